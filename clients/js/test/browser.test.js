// The client in a real browser (headless Debian Chromium through
// playwright-core): a page imports the client, subscribes with gzip,
// receives small and 20 KB rows (the large ones arrive as gzip binary
// frames), survives a gateway restart, and reports what it got; the test
// compares that with the outbox. Then the README's browser example runs.
//
// CLIENT_JS_URL says where the page imports the client from; `{gateway}`
// in it stands for the gateway's http://host:port (e.g.
// CLIENT_JS_URL='{gateway}/client.js'). Default: this package's client.js,
// served by the test's own HTTP server. CHROMIUM overrides /usr/bin/chromium.

import assert from "node:assert/strict";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import path from "node:path";
import { after, test } from "node:test";
import { launchChromium } from "./chromium.js";
import { CLIENT_DIR, Gateway, compare, eventually, freePort, freshDatabase, makeToken, outboxPositions, startWorkload } from "./harness.js";

const ROOMS = ["project:0", "project:1"]; // the workload writes item id to project:{id % 2}

const cleanup = [];
after(async () => {
  for (const step of cleanup.reverse()) await step().catch(() => {});
});

/** The application's origin: pages, the client, a token endpoint, and /ws
 * passed through to the gateway (as an app server in front of it would). */
function appServer(gatewayPort, clientUrl) {
  const files = {
    "/client.js": [path.join(CLIENT_DIR, "client.js"), "text/javascript"],
    "/page.html": [path.join(CLIENT_DIR, "test/browser/page.html"), "text/html"],
    "/example": [path.join(CLIENT_DIR, "examples/browser.html"), "text/html"],
  };
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, "http://app");
    if (url.pathname === "/token") {
      res.writeHead(200, { "content-type": "text/plain", "cache-control": "no-store" });
      res.end(makeToken({ rooms: ["project:*"], expiresInS: 600 }));
      return;
    }
    if (url.pathname === "/client.js" && clientUrl) {
      res.writeHead(302, { location: clientUrl });
      res.end();
      return;
    }
    const file = files[url.pathname];
    if (!file) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "content-type": file[1], "cache-control": "no-store" });
    res.end(fs.readFileSync(file[0]));
  });
  server.on("upgrade", (req, socket, head) => {
    const upstream = net.connect(gatewayPort, "127.0.0.1", () => {
      let request = `${req.method} ${req.url} HTTP/1.1\r\n`;
      for (let i = 0; i < req.rawHeaders.length; i += 2) request += `${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`;
      upstream.write(`${request}\r\n`);
      upstream.write(head);
      socket.pipe(upstream).pipe(socket);
    });
    upstream.on("error", () => socket.destroy());
    socket.on("error", () => upstream.destroy());
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

test("in headless Chromium: gzip frames, small and 20 KB rows, a gateway restart; what the page got equals the outbox", { timeout: 120000 }, async () => {
  const db = await freshDatabase();
  cleanup.push(() => db.drop());
  const port = await freePort();
  let gateway = await Gateway.start({ databaseUrl: db.url, port });
  cleanup.push(() => gateway.stop("SIGKILL"));
  const clientUrl = process.env.CLIENT_JS_URL ? process.env.CLIENT_JS_URL.replaceAll("{gateway}", gateway.httpUrl) : null;
  const app = await appServer(port, clientUrl);
  cleanup.push(() => new Promise((resolve) => app.close(resolve)));
  const appUrl = `http://127.0.0.1:${app.address().port}`;
  const browser = await launchChromium();
  cleanup.push(() => browser.close());

  const page = await browser.context.newPage();
  const pageErrors = [];
  page.on("pageerror", (error) => pageErrors.push(String(error)));
  const query = new URLSearchParams({ client: clientUrl ?? `${appUrl}/client.js`, ws: gateway.wsUrl, rooms: ROOMS.join(",") });
  await page.goto(`${appUrl}/page.html?${query}`);
  const report = () => page.evaluate(() => JSON.parse(JSON.stringify(window.report)));
  const subscribedTo = (r) => new Set(r.subscribed.map((s) => s.room));
  await eventually("the page to subscribe", async () => {
    const r = await report();
    if (r.failure) throw new Error(`page failed: ${r.failure}`);
    return ROOMS.every((room) => subscribedTo(r).has(room));
  });
  const first = Object.fromEntries((await report()).subscribed.map((s) => [s.room, s.position]));

  // Every fifth row 20 KB (compressed: above GATEWAY_COMPRESSION_THRESHOLD).
  const body = (id) => (id % 5 === 0 ? `${id}:`.padEnd(20000, "r") : `small ${id}`);
  let work = startWorkload(db.url, { total: 100, rooms: 2, writers: 2, body, firstId: 1 });
  await work.done;
  await eventually("the first 100 changes in the page", async () => {
    const r = await report();
    return ROOMS.reduce((n, room) => n + r.got[room].length, 0) >= 100;
  }).catch(async (error) => {
    const r = await report();
    throw new Error(`${error.message}: ${JSON.stringify({ ...r, got: Object.fromEntries(ROOMS.map((room) => [room, r.got[room].length])) })}`);
  });

  // Restart: killed, rows committed while it is down, a new gateway on the
  // same address.
  const restartAt = Date.now();
  await gateway.stop("SIGKILL");
  work = startWorkload(db.url, { total: 50, rooms: 2, writers: 2, body, firstId: 101 });
  await work.done;
  gateway = await Gateway.start({ databaseUrl: db.url, port });
  work = startWorkload(db.url, { total: 50, rooms: 2, writers: 2, body, firstId: 151 });
  await work.done;

  const want = {};
  for (const room of ROOMS) want[room] = await outboxPositions(db.pool, room, first[room]);
  await eventually("every change in the page", async () => {
    const r = await report();
    return ROOMS.every((room) => r.got[room].length >= want[room].length);
  }, 30000);
  const r = await report();
  const back = r.subscribed.filter((s) => s.at > restartAt && s.resumed);
  const reconnectMs = back.length === ROOMS.length ? Math.max(...back.map((s) => s.at)) - restartAt : null;
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
  console.log(
    `\nChromium (${await browser.context.browser()?.version?.() ?? "headless"}): expected ${expected} / delivered ${delivered} / duplicates ${duplicates}; ` +
      `frames: ${r.frames.text} text, ${r.frames.binary} gzip binary; ${r.bigRows} rows of 20 KB; ` +
      `live again ${reconnectMs} ms after the SIGKILL (the new gateway took part of that to start)`,
  );
  assert.ok(r.frames.binary >= 1, "some frames arrived gzip-compressed");
  assert.equal(r.bigRows, 40, "every 20 KB row arrived whole");
  assert.ok(r.states.some((s) => s.state === "disconnected"), "the page saw the restart");
  assert.equal(r.states.at(-1).state, "connected");
  assert.deepEqual(r.errors, []);
  assert.deepEqual(r.resets, []);
  assert.deepEqual(pageErrors, []);
  await page.evaluate(() => window.client.close());
  await page.close();

  // The README's browser example, as it is: same origin as its gateway.
  const example = await browser.context.newPage();
  example.on("pageerror", (error) => pageErrors.push(String(error)));
  await example.goto(`${appUrl}/example`);
  // The example subscribes to project:42: commit markers until one shows
  // up (then it is live), then one more that must show up too.
  let id = 1000;
  await eventually("the example page to list a change", async () => {
    await db.pool.query("insert into items (id, project_id) values ($1, 42)", [id++]);
    return (await example.locator("#changes li").count()) >= 1;
  });
  await db.pool.query("insert into items (id, project_id) values (5000, 42)");
  await eventually("the example to show id 5000", async () => (await example.locator("#changes li").allTextContents()).some((t) => t === 'INSERT {"id":5000}'));
  const stored = await example.evaluate(() => localStorage.getItem("project:42"));
  assert.ok(stored && BigInt(stored) > 0n, "the example's positions went to localStorage");
  assert.deepEqual(pageErrors, []);
});
