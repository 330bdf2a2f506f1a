// The gateway's dashboard (`/`) in headless Chromium: its live-changes
// panel subscribes through the client the gateway serves (`/client.js`) and
// resumes across a gateway restart: every change of its rooms is listed
// once, in commit order, equal to the outbox.

import assert from "node:assert/strict";
import { after, test } from "node:test";
import { launchChromium } from "./chromium.js";
import { Gateway, compare, eventually, freePort, freshDatabase, makeToken, outboxPositions, startWorkload } from "./harness.js";

const ROOMS = ["project:1", "project:2"]; // among the panel's default rooms

const cleanup = [];
after(async () => {
  for (const step of cleanup.reverse()) await step().catch(() => {});
});

test("the dashboard's live panel uses /client.js and resumes across a gateway restart: each change once, in order", { timeout: 120000 }, async () => {
  const db = await freshDatabase();
  cleanup.push(() => db.drop());
  const port = await freePort();
  let gateway = await Gateway.start({ databaseUrl: db.url, port });
  cleanup.push(() => gateway.stop("SIGKILL"));
  const browser = await launchChromium();
  cleanup.push(() => browser.close());
  const page = await browser.context.newPage();
  const pageErrors = [];
  page.on("pageerror", (error) => pageErrors.push(String(error)));
  const scripts = [];
  page.on("request", (request) => scripts.push(new URL(request.url()).pathname));
  const token = makeToken({ rooms: ["project:*", "safety"], expiresInS: 600 });
  await page.goto(`${gateway.httpUrl}/?token=${token}`);
  await page.waitForFunction(() => window.liveClient?.state === "connected");
  await page.evaluate(() => {
    window.states = [];
    window.liveClient.on("state", (e) => window.states.push({ ...e, at: Date.now() }));
  });
  const panel = () =>
    page.evaluate(() => [...document.querySelectorAll("#changes .row")].map((r) => ({ room: r.dataset.room, position: r.dataset.position })));
  /** Per room, in commit order (the panel lists the newest first). */
  const perRoom = async () => {
    const rows = (await panel()).reverse();
    return Object.fromEntries(ROOMS.map((room) => [room, rows.filter((r) => r.room === room).map((r) => r.position)]));
  };

  // Live once a marker of each room shows up.
  let id = 1;
  await eventually("the panel to list a change of each room", async () => {
    for (const project of [1, 2]) await db.pool.query("insert into items (id, project_id) values ($1, $2)", [id++, project]);
    const got = await perRoom();
    return ROOMS.every((room) => got[room].length > 0);
  });
  const first = Object.fromEntries(Object.entries(await perRoom()).map(([room, ps]) => [room, ps[0]]));
  const before = (p, room) => BigInt(p) < BigInt(first[room]);

  let work = startWorkload(db.url, { total: 40, rooms: 3, writers: 2, firstId: 1000 });
  await work.done;
  const killedAt = Date.now();
  await gateway.stop("SIGKILL");
  work = startWorkload(db.url, { total: 20, rooms: 3, writers: 2, firstId: 2000 });
  await work.done;
  gateway = await Gateway.start({ databaseUrl: db.url, port });
  const liveAt = Date.now();
  work = startWorkload(db.url, { total: 20, rooms: 3, writers: 2, firstId: 3000 });
  await work.done;

  const want = {};
  for (const room of ROOMS) want[room] = (await outboxPositions(db.pool, room)).filter((p) => !before(p, room));
  await eventually("every change in the panel", async () => {
    const got = await perRoom();
    return ROOMS.every((room) => got[room].length >= want[room].length);
  }, 30000);
  const got = await perRoom();
  const states = await page.evaluate(() => window.states);
  const stats = await page.evaluate(() => window.liveClient.stats);
  let expected = 0;
  let delivered = 0;
  let duplicates = 0;
  for (const room of ROOMS) {
    const c = compare(want[room], got[room]);
    expected += c.expected;
    delivered += c.delivered;
    duplicates += c.duplicates;
    assert.deepEqual(got[room], want[room], `${room}: the outbox's changes, once, in order`);
  }
  const back = states.find((s) => s.state === "connected" && s.at > killedAt);
  console.log(
    `\ndashboard live panel (Chromium, /client.js): expected ${expected} / delivered ${delivered} / duplicates ${duplicates}; ` +
      `connected again ${back ? back.at - killedAt : null} ms after the SIGKILL (${back ? back.at - liveAt : null} ms after the new gateway was live); ` +
      `client ${JSON.stringify(stats)}`,
  );
  assert.ok(scripts.includes("/client.js"), "the page loaded the gateway's /client.js");
  assert.ok(states.some((s) => s.state === "disconnected"), "the page saw the restart");
  assert.ok(back, "and came back");
  assert.equal(stats.duplicates, 0);
  assert.ok(stats.frames > 0 && stats.connections >= 2, JSON.stringify(stats));
  assert.equal(await page.locator("#live-status").textContent(), "connected");
  assert.deepEqual(pageErrors, []);
});
