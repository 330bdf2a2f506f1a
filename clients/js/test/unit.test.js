// Unit tests of the client's logic against an in-memory socket: backoff,
// ordering of asynchronous decompression, dedup at a seam, correlation of
// refusals, acks, heartbeat, tokens, positions. The real gateway is in the
// other test files.

import assert from "node:assert/strict";
import { afterEach, describe, mock, test } from "node:test";
import zlib from "node:zlib";
import { GatewayClient, backoffDelay, refreshDelay, tokenTimes } from "../client.js";
import { change, fakeSocketClass, turn, until } from "./fake-socket.js";
import { makeToken } from "./harness.js";

const clients = [];
function client(url, options) {
  const c = new GatewayClient(url, options);
  clients.push(c);
  return c;
}
afterEach(() => {
  for (const c of clients.splice(0)) c.close();
  mock.timers.reset();
  mock.restoreAll();
});

/** A client on a fake socket, welcomed, with `rooms` subscribed (the fake
 * answers each subscribe with `subscribed` at `position`). */
async function connected({ rooms = ["project:1"], position = "10", options = {}, since, welcome = {} } = {}) {
  const Socket = fakeSocketClass();
  const got = new Map(rooms.map((r) => [r, []]));
  const events = [];
  const c = client("ws://gateway.test/ws", { WebSocket: Socket, reconnect: { minDelayMs: 1000, maxDelayMs: 8000 }, ...options });
  c.on("state", (e) => events.push(e));
  const subs = rooms.map((room) =>
    c.subscribe(room, {
      since,
      onChange: (ch) => got.get(room).push(ch.position),
      onReset: (r) => events.push({ reset: r }),
      onSubscribed: (s) => events.push({ subscribed: s }),
      onError: (e) => events.push({ error: e }),
    }),
  );
  await turn();
  const socket = Socket.last;
  socket.welcome(welcome);
  for (const room of rooms) socket.deliver({ type: "subscribed", room, position });
  return { c, Socket, socket, got, events, subs };
}

function gzip(value) {
  const bytes = zlib.gzipSync(JSON.stringify(value));
  return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
}

describe("backoff", () => {
  test("full jitter stays within [0, min(max, min * 2^n)]", () => {
    const reconnect = { minDelayMs: 500, maxDelayMs: 20000 };
    for (let n = 0; n < 12; n++) {
      const ceiling = Math.min(20000, 500 * 2 ** n);
      assert.equal(backoffDelay(n, reconnect, () => 0), 0);
      const top = backoffDelay(n, reconnect, () => 0.999999);
      assert.ok(top <= ceiling && top >= ceiling - 1, `attempt ${n}: ${top} vs ${ceiling}`);
      for (let i = 0; i < 200; i++) {
        const d = backoffDelay(n, reconnect);
        assert.ok(d >= 0 && d <= ceiling, `attempt ${n}: ${d} outside [0, ${ceiling}]`);
      }
    }
    // Jitter really spreads: 1,000 draws at the cap are not all alike.
    const draws = new Set(Array.from({ length: 1000 }, () => backoffDelay(20, reconnect)));
    assert.ok(draws.size > 500, `only ${draws.size} distinct delays`);
    assert.equal(backoffDelay(1000, reconnect, () => 0.5), 10000, "huge attempts stay at the cap");
  });

  test("after 1001 and 4008 the first reconnect is immediate; other closes back off", async () => {
    mock.method(Math, "random", () => 0.75);
    const { socket, Socket, events } = await connected();
    socket.deliver(change("project:1", 11)); // the connection made progress: healthy
    socket.serverClose(1001, "gateway shutting down; reconnect and resume from your last position");
    await until(() => Socket.instances.length === 2, "a reconnect at once");
    const first = events.filter((e) => e.state === "disconnected");
    assert.equal(first.at(-1).code, 1001);
    assert.equal(first.at(-1).reconnectInMs, 0);
    // The new connection fails before its welcome: now it backs off.
    Socket.last.serverClose(1006, "");
    await turn();
    const second = events.filter((e) => e.state === "disconnected").at(-1);
    assert.equal(second.code, 1006);
    assert.equal(second.reconnectInMs, Math.floor(0.75 * 2000), "attempt 1: min * 2 ceiling, jittered");
  });

  test("a 4008 after a healthy connection reconnects at once and resumes from the last position", async () => {
    const { socket, Socket, events } = await connected();
    socket.deliver(change("project:1", 11));
    socket.deliver(change("project:1", 12));
    socket.serverClose(4008, "slow consumer: send queue full; resume from your last position");
    await until(() => Socket.instances.length === 2, "a reconnect");
    assert.equal(events.filter((e) => e.state === "disconnected").at(-1).reconnectInMs, 0);
    const next = Socket.last;
    next.welcome();
    assert.deepEqual(next.sentOf("subscribe"), [{ type: "subscribe", room: "project:1", since: "12" }]);
  });

  test("1008 and refused upgrades back off and are reported with their code", async () => {
    mock.method(Math, "random", () => 0.5);
    const { socket, events } = await connected();
    socket.serverClose(1008, "rate limit exceeded");
    await turn();
    const event = events.filter((e) => e.state === "disconnected").at(-1);
    assert.equal(event.code, 1008);
    assert.equal(event.reason, "rate limit exceeded");
    assert.equal(event.reconnectInMs, 500, "backoff, not at once");
  });
});

describe("frames in arrival order", () => {
  test("a slow big compressed frame is handled before the small plain frame that followed it", async () => {
    const { socket, got } = await connected({ options: { encoding: "gzip" } });
    const big = [];
    for (let p = 11; p <= 30010; p++) big.push(change("project:1", p, { row: { id: p, body: "x".repeat(40) } }));
    const frame = gzip({ type: "batch", changes: big });
    socket.deliver(frame); // decompressing this takes a while...
    socket.deliver(change("project:1", 30011)); // ...this plain one is ready at once
    socket.deliver(gzip(change("project:1", 30012))); // a small compressed one
    socket.deliver(change("project:1", 30013));
    await new Promise((resolve) => {
      const check = () => (got.get("project:1").length >= 30003 ? resolve() : setTimeout(check, 5));
      check();
    });
    const positions = got.get("project:1").map(Number);
    assert.equal(positions.length, 30003);
    assert.ok(
      positions.every((p, i) => p === 11 + i),
      "every change in arrival (= commit) order",
    );
  });

  test("brotli frames decode in Node (node:zlib)", async () => {
    const { socket, got } = await connected({ options: { encoding: "br" } });
    assert.equal(socket.url.searchParams.get("encoding"), "br");
    const bytes = zlib.brotliCompressSync(JSON.stringify(change("project:1", 11)));
    socket.deliver(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
    socket.deliver(change("project:1", 12));
    await new Promise((resolve) => {
      const check = () => (got.get("project:1").length >= 2 ? resolve() : setTimeout(check, 5));
      check();
    });
    assert.deepEqual(got.get("project:1"), ["11", "12"]);
  });

  test("an undecodable frame ends the connection (nothing after it is handled) and the client resumes", async () => {
    const { socket, Socket, got, events } = await connected({ options: { encoding: "gzip" } });
    socket.deliver(change("project:1", 11));
    socket.deliver(new Uint8Array([1, 2, 3, 4]).buffer);
    socket.deliver(change("project:1", 13)); // after a gap: must not be delivered
    await new Promise((resolve) => {
      const check = () => (Socket.instances.length > 1 || events.some((e) => e.state === "disconnected") ? resolve() : setTimeout(check, 5));
      check();
    });
    assert.deepEqual(got.get("project:1"), ["11"]);
    const closed = events.find((e) => e.state === "disconnected");
    assert.equal(closed.code, 1007);
    assert.match(closed.reason, /undecodable/);
  });
});

describe("exactly once across seams", () => {
  test("a batch overlapping the position delivers only what is new; positions compare as big integers", async () => {
    const { socket, Socket, got, events, subs } = await connected({ since: "100", position: "100" });
    assert.deepEqual(Socket.instances[0].sentOf("subscribe"), [{ type: "subscribe", room: "project:1", since: "100" }]);
    assert.deepEqual(events.find((e) => e.subscribed).subscribed, { position: "100", resumed: true, room: "project:1" });
    socket.deliver({ type: "batch", changes: [98, 99, 100, 101, 102, 103].map((p) => change("project:1", p)) });
    socket.deliver(change("project:1", 102)); // a repeat
    socket.deliver(change("project:1", 104));
    assert.deepEqual(got.get("project:1"), ["101", "102", "103", "104"]);
    assert.equal(subs[0].position, "104");
    // Reconnect: resumes after the last delivered change, the seam is exact.
    socket.serverClose(1006, "");
    await until(() => Socket.instances.length === 2, "a reconnect", 3000);
    const next = Socket.last;
    next.welcome();
    assert.deepEqual(next.sentOf("subscribe"), [{ type: "subscribe", room: "project:1", since: "104" }]);
    next.deliver({ type: "subscribed", room: "project:1", position: "110" });
    next.deliver({ type: "batch", changes: [103, 104, 105].map((p) => change("project:1", p)) });
    assert.deepEqual(got.get("project:1"), ["101", "102", "103", "104", "105"]);
  });

  test("positions beyond 2^53 and of different lengths compare numerically", async () => {
    const { socket, got } = await connected({ since: "9007199254740993", position: "9007199254740993" });
    socket.deliver({
      type: "batch",
      changes: ["9007199254740992", "9007199254740993", "9007199254740994"].map((p) => change("project:1", p)),
    });
    assert.deepEqual(got.get("project:1"), ["9007199254740994"]);
    const small = await connected({ since: "9", position: "9" });
    small.socket.deliver(change("project:1", "10")); // "10" < "9" as strings
    assert.deepEqual(small.got.get("project:1"), ["10"]);
  });

  test("events are delivered with changes in position order", async () => {
    const { socket, got } = await connected();
    socket.deliver(change("project:1", 11));
    socket.deliver({ type: "event", room: "project:1", position: "12", event: "moved", payload: { a: 1 }, committed_at: "x" });
    socket.deliver({ type: "event", room: "project:1", position: "12", event: "moved", payload: { a: 1 }, committed_at: "x" });
    assert.deepEqual(got.get("project:1"), ["11", "12"]);
  });

  test("frames for a room before its `subscribed` on this connection are not delivered", async () => {
    const Socket = fakeSocketClass();
    const got = [];
    const c = client("ws://gateway.test/ws", { WebSocket: Socket });
    c.subscribe("project:1", { onChange: (ch) => got.push(ch.position) });
    await turn();
    Socket.last.welcome();
    Socket.last.deliver(change("project:1", 5)); // not live yet
    Socket.last.deliver({ type: "subscribed", room: "project:1", position: "7" });
    Socket.last.deliver(change("project:1", 7));
    Socket.last.deliver(change("project:1", 8));
    assert.deepEqual(got, ["8"]);
  });

  test("a reset reaches onReset; the stream goes on and a later resume does not ask for the lost history", async () => {
    const { socket, Socket, got, events, subs } = await connected({ since: "5", position: "50" });
    socket.deliver({ type: "reset", room: "project:1", reason: "history_expired" });
    assert.deepEqual(events.find((e) => e.reset).reset, { reason: "history_expired", room: "project:1", position: "50" });
    assert.equal(subs[0].position, "50");
    socket.deliver(change("project:1", 51));
    assert.deepEqual(got.get("project:1"), ["51"]);
    socket.serverClose(1001, "");
    await until(() => Socket.instances.length === 2, "a reconnect");
    Socket.last.welcome();
    assert.equal(Socket.last.sentOf("subscribe")[0].since, "51");
  });
});

describe("refusals", () => {
  test("a refused subscribe ends that subscription only (errors correlate with subscribes in order)", async () => {
    const Socket = fakeSocketClass();
    const errors = [];
    const live = [];
    const c = client("ws://gateway.test/ws", { WebSocket: Socket });
    for (const room of ["project:1", "__secret", "project:2"]) {
      c.subscribe(room, { onError: (e) => errors.push(e), onSubscribed: (s) => live.push(s.room) });
    }
    await turn();
    const socket = Socket.last;
    socket.welcome();
    assert.deepEqual(
      socket.sentOf("subscribe").map((m) => m.room),
      ["project:1", "__secret", "project:2"],
    );
    socket.deliver({ type: "subscribed", room: "project:1", position: "1" });
    socket.deliver({ type: "error", code: "forbidden", message: 'you may not read room "__secret"' });
    socket.deliver({ type: "subscribed", room: "project:2", position: "1" });
    assert.deepEqual(errors, [{ code: "forbidden", message: 'you may not read room "__secret"', room: "__secret" }]);
    assert.deepEqual(live, ["project:1", "project:2"]);
    // A reconnect resubscribes only the live ones.
    socket.serverClose(1001, "");
    await until(() => Socket.instances.length === 2, "a reconnect");
    Socket.last.welcome();
    assert.deepEqual(
      Socket.last.sentOf("subscribe").map((m) => m.room),
      ["project:1", "project:2"],
    );
  });

  test("invalid room names and positions are refused locally through onError", async () => {
    const Socket = fakeSocketClass();
    const c = client("ws://gateway.test/ws", { WebSocket: Socket });
    const errors = [];
    const onError = (e) => errors.push(e);
    const subs = [c.subscribe("", { onError }), c.subscribe("a b", { onError }), c.subscribe("project:*", { onError })];
    c.subscribe("project:1", { since: "-4", onError });
    await turn();
    assert.deepEqual(
      errors.map((e) => e.code),
      ["invalid_room", "invalid_room", "invalid_room", "invalid_position"],
    );
    assert.ok(subs.every((s) => s.state === "ended"));
    Socket.last.welcome();
    assert.deepEqual(Socket.last.sentOf("subscribe"), [], "nothing refused locally is sent");
    assert.throws(() => c.subscribe("project:2", { since: 5 }), /since/);
  });

  test("history_unavailable is retried after a backoff, not ended", async () => {
    const Socket = fakeSocketClass();
    const errors = [];
    const c = client("ws://gateway.test/ws", { WebSocket: Socket, reconnect: { minDelayMs: 20, maxDelayMs: 40 } });
    c.subscribe("project:1", { onError: (e) => errors.push(e) });
    await turn();
    Socket.last.welcome();
    Socket.last.deliver({ type: "error", code: "history_unavailable", message: "retry in a moment" });
    await new Promise((r) => setTimeout(r, 60));
    assert.equal(Socket.last.sentOf("subscribe").length, 2);
    assert.deepEqual(errors, []);
  });

  test("an `unsubscribed` the client did not ask for (token no longer grants the room) ends with forbidden", async () => {
    const { socket, events, subs } = await connected();
    socket.deliver({ type: "unsubscribed", room: "project:1" });
    assert.equal(events.find((e) => e.error).error.code, "forbidden");
    assert.equal(subs[0].state, "ended");
  });

  test("unsubscribe then subscribe again on one connection: replies are told apart", async () => {
    const { c, socket, got, subs } = await connected();
    socket.deliver(change("project:1", 11));
    subs[0].unsubscribe();
    assert.deepEqual(socket.sentOf("unsubscribe"), [{ type: "unsubscribe", room: "project:1" }]);
    const again = [];
    const errors = [];
    const second = c.subscribe("project:1", { onChange: (ch) => again.push(ch.position), onError: (e) => errors.push(e) });
    assert.deepEqual(socket.sentOf("subscribe").at(-1), { type: "subscribe", room: "project:1" });
    socket.deliver(change("project:1", 12)); // sent before the gateway handled the unsubscribe
    socket.deliver({ type: "unsubscribed", room: "project:1" });
    socket.deliver({ type: "subscribed", room: "project:1", position: "12" });
    socket.deliver(change("project:1", 13));
    assert.deepEqual(got.get("project:1"), ["11"], "nothing after unsubscribe()");
    assert.deepEqual(again, ["13"]);
    assert.deepEqual(errors, [], "the expected `unsubscribed` is not taken for a revocation");
    assert.equal(second.state, "subscribed");
    assert.throws(() => c.subscribe("project:1", {}), /already subscribed/);
  });

  test("rate_limited (some message was dropped, the gateway cannot say which) reconnects and resumes", async () => {
    const { socket, Socket, events } = await connected();
    socket.deliver(change("project:1", 11));
    socket.deliver({ type: "error", code: "rate_limited", message: "more than 100 messages per second; this one was dropped" });
    await until(() => events.some((e) => e.state === "disconnected"), "a disconnect");
    assert.equal(events.filter((e) => e.state === "disconnected").at(-1).code, 4000);
    assert.equal(socket.closedWith.code, 1000, "the client closed it");
  });
});

describe("protocol 2 (welcome says protocol: 2)", () => {
  test("refusals are matched by their room, whatever the order; a roomless one is not a subscribe's", async () => {
    const Socket = fakeSocketClass();
    const errors = [];
    const clientErrors = [];
    const live = [];
    const c = client("ws://gateway.test/ws", { WebSocket: Socket });
    c.on("error", (e) => clientErrors.push(e.code));
    for (const room of ["project:1", "project:2"]) {
      c.subscribe(room, { onError: (e) => errors.push(e), onSubscribed: (s) => live.push(s.room) });
    }
    await turn();
    const socket = Socket.last;
    socket.welcome({ protocol: 2 });
    socket.deliver({ type: "error", code: "forbidden", message: "no", room: "project:2" });
    socket.deliver({ type: "error", code: "invalid_position", message: "an ack's" });
    socket.deliver({ type: "subscribed", room: "project:1", position: "1" });
    assert.deepEqual(errors, [{ code: "forbidden", message: "no", room: "project:2" }]);
    assert.deepEqual(live, ["project:1"]);
    assert.deepEqual(clientErrors, ["invalid_position"]);
  });

  test("rate_limited says what it dropped: a subscribe is sent again, an ack let go, nothing reconnects", async () => {
    const Socket = fakeSocketClass();
    const events = [];
    const c = client("ws://gateway.test/ws", { WebSocket: Socket, reconnect: { minDelayMs: 20, maxDelayMs: 40 } });
    c.on("state", (e) => events.push(e.state));
    c.subscribe("project:1", {});
    await turn();
    const socket = Socket.last;
    socket.welcome({ protocol: 2 });
    socket.deliver({ type: "error", code: "rate_limited", message: "slow down", dropped: "subscribe", room: "project:1" });
    socket.deliver({ type: "error", code: "rate_limited", message: "slow down", dropped: "ack" });
    await until(() => socket.sentOf("subscribe").length === 2, "the dropped subscribe sent again");
    socket.deliver({ type: "subscribed", room: "project:1", position: "3" });
    assert.equal(Socket.instances.length, 1, "no reconnect");
    assert.ok(!events.includes("disconnected"));
  });

  test("a reset's position moves the room past the gap, also for a live reset", async () => {
    const { socket, Socket, subs } = await connected({ position: "10", welcome: { protocol: 2 } });
    socket.deliver(change("project:1", 11));
    socket.deliver({ type: "reset", room: "project:1", reason: "history_expired", position: "90" });
    assert.equal(subs[0].position, "90");
    socket.serverClose(1001, "");
    await until(() => Socket.instances.length === 2, "a reconnect");
    Socket.last.welcome({ protocol: 2 });
    assert.equal(Socket.last.sentOf("subscribe")[0].since, "90");
  });

  test("a reset repeated by the gateway reaches onReset once (dropped by position, as changes are)", async () => {
    const { c, socket, events } = await connected({ position: "10", welcome: { protocol: 2 } });
    socket.deliver({ type: "reset", room: "project:1", reason: "truncated", position: "20" });
    socket.deliver({ type: "reset", room: "project:1", reason: "truncated", position: "20" });
    socket.deliver({ type: "reset", room: "project:1", reason: "truncated", position: "15" });
    socket.deliver({ type: "reset", room: "project:1", reason: "truncated", position: "21" });
    const resets = events.filter((e) => e.reset).map((e) => e.reset.position);
    assert.deepEqual(resets, ["20", "21"]);
    assert.equal(c.stats.duplicates, 2);
  });
});

describe("acks", () => {
  test("acks are coalesced (at most one per 100 ms), for live changes only", async () => {
    // A mocked clock: 1,500 changes take no time, however busy the machine.
    mock.timers.enable({ apis: ["setTimeout", "Date"], now: 3_000_000 });
    const { socket } = await connected({ since: "10", position: "500" });
    // Replayed (at or below the subscribed position): not acked.
    for (let p = 11; p <= 500; p++) socket.deliver(change("project:1", p));
    assert.equal(socket.sentOf("ack").length, 0);
    for (let p = 501; p <= 2000; p++) socket.deliver(change("project:1", p));
    const acks = socket.sentOf("ack");
    assert.equal(acks.length, 1, "one ack for 1,500 live changes within 100 ms");
    assert.equal(acks[0].position, "501", "sent as the change is handled, not later");
    mock.timers.tick(99);
    socket.deliver(change("project:1", 2001));
    assert.equal(socket.sentOf("ack").length, 1, "none within 100 ms of the last");
    mock.timers.tick(1);
    socket.deliver({ type: "batch", changes: [2002, 2003].map((p) => change("project:1", p)) });
    assert.deepEqual(socket.sentOf("ack").at(-1), { type: "ack", position: "2003" }, "the latest position");
  });
});

describe("timers", () => {
  test("ping after a heartbeat interval of silence; no answer within the next one: closed and reconnected", async () => {
    mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
    const { socket, Socket, events } = await connected({ welcome: { heartbeat_ms: 10000 } });
    mock.timers.tick(9999);
    assert.equal(socket.sentOf("ping").length, 0);
    mock.timers.tick(1);
    assert.equal(socket.sentOf("ping").length, 1);
    socket.deliver({ type: "pong", id: socket.sentOf("ping")[0].id });
    mock.timers.tick(10000);
    assert.equal(socket.closedWith, null, "a pong keeps it alive");
    assert.equal(socket.sentOf("ping").length, 2, "pinged again after another silent interval");
    mock.timers.tick(9999);
    assert.equal(socket.closedWith, null);
    mock.timers.tick(1);
    await turn();
    assert.ok(socket.closedWith, "closed after two silent intervals");
    const event = events.filter((e) => e.state === "disconnected").at(-1);
    assert.equal(event.code, 1006);
    assert.match(event.reason, /presumed dead/);
    mock.timers.tick(event.reconnectInMs);
    await until(() => Socket.instances.length === 2, "a reconnect");
  });

  test("a socket that brings no welcome is given up after 15 s and retried", async () => {
    mock.timers.enable({ apis: ["setTimeout", "Date"], now: 2_000_000 });
    const Socket = fakeSocketClass();
    const events = [];
    const c = client("ws://gateway.test/ws", { WebSocket: Socket, reconnect: { minDelayMs: 100, maxDelayMs: 100 } });
    c.on("state", (e) => events.push(e));
    await turn();
    assert.equal(Socket.instances.length, 1);
    mock.timers.tick(14999);
    assert.equal(events.at(-1).state, "connecting");
    mock.timers.tick(1);
    // Not events.at(-1): a jittered delay of 0 ms runs the next attempt
    // ("connecting") within the same tick.
    await until(() => events.some((e) => e.state === "disconnected"), "the give-up");
    const gaveUp = events.find((e) => e.state === "disconnected");
    assert.equal(gaveUp.code, 1006);
    assert.match(gaveUp.reason, /no welcome/);
    mock.timers.tick(100);
    await until(() => Socket.instances.length === 2, "a new attempt");
  });

  test("in a page, coming back online reconnects at once instead of waiting out the backoff", async () => {
    const page = new EventTarget();
    globalThis.window = page;
    try {
      const Socket = fakeSocketClass();
      const c = client("ws://gateway.test/ws", { WebSocket: Socket, reconnect: { minDelayMs: 60000, maxDelayMs: 60000 } });
      await turn();
      Socket.last.serverClose(1006, "");
      await turn();
      assert.equal(Socket.instances.length, 1, "backing off (up to a minute)");
      page.dispatchEvent(new Event("online"));
      await until(() => Socket.instances.length === 2, "the reconnect on online");
      c.close();
    } finally {
      delete globalThis.window;
    }
  });

  test("a token function is asked on every connect and again before exp, refreshed in band", async () => {
    mock.timers.enable({ apis: ["setTimeout", "Date"], now: Date.now() });
    let issued = 0;
    const token = () => {
      issued++;
      return makeToken({ expiresInS: 3 });
    };
    const { socket, Socket } = await connected({ options: { token } });
    assert.equal(issued, 1);
    assert.ok(socket.url.searchParams.get("token"));
    const delay = refreshDelay(socket.url.searchParams.get("token"));
    assert.ok(delay >= 1000 && delay <= 2000, `refresh ${delay} ms before a 3 s exp`);
    mock.timers.tick(delay);
    await turn();
    assert.equal(issued, 2);
    assert.equal(socket.sentOf("auth").length, 1);
    socket.deliver({ type: "authenticated", expires_at: Math.floor(Date.now() / 1000) + 3 });
    mock.timers.tick(2000);
    await turn();
    assert.equal(socket.sentOf("auth").length, 2, "and again for the new token");
    // 4001 anyway: a fresh token first, at once.
    socket.serverClose(4001, "token expired");
    await turn();
    mock.timers.tick(0);
    await until(() => Socket.instances.length === 2, "a reconnect at once");
    assert.equal(issued, 4, "asked again for the connect");
  });

  test("refresh timing reads exp and iat from the token", () => {
    const now = Date.now();
    const nowS = Math.floor(now / 1000);
    const jwt = (claims) => `x.${Buffer.from(JSON.stringify(claims)).toString("base64url")}.y`;
    assert.deepEqual(tokenTimes(jwt({ exp: 10, iat: 4 })), { exp: 10, iat: 4 });
    assert.equal(tokenTimes("not a jwt"), null);
    assert.equal(refreshDelay("not a jwt"), null);
    const hour = refreshDelay(jwt({ exp: nowS + 3600, iat: nowS }), nowS * 1000);
    assert.equal(hour, 3600_000 - 60_000, "a minute of margin on long tokens");
    // This machine's clock an hour behind: iat bounds the estimate.
    const skewed = refreshDelay(jwt({ exp: nowS + 3600 + 60, iat: nowS + 3600 }), nowS * 1000);
    assert.equal(skewed, 40_000);
    assert.equal(refreshDelay(jwt({ exp: nowS - 10 }), nowS * 1000), 500, "expired: soon, not in a loop");
  });

  test("close() stops everything: no callback, no timer, the socket closed", async () => {
    mock.timers.enable({ apis: ["setTimeout", "Date"], now: 5_000_000 });
    const { c, socket, got, events } = await connected({ options: { token: () => makeToken({ expiresInS: 60 }) } });
    c.close();
    socket.deliver(change("project:1", 11));
    assert.deepEqual(got.get("project:1"), []);
    assert.deepEqual(socket.closedWith, { code: 1000, reason: "client closed" });
    assert.equal(events.at(-1).state, "disconnected");
    const before = events.length;
    mock.timers.tick(600_000);
    await turn();
    assert.equal(events.length, before, "nothing happens after close");
    assert.equal(c.state, "disconnected");
    assert.throws(() => c.subscribe("project:2", {}), /closed/);
  });
});

describe("positions", () => {
  test("positions.get gives since when the caller gives none; set follows every delivered change", async () => {
    const store = new Map([["project:1", "40"]]);
    const sets = [];
    const positions = { get: (room) => store.get(room), set: (room, p) => (sets.push([room, p]), store.set(room, p)) };
    const { socket } = await connected({ position: "40", options: { positions } });
    assert.deepEqual(socket.sentOf("subscribe"), [{ type: "subscribe", room: "project:1", since: "40" }]);
    socket.deliver({ type: "batch", changes: [41, 42].map((p) => change("project:1", p)) });
    assert.deepEqual(sets, [
      ["project:1", "41"],
      ["project:1", "42"],
    ]);
  });

  test("an asynchronous positions.get is waited for; a fresh subscription stores its starting position", async () => {
    const Socket = fakeSocketClass();
    const store = new Map();
    const positions = {
      get: async (room) => (room === "a" ? "7" : undefined),
      set: (room, p) => store.set(room, p),
    };
    const c = client("ws://gateway.test/ws", { WebSocket: Socket, positions });
    c.subscribe("a", {});
    c.subscribe("b", {});
    await turn();
    Socket.last.welcome();
    await turn();
    assert.deepEqual(
      Socket.last.sentOf("subscribe").sort((x, y) => x.room.localeCompare(y.room)),
      [
        { type: "subscribe", room: "a", since: "7" },
        { type: "subscribe", room: "b" },
      ],
    );
    Socket.last.deliver({ type: "subscribed", room: "a", position: "7" });
    Socket.last.deliver({ type: "subscribed", room: "b", position: "30" });
    assert.equal(store.get("b"), "30");
    assert.equal(store.has("a"), false, "a resumed subscription stores only what it delivers");
  });
});
