// Types for ws-gateway-client (client.js). Checked by `npm run typecheck`
// against test/types/usage.ts.

/** A position as the gateway hands them out: an opaque decimal string.
 * Compare positions with BigInt, never as numbers or strings. */
export type Position = string;

export type ConnectionState = "connecting" | "connected" | "disconnected";

/** What `client.on("state", ...)` receives. */
export interface StateEvent {
  state: ConnectionState;
  /** On "disconnected": the close code (1001 shutdown, 1006 lost or refused,
   * 1008 policy, 4001 token expired, 4008 slow consumer, ...). Codes the
   * client decided itself: 1006 (no pong: presumed dead), 1007 (undecodable
   * frame), 4000 (client and gateway out of step, e.g. after rate_limited).
   * Undefined when no socket was opened (the token function failed). */
  code?: number;
  /** On "disconnected": the gateway's close reason, or what failed (e.g.
   * "Unexpected server response: 401" in Node; browsers do not say). */
  reason?: string;
  /** On "disconnected": when the next attempt starts (0: at once). */
  reconnectInMs?: number;
  /** On "connecting": attempts since the last healthy connection. */
  attempt?: number;
  /** On "connected": the gateway's id for this connection. */
  connectionId?: string;
}

/** Problems not tied to one subscription: a refused in-band token refresh
 * (invalid_token), rate_limited, a callback that threw (callback_threw),
 * positions.get/set failures, errors the gateway sent for no subscribe. */
export interface ClientError {
  code: string;
  message: string;
  cause?: unknown;
}

/** A committed INSERT, UPDATE or DELETE (SPEC 4). */
export interface Change<Row = Record<string, unknown>> {
  type: "change";
  room: string;
  position: Position;
  schema: string;
  table: string;
  op: "INSERT" | "UPDATE" | "DELETE";
  /** The primary-key columns, with the same JSON values as in `row`. */
  key: Record<string, unknown>;
  /** The row after the change; for DELETE, as it was before. */
  row: Row;
  /** RFC 3339, microseconds. */
  committed_at: string;
}

/** An event published with `realtime.publish(room, event, payload)`. */
export interface GatewayEvent<Payload = unknown> {
  type: "event";
  room: string;
  position: Position;
  event: string;
  payload: Payload;
  committed_at: string;
}

export type Delivery<Row = Record<string, unknown>, Payload = unknown> = Change<Row> | GatewayEvent<Payload>;

export interface SubscriptionError {
  /** forbidden, invalid_room, invalid_position, too_many_subscriptions, ... */
  code: string;
  message: string;
  room: string;
}

export interface SubscribeOptions<Row = Record<string, unknown>, Payload = unknown> {
  /** Resume after this position (changes after it follow, none missing).
   * Default: positions.get(room), else live from now. */
  since?: Position | bigint | null;
  /** Each change or event of the room exactly once, in commit order, across
   * reconnects. positions.set(room, position) runs after it returns. */
  onChange?(change: Delivery<Row, Payload>): void;
  /** The history since the resume point is gone (retention, TRUNCATE):
   * refetch the room's state. The stream goes on after it. */
  /** `position`: where the stream goes on (after it), as `sub.position`. */
  onReset?(info: { reason: string; room: string; position: string | null }): void;
  /** The room is live on a connection (each connect): everything committed
   * after `position` will be delivered. `resumed`: it continued from an
   * earlier position (what was missed follows). */
  onSubscribed?(info: { position: Position; resumed: boolean; room: string }): void;
  /** The gateway refused the room: this subscription has ended. */
  onError?(error: SubscriptionError): void;
}

/** Where positions live between page loads or process runs. */
export interface PositionStore {
  get(room: string): Position | null | undefined | Promise<Position | null | undefined>;
  set(room: string, position: Position): void | Promise<void>;
}

/** The parts of a WebSocket the client uses: the browser's, or the ws package's. */
export interface WebSocketLike {
  readonly readyState: number;
  binaryType: string;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: "open" | "message" | "close" | "error", listener: (event: any) => void): void;
}

export interface WebSocketConstructor {
  new (url: string): WebSocketLike;
}

export interface ReconnectOptions {
  /** Default 500. */
  minDelayMs?: number;
  /** Default 20000. */
  maxDelayMs?: number;
}

export interface GatewayClientOptions {
  /** A JWT, or a function giving one: asked on every connect (after 4001
   * first of all) and again before `exp`, then sent in band. */
  token?: string | (() => string | Promise<string>);
  /** "auto" (gzip where DecompressionStream exists, else none), "gzip",
   * "br" (Node; browsers with DecompressionStream("brotli")) or "none". */
  encoding?: "auto" | "gzip" | "br" | "none";
  /** Default: globalThis.WebSocket. In Node 20, the ws package's. */
  WebSocket?: WebSocketConstructor;
  /** Exponential backoff with full jitter between these. */
  reconnect?: ReconnectOptions;
  positions?: PositionStore;
}

export interface ClientStats {
  connections: number;
  frames: number;
  changes: number;
  /** Repeats dropped at a seam (at or below the room's position). */
  duplicates: number;
  acks: number;
  pings: number;
  tokenRefreshes: number;
}

export class Subscription {
  readonly room: string;
  /** The last position delivered to onChange (or where it went live). */
  readonly position: Position | null;
  readonly state: "subscribing" | "subscribed" | "ended";
  /** No callback runs after this returns. */
  unsubscribe(): void;
}

export class GatewayClient {
  constructor(url: string | URL, options?: GatewayClientOptions);
  readonly state: ConnectionState;
  readonly stats: ClientStats;
  /** Returns a function that removes the listener. */
  on(event: "state", listener: (event: StateEvent) => void): () => void;
  on(event: "error", listener: (error: ClientError) => void): () => void;
  off(event: "state", listener: (event: StateEvent) => void): void;
  off(event: "error", listener: (error: ClientError) => void): void;
  /** Throws if `room` is already subscribed on this client. */
  subscribe<Row = Record<string, unknown>, Payload = unknown>(
    room: string,
    options?: SubscribeOptions<Row, Payload>,
  ): Subscription;
  /** For good: no reconnect, no callback, no timer left. */
  close(): void;
}

export const DEFAULT_RECONNECT: Readonly<{ minDelayMs: number; maxDelayMs: number }>;

/** Full jitter: uniform in [0, min(maxDelayMs, minDelayMs * 2^attempt)]. */
export function backoffDelay(
  attempt: number,
  reconnect: { minDelayMs: number; maxDelayMs: number },
  random?: () => number,
): number;

export function isPosition(value: unknown): value is Position;

/** `exp` and `iat` (seconds) from a JWT's payload, or null. */
export function tokenTimes(token: string): { exp: number; iat: number | null } | null;

/** Milliseconds until an in-band refresh of `token` is due, or null. */
export function refreshDelay(token: string, nowMs?: number): number | null;
