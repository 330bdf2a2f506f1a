// ws-gateway-client: the resuming WebSocket client for ws-gateway (SPEC 9).
//
// One ES module, no dependencies, no build step: this file is the npm
// package's entry point and what the gateway serves at GET /client.js.
// It keeps the gateway's guarantee all the way into the application: each
// change of a room reaches onChange once, in commit order, across
// reconnects, gateway restarts, slow-consumer closes and token expiry.
//
// How a frame travels: socket -> inbox (in arrival order; compressed frames
// are decoded asynchronously but handled strictly in turn) -> dispatch by
// type -> per-room dedup by position (BigInt) -> onChange -> positions.set.

/** @typedef {"connecting" | "connected" | "disconnected"} ConnectionState */

export const DEFAULT_RECONNECT = Object.freeze({ minDelayMs: 500, maxDelayMs: 20000 });

/** At most one ack per this interval: acks only feed the gateway's latency
 * histogram, and GATEWAY_RATE_LIMIT counts them like any other message. */
const ACK_INTERVAL_MS = 100;
/** A connection counts as healthy (backoff starts over) once it delivered a
 * change, or stayed up this long. */
const HEALTHY_AFTER_MS = 5000;
/** When a timer fires this much late, the machine probably slept: the socket
 * is suspect, so the ping after it gets a short deadline. */
const LATE_TIMER_MS = 3000;
const SUSPECT_PONG_TIMEOUT_MS = 5000;
/** How long close() waits for the server's half of the closing handshake
 * before dropping the socket (Node: lets the process exit promptly). */
const CLOSE_GRACE_MS = 1000;
/** Never refresh a token more often than this (a token function that keeps
 * handing back the same nearly expired token must not spin). */
const MIN_REFRESH_MS = 500;
const MAX_REFRESH_MARGIN_MS = 60000;
/** A socket that has not brought `welcome` by then is given up (a hung
 * gateway, a proxy that accepted and went silent, a black-holed address). */
const WELCOME_TIMEOUT_MS = 15000;
/** Used until `welcome` says otherwise (the gateway's default). */
const DEFAULT_HEARTBEAT_MS = 25000;
/** Room names the gateway accepts (protocol.rs validate_room): at most this
 * many UTF-8 bytes, no whitespace or control characters; `*` only grants. */
const MAX_ROOM_BYTES = 200;
const POSITION = /^[0-9]{1,30}$/;

/** Refusals of a subscribe: the reply to the oldest subscribe in flight. */
const SUBSCRIBE_ERRORS = new Set([
  "forbidden",
  "invalid_room",
  "invalid_position",
  "already_subscribed",
  "too_many_subscriptions",
  "history_unavailable",
  "authorization_unavailable",
]);
/** Subscribe refusals that a later attempt may not get: retried with backoff. */
const RETRYABLE_SUBSCRIBE_ERRORS = new Set(["history_unavailable", "authorization_unavailable"]);
/** Closes after which the first reconnect goes at once: the gateway asked
 * us to come back (1001 shutdown, 4008 slow consumer) or the token ran out
 * (4001: a fresh token is asked for first). */
const RECONNECT_AT_ONCE = new Set([1001, 4001, 4008]);

/**
 * Exponential backoff with full jitter: a delay drawn uniformly from
 * [0, min(maxDelayMs, minDelayMs * 2^attempt)].
 * @param {number} attempt 0 for the first retry
 * @param {{minDelayMs: number, maxDelayMs: number}} reconnect
 * @param {() => number} [random] in [0, 1)
 */
export function backoffDelay(attempt, reconnect, random = Math.random) {
  const { minDelayMs, maxDelayMs } = reconnect;
  const ceiling = Math.min(maxDelayMs, minDelayMs * 2 ** Math.min(Math.max(attempt, 0), 40));
  return Math.floor(random() * ceiling);
}

/** Whether `value` is a position as the gateway hands them out. */
export function isPosition(value) {
  return typeof value === "string" && POSITION.test(value);
}

/** Why the gateway would refuse `room` (null: it would not). */
function roomProblem(room) {
  if (typeof room !== "string" || room.length === 0) return "room name is empty";
  const bytes = new TextEncoder().encode(room).length;
  if (bytes > MAX_ROOM_BYTES) return `room name is ${bytes} bytes; at most ${MAX_ROOM_BYTES} allowed`;
  if (/[\s\p{Cc}]/u.test(room)) return "room name must not contain spaces or control characters";
  if (room.includes("*")) return "room name must not contain '*' (patterns only grant rooms in tokens)";
  return null;
}

/** `exp` and `iat` (seconds) from a JWT's payload, or null if unreadable. */
export function tokenTimes(token) {
  try {
    const payload = token.split(".")[1];
    const base64 = payload.replace(/-/g, "+").replace(/_/g, "/");
    const padded = base64 + "=".repeat((4 - (base64.length % 4)) % 4);
    const json = new TextDecoder().decode(Uint8Array.from(atob(padded), (c) => c.charCodeAt(0)));
    const claims = JSON.parse(json);
    if (typeof claims.exp !== "number") return null;
    return { exp: claims.exp, iat: typeof claims.iat === "number" ? claims.iat : null };
  } catch {
    return null;
  }
}

/**
 * How long to wait before refreshing `token` in band. The lifetime is read
 * from the token; with `iat` it does not depend on this machine's clock
 * being right. A third of it (at most a minute) is kept as margin.
 */
export function refreshDelay(token, nowMs = Date.now()) {
  const times = tokenTimes(token);
  if (!times) return null;
  const untilExp = times.exp * 1000 - nowMs;
  const lifetime = times.iat !== null ? (times.exp - times.iat) * 1000 : untilExp;
  let left = untilExp > 0 ? Math.min(untilExp, lifetime > 0 ? lifetime : untilExp) : Math.max(lifetime, 0);
  const margin = Math.min(MAX_REFRESH_MARGIN_MS, left / 3);
  return Math.max(MIN_REFRESH_MS, Math.floor(left - margin));
}

function hasDecompressionStream(format) {
  if (typeof DecompressionStream === "undefined") return false;
  try {
    new DecompressionStream(format);
    return true;
  } catch {
    return false;
  }
}

const isNode = typeof process !== "undefined" && typeof process.versions?.node === "string";

/** Resolves `encoding` to what this platform can decode. */
function resolveEncoding(encoding) {
  switch (encoding ?? "auto") {
    case "auto":
      return hasDecompressionStream("gzip") ? "gzip" : "none";
    case "gzip":
      if (!hasDecompressionStream("gzip")) throw new Error('encoding "gzip" needs DecompressionStream, which this platform lacks');
      return "gzip";
    case "br":
      if (!hasDecompressionStream("brotli") && !isNode) {
        throw new Error('encoding "br": this platform has no brotli decoder (use "gzip" in browsers without it)');
      }
      return "br";
    case "none":
      return "none";
    default:
      throw new TypeError(`encoding must be "auto", "gzip", "br" or "none", not ${JSON.stringify(encoding)}`);
  }
}

let nodeZlib = null;
/** Brotli in Node: node:zlib, loaded only when needed (never in browsers). */
async function brotliInNode(bytes) {
  const specifier = "node:zlib";
  nodeZlib ??= import(/* webpackIgnore: true */ /* @vite-ignore */ specifier);
  const zlib = await nodeZlib;
  return new Promise((resolve, reject) =>
    zlib.brotliDecompress(bytes, (error, out) => (error ? reject(error) : resolve(new TextDecoder().decode(out)))),
  );
}

async function toBytes(data) {
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  if (typeof Blob !== "undefined" && data instanceof Blob) return new Uint8Array(await data.arrayBuffer());
  if (Array.isArray(data)) return toBytes(new Blob(data));
  throw new TypeError("binary frame of an unknown type");
}

/** The JSON text of a compressed (binary) frame. */
async function decompress(data, encoding) {
  const bytes = await toBytes(data);
  if (encoding === "br" && !hasDecompressionStream("brotli")) return brotliInNode(bytes);
  const format = encoding === "br" ? "brotli" : "gzip";
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream(format));
  return new Response(stream).text();
}

function reportUncaught(error) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(error);
  else console.error(error);
}

/** One WebSocket connection's state. A reconnect makes a new one. */
class Connection {
  constructor(ws, token) {
    this.ws = ws;
    this.token = token;
    /** Frames (strings, or promises of decoded strings) and the close, in
     * arrival order. */
    this.inbox = [];
    this.draining = false;
    this.welcomed = false;
    this.welcomedAt = 0;
    this.heartbeatMs = DEFAULT_HEARTBEAT_MS;
    this.encoding = "none";
    /** The gateway's protocol revision (`welcome`): from 2 on, a refusal
     * names its room, `rate_limited` what it dropped, `reset` its position. */
    this.protocol = 1;
    /** Subscribes sent and not yet answered, oldest first: the gateway
     * answers each with `subscribed` or an `error`, in order. */
    this.pendingSubscribes = [];
    /** Unsubscribes sent and not yet answered, per room. */
    this.pendingUnsubscribes = new Map();
    this.lastHeard = Date.now();
    this.pingSentAt = null;
    this.pingTimeout = 0;
    this.pings = 0;
    this.heartbeatTimer = null;
    this.heartbeatDue = 0;
    this.refreshTimer = null;
    this.authToken = null;
    this.retryTimers = new Set();
    this.lastAckAt = 0;
    /** The latest live (not replayed) position delivered and not yet acked. */
    this.ackable = null;
    this.delivered = 0;
    /** No frame of this socket is handled any more (dead, broken, closed). */
    this.aborted = false;
    this.finished = false;
    this.lastError = null;
  }

  send(message) {
    if (this.aborted || this.ws.readyState !== 1) return false;
    this.ws.send(JSON.stringify(message));
    return true;
  }

  stopTimers() {
    clearTimeout(this.heartbeatTimer);
    clearTimeout(this.refreshTimer);
    for (const timer of this.retryTimers) clearTimeout(timer);
    this.retryTimers.clear();
    this.heartbeatTimer = this.refreshTimer = null;
  }
}

/** A room subscription, as the application holds it. */
export class Subscription {
  #record;
  #end;
  constructor(record, end) {
    this.#record = record;
    this.#end = end;
  }
  /** @returns {string} */
  get room() {
    return this.#record.room;
  }
  /** The last position delivered to onChange (or where the subscription
   * started); null until known. */
  get position() {
    return this.#record.position;
  }
  /** @returns {"subscribing" | "subscribed" | "ended"} */
  get state() {
    if (this.#record.ended) return "ended";
    return this.#record.live ? "subscribed" : "subscribing";
  }
  /** Stops the subscription: no callback runs after this returns. */
  unsubscribe() {
    this.#end(this.#record);
  }
}

export class GatewayClient {
  #url;
  #token;
  #encoding;
  #WebSocket;
  #reconnect;
  #positions;
  #listeners = new Map();
  /** room -> subscription record (see subscribe()). */
  #subs = new Map();
  #conn = null;
  #state = "disconnected";
  #closed = false;
  /** Reconnect attempts since the last healthy connection. */
  #attempt = 0;
  #reconnectTimer = null;
  /** Bumped by every connect and by close(): an await that comes back to a
   * different value knows it was overtaken. */
  #generation = 0;
  #onWake = null;
  #stats = { connections: 0, frames: 0, changes: 0, duplicates: 0, acks: 0, pings: 0, tokenRefreshes: 0 };

  /**
   * @param {string | URL} url the gateway's /ws endpoint (ws://, wss://, http(s):// or relative in a page)
   * @param {import("./index.d.ts").GatewayClientOptions} [options]
   */
  constructor(url, options = {}) {
    const base = typeof location !== "undefined" ? location.href : undefined;
    const parsed = new URL(String(url), base);
    if (parsed.protocol === "http:") parsed.protocol = "ws:";
    if (parsed.protocol === "https:") parsed.protocol = "wss:";
    if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
      throw new TypeError(`url must be ws://, wss://, http:// or https://, not ${parsed.protocol}`);
    }
    this.#url = parsed;
    const { token, encoding, WebSocket: Ctor, reconnect, positions } = options;
    if (token !== undefined && typeof token !== "string" && typeof token !== "function") {
      throw new TypeError("token must be a string or a function returning one (or a promise of one)");
    }
    this.#token = token;
    this.#encoding = resolveEncoding(encoding);
    this.#WebSocket = Ctor ?? globalThis.WebSocket;
    if (typeof this.#WebSocket !== "function") {
      throw new TypeError("no WebSocket constructor: pass options.WebSocket (in Node 20, the ws package's WebSocket)");
    }
    const minDelayMs = reconnect?.minDelayMs ?? DEFAULT_RECONNECT.minDelayMs;
    const maxDelayMs = reconnect?.maxDelayMs ?? Math.max(DEFAULT_RECONNECT.maxDelayMs, minDelayMs);
    if (!(minDelayMs > 0) || !(maxDelayMs >= minDelayMs) || !Number.isFinite(maxDelayMs)) {
      throw new RangeError(`reconnect needs 0 < minDelayMs <= maxDelayMs (finite), got ${minDelayMs} and ${maxDelayMs}`);
    }
    this.#reconnect = { minDelayMs, maxDelayMs };
    if (positions != null && (typeof positions.get !== "function" || typeof positions.set !== "function")) {
      throw new TypeError("positions must have get(room) and set(room, position)");
    }
    this.#positions = positions ?? null;
    // In a page: back online, or the tab shown again (after a laptop slept,
    // a phone changed networks), the connection is checked at once instead
    // of at the next timer.
    if (typeof window !== "undefined" && typeof window.addEventListener === "function") {
      this.#onWake = () => this.#wake();
      window.addEventListener("online", this.#onWake);
      globalThis.document?.addEventListener?.("visibilitychange", this.#onWake);
    }
    // After the constructor returns, so a listener added right away sees
    // "connecting".
    queueMicrotask(() => this.#connect());
  }

  /** @returns {ConnectionState} */
  get state() {
    return this.#state;
  }

  /** Counters since construction: connections opened, frames handled,
   * changes delivered, duplicates dropped at a seam, acks and pings sent. */
  get stats() {
    return { ...this.#stats };
  }

  /**
   * Listens to "state" ({state, code, reason, ...}) or "error" (problems not
   * tied to one subscription). Returns a function that removes the listener.
   */
  on(event, listener) {
    if (event !== "state" && event !== "error") throw new TypeError(`unknown event ${JSON.stringify(event)}; expected "state" or "error"`);
    if (typeof listener !== "function") throw new TypeError("listener must be a function");
    let set = this.#listeners.get(event);
    if (!set) this.#listeners.set(event, (set = new Set()));
    set.add(listener);
    return () => this.off(event, listener);
  }

  off(event, listener) {
    this.#listeners.get(event)?.delete(listener);
  }

  /**
   * Subscribes to `room`. Callbacks: onChange(change) for each change or
   * event once, in commit order; onReset({reason, room, position}) when history is
   * gone; onSubscribed({position, resumed, room}) each time the room is
   * live on a connection; onError({code, message, room}) when the gateway
   * refuses the room (the subscription has then ended).
   */
  subscribe(room, options = {}) {
    if (this.#closed) throw new Error("this GatewayClient is closed; make a new one");
    if (this.#subs.has(room)) {
      throw new Error(`already subscribed to ${JSON.stringify(room)} on this client: unsubscribe first, or share the subscription`);
    }
    const { since, onChange, onReset, onSubscribed, onError } = options;
    if (since != null && typeof since !== "string" && typeof since !== "bigint") {
      throw new TypeError(`since must be a position string as received in a change, not a ${typeof since}`);
    }
    const record = {
      room,
      handlers: { onChange, onReset, onSubscribed, onError },
      position: null,
      big: null,
      live: false,
      ended: false,
      conn: null,
      waiting: false,
      liveFrom: null,
      sentSince: false,
      retries: 0,
    };
    const subscription = new Subscription(record, (r) => this.#unsubscribe(r));
    const problem = roomProblem(room);
    if (problem) {
      record.ended = true;
      queueMicrotask(() => this.#call(record, "onError", { code: "invalid_room", message: problem, room }, true));
      return subscription;
    }
    this.#subs.set(room, record);
    let from = since;
    if (from == null && this.#positions) {
      try {
        from = this.#positions.get(room);
      } catch (error) {
        this.#emitError("positions_get_failed", `positions.get(${JSON.stringify(room)}) threw: ${error?.message ?? error}`);
        from = null;
      }
    }
    if (from != null && typeof from.then === "function") {
      record.waiting = true;
      Promise.resolve(from).then(
        (value) => this.#startFrom(record, value),
        (error) => {
          this.#emitError("positions_get_failed", `positions.get(${JSON.stringify(room)}) failed: ${error?.message ?? error}`);
          this.#startFrom(record, null);
        },
      );
    } else {
      this.#startFrom(record, from, true);
    }
    return subscription;
  }

  /** Closes the connection for good: no reconnect, no callback, no timer left. */
  close() {
    if (this.#closed) return;
    this.#closed = true;
    this.#generation++;
    if (this.#onWake) {
      window.removeEventListener("online", this.#onWake);
      globalThis.document?.removeEventListener?.("visibilitychange", this.#onWake);
    }
    clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = null;
    for (const record of this.#subs.values()) record.ended = true;
    this.#subs.clear();
    const conn = this.#conn;
    this.#conn = null;
    if (conn) {
      conn.stopTimers();
      conn.aborted = true;
      conn.finished = true;
      conn.inbox.length = 0;
      closeSocket(conn.ws, 1000, "client closed", CLOSE_GRACE_MS);
    }
    this.#setState("disconnected", { code: 1000, reason: "closed by the application" });
  }

  // --- subscriptions ---------------------------------------------------------

  #startFrom(record, since, sync = false) {
    record.waiting = false;
    if (record.ended) return;
    if (since != null && since !== "") {
      const text = typeof since === "bigint" || Number.isSafeInteger(since) ? String(since) : since;
      if (!isPosition(text)) {
        const message = `since must be a position string as received in a change, not ${JSON.stringify(String(since))}`;
        this.#endWithError(record, { code: "invalid_position", message, room: record.room }, sync);
        return;
      }
      record.position = text;
      record.big = BigInt(text);
    }
    const conn = this.#conn;
    if (conn?.welcomed && !conn.aborted) this.#sendSubscribe(conn, record);
  }

  #sendSubscribe(conn, record) {
    const message = { type: "subscribe", room: record.room };
    if (record.position !== null) message.since = record.position;
    record.sentSince = record.position !== null;
    record.conn = conn;
    record.live = false;
    conn.pendingSubscribes.push(record);
    conn.send(message);
  }

  #unsubscribe(record) {
    if (record.ended) return;
    record.ended = true;
    if (this.#subs.get(record.room) === record) this.#subs.delete(record.room);
    const conn = this.#conn;
    if (conn && record.conn === conn && conn.send({ type: "unsubscribe", room: record.room })) {
      conn.pendingUnsubscribes.set(record.room, (conn.pendingUnsubscribes.get(record.room) ?? 0) + 1);
    }
  }

  #endWithError(record, error, deferred = false) {
    if (record.ended) return;
    record.ended = true;
    record.live = false;
    if (this.#subs.get(record.room) === record) this.#subs.delete(record.room);
    if (deferred) queueMicrotask(() => this.#call(record, "onError", error, true));
    else this.#call(record, "onError", error, true);
  }

  /** Calls an application callback; what it throws is reported, and the
   * stream goes on. */
  #call(record, name, arg, evenIfEnded = false) {
    const fn = record.handlers[name];
    if (typeof fn !== "function" || this.#closed || (record.ended && !evenIfEnded)) return;
    try {
      fn(arg);
    } catch (error) {
      this.#emitError("callback_threw", `${name} for ${JSON.stringify(record.room)} threw: ${error?.message ?? error}`, error);
    }
  }

  #persist(record) {
    if (!this.#positions || record.position === null) return;
    try {
      const result = this.#positions.set(record.room, record.position);
      if (result && typeof result.then === "function") {
        result.then(undefined, (error) =>
          this.#emitError("positions_set_failed", `positions.set failed: ${error?.message ?? error}`, error),
        );
      }
    } catch (error) {
      this.#emitError("positions_set_failed", `positions.set threw: ${error?.message ?? error}`, error);
    }
  }

  // --- events ----------------------------------------------------------------

  #emit(event, payload) {
    const set = this.#listeners.get(event);
    if (!set) return false;
    for (const listener of [...set]) {
      try {
        listener(payload);
      } catch (error) {
        reportUncaught(error);
      }
    }
    return set.size > 0;
  }

  #emitError(code, message, cause) {
    const error = { code, message };
    if (cause !== undefined) error.cause = cause;
    if (!this.#emit("error", error) && code === "callback_threw") reportUncaught(cause ?? new Error(message));
  }

  #setState(state, details = {}) {
    this.#state = state;
    this.#emit("state", { state, ...details });
  }

  // --- connecting ------------------------------------------------------------

  async #getToken() {
    const token = typeof this.#token === "function" ? await this.#token() : this.#token;
    if (token !== undefined && token !== null && typeof token !== "string") {
      throw new TypeError(`the token function returned ${typeof token}, not a string`);
    }
    return token ?? null;
  }

  async #connect() {
    this.#reconnectTimer = null;
    if (this.#closed) return;
    const generation = ++this.#generation;
    this.#setState("connecting", { attempt: this.#attempt });
    let token;
    try {
      token = await this.#getToken();
    } catch (error) {
      if (generation !== this.#generation) return;
      this.#scheduleReconnect(null, `token function failed: ${error?.message ?? error}`, false);
      return;
    }
    if (generation !== this.#generation) return;
    const url = new URL(this.#url);
    if (token) url.searchParams.set("token", token);
    if (this.#encoding !== "none") url.searchParams.set("encoding", this.#encoding);
    let ws;
    try {
      ws = new this.#WebSocket(url.href);
    } catch (error) {
      this.#scheduleReconnect(null, `cannot open a WebSocket: ${error?.message ?? error}`, false);
      return;
    }
    ws.binaryType = "arraybuffer";
    const conn = new Connection(ws, token);
    this.#conn = conn;
    this.#stats.connections++;
    conn.heartbeatTimer = setTimeout(
      () => this.#abort(conn, 1006, `no welcome from the gateway within ${WELCOME_TIMEOUT_MS} ms`),
      WELCOME_TIMEOUT_MS,
    );
    ws.addEventListener("message", (event) => this.#onFrame(conn, event.data));
    ws.addEventListener("error", (event) => {
      conn.lastError = event?.message ?? event?.error?.message ?? null;
    });
    ws.addEventListener("close", (event) => {
      clearTimeout(closeGraceTimers.get(ws));
      if (conn.aborted) return;
      const reason = event.reason || conn.lastError || (event.code === 1006 ? "connection lost" : "");
      this.#enqueue(conn, { close: { code: event.code, reason } });
    });
  }

  /** The connection is over (its close was handled in turn, after every
   * frame before it): reconnect, unless close() was called. */
  #finish(conn, code, reason) {
    if (conn.finished) return;
    conn.finished = true;
    conn.aborted = true;
    conn.stopTimers();
    conn.inbox.length = 0;
    if (this.#conn === conn) this.#conn = null;
    for (const record of this.#subs.values()) {
      if (record.conn === conn) {
        record.conn = null;
        record.live = false;
      }
    }
    if (this.#closed) return;
    const healthy = conn.welcomed && (conn.delivered > 0 || Date.now() - conn.welcomedAt >= HEALTHY_AFTER_MS);
    this.#scheduleReconnect(code, reason, healthy);
  }

  #scheduleReconnect(code, reason, healthy) {
    if (this.#closed) return;
    if (healthy) this.#attempt = 0;
    const atOnce = this.#attempt === 0 && RECONNECT_AT_ONCE.has(code);
    const delay = atOnce ? 0 : backoffDelay(this.#attempt, this.#reconnect);
    this.#attempt++;
    this.#setState("disconnected", { code: code ?? undefined, reason: reason ?? "", reconnectInMs: delay });
    clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = setTimeout(() => this.#connect(), delay);
  }

  /** Gives up on a socket this client judged dead or broken. Frames already
   * received are still handled (unless `discardQueued`); then it reconnects. */
  #abort(conn, code, reason, discardQueued = false) {
    if (conn.aborted) return;
    if (discardQueued) conn.inbox.length = 0;
    conn.stopTimers();
    this.#enqueue(conn, { close: { code, reason } });
    conn.aborted = true;
    // A fixed ASCII reason: a browser refuses one over 123 bytes.
    closeSocket(conn.ws, 1000, "client: reconnecting", 0);
  }

  // --- frames, in arrival order ---------------------------------------------

  #onFrame(conn, data) {
    if (conn.aborted) return;
    conn.lastHeard = Date.now();
    this.#enqueue(conn, typeof data === "string" ? data : decompress(data, conn.encoding === "none" ? this.#encoding : conn.encoding));
  }

  #enqueue(conn, item) {
    if (item && typeof item.then === "function") item.catch(() => {}); // handled when its turn comes
    conn.inbox.push(item);
    if (!conn.draining) this.#drain(conn).catch(reportUncaught);
  }

  async #drain(conn) {
    conn.draining = true;
    try {
      while (conn.inbox.length > 0 && !conn.finished) {
        let item = conn.inbox.shift();
        if (item && typeof item === "object" && "close" in item) {
          this.#finish(conn, item.close.code, item.close.reason);
          return;
        }
        if (typeof item !== "string") {
          try {
            item = await item;
          } catch (error) {
            if (!conn.finished) this.#abort(conn, 1007, `undecodable compressed frame: ${error?.message ?? error}`, true);
            continue;
          }
          if (conn.finished) return;
        }
        try {
          this.#handleText(conn, item);
        } catch (error) {
          // A bug of ours must not stop the stream silently: report it and
          // start over on a new connection (resuming loses nothing).
          this.#emitError("internal_error", `handling a frame failed: ${error?.message ?? error}`, error);
          this.#abort(conn, 4000, "internal error", true);
        }
      }
    } finally {
      conn.draining = false;
    }
  }

  #handleText(conn, text) {
    if (this.#closed || conn.finished) return;
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      this.#abort(conn, 1007, "the gateway sent a frame that is not JSON", true);
      return;
    }
    this.#stats.frames++;
    switch (message?.type) {
      case "change":
      case "event":
        this.#deliver(conn, message);
        this.#maybeAck(conn);
        break;
      case "batch":
        if (Array.isArray(message.changes)) for (const change of message.changes) this.#deliver(conn, change);
        this.#maybeAck(conn);
        break;
      case "welcome":
        this.#onWelcome(conn, message);
        break;
      case "subscribed":
        this.#onSubscribed(conn, message);
        break;
      case "reset":
        this.#onReset(conn, message);
        break;
      case "error":
        this.#onError(conn, message);
        break;
      case "unsubscribed":
        this.#onUnsubscribed(conn, message);
        break;
      case "authenticated":
        this.#scheduleRefresh(conn, conn.authToken ?? conn.token);
        break;
      case "pong":
        break; // lastHeard is enough
      default:
        break; // a newer gateway's message: ignored
    }
  }

  #onWelcome(conn, message) {
    if (conn.welcomed) return; // one per connection
    conn.welcomed = true;
    conn.welcomedAt = Date.now();
    if (Number.isFinite(message.heartbeat_ms) && message.heartbeat_ms > 0) conn.heartbeatMs = message.heartbeat_ms;
    if (typeof message.encoding === "string") conn.encoding = message.encoding;
    if (Number.isInteger(message.protocol)) conn.protocol = message.protocol;
    this.#setState("connected", { connectionId: message.connection_id });
    this.#armHeartbeat(conn, conn.heartbeatMs);
    this.#scheduleRefresh(conn, conn.token);
    for (const record of this.#subs.values()) {
      if (!record.ended && !record.waiting) this.#sendSubscribe(conn, record);
    }
  }

  /** The reply to the oldest subscribe in flight for `room`. */
  #takePending(conn, room) {
    const pending = conn.pendingSubscribes;
    let index = 0;
    if (room !== undefined) {
      index = pending.findIndex((r) => r.room === room);
      if (index < 0) return null;
    }
    return pending.splice(index, 1)[0] ?? null;
  }

  #onSubscribed(conn, message) {
    const record = this.#takePending(conn, message.room);
    if (!record || record.ended || record.conn !== conn || !isPosition(message.position)) return;
    record.live = true;
    record.retries = 0;
    record.liveFrom = BigInt(message.position);
    if (!record.sentSince) {
      // A fresh subscription starts here: every change after it is owed.
      record.position = message.position;
      record.big = record.liveFrom;
      this.#persist(record);
    }
    this.#call(record, "onSubscribed", { position: message.position, resumed: record.sentSince, room: record.room });
  }

  #deliver(conn, change) {
    const record = this.#subs.get(change?.room);
    // Before `subscribed` on this connection a room's frames belong to an
    // earlier subscription (unsubscribed, or refused): not ours.
    if (!record || !record.live || record.conn !== conn || record.ended) return;
    if (!isPosition(change.position)) return;
    const position = BigInt(change.position);
    if (record.big !== null && position <= record.big) {
      this.#stats.duplicates++;
      return;
    }
    record.big = position;
    record.position = change.position;
    conn.delivered++;
    this.#stats.changes++;
    // Only live changes are acked: a replayed one's commit-to-ack would be
    // the outage, not the latency.
    if (position > record.liveFrom) conn.ackable = change.position;
    this.#call(record, "onChange", change);
    this.#persist(record);
  }

  /** Acks the latest live position, at most once per ACK_INTERVAL_MS, at the
   * moment it is handled: a delayed (trailing) ack would add the delay to
   * the latency the gateway measures. */
  #maybeAck(conn) {
    if (conn.ackable === null) return;
    const now = Date.now();
    if (now - conn.lastAckAt < ACK_INTERVAL_MS) return;
    if (conn.send({ type: "ack", position: conn.ackable })) this.#stats.acks++;
    conn.lastAckAt = now;
    conn.ackable = null;
  }

  #onReset(conn, message) {
    const record = this.#subs.get(message.room);
    if (!record || record.conn !== conn || record.ended) return;
    // A reset carries its position (protocol 2): one at or below what the
    // room has is a repeat (sent again across a seam); onReset hears of
    // each reset once.
    if (isPosition(message.position) && record.big !== null && BigInt(message.position) <= record.big) {
      this.#stats.duplicates++;
      return;
    }
    // What was missed is gone; the stream goes on after the reset's
    // position (protocol 2), or else from where this connection's
    // subscription went live, so a later resume does not ask for the lost
    // history again.
    const after = isPosition(message.position) ? BigInt(message.position) : record.liveFrom;
    if (after !== null && (record.big === null || after > record.big)) {
      record.big = after;
      record.position = after.toString();
      this.#persist(record);
    }
    this.#call(record, "onReset", { reason: message.reason ?? "unknown", room: record.room, position: record.position });
  }

  #onUnsubscribed(conn, message) {
    const room = message.room;
    const asked = conn.pendingUnsubscribes.get(room) ?? 0;
    if (asked > 0) {
      if (asked === 1) conn.pendingUnsubscribes.delete(room);
      else conn.pendingUnsubscribes.set(room, asked - 1);
      return;
    }
    // Not asked for: an in-band token refresh no longer grants the room.
    const record = this.#subs.get(room);
    if (record && record.conn === conn) {
      this.#endWithError(record, { code: "forbidden", message: `the refreshed token no longer grants room ${JSON.stringify(room)}`, room });
    }
  }

  #onError(conn, message) {
    const code = String(message.code ?? "");
    const text = String(message.message ?? "");
    const named = typeof message.room === "string" ? message.room : undefined;
    if (code === "rate_limited") {
      this.#onRateLimited(conn, message, named, text);
      return;
    }
    // Protocol 2 names the refused subscribe's room; an error without one
    // is then not a subscribe's (an ack's invalid_position, say).
    if (SUBSCRIBE_ERRORS.has(code) && (named !== undefined || conn.protocol < 2)) {
      // Protocol 1: the gateway handles one message at a time and answers
      // every subscribe with `subscribed` or an error, in order, so this
      // refusal is the oldest subscribe's.
      const record = this.#takePending(conn, named);
      if (!record) {
        this.#emitError(code, text);
        return;
      }
      if (record.ended) return;
      if (code === "already_subscribed") {
        // This client and the gateway disagree about what is subscribed:
        // start over on a new connection (resuming loses nothing).
        this.#abort(conn, 4000, `subscription state out of step (${text})`);
        return;
      }
      if (RETRYABLE_SUBSCRIBE_ERRORS.has(code)) {
        this.#retrySubscribe(conn, record);
        return;
      }
      this.#endWithError(record, { code, message: text, room: record.room });
      return;
    }
    if (code === "not_subscribed") {
      for (const [room, count] of conn.pendingUnsubscribes) {
        if (named !== undefined ? named === room : text.includes(JSON.stringify(room)) || conn.pendingUnsubscribes.size === 1) {
          if (count <= 1) conn.pendingUnsubscribes.delete(room);
          else conn.pendingUnsubscribes.set(room, count - 1);
          return;
        }
      }
    }
    if (code === "invalid_token") {
      // The in-band refresh was refused; the current token stays in force
      // until its exp. Ask again shortly (then, at worst, 4001 and a
      // reconnect with a fresh token).
      this.#emitError(code, text);
      this.#armRefresh(conn, Math.max(MIN_REFRESH_MS, 1000));
      return;
    }
    this.#emitError(code, text);
  }

  /** Sends `record`'s subscribe again on `conn` after a backoff. */
  #retrySubscribe(conn, record) {
    const delay = backoffDelay(record.retries++, this.#reconnect);
    const timer = setTimeout(() => {
      conn.retryTimers.delete(timer);
      if (!record.ended && this.#conn === conn && !conn.aborted && this.#subs.get(record.room) === record) {
        this.#sendSubscribe(conn, record);
      }
    }, delay);
    conn.retryTimers.add(timer);
  }

  /** The gateway dropped one of our messages. Protocol 2 says which
   * (`dropped`, with its `room`): it is sent again (subscribe, unsubscribe,
   * auth) or let go (ack, ping). Protocol 1 cannot say: resubscribing on a
   * new connection is the only answer that cannot lose anything. */
  #onRateLimited(conn, message, room, text) {
    this.#emitError("rate_limited", text);
    switch (message.dropped) {
      case "subscribe": {
        const record = room === undefined ? null : this.#takePending(conn, room);
        if (record && !record.ended) this.#retrySubscribe(conn, record);
        if (record || room !== undefined) return;
        break;
      }
      case "unsubscribe":
        if (room !== undefined && conn.pendingUnsubscribes.has(room)) {
          const timer = setTimeout(() => {
            conn.retryTimers.delete(timer);
            conn.send({ type: "unsubscribe", room });
          }, backoffDelay(0, this.#reconnect));
          conn.retryTimers.add(timer);
        }
        return;
      case "ack":
        return;
      case "ping":
        // No pong will come for it: ask again after an interval.
        conn.pingSentAt = null;
        this.#armHeartbeat(conn, conn.heartbeatMs);
        return;
      case "auth":
        this.#armRefresh(conn, Math.max(MIN_REFRESH_MS, 1000));
        return;
      default:
        break;
    }
    this.#abort(conn, 4000, `rate limited by the gateway (${text})`);
  }

  // --- liveness --------------------------------------------------------------

  /** The page came back (online, or visible): a connection silent for a
   * while is pinged with a short deadline; a pending reconnect goes now. */
  #wake() {
    if (this.#closed || globalThis.document?.visibilityState === "hidden") return;
    const conn = this.#conn;
    if (!conn && this.#reconnectTimer !== null) {
      clearTimeout(this.#reconnectTimer);
      this.#reconnectTimer = null;
      this.#connect();
      return;
    }
    if (conn?.welcomed && !conn.aborted && conn.pingSentAt === null && Date.now() - conn.lastHeard > SUSPECT_PONG_TIMEOUT_MS) {
      conn.pingSentAt = Date.now();
      conn.pingTimeout = SUSPECT_PONG_TIMEOUT_MS;
      conn.send({ type: "ping", id: String(++conn.pings) });
      this.#stats.pings++;
      this.#armHeartbeat(conn, SUSPECT_PONG_TIMEOUT_MS);
    }
  }

  /** Pings after a heartbeat interval of silence; no frame within the next
   * interval means the connection is dead. One timer, re-armed lazily. */
  #armHeartbeat(conn, delay) {
    clearTimeout(conn.heartbeatTimer);
    conn.heartbeatDue = Date.now() + delay;
    conn.heartbeatTimer = setTimeout(() => this.#heartbeat(conn), delay);
  }

  #heartbeat(conn) {
    conn.heartbeatTimer = null;
    if (conn.aborted || this.#closed) return;
    const now = Date.now();
    const slept = now - conn.heartbeatDue > LATE_TIMER_MS;
    const interval = conn.heartbeatMs;
    if (conn.pingSentAt !== null) {
      if (conn.lastHeard >= conn.pingSentAt) {
        conn.pingSentAt = null;
      } else if (now - conn.pingSentAt >= conn.pingTimeout) {
        this.#abort(conn, 1006, `no frame for ${now - conn.lastHeard} ms, not even a pong: connection presumed dead`);
        return;
      } else {
        this.#armHeartbeat(conn, conn.pingSentAt + conn.pingTimeout - now);
        return;
      }
    }
    const silent = now - conn.lastHeard;
    if (silent >= interval || slept) {
      conn.pingSentAt = now;
      conn.pingTimeout = slept ? Math.min(interval, SUSPECT_PONG_TIMEOUT_MS) : interval;
      conn.send({ type: "ping", id: String(++conn.pings) });
      this.#stats.pings++;
      this.#armHeartbeat(conn, conn.pingTimeout);
    } else {
      this.#armHeartbeat(conn, interval - silent);
    }
  }

  // --- tokens ----------------------------------------------------------------

  #scheduleRefresh(conn, token) {
    clearTimeout(conn.refreshTimer);
    conn.refreshTimer = null;
    if (typeof this.#token !== "function" || !token) return; // a fixed string cannot be refreshed
    const delay = refreshDelay(token);
    if (delay !== null) this.#armRefresh(conn, delay);
  }

  #armRefresh(conn, delay) {
    clearTimeout(conn.refreshTimer);
    conn.refreshTimer = setTimeout(() => this.#refresh(conn), delay);
  }

  async #refresh(conn) {
    conn.refreshTimer = null;
    if (conn.aborted || this.#closed) return;
    let token;
    try {
      token = await this.#getToken();
    } catch (error) {
      if (conn.aborted) return;
      this.#emitError("token_refresh_failed", `token function failed: ${error?.message ?? error}`, error);
      this.#armRefresh(conn, 1000);
      return;
    }
    if (conn.aborted || this.#closed || !token) return;
    conn.authToken = token;
    if (conn.send({ type: "auth", token })) this.#stats.tokenRefreshes++;
  }
}

/** Sockets being closed -> the timer that drops them if the peer is silent. */
const closeGraceTimers = new WeakMap();

/** Closes a socket; if the peer does not finish the closing handshake within
 * `graceMs`, drops it (ws in Node has terminate(); a browser needs nothing). */
function closeSocket(ws, code, reason, graceMs) {
  try {
    ws.close(code, reason);
  } catch {
    // CONNECTING in some implementations, or already closed: nothing to do.
  }
  if (typeof ws.terminate === "function") {
    if (graceMs === 0) ws.terminate();
    else closeGraceTimers.set(ws, setTimeout(() => ws.terminate(), graceMs));
  }
}
