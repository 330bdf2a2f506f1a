// The demo's project board (what `make run` serves beside the dashboard)
// in headless Chromium: the page loads the board as of a position from the
// demo application's backend, imports the client from the gateway (another
// origin: `/client.js` with Access-Control-Allow-Origin) with a token
// function over the backend's `/token`, and follows `project:{id}` from that
// position. Tasks move between columns and daily logs appear as they
// commit; after the whole demo (gateway and backend) is SIGKILLed and
// restarted, the page resumes without reloading. What it shows is compared
// with the database.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, test } from "node:test";
import { launchChromium } from "./chromium.js";
import { GATEWAY_BIN, JWT_SECRET, eventually, freePort, freshDatabase } from "./harness.js";

const PROJECT = 1;
const STATUSES = ["todo", "in_progress", "blocked", "done"];

const cleanup = [];
after(async () => {
  for (const step of cleanup.reverse()) await step().catch(() => {});
});

/** `ws-gateway demo` against `databaseUrl`: the gateway, the demo writer
 * (slow, so the test's own writes dominate) and the board. */
async function startDemo({ databaseUrl, gatewayPort, boardPort }) {
  const logPath = path.join(os.tmpdir(), `ws-gateway-demo-${process.pid}-${boardPort}-${Date.now()}.log`);
  const log = fs.openSync(logPath, "w");
  const child = spawn(GATEWAY_BIN, ["demo", "--rate", "0.5", "--board-listen", `127.0.0.1:${boardPort}`], {
    env: {
      PATH: process.env.PATH,
      DATABASE_URL: databaseUrl,
      GATEWAY_LISTEN: `127.0.0.1:${gatewayPort}`,
      GATEWAY_AUTH: "jwt",
      GATEWAY_JWT_SECRET: JWT_SECRET,
      RUST_LOG: "warn",
    },
    stdio: ["ignore", log, log],
  });
  fs.closeSync(log);
  let exited = false;
  const exit = new Promise((resolve) => child.on("exit", () => resolve((exited = true))));
  const demo = {
    log: () => fs.readFileSync(logPath, "utf8"),
    async kill() {
      if (!exited) child.kill("SIGKILL");
      await exit;
    },
  };
  await eventually(`the demo to serve the board and the gateway (log: ${logPath})`, async () => {
    if (exited) throw new Error(`the demo exited:\n${demo.log()}`);
    const board = await fetch(`http://127.0.0.1:${boardPort}/api/projects`);
    const health = await (await fetch(`http://127.0.0.1:${gatewayPort}/healthz`)).json();
    return board.ok && health.feed?.state === "live";
  }, 60000);
  return demo;
}

/** The project's tasks per column and its latest daily logs, from the database. */
async function fromDatabase(pool) {
  const { rows: tasks } = await pool.query("select id::int, status from public.tasks where project_id = $1 order by id", [PROJECT]);
  const { rows: logs } = await pool.query("select id::int from public.daily_logs where project_id = $1 order by id desc limit 30", [PROJECT]);
  const columns = Object.fromEntries(STATUSES.map((s) => [s, tasks.filter((t) => t.status === s).map((t) => t.id)]));
  return { columns, logs: logs.map((l) => l.id) };
}

/** The same, from the page. */
function fromPage(page) {
  return page.evaluate((statuses) => {
    const ids = (selector) => [...document.querySelectorAll(selector)].map((e) => Number(e.dataset.id));
    const columns = Object.fromEntries(statuses.map((s) => [s, ids(`.column[data-status="${s}"] .task`)]));
    return { columns, logs: ids("#logs .log") };
  }, STATUSES);
}

async function boardMatchesDatabase(page, pool, what) {
  let last;
  await eventually(`the board to show ${what}`, async () => {
    const [shown, stored] = [await fromPage(page), await fromDatabase(pool)];
    last = { shown, stored };
    return JSON.stringify(shown) === JSON.stringify(stored);
  }).catch((error) => {
    throw new Error(`${error.message}: ${JSON.stringify(last)}`);
  });
}

test("the demo's project board follows its project live through the gateway's /client.js, across a restart of the whole demo", { timeout: 150000 }, async () => {
  const db = await freshDatabase();
  cleanup.push(() => db.drop());
  const ports = { databaseUrl: db.url, gatewayPort: await freePort(), boardPort: await freePort() };
  let demo = await startDemo(ports);
  cleanup.push(() => demo.kill());
  const browser = await launchChromium();
  cleanup.push(() => browser.close());
  const page = await browser.context.newPage();
  const pageErrors = [];
  page.on("pageerror", (error) => pageErrors.push(String(error)));
  const clientFrom = [];
  page.on("request", (request) => request.url().endsWith("/client.js") && clientFrom.push(request.url()));
  await page.goto(`http://127.0.0.1:${ports.boardPort}/?project=${PROJECT}`);
  await page.waitForFunction(() => window.boardClient?.state === "connected" && window.board.loads === 1, null, { timeout: 30000 });
  await page.evaluate(() => {
    window.states = [];
    window.boardClient.on("state", (e) => window.states.push({ ...e, at: Date.now() }));
  });
  await boardMatchesDatabase(page, db.pool, "what the database holds");

  // A task moves to another column, one is planned, one archived; a daily log appears.
  const { rows: [moving] } = await db.pool.query("select id::int, status from public.tasks where project_id = $1 and status <> 'blocked' order by id limit 1", [PROJECT]);
  await db.pool.query("update public.tasks set status = 'blocked', updated_at = now() where id = $1", [moving.id]);
  const { rows: [planned] } = await db.pool.query(
    "insert into public.tasks (project_id, title, status) values ($1, 'Survey crane pad (test)', 'todo') returning id::int",
    [PROJECT],
  );
  const { rows: [archived] } = await db.pool.query("select id::int from public.tasks where project_id = $1 and id <> $2 order by id desc limit 1", [PROJECT, planned.id]);
  await db.pool.query("delete from public.tasks where id = $1", [archived.id]);
  const { rows: [log] } = await db.pool.query(
    "insert into public.daily_logs (project_id, weather, crew_count, notes) values ($1, 'overcast', 14, 'Test log: slab formwork inspected') returning id::int",
    [PROJECT],
  );
  await boardMatchesDatabase(page, db.pool, "the moved task, the new one, without the archived one, and the new log");
  const shown = await fromPage(page);
  assert.ok(shown.columns.blocked.includes(moving.id), "the task moved to Blocked");
  assert.ok(shown.columns.todo.includes(planned.id));
  assert.ok(!Object.values(shown.columns).flat().includes(archived.id));
  assert.equal(shown.logs[0], log.id, "the new log on top");

  // The whole demo dies; the board keeps its page and resumes when it is back.
  const killedAt = Date.now();
  await demo.kill();
  await db.pool.query("update public.tasks set status = 'done', percent_complete = 100 where id = $1", [planned.id]);
  await db.pool.query("insert into public.daily_logs (project_id, weather, crew_count, notes) values ($1, 'rain', 9, 'Test log written while the gateway was down')", [PROJECT]);
  demo = await startDemo(ports);
  const liveAt = Date.now();
  await boardMatchesDatabase(page, db.pool, "what was committed while the demo was down");
  const states = await page.evaluate(() => window.states);
  const stats = await page.evaluate(() => ({ loads: window.board.loads, applied: window.board.applied, ...window.boardClient.stats }));
  const back = states.find((s) => s.state === "connected" && s.at > killedAt);
  console.log(
    `\nproject board (Chromium, ${clientFrom[0]}): board equals the database after live moves and a restart; ` +
      `connected again ${back ? back.at - killedAt : null} ms after the SIGKILL (${back ? back.at - liveAt : null} ms after the demo was back); ${JSON.stringify(stats)}`,
  );
  assert.equal(new URL(clientFrom[0]).port, String(ports.gatewayPort), "the client came from the gateway, another origin");
  assert.equal(stats.loads, 1, "resumed, not reloaded");
  assert.equal(stats.duplicates, 0);
  assert.ok(stats.connections >= 2 && back, JSON.stringify(states));
  assert.deepEqual(pageErrors, []);
});
