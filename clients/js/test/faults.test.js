// Nothing lost, nothing duplicated, in commit order, through GatewayClient,
// across every gateway fault: 1,500 commits into two rooms from concurrent
// writers while the gateway is SIGKILLed and restarted on the same address,
// then SIGTERMed (1001) and restarted, then its LISTEN connection is killed.
// Each room's onChange stream is compared with the outbox.

import assert from "node:assert/strict";
import { after, test } from "node:test";
import WebSocket from "ws";
import { GatewayClient } from "../client.js";
import {
  Gateway,
  compare,
  eventually,
  freePort,
  freshDatabase,
  makeToken,
  outboxHead,
  outboxPositions,
  recordingClient,
  startWorkload,
} from "./harness.js";

const ROOMS = ["project:0", "project:1"];
const TOTAL = 1500;

const cleanup = [];
after(async () => {
  for (const step of cleanup.reverse()) await step().catch(() => {});
});

/** The time from `fault` (the signal, or the kill) until the client had
 * every room live again, and until the first change committed after the
 * fault took effect (`head`: the outbox's end then) reached onChange. */
function recovery(record, fault) {
  const down = record.states.find((s) => s.at >= fault.at && s.state === "disconnected");
  const live = ROOMS.map((room) => record.subscribed.find((s) => s.at >= fault.at && s.room === room && s.resumed));
  // The first change committed after the fault, in either room.
  const firstAfter = ROOMS.map((room) => {
    const index = record.got.get(room).findIndex((p) => BigInt(p) > BigInt(fault.head));
    return index < 0 ? Infinity : record.times.get(room)[index];
  });
  return {
    disconnectedAfterMs: down ? down.at - fault.at : null,
    reconnectInMs: down ? down.reconnectInMs : null,
    liveAgainAfterMs: live.every(Boolean) && down ? Math.max(...live.map((s) => s.at)) - fault.at : null,
    sinceGatewayLiveMs: live.every(Boolean) && fault.gatewayLiveAt ? Math.max(...live.map((s) => s.at)) - fault.gatewayLiveAt : null,
    firstNewChangeAfterMs: Number.isFinite(Math.min(...firstAfter)) ? Math.min(...firstAfter) - fault.at : null,
  };
}

test("two rooms, 1,500 commits through SIGKILL, SIGTERM (1001) and a killed LISTEN connection: each change once, in order", { timeout: 150000 }, async () => {
  const db = await freshDatabase();
  cleanup.push(() => db.drop());
  const port = await freePort();
  let gateway = await Gateway.start({ databaseUrl: db.url, port });
  cleanup.push(() => gateway.stop("SIGKILL"));

  let tokens = 0;
  const record = recordingClient(
    GatewayClient,
    gateway.wsUrl,
    {
      token: async () => {
        tokens++;
        return makeToken({ rooms: ["project:*"] });
      },
      WebSocket,
      reconnect: { minDelayMs: 100, maxDelayMs: 1000 },
    },
    ROOMS,
  );
  cleanup.push(async () => record.client.close());
  await record.waitSubscribed();

  const work = startWorkload(db.url, { total: TOTAL, rooms: ROOMS.length, writers: 4 });
  cleanup.push(() => work.stop());
  const faults = [];

  // 1. SIGKILL: no close frame; writers go on while no gateway runs.
  await work.waitCommitted(300);
  faults.push({ name: "SIGKILL, restarted on the same address", at: Date.now() });
  await gateway.stop("SIGKILL");
  faults.at(-1).head = await outboxHead(db.pool);
  await work.waitCommitted(550);
  gateway = await Gateway.start({ databaseUrl: db.url, port });
  faults.at(-1).gatewayLiveAt = Date.now();
  await eventually("the client to resume after SIGKILL", () => recovery(record, faults.at(-1)).liveAgainAfterMs !== null);

  // 2. SIGTERM: the gateway says 1001, "reconnect and resume".
  await work.waitCommitted(850);
  faults.push({ name: "SIGTERM (1001), restarted", at: Date.now() });
  const stopped = await gateway.stop("SIGTERM");
  faults.at(-1).head = await outboxHead(db.pool);
  assert.equal(stopped.code, 0, `graceful stop exits 0:\n${gateway.log()}`);
  gateway = await Gateway.start({ databaseUrl: db.url, port });
  faults.at(-1).gatewayLiveAt = Date.now();
  await eventually("the client to resume after SIGTERM", () => recovery(record, faults.at(-1)).liveAgainAfterMs !== null);
  const closes = record.states.filter((s) => s.state === "disconnected").map((s) => s.code);
  assert.ok(closes.includes(1001), `the client saw the gateway's 1001: ${closes}`);

  // 3. The gateway's LISTEN connection dies; clients stay connected.
  await work.waitCommitted(1150);
  const connectionsBefore = record.client.stats.connections;
  faults.push({ name: "LISTEN connection killed", at: Date.now() });
  const { rows } = await db.pool.query(
    "select pg_terminate_backend(pid) as killed from pg_stat_activity where application_name = 'ws-gateway feed' and datname = current_database()",
  );
  faults.at(-1).head = await outboxHead(db.pool);
  assert.ok(rows.some((r) => r.killed), "found and killed the feed's LISTEN connection");

  await work.done;
  const want = new Map();
  for (const room of ROOMS) want.set(room, await outboxPositions(db.pool, room, record.firstPosition.get(room)));
  await eventually(
    "every committed change to reach onChange",
    () => ROOMS.every((room) => record.got.get(room).length >= want.get(room).length),
    60000,
  );
  const { body: health } = await gateway.health();
  assert.ok(health.feed.reconnects >= 1, `the feed reconnected: ${JSON.stringify(health.feed)}`);
  assert.equal(record.client.stats.connections, connectionsBefore, "a feed fault does not drop clients");

  // The report: per fault, the changes committed between it and the next.
  const bounds = [...faults.map((f) => f.head), null];
  const rowsOut = [];
  for (let i = 0; i < faults.length; i++) {
    let expected = 0;
    let delivered = 0;
    let duplicates = 0;
    for (const room of ROOMS) {
      const inWindow = (p) => BigInt(p) > BigInt(bounds[i]) && (bounds[i + 1] === null || BigInt(p) <= BigInt(bounds[i + 1]));
      const c = compare(want.get(room).filter(inWindow), record.got.get(room).filter(inWindow));
      expected += c.expected;
      delivered += c.delivered;
      duplicates += c.duplicates;
    }
    const r = recovery(record, faults[i]);
    rowsOut.push({ fault: faults[i].name, expected, delivered, duplicates, ...r });
  }
  console.log("\nGatewayClient under gateway faults (per fault: the changes committed from it to the next fault, both rooms):");
  for (const row of rowsOut) {
    const times =
      row.disconnectedAfterMs === null
        ? "client stayed connected"
        : `client saw the close after ${row.disconnectedAfterMs} ms (first retry in ${row.reconnectInMs} ms); ` +
          `rooms live again ${row.liveAgainAfterMs} ms after the fault, ${row.sinceGatewayLiveMs} ms after the new gateway was live`;
    console.log(
      `  ${row.fault}: expected ${row.expected} / delivered ${row.delivered} / duplicates ${row.duplicates}; ${times}; ` +
        `first change committed after the fault delivered ${row.firstNewChangeAfterMs} ms after it`,
    );
  }
  console.log(`  client: ${JSON.stringify(record.client.stats)}, token() asked ${tokens} times`);

  for (const room of ROOMS) {
    const c = compare(want.get(room), record.got.get(room));
    assert.deepEqual(
      { missing: c.missing.slice(0, 10), unexpected: c.unexpected.slice(0, 10), duplicates: c.duplicates, inOrder: c.inOrder },
      { missing: [], unexpected: [], duplicates: 0, inOrder: true },
      `${room}: received ${c.delivered} of ${c.expected}`,
    );
    assert.deepEqual(record.got.get(room), want.get(room), `${room}: the outbox's positions, in order, once`);
  }
  const total = ROOMS.reduce((n, room) => n + want.get(room).length, 0);
  assert.equal(total, TOTAL, "every commit is one change in one of the two rooms");
  assert.deepEqual(record.errors, []);
  assert.deepEqual(record.resets, []);
  assert.ok(tokens >= 3, "token() asked again on every reconnect");
});
