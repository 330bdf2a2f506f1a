// Tokens that expire every 3 s (GATEWAY_JWT_LEEWAY_S=0): a token function
// refreshed in band keeps the stream going with no 4001; and when a refresh
// is refused, the 4001 that follows is recovered from with nothing lost.

import assert from "node:assert/strict";
import { after, test } from "node:test";
import WebSocket from "ws";
import { GatewayClient } from "../client.js";
import { Gateway, compare, eventually, freePort, freshDatabase, makeToken, outboxPositions, recordingClient } from "./harness.js";

const cleanup = [];
after(async () => {
  for (const step of cleanup.reverse()) await step().catch(() => {});
});

const ROOM = "project:1";
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

let shared;
async function gateway() {
  if (!shared) {
    const db = await freshDatabase();
    cleanup.push(() => db.drop());
    const gw = await Gateway.start({ databaseUrl: db.url, port: await freePort(), env: { GATEWAY_JWT_LEEWAY_S: "0" } });
    cleanup.push(() => gw.stop("SIGKILL"));
    shared = { db, gw, nextId: 1 };
  }
  return shared;
}

/** Commits one change to ROOM every `everyMs` for `forMs`. */
async function steadyWrites(env, forMs, everyMs = 20) {
  const end = Date.now() + forMs;
  while (Date.now() < end) {
    await env.db.pool.query("insert into items (id, project_id) values ($1, 1)", [env.nextId++]);
    await sleep(everyMs);
  }
}

function largestGap(times) {
  let gap = 0;
  for (let i = 1; i < times.length; i++) gap = Math.max(gap, times[i] - times[i - 1]);
  return gap;
}

test("tokens that expire in 3 s, refreshed in band: the stream never stops for 10 s", { timeout: 60000 }, async () => {
  const env = await gateway();
  let asked = 0;
  const record = recordingClient(
    GatewayClient,
    env.gw.wsUrl,
    {
      token: async () => {
        asked++;
        return makeToken({ expiresInS: 3 });
      },
      WebSocket,
      reconnect: { minDelayMs: 100, maxDelayMs: 1000 },
    },
    [ROOM],
  );
  cleanup.push(async () => record.client.close());
  await record.waitSubscribed();
  await steadyWrites(env, 10000);
  const want = await outboxPositions(env.db.pool, ROOM, record.firstPosition.get(ROOM));
  await eventually("every change", () => record.got.get(ROOM).length >= want.length);
  const c = compare(want, record.got.get(ROOM));
  const gap = largestGap(record.times.get(ROOM));
  console.log(
    `\nshort-lived tokens (3 s, leeway 0) for 10 s: expected ${c.expected} / delivered ${c.delivered} / duplicates ${c.duplicates}; ` +
      `token() asked ${asked} times, ${record.client.stats.tokenRefreshes} in-band refreshes, ` +
      `closes: ${record.states.filter((s) => s.state === "disconnected").length}, largest gap between changes ${gap} ms`,
  );
  assert.deepEqual(
    record.states.filter((s) => s.state === "disconnected"),
    [],
    "no close at all: the token was refreshed before every exp",
  );
  assert.ok(record.client.stats.tokenRefreshes >= 4, `refreshed in band ${record.client.stats.tokenRefreshes} times in 10 s`);
  assert.deepEqual(record.clientErrors, []);
  assert.ok(gap < 1000, `the stream never stopped (largest gap ${gap} ms)`);
  assert.deepEqual(record.got.get(ROOM), want);
  record.client.close();
});

test("a refused refresh ends in 4001; the client reconnects at once with a fresh token and loses nothing", { timeout: 60000 }, async () => {
  const env = await gateway();
  let asked = 0;
  // Every token is for another subject: the gateway refuses each in-band
  // refresh ("the new token is for another subject"), so the connection
  // ends at exp (4001) and the client must reconnect.
  const record = recordingClient(
    GatewayClient,
    env.gw.wsUrl,
    {
      token: () => makeToken({ sub: `user-${asked++}`, expiresInS: 2 }),
      WebSocket,
      reconnect: { minDelayMs: 100, maxDelayMs: 1000 },
    },
    [ROOM],
  );
  cleanup.push(async () => record.client.close());
  await record.waitSubscribed();
  await steadyWrites(env, 5000);
  const want = await outboxPositions(env.db.pool, ROOM, record.firstPosition.get(ROOM));
  await eventually("every change", () => record.got.get(ROOM).length >= want.length);
  const expiries = record.states.filter((s) => s.state === "disconnected" && s.code === 4001);
  const c = compare(want, record.got.get(ROOM));
  const reconnects = expiries.map((close) => {
    const live = record.subscribed.find((s) => s.at >= close.at && s.resumed);
    return live ? live.at - close.at : null;
  });
  console.log(
    `4001 recovery: expected ${c.expected} / delivered ${c.delivered} / duplicates ${c.duplicates}; ` +
      `${expiries.length} closes 4001, rooms live again after ${reconnects.join(", ")} ms; ` +
      `refusals seen: ${record.clientErrors.filter((e) => e.code === "invalid_token").length}`,
  );
  assert.ok(expiries.length >= 1, "the refused refreshes ended in 4001");
  assert.ok(
    expiries.every((s) => s.reconnectInMs === 0),
    "after 4001 the first reconnect goes at once (with a fresh token)",
  );
  assert.ok(record.clientErrors.some((e) => e.code === "invalid_token"), "the refused refresh was reported");
  assert.deepEqual(record.got.get(ROOM), want);
  record.client.close();
});
