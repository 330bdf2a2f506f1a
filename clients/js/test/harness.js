// The test harness: a real PostgreSQL (TEST_DATABASE_URL names a server's
// `postgres` database), a fresh database per test file with the gateway's
// migrations applied by the real binary (GATEWAY_BIN), the real gateway as a
// process on a fixed port (so it can be restarted on the same address),
// concurrent writers, and the outbox (`realtime.changes`) as the truth every
// count is compared with.

import { spawn } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import pg from "pg";

export const CLIENT_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
export const GATEWAY_BIN = path.resolve(CLIENT_DIR, process.env.GATEWAY_BIN || "../../target/debug/ws-gateway");
/** How long any awaited condition may take before the test fails. */
export const DEADLINE_MS = 20000;
/** HS256 secret the test gateways verify tokens with (at least 32 bytes). */
export const JWT_SECRET = "ws-gateway-js-client-tests-secret-0123456789";

/** Fails (never skips) when the suite cannot run here, saying what is missing. */
export function requireEnvironment() {
  const problems = [];
  if (!process.env.TEST_DATABASE_URL) {
    problems.push(
      "TEST_DATABASE_URL is not set: point it at a PostgreSQL server's `postgres` database, " +
        "e.g. the URL printed by `ws-gateway dev-db start --dir /tmp/jsdb` (make test exports it)",
    );
  }
  if (!fs.existsSync(GATEWAY_BIN)) {
    problems.push(`no gateway binary at ${GATEWAY_BIN}: run \`cargo build\` at the repository root, or set GATEWAY_BIN`);
  }
  if (problems.length > 0) throw new Error(`cannot run the JS client tests:\n  ${problems.join("\n  ")}`);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls `check` until it returns a value other than undefined/false/null,
 * or throws at the deadline naming what was awaited. */
export async function eventually(what, check, deadlineMs = DEADLINE_MS) {
  const deadline = Date.now() + deadlineMs;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value !== undefined && value !== false && value !== null) return value;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${deadlineMs} ms waiting for ${what}${last ? ` (last error: ${last.message})` : ""}`);
    }
    await sleep(20);
  }
}

function base64url(data) {
  return Buffer.from(data).toString("base64url");
}

/** An HS256 JWT. `expiresInS` defaults to an hour; claims override. */
export function makeToken({ sub = "js-tests", rooms = ["project:*"], expiresInS = 3600, ...claims } = {}, secret = JWT_SECRET) {
  const now = Math.floor(Date.now() / 1000);
  const header = base64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const payload = base64url(JSON.stringify({ sub, rooms, iat: now, exp: now + expiresInS, ...claims }));
  const signature = createHmac("sha256", secret).update(`${header}.${payload}`).digest("base64url");
  return `${header}.${payload}.${signature}`;
}

function withDatabase(serverUrl, database) {
  const url = new URL(serverUrl);
  url.pathname = `/${database}`;
  return url.href;
}

function run(command, args, env) {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { env: { PATH: process.env.PATH, ...env }, stdio: ["ignore", "pipe", "pipe"] });
    let output = "";
    child.stdout.on("data", (d) => (output += d));
    child.stderr.on("data", (d) => (output += d));
    child.on("error", reject);
    child.on("exit", (code) =>
      code === 0 ? resolve(output) : reject(new Error(`${command} ${args.join(" ")} exited ${code}:\n${output}`)),
    );
  });
}

let databases = 0;

/**
 * A fresh database: `ws-gateway migrate` applied, and `items` (id, project_id,
 * body) tracked into `project:{project_id}`.
 */
export async function freshDatabase() {
  requireEnvironment();
  const server = process.env.TEST_DATABASE_URL;
  const name = `tjs_${process.pid}_${databases++}_${randomBytes(3).toString("hex")}`;
  const admin = new pg.Client({ connectionString: server });
  await admin.connect();
  await admin.query(`create database ${name}`);
  await admin.end();
  const url = withDatabase(server, name);
  // The secret too: at 27a87b9 `migrate` still validates the auth settings.
  await run(GATEWAY_BIN, ["migrate"], { DATABASE_URL: url, GATEWAY_JWT_SECRET: JWT_SECRET, RUST_LOG: "warn" });
  const pool = new pg.Pool({ connectionString: url, max: 6 });
  pool.on("error", () => {}); // a terminated idle connection is not the test's failure
  await pool.query(
    `create table items (id bigint primary key, project_id int not null, body text not null default '');
     select realtime.track('public.items', array['project:{project_id}']);`,
  );
  return {
    url,
    name,
    pool,
    async drop() {
      await pool.end();
      const admin = new pg.Client({ connectionString: server });
      await admin.connect();
      await admin.query(`drop database if exists ${name} with (force)`);
      await admin.end();
    },
  };
}

/** A port that was free a moment ago, for a gateway that must come back on it. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

let gateways = 0;

/** The real gateway binary, `serve`, as a child process. */
export class Gateway {
  /** @param {{databaseUrl: string, port: number, env?: Record<string, string>}} options */
  static async start(options) {
    const gateway = new Gateway(options);
    await gateway.waitLive();
    return gateway;
  }

  constructor({ databaseUrl, port, env = {} }) {
    this.port = port;
    this.logPath = path.join(os.tmpdir(), `ws-gateway-js-${process.pid}-${port}-${gateways++}.log`);
    const log = fs.openSync(this.logPath, "w");
    this.child = spawn(GATEWAY_BIN, ["serve"], {
      env: {
        PATH: process.env.PATH,
        DATABASE_URL: databaseUrl,
        GATEWAY_LISTEN: `127.0.0.1:${port}`,
        GATEWAY_AUTH: "jwt",
        GATEWAY_JWT_SECRET: JWT_SECRET,
        RUST_LOG: "info",
        ...env,
      },
      stdio: ["ignore", "ignore", log],
    });
    fs.closeSync(log);
    this.exit = new Promise((resolve) => this.child.on("exit", (code, signal) => resolve({ code, signal })));
    this.exited = false;
    this.exit.then(() => (this.exited = true));
  }

  get wsUrl() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  get httpUrl() {
    return `http://127.0.0.1:${this.port}`;
  }

  async health() {
    const response = await fetch(`${this.httpUrl}/healthz`);
    return { status: response.status, body: await response.json() };
  }

  async metrics() {
    return (await fetch(`${this.httpUrl}/metrics`)).text();
  }

  async waitLive() {
    await eventually(`the gateway on port ${this.port} to be live (log: ${this.logPath})`, async () => {
      if (this.exited) throw new Error(`gateway exited:\n${this.log()}`);
      const { status, body } = await this.health();
      return status === 200 && body.feed?.state === "live";
    });
  }

  /** Sends `signal` and waits for the process to exit. */
  async stop(signal = "SIGTERM") {
    if (!this.exited) this.child.kill(signal);
    const deadline = setTimeout(() => this.child.kill("SIGKILL"), DEADLINE_MS);
    const result = await this.exit;
    clearTimeout(deadline);
    return result;
  }

  log() {
    try {
      return fs.readFileSync(this.logPath, "utf8");
    } catch {
      return "";
    }
  }
}

/**
 * `writers` concurrent connections commit items 1..total (one per
 * transaction, room `project:{id % rooms}`), retrying through any error
 * until every one is committed (inserts are idempotent).
 */
export function startWorkload(databaseUrl, { total, rooms, writers = 4, body = () => "load", firstId = 1 }) {
  let committed = 0;
  let stopping = false;
  const writer = async (w) => {
    let client = null;
    let id = firstId + w;
    while (id < firstId + total && !stopping) {
      try {
        if (!client) {
          client = new pg.Client({ connectionString: databaseUrl });
          client.on("error", () => {});
          await client.connect();
        }
        await client.query("insert into items (id, project_id, body) values ($1, $2, $3) on conflict (id) do nothing", [
          id,
          id % rooms,
          body(id),
        ]);
        committed++;
        id += writers;
      } catch {
        await client?.end().catch(() => {});
        client = null;
        await sleep(50);
      }
    }
    await client?.end().catch(() => {});
  };
  const done = Promise.all(Array.from({ length: writers }, (_, w) => writer(w)));
  return {
    get committed() {
      return committed;
    },
    waitCommitted: (n) => eventually(`writers to commit ${n}`, () => committed >= n, 60000),
    done,
    stop() {
      stopping = true;
      return done;
    },
  };
}

/** Positions committed to `room` after `after`, in commit order: the truth. */
export async function outboxPositions(pool, room, after = "0") {
  const { rows } = await pool.query(
    "select position::text as p from realtime.changes where $1 = any (rooms) and position > $2::bigint order by position",
    [room, after],
  );
  return rows.map((r) => r.p);
}

/** The outbox's last position right now. */
export async function outboxHead(pool) {
  const { rows } = await pool.query("select coalesce(max(position), 0)::text as p from realtime.changes");
  return rows[0].p;
}

/** Compares what a room's onChange got with what the outbox holds. */
export function compare(expected, delivered) {
  const seen = new Set();
  let duplicates = 0;
  for (const p of delivered) {
    if (seen.has(p)) duplicates++;
    seen.add(p);
  }
  const want = new Set(expected);
  const missing = expected.filter((p) => !seen.has(p));
  const unexpected = delivered.filter((p) => !want.has(p));
  let inOrder = true;
  for (let i = 1; i < delivered.length; i++) if (BigInt(delivered[i]) <= BigInt(delivered[i - 1])) inOrder = false;
  return { expected: expected.length, delivered: delivered.length, duplicates, missing, unexpected, inOrder };
}

/**
 * A GatewayClient subscribed to `rooms`, recording every callback with its
 * time: positions per room, subscribed events, resets, state changes.
 */
export function recordingClient(GatewayClient, url, options, rooms) {
  const record = {
    client: null,
    got: new Map(rooms.map((r) => [r, []])),
    /** When each change in `got` arrived (ms since the epoch). */
    times: new Map(rooms.map((r) => [r, []])),
    firstPosition: new Map(),
    subscribed: [],
    resets: [],
    errors: [],
    clientErrors: [],
    states: [],
    subs: new Map(),
  };
  const client = new GatewayClient(url, options);
  record.client = client;
  client.on("state", (event) => record.states.push({ at: Date.now(), ...event }));
  client.on("error", (error) => record.clientErrors.push({ at: Date.now(), ...error }));
  for (const room of rooms) {
    const sub = client.subscribe(room, {
      onChange(change) {
        record.got.get(room).push(change.position);
        record.times.get(room).push(Date.now());
      },
      onSubscribed(info) {
        if (!record.firstPosition.has(room)) record.firstPosition.set(room, info.position);
        record.subscribed.push({ at: Date.now(), ...info });
      },
      onReset(info) {
        record.resets.push({ at: Date.now(), ...info });
      },
      onError(error) {
        record.errors.push({ at: Date.now(), ...error });
      },
    });
    record.subs.set(room, sub);
  }
  record.waitSubscribed = () =>
    eventually(`subscribed to ${rooms.join(", ")}`, () => rooms.every((r) => record.firstPosition.has(r)));
  return record;
}

/** A child process's output, and a way to wait for a line matching `pattern`. */
export function watchOutput(child) {
  const lines = [];
  let partial = "";
  child.stdout.setEncoding("utf8");
  child.stdout.on("data", (chunk) => {
    partial += chunk;
    const parts = partial.split("\n");
    partial = parts.pop();
    lines.push(...parts);
  });
  let stderr = "";
  child.stderr?.setEncoding("utf8");
  child.stderr?.on("data", (chunk) => (stderr += chunk));
  return {
    lines,
    get stderr() {
      return stderr;
    },
  };
}
