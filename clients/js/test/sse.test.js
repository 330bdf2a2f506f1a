// GET /sse in a real browser: a page on another origin opens a native
// EventSource on two rooms of the real gateway (headless Debian Chromium
// through playwright-core), the gateway is killed and started again while
// rows are committed, and the browser reconnects by itself with
// Last-Event-ID (preflighted: it is cross-origin). What the page got must
// equal the outbox: every change once, in order, nothing missing.

import assert from "node:assert/strict";
import http from "node:http";
import { after, test } from "node:test";
import { launchChromium } from "./chromium.js";
import { Gateway, compare, eventually, freePort, freshDatabase, makeToken, outboxPositions, startWorkload } from "./harness.js";

const ROOMS = ["project:0", "project:1"]; // the workload writes item id to project:{id % 2}

const cleanup = [];
after(async () => {
  for (const step of cleanup.reverse()) await step().catch(() => {});
});

const PAGE = `<!doctype html><meta charset="utf-8"><script>
window.report = { got: {}, subscribed: [], ids: [], opens: 0, errors: 0, closes: [], gzip: null };
const params = new URLSearchParams(location.search);
const source = new EventSource(params.get("sse"));
source.onopen = () => report.opens++;
source.onerror = () => report.errors++;
source.onmessage = (e) => {
  const m = JSON.parse(e.data);
  if (e.lastEventId) report.ids.push(e.lastEventId);
  if (m.type === "subscribed") report.subscribed.push({ room: m.room, position: m.position });
  if (m.type === "close") report.closes.push(m.code);
  for (const c of m.type === "batch" ? m.changes : [m]) {
    if (c.type === "change") (report.got[c.room] ??= []).push(c.position);
  }
};
</script>`;

function pageServer() {
  const server = http.createServer((req, res) => {
    res.writeHead(200, { "content-type": "text/html", "cache-control": "no-store" });
    res.end(PAGE);
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

test("a browser EventSource on two rooms survives a gateway restart with Last-Event-ID: the outbox's changes, once, in order", { timeout: 120000 }, async () => {
  const db = await freshDatabase();
  cleanup.push(() => db.drop());
  const port = await freePort();
  let gateway = await Gateway.start({ databaseUrl: db.url, port });
  cleanup.push(() => gateway.stop("SIGKILL"));
  const app = await pageServer();
  cleanup.push(() => new Promise((resolve) => app.close(resolve)));
  const browser = await launchChromium();
  cleanup.push(() => browser.close());

  const page = await browser.context.newPage();
  const pageErrors = [];
  page.on("pageerror", (error) => pageErrors.push(String(error)));
  const streams = [];
  page.on("request", async (request) => {
    if (request.url().includes("/sse")) streams.push({ method: request.method(), headers: await request.allHeaders() });
  });
  page.on("response", async (response) => {
    if (response.url().includes("/sse") && response.request().method() === "GET") {
      const encoding = (await response.allHeaders())["content-encoding"] ?? null;
      await page.evaluate((e) => (window.report.gzip = e), encoding).catch(() => {});
    }
  });
  const token = makeToken({ rooms: ["project:*"], expiresInS: 600 });
  const sse = `${gateway.httpUrl}/sse?room=${ROOMS[0]}&room=${ROOMS[1]}&token=${token}`;
  await page.goto(`http://127.0.0.1:${app.address().port}/?${new URLSearchParams({ sse })}`);
  const report = () => page.evaluate(() => JSON.parse(JSON.stringify(window.report)));
  await eventually("the page's stream to be subscribed to both rooms", async () => (await report()).subscribed.length === 2);
  const first = Object.fromEntries((await report()).subscribed.map((s) => [s.room, s.position]));

  const total = async () => {
    const r = await report();
    return ROOMS.reduce((n, room) => n + (r.got[room]?.length ?? 0), 0);
  };
  const write = async (firstId, count) => {
    await startWorkload(db.url, { total: count, rooms: 2, writers: 2, firstId }).done;
  };
  await write(1, 100);
  await eventually("the first 100 changes in the page", async () => (await total()) >= 100);

  // Killed: no close event, the stream just breaks. Rows are committed
  // while nothing listens; the new gateway comes up on the same address.
  await gateway.stop("SIGKILL");
  await write(101, 50);
  gateway = await Gateway.start({ databaseUrl: db.url, port });
  await eventually("the EventSource to reconnect", async () => (await report()).opens >= 2);
  await write(151, 50);
  await eventually("the page to catch up", async () => (await total()) >= 200);
  // A graceful restart: the stream ends with a 1001 close event.
  await gateway.stop("SIGTERM");
  await eventually("the 1001 close event", async () => (await report()).closes.includes(1001));
  await write(201, 50);
  gateway = await Gateway.start({ databaseUrl: db.url, port });
  await eventually("the EventSource to reconnect again", async () => (await report()).opens >= 3);
  await write(251, 50);

  const want = {};
  for (const room of ROOMS) want[room] = await outboxPositions(db.pool, room, first[room]);
  await eventually(
    "every change in the page",
    async () => {
      const r = await report();
      return ROOMS.every((room) => (r.got[room]?.length ?? 0) >= want[room].length);
    },
    40000,
  ).catch(async (error) => {
    const r = await report();
    throw new Error(`${error.message}: ${JSON.stringify({ ...r, got: Object.fromEntries(ROOMS.map((room) => [room, r.got[room]?.length])) , streams: streams.length })}`);
  });
  const r = await report();
  let expected = 0;
  let delivered = 0;
  let duplicates = 0;
  for (const room of ROOMS) {
    const c = compare(want[room], r.got[room]);
    expected += c.expected;
    delivered += c.delivered;
    duplicates += c.duplicates;
    assert.deepEqual(r.got[room], want[room], `${room}: the outbox's changes, once, in order`);
  }
  const resumed = streams.filter((s) => s.method === "GET" && s.headers["last-event-id"]);
  console.log(
    `\nEventSource in Chromium: expected ${expected} / delivered ${delivered} / duplicates ${duplicates}; ` +
      `${r.opens} opens, ${r.errors} errors, close events ${JSON.stringify(r.closes)}, ` +
      `${resumed.length} reconnects with Last-Event-ID, body encoding ${r.gzip ?? "none"}`,
  );
  assert.ok(resumed.length >= 2, "the browser came back with Last-Event-ID after each restart");
  assert.ok(r.closes.includes(1001), "the graceful restart said so");
  assert.ok(r.opens >= 3);
  const ids = r.ids.map(BigInt);
  assert.ok(ids.every((id, i) => i === 0 || id >= ids[i - 1]), "event ids only move forward");
  assert.deepEqual(pageErrors, []);
  await page.close();
});
