// The README's Node example (examples/node.mjs), run as it is: it prints
// each change of its room, and once closed it lets the process exit (no
// timer or socket left behind).

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import path from "node:path";
import { after, test } from "node:test";
import { CLIENT_DIR, Gateway, eventually, freePort, freshDatabase, makeToken, outboxPositions, watchOutput } from "./harness.js";

const cleanup = [];
after(async () => {
  for (const step of cleanup.reverse()) await step().catch(() => {});
});

test("the Node example follows a room across a gateway restart, and exits once closed", { timeout: 60000 }, async () => {
  const db = await freshDatabase();
  cleanup.push(() => db.drop());
  const port = await freePort();
  let gateway = await Gateway.start({ databaseUrl: db.url, port });
  cleanup.push(() => gateway.stop("SIGKILL"));
  const child = spawn(process.execPath, [path.join(CLIENT_DIR, "examples/node.mjs"), "project:42"], {
    cwd: CLIENT_DIR,
    env: { PATH: process.env.PATH, GATEWAY_URL: gateway.wsUrl, GATEWAY_TOKEN: makeToken({ rooms: ["project:42"] }) },
    stdio: ["ignore", "pipe", "pipe"],
  });
  const exited = new Promise((resolve) => child.on("exit", (code, signal) => resolve({ code, signal })));
  cleanup.push(async () => child.kill("SIGKILL"));
  const out = watchOutput(child);
  await eventually("the example to connect", () => out.stderr.includes("[connected]"));
  // Live once a committed change shows up.
  let id = 1;
  await eventually("the example to print a change", async () => {
    await db.pool.query("insert into items (id, project_id) values ($1, 42)", [id++]);
    return out.lines.length >= 1;
  });
  const start = JSON.parse(out.lines[0]).position;
  await db.pool.query("insert into items (id, project_id) select g, 42 from generate_series(100, 119) g");
  await gateway.stop("SIGTERM");
  await db.pool.query("insert into items (id, project_id) select g, 42 from generate_series(120, 139) g");
  gateway = await Gateway.start({ databaseUrl: db.url, port });
  const want = [start, ...(await outboxPositions(db.pool, "project:42", start))];
  await eventually("every change printed", () => out.lines.length >= want.length);
  const printed = out.lines.map((line) => JSON.parse(line));
  assert.deepEqual(
    printed.map((c) => c.position),
    want,
  );
  assert.equal(printed.at(-1).op, "INSERT");
  assert.match(out.stderr, /\[disconnected\] 1001/, "it saw the gateway's 1001");
  // SIGTERM: the example closes its client; nothing keeps the process alive.
  const closedAt = Date.now();
  child.kill("SIGTERM");
  const result = await Promise.race([exited, new Promise((resolve) => setTimeout(() => resolve("still running"), 5000))]);
  assert.deepEqual(result, { code: 0, signal: null }, `the example exits on its own after close(); stderr:\n${out.stderr}`);
  console.log(`\nNode example: printed ${printed.length} changes across a restart; exited ${Date.now() - closedAt} ms after close()`);
});
