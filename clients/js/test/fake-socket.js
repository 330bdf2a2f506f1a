// An in-memory WebSocket for the unit tests: the test plays the gateway,
// frame by frame, and sees everything the client sends.

/** A fresh WebSocket class with its own list of instances. */
export function fakeSocketClass() {
  class FakeSocket {
    static instances = [];

    constructor(url) {
      this.url = new URL(url);
      this.readyState = 0;
      this.binaryType = "blob";
      this.sent = [];
      this.listeners = new Map();
      this.closedWith = null;
      FakeSocket.instances.push(this);
      // Opens on the next turn, as a real socket would.
      queueMicrotask(() => {
        if (this.readyState === 0) {
          this.readyState = 1;
          this.emit("open", {});
        }
      });
    }

    static get last() {
      return FakeSocket.instances[FakeSocket.instances.length - 1];
    }

    addEventListener(type, listener) {
      if (!this.listeners.has(type)) this.listeners.set(type, []);
      this.listeners.get(type).push(listener);
    }

    emit(type, event) {
      for (const listener of this.listeners.get(type) ?? []) listener(event);
    }

    send(text) {
      if (this.readyState !== 1) throw new Error("send on a socket that is not open");
      this.sent.push(JSON.parse(text));
    }

    /** Messages the client sent, of one type. */
    sentOf(type) {
      return this.sent.filter((m) => m.type === type);
    }

    close(code = 1005, reason = "") {
      if (this.readyState === 3) return;
      this.closedWith = { code, reason };
      this.readyState = 3;
      queueMicrotask(() => this.emit("close", { code, reason }));
    }

    // --- the gateway's side ---

    /** Sends a text frame (an object is sent as JSON) or a binary frame. */
    deliver(frame) {
      const data = typeof frame === "string" || frame instanceof ArrayBuffer ? frame : JSON.stringify(frame);
      this.emit("message", { data });
    }

    welcome(extra = {}) {
      this.deliver({ type: "welcome", connection_id: "fake-1", heartbeat_ms: 25000, encoding: "none", ...extra });
    }

    serverClose(code, reason = "") {
      this.readyState = 3;
      this.emit("close", { code, reason });
    }
  }
  return FakeSocket;
}

/** Resolves after pending microtasks and one macrotask turn. */
export const turn = () => new Promise((resolve) => setImmediate(resolve));

export function change(room, position, extra = {}) {
  return {
    type: "change",
    room,
    position: String(position),
    schema: "public",
    table: "items",
    op: "INSERT",
    key: { id: Number(position) },
    row: { id: Number(position) },
    committed_at: "2026-11-26T10:30:00.123456Z",
    ...extra,
  };
}

/** Waits (on real turns of the event loop, so it works under mocked timers)
 * until `condition()` holds, or fails naming `what`. */
export async function until(condition, what, deadlineMs = 2000) {
  const start = performance.now();
  while (!condition()) {
    if (performance.now() - start > deadlineMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setImmediate(resolve));
  }
}
