// A resume point older than GATEWAY_HISTORY_RETENTION: the gateway has
// pruned what followed it, so onReset fires (refetch), and the stream goes
// on from where the subscription went live, also across a later reconnect.

import assert from "node:assert/strict";
import { after, test } from "node:test";
import WebSocket from "ws";
import { GatewayClient } from "../client.js";
import { Gateway, eventually, freePort, freshDatabase, makeToken, outboxPositions } from "./harness.js";

const cleanup = [];
after(async () => {
  for (const step of cleanup.reverse()) await step().catch(() => {});
});

const ROOM = "project:1";

test("a resume from pruned history reaches onReset and the stream goes on", { timeout: 60000 }, async () => {
  const db = await freshDatabase();
  cleanup.push(() => db.drop());
  // Ten changes, the first five two days old (as if committed then).
  await db.pool.query("insert into items (id, project_id) select g, 1 from generate_series(1, 10) g");
  const old = await outboxPositions(db.pool, ROOM);
  assert.equal(old.length, 10);
  await db.pool.query("update realtime.changes set committed_at = now() - interval '2 days' where position <= $1", [old[4]]);
  // The gateway prunes what is older than its retention (1 minute) at start.
  const port = await freePort();
  const env = { GATEWAY_HISTORY_RETENTION: "1m" };
  let gateway = await Gateway.start({ databaseUrl: db.url, port, env });
  cleanup.push(() => gateway.stop("SIGKILL"));
  await eventually("the gateway to prune the old changes", async () => {
    const { rows } = await db.pool.query("select pruned_through::text as p from realtime.settings");
    return BigInt(rows[0].p) >= BigInt(old[4]);
  });

  // A page that last ran two days ago: its stored position is the first change.
  const stored = new Map([[ROOM, old[0]]]);
  const positions = { get: (room) => stored.get(room), set: (room, p) => stored.set(room, p) };
  const got = [];
  const resets = [];
  const subscribed = [];
  const client = new GatewayClient(gateway.wsUrl, {
    token: () => makeToken(),
    WebSocket,
    positions,
    reconnect: { minDelayMs: 100, maxDelayMs: 1000 },
  });
  cleanup.push(async () => client.close());
  const sub = client.subscribe(ROOM, {
    onChange: (change) => got.push(change.position),
    onReset: (info) => resets.push(info),
    onSubscribed: (info) => subscribed.push(info),
  });
  await eventually("onReset", () => resets.length === 1);
  assert.deepEqual(resets[0], { reason: "history_expired", room: ROOM, position: subscribed[0].position });
  assert.equal(subscribed[0].resumed, true);
  assert.deepEqual(got, [], "nothing of the pruned stretch is delivered after a reset");
  assert.equal(sub.position, subscribed[0].position, "after a reset the subscription goes on from where it went live");
  assert.equal(stored.get(ROOM), sub.position, "and that is what positions.set stored");

  // The stream goes on...
  await db.pool.query("insert into items (id, project_id) select g, 1 from generate_series(11, 20) g");
  await eventually("the changes after the reset", () => got.length === 10);
  // ...also across a restart: the resume asks only for what followed.
  const stopped = await gateway.stop("SIGTERM");
  assert.equal(stopped.code, 0);
  await db.pool.query("insert into items (id, project_id) select g, 1 from generate_series(21, 30) g");
  gateway = await Gateway.start({ databaseUrl: db.url, port, env });
  await db.pool.query("insert into items (id, project_id) select g, 1 from generate_series(31, 40) g");
  const want = await outboxPositions(db.pool, ROOM, subscribed[0].position);
  await eventually("every change after the reset", () => got.length >= want.length);
  assert.deepEqual(got, want, "every change after the reset, once, in order");
  assert.equal(resets.length, 1, "no second reset on the resume after it");
  assert.equal(subscribed.length, 2);
  console.log(`\nreset: onReset once (history_expired), then expected ${want.length} / delivered ${got.length} across a restart`);
  client.close();
});
