// A typed use of the package's declarations, checked by `npm run typecheck`
// (tsc --noEmit). Each @ts-expect-error line must stay an error.

import WebSocket from "ws";
import { GatewayClient, backoffDelay, isPosition, type Change, type Delivery, type PositionStore, type StateEvent } from "ws-gateway-client";

interface Task {
  id: number;
  project_id: number;
  title: string;
}

const positions: PositionStore = {
  get: (room) => localStorage.getItem(`position:${room}`),
  set: (room, position) => localStorage.setItem(`position:${room}`, position),
};

// In a browser: the global WebSocket, gzip.
const browser = new GatewayClient("wss://rt.example.com/ws", {
  token: async () => (await fetch("/token")).text(),
  encoding: "auto",
  reconnect: { minDelayMs: 500, maxDelayMs: 20000 },
  positions,
});

// In Node: the ws package's constructor.
const node = new GatewayClient(new URL("ws://127.0.0.1:8080/ws"), { token: "a.b.c", WebSocket, encoding: "br" });

const off = browser.on("state", ({ state, code, reason, reconnectInMs }: StateEvent) => {
  const s: "connecting" | "connected" | "disconnected" = state;
  const c: number | undefined = code;
  const r: string | undefined = reason;
  void [s, c, r, reconnectInMs];
});
off();
browser.on("error", (error) => console.warn(error.code, error.message));

const sub = browser.subscribe<Task, { moved: boolean }>("project:42", {
  since: "120",
  onChange(change: Delivery<Task, { moved: boolean }>) {
    if (change.type === "change") {
      const title: string = change.row.title;
      const op: "INSERT" | "UPDATE" | "DELETE" = change.op;
      void [title, op, change.key, change.committed_at];
    } else {
      const moved: boolean = change.payload.moved;
      const name: string = change.event;
      void [moved, name];
    }
    const p: string = change.position;
    void BigInt(p);
  },
  onReset({ reason }) {
    void reason.toUpperCase();
  },
  onSubscribed({ position, resumed }) {
    void [position.length, resumed === true];
  },
  onError({ code, message, room }) {
    void [code, message, room];
  },
});
const position: string | null = sub.position;
const state: "subscribing" | "subscribed" | "ended" = sub.state;
void [position, state];
sub.unsubscribe();

node.subscribe("task:7", {
  onChange(change) {
    const c = change as Change;
    void c.row["anything"];
  },
});
const stats = node.stats;
void [stats.changes + stats.duplicates, backoffDelay(3, { minDelayMs: 500, maxDelayMs: 20000 }), isPosition("1")];
node.close();

// @ts-expect-error: positions are strings, not numbers
browser.subscribe("project:1", { since: 5 });
// @ts-expect-error: no such encoding
new GatewayClient("ws://x/ws", { encoding: "deflate" });
// @ts-expect-error: no such event
browser.on("message", () => {});
// @ts-expect-error: the state is read-only
browser.state = "connected";
// @ts-expect-error: a token function returns a string
new GatewayClient("ws://x/ws", { token: () => 42 });
