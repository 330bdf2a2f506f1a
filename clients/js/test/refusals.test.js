// Every refusal an application can cause, as GatewayClient reports it:
// a token the gateway refuses at the upgrade (401: backoff, reported through
// "state", recovered once the token function gives a good one), rooms the
// token does not grant (onError ends that subscription only), and names the
// gateway would refuse (refused locally).

import assert from "node:assert/strict";
import { after, test } from "node:test";
import WebSocket from "ws";
import { GatewayClient } from "../client.js";
import { Gateway, eventually, freePort, freshDatabase, makeToken } from "./harness.js";

const cleanup = [];
after(async () => {
  for (const step of cleanup.reverse()) await step().catch(() => {});
});

let shared;
async function gateway() {
  if (!shared) {
    const db = await freshDatabase();
    cleanup.push(() => db.drop());
    const gw = await Gateway.start({ databaseUrl: db.url, port: await freePort() });
    cleanup.push(() => gw.stop("SIGKILL"));
    shared = { db, gw };
  }
  return shared;
}

test("a refused token (401 at the upgrade) backs off, is reported, and the client recovers with a good one", { timeout: 30000 }, async () => {
  const { db, gw } = await gateway();
  let good = false;
  const states = [];
  const client = new GatewayClient(gw.wsUrl, {
    token: () => (good ? makeToken() : makeToken({}, "a-secret-the-gateway-does-not-know-0123456789")),
    WebSocket,
    reconnect: { minDelayMs: 50, maxDelayMs: 400 },
  });
  cleanup.push(async () => client.close());
  client.on("state", (s) => states.push(s));
  const got = [];
  let subscribed = false;
  client.subscribe("project:1", { onChange: (c) => got.push(c.position), onSubscribed: () => (subscribed = true) });
  await eventually("four refused attempts", () => states.filter((s) => s.state === "disconnected").length >= 4);
  const refused = states.filter((s) => s.state === "disconnected");
  assert.ok(!states.some((s) => s.state === "connected"));
  assert.match(refused[0].reason, /401/, `the refusal is named: ${refused[0].reason}`);
  assert.ok(
    refused.every((s, n) => s.reconnectInMs >= 0 && s.reconnectInMs <= Math.min(400, 50 * 2 ** n)),
    `backoff with full jitter: ${refused.map((s) => s.reconnectInMs)}`,
  );
  good = true;
  await eventually("connected with a good token", () => client.state === "connected");
  // Subscribed, not only connected: a row committed before the gateway
  // took the subscription is before its starting position (CI saw that).
  await eventually("the room subscribed", () => subscribed);
  await db.pool.query("insert into items (id, project_id) values (1, 1)");
  await eventually("a change", () => got.length === 1);
  client.close();
});

test("rooms the token does not grant end through onError; the others go on", { timeout: 30000 }, async () => {
  const { db, gw } = await gateway();
  const client = new GatewayClient(gw.wsUrl, { token: () => makeToken({ rooms: ["project:2"] }), WebSocket });
  cleanup.push(async () => client.close());
  const errors = [];
  const got = [];
  const live = [];
  const subs = ["project:3", "__internal", "project:2", "bad room"].map((room) =>
    client.subscribe(room, {
      onError: (e) => errors.push(e),
      onChange: (c) => got.push(`${room}@${c.position}`),
      onSubscribed: () => live.push(room),
    }),
  );
  await eventually("the refusals", () => errors.length === 3);
  await eventually("project:2 live", () => live.includes("project:2"));
  const byRoom = Object.fromEntries(errors.map((e) => [e.room, e.code]));
  assert.deepEqual(byRoom, { "bad room": "invalid_room", "project:3": "forbidden", __internal: "forbidden" });
  assert.ok(errors.every((e) => typeof e.message === "string" && e.message.length > 0));
  assert.deepEqual(
    subs.map((s) => s.state),
    ["ended", "ended", "subscribed", "ended"],
  );
  await db.pool.query("insert into items (id, project_id) values (20, 3), (21, 2)");
  await eventually("the granted room's change", () => got.length === 1);
  assert.match(got[0], /^project:2@/);
  client.close();
});
