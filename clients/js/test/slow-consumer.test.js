// A reader that stops reading is closed by the gateway as a slow consumer
// (its send queue, GATEWAY_SEND_QUEUE_BYTES, overflows); GatewayClient
// reconnects and resumes with nothing lost.
//
// The reader stalls by pausing the TCP socket under the ws instance (the
// test passes a WebSocket subclass that records its instances).

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
} from "./harness.js";

const cleanup = [];
after(async () => {
  for (const step of cleanup.reverse()) await step().catch(() => {});
});

const ROOM = "project:1";
const BODY = "x".repeat(16000);

/**
 * Subscribes, stalls the reader, commits with `commitWhileStalled` until the
 * gateway has closed the connection as a slow consumer, reads again, and
 * checks the resumed stream against the outbox. Returns what happened.
 */
async function stallAndResume(commitWhileStalled) {
  const db = await freshDatabase();
  cleanup.push(() => db.drop());
  const gateway = await Gateway.start({ databaseUrl: db.url, port: await freePort(), env: { GATEWAY_SEND_QUEUE_BYTES: "65536" } });
  cleanup.push(() => gateway.stop("SIGKILL"));
  const sockets = [];
  class RecordingWebSocket extends WebSocket {
    constructor(...args) {
      super(...args);
      sockets.push(this);
    }
  }
  const record = recordingClient(
    GatewayClient,
    gateway.wsUrl,
    { token: () => makeToken(), WebSocket: RecordingWebSocket, encoding: "none", reconnect: { minDelayMs: 100, maxDelayMs: 1000 } },
    [ROOM],
  );
  cleanup.push(async () => record.client.close());
  await record.waitSubscribed();
  await db.pool.query("insert into items (id, project_id, body) values (1, 1, 'before the stall')");
  await eventually("the first change", () => record.got.get(ROOM).length === 1);

  const stalled = sockets.at(-1);
  stalled._socket.pause();
  const slowClosed = async () => {
    const line = (await gateway.metrics()).split("\n").find((l) => l.startsWith("ws_gateway_slow_consumer_disconnects_total"));
    return Number(line?.split(" ").at(-1) ?? 0) >= 1;
  };
  // How much the kernel buffers for a stalled loopback socket varies (tens
  // of MB with receive-buffer autotuning): commit until the gateway says.
  const next = { id: 2 };
  for (let step = 0; !(step % 10 === 0 && (await slowClosed())); step++) {
    assert.ok(next.id < 10000, "the gateway closes a stalled reader before 160 MB are committed for it");
    await commitWhileStalled(db.pool, next);
  }
  // Everything committed has been dispatched: what follows is the resume.
  const head = await outboxHead(db.pool);
  await eventually("the gateway to dispatch what was committed", async () => {
    const { body } = await gateway.health();
    return BigInt(body.feed.position) >= BigInt(head);
  });
  const readAgainAt = Date.now();
  stalled._socket.resume(); // the backlog, then (if the gateway could write it) the close frame

  await eventually("the stalled connection to end", () => record.states.some((s) => s.state === "disconnected"));
  const close = record.states.find((s) => s.state === "disconnected");
  await eventually("the client to resume", () => record.subscribed.some((s) => s.resumed && s.at >= close.at)).catch((error) => {
    const again = record.states.filter((s) => s.code === 4008 && s.at > close.at).length;
    throw new Error(
      `${error.message}; ${again} more connections were closed 4008 before their subscribe was answered` +
        (again > 0 ? " (the gateway's replay of the missed changes overflowed the new connection's send queue)" : "") +
        `; states: ${JSON.stringify(record.states.slice(0, 8))}`,
    );
  });
  const resumedAt = record.subscribed.find((s) => s.resumed && s.at >= close.at).at;
  // Changes committed after the close arrive too.
  await db.pool.query("insert into items (id, project_id, body) select g, 1, 'after' from generate_series($1::bigint, $2::bigint) g", [
    next.id,
    next.id + 99,
  ]);
  const want = await outboxPositions(db.pool, ROOM, record.firstPosition.get(ROOM));
  await eventually("every change to arrive", () => record.got.get(ROOM).length >= want.length, 60000);
  const c = compare(want, record.got.get(ROOM));
  const backlog = record.times.get(ROOM).filter((t) => t >= readAgainAt && t <= close.at).length;
  assert.deepEqual(record.got.get(ROOM), want, "every change once, in order");
  assert.ok(sockets.length >= 2, "a new connection after the close");
  return { close, c, backlog, readAgainAt, resumedAt, sockets: sockets.length, duplicatesDropped: record.client.stats.duplicates };
}

function describeResult(name, r) {
  console.log(
    `\n${name}: expected ${r.c.expected} / delivered ${r.c.delivered} / duplicates ${r.c.duplicates} ` +
      `(dropped at the seam: ${r.duplicatesDropped}); the stalled connection ended ${r.close.code} ` +
      `${r.close.at - r.readAgainAt} ms after it read again (${r.backlog} changes read from its backlog first); ` +
      `live again ${r.resumedAt - r.close.at} ms after the close (first retry in ${r.close.reconnectInMs} ms); ${r.sockets} connections`,
  );
}

test("a reader that stalls while a burst bigger than its queue arrives is closed 4008, reconnects at once, loses nothing", { timeout: 90000 }, async () => {
  // One transaction of 10 rows of 16 KB: the gateway queues its units at
  // once, past the 64 KB bound, and closes with 4008 while the socket still
  // has room for the close frame.
  const r = await stallAndResume(async (pool, next) => {
    await pool.query("insert into items (id, project_id, body) select g, 1, $3 from generate_series($1::bigint, $2::bigint) g", [
      next.id,
      next.id + 9,
      BODY,
    ]);
    next.id += 10;
  });
  describeResult("4008, burst while stalled", r);
  // The reader resumes only once the gateway counted the close; the close
  // frame still waits behind the backlog in the gateway's kernel, and the
  // gateway keeps the socket open (reading and dropping the client's acks)
  // for its slow-consumer grace, so the frame arrives.
  assert.equal(r.close.code, 4008, `closed ${r.close.code} ${r.close.reason}`);
  assert.match(r.close.reason, /slow consumer/);
  assert.equal(r.close.reconnectInMs, 0, "4008: the first reconnect goes at once");
});

test("a reader that stalls until its socket and queue are full is closed as slow and resumes with nothing lost", { timeout: 90000 }, async () => {
  // Transactions of 2 rows of 16 KB, under the queue's bound: only a reader
  // that stopped reading falls behind. The gateway's 4008 close frame waits
  // behind the full socket; a reader that reads again within the gateway's
  // slow-consumer grace gets it and reconnects at once.
  const r = await stallAndResume(async (pool, next) => {
    await pool.query("insert into items (id, project_id, body) select g, 1, $3 from generate_series($1::bigint, $2::bigint) g", [
      next.id,
      next.id + 1,
      BODY,
    ]);
    next.id += 2;
  });
  describeResult("slow consumer, socket full", r);
  assert.equal(r.close.code, 4008, `closed ${r.close.code} ${r.close.reason}`);
  assert.match(r.close.reason, /slow consumer/);
  assert.equal(r.close.reconnectInMs, 0, "4008: the first reconnect goes at once");
});
