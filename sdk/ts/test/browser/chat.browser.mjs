// Browser test of the SDK and the demo chat page, in Debian's Chromium driven by
// playwright-core, against a real stack: `tether up` with its own data dir and free
// ports (nats-server, gateway, state, ipconfig, the demo service and page), real sockets.
//
//   node test/browser/chat.browser.mjs [--screenshot PATH]
//
// Environment: TETHER_BIN (default ../../target/debug/tether), CHROMIUM (default
// /usr/bin/chromium). Exits 0 when every step passed; stops every process it started.
//
// Steps: two pages (separate browser contexts) pick names and join a room; they chat both
// ways and see each other online; page A goes offline (network emulation) for 10 s while
// page B sends 20 messages; A comes back and shows all 20 in order, exactly once; A
// reloads while B sends 5 more, and after the reload shows everything once, in order.

import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, existsSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "../../../..");
const tetherBin = process.env.TETHER_BIN ?? join(repo, "target/debug/tether");
const chromiumPath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const screenshotArg = process.argv.indexOf("--screenshot");
const screenshot = screenshotArg > 0 ? resolve(process.argv[screenshotArg + 1]) : undefined;

/** Generous waits: only for waiting, never a pass/fail threshold. */
const WAIT = 60_000;
const OFFLINE_MS = 10_000;

const cleanups = [];
let failed = false;

function log(...parts) {
  console.log(`[browser-test ${new Date().toISOString().slice(11, 23)}]`, ...parts);
}

function check(condition, what) {
  if (!condition) throw new Error(`check failed: ${what}`);
  log(`ok: ${what}`);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Whether `port` can be bound on 127.0.0.1 right now. */
function portFree(port) {
  return new Promise((done) => {
    const server = createServer();
    server.once("error", () => done(false));
    server.listen(port, "127.0.0.1", () => server.close(() => done(true)));
  });
}

/** A base port whose +0..+40 offsets `tether up` uses are free, and two more for NATS. */
async function freePorts() {
  const offsets = [0, 1, 2, 10, 20, 21, 30, 40];
  for (let attempt = 0; attempt < 50; attempt++) {
    const base = 20000 + Math.floor(Math.random() * 400) * 100;
    const nats = base + 50;
    const natsHttp = base + 51;
    const all = [...offsets.map((o) => base + o), nats, natsHttp];
    let free = true;
    for (const p of all) if (!(await portFree(p))) free = false;
    if (free) return { base, nats, natsHttp };
  }
  throw new Error("no free ports found");
}

/** Starts `tether up`; resolves once it printed its banner. */
async function startStack() {
  if (!existsSync(tetherBin)) throw new Error(`${tetherBin} not found (cargo build -p tether)`);
  const ports = await freePorts();
  const data = mkdtempSync(join(tmpdir(), "tether-browser-"));
  cleanups.push(() => rmSync(data, { recursive: true, force: true }));
  const args = [
    "up",
    "--data", data,
    "--base-port", String(ports.base),
    "--nats-port", String(ports.nats),
    "--nats-http-port", String(ports.natsHttp),
    "--web-root", repo,
  ];
  log(`starting ${tetherBin} ${args.join(" ")}`);
  const child = spawn(tetherBin, args, {
    cwd: repo,
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "warn" },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let output = "";
  child.stdout.on("data", (d) => (output += d));
  child.stderr.on("data", (d) => (output += d));
  const exited = new Promise((r) => child.once("exit", (code, signal) => r({ code, signal })));
  cleanups.push(async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill("SIGTERM");
    const stopped = await Promise.race([exited, sleep(20_000).then(() => undefined)]);
    if (!stopped) {
      log("tether did not stop on SIGTERM; killing it");
      child.kill("SIGKILL");
      await exited;
    }
  });
  const deadline = Date.now() + 120_000;
  while (!output.includes("Tether is up.")) {
    if (child.exitCode !== null) throw new Error(`tether up exited early:\n${output}`);
    if (Date.now() > deadline) throw new Error(`tether up did not come up:\n${output}`);
    await sleep(100);
  }
  log("stack is up");
  return { url: `http://127.0.0.1:${ports.base + 40}/`, output: () => output, child };
}

async function waitFor(page, fn, arg, what) {
  try {
    await page.waitForFunction(fn, arg, { timeout: WAIT, polling: 50 });
  } catch (e) {
    const state = await page.evaluate(() => ({
      state: document.getElementById("state")?.textContent,
      status: document.getElementById("status")?.textContent,
      texts: window.chat?.messages?.().map((m) => m.text),
    }));
    throw new Error(`timed out waiting for ${what}: ${e.message}\npage: ${JSON.stringify(state)}`);
  }
}

/** Opens the page in its own browser context and joins `room` as `name`. */
async function joinAs(browser, url, name, room) {
  const context = await browser.newContext({ viewport: { width: 900, height: 640 } });
  const page = await context.newPage();
  page.on("pageerror", (e) => log(`${name} page error: ${e.message}`));
  page.on("console", (m) => m.type() === "error" && log(`${name} console: ${m.text()}`));
  await page.goto(url);
  await page.fill("#name", name);
  await page.fill("#room", room);
  await page.click("#join button[type=submit]");
  await waitFor(page, () => document.getElementById("state").textContent === "connected", undefined, `${name} connected`);
  return { context, page, name };
}

/** Texts of the chat messages shown (DOM), in order. */
const shownTexts = (page) =>
  page.evaluate(() => [...document.querySelectorAll("#messages li[data-id]")].map((li) => li.lastChild.textContent));

async function sendAll(page, texts) {
  for (const text of texts) {
    // One after the other, each resolved by its UP_ACK (the receipt).
    const receipt = await page.evaluate((t) => window.chat.send(t).then((r) => r.serverMsgId), text);
    if (!receipt) throw new Error(`no receipt for ${text}`);
  }
}

async function main() {
  const stack = await startStack();
  const browser = await chromium.launch({
    executablePath: chromiumPath,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  cleanups.push(() => browser.close());
  log(`chromium ${browser.version()}`);

  const room = "lobby";
  const a = await joinAs(browser, stack.url, "alice", room);
  const b = await joinAs(browser, stack.url, "bob", room);

  // Presence: each sees both names online.
  for (const p of [a, b]) {
    await waitFor(
      p.page,
      () => [...document.querySelectorAll("#online li")].map((li) => li.textContent).join(",") === "alice,bob",
      undefined,
      `${p.name} sees alice and bob online`,
    );
  }
  check(true, "presence: both pages list alice and bob online");

  // Chat both ways.
  await sendAll(a.page, ["hello from alice"]);
  await waitFor(b.page, () => window.chat.messages().some((m) => m.text === "hello from alice"), undefined, "bob gets alice's message");
  await sendAll(b.page, ["hi alice"]);
  await waitFor(a.page, () => window.chat.messages().some((m) => m.text === "hi alice"), undefined, "alice gets bob's message");
  check(true, "chat both ways: each page shows the other's message live");

  // A goes offline for 10 s while B sends 20 messages.
  const burst = Array.from({ length: 20 }, (_, i) => `burst-${String(i + 1).padStart(2, "0")}`);
  const offlineAt = Date.now();
  await a.context.setOffline(true);
  await waitFor(a.page, () => document.getElementById("state").textContent === "offline", undefined, "alice's SDK notices offline");
  await sendAll(b.page, burst);
  check(true, "bob sent 20 messages, each with a receipt, while alice was offline");
  const aliceDuringOutage = await a.page.evaluate((t) => window.chat.messages().filter((m) => t.includes(m.text)).length, burst);
  check(aliceDuringOutage === 0, `alice got none of them while offline (got ${aliceDuringOutage})`);
  await sleep(Math.max(0, OFFLINE_MS - (Date.now() - offlineAt)));
  await a.context.setOffline(false);
  log(`alice back online after ${Date.now() - offlineAt} ms`);
  await waitFor(
    a.page,
    (t) => t.every((text) => window.chat.messages().some((m) => m.text === text)),
    burst,
    "alice shows all 20 after coming back",
  );
  const aliceTexts = await shownTexts(a.page);
  const aliceBurst = aliceTexts.filter((t) => burst.includes(t));
  check(JSON.stringify(aliceBurst) === JSON.stringify(burst), "alice shows the 20 in order, each exactly once");
  const deliveries = await a.page.evaluate(() => window.chat.deliveries);
  const multiple = Object.entries(deliveries).filter(([, n]) => n !== 1);
  check(multiple.length === 0, `the SDK delivered every chat message exactly once (${Object.keys(deliveries).length} ids)`);

  // A reloads while B sends 5 more: nothing is lost, nothing is shown twice.
  const more = Array.from({ length: 5 }, (_, i) => `reload-${i + 1}`);
  const reloading = a.page.reload();
  await sendAll(b.page, more);
  await reloading;
  await waitFor(a.page, () => document.getElementById("state").textContent === "connected", undefined, "alice reconnected after reload");
  await waitFor(
    a.page,
    (t) => t.every((text) => window.chat.messages().some((m) => m.text === text)),
    more,
    "alice shows the 5 messages sent during the reload",
  );
  const expected = ["hello from alice", "hi alice", ...burst, ...more];
  const afterReload = await shownTexts(a.page);
  check(JSON.stringify(afterReload) === JSON.stringify(expected), "after the reload alice shows all 27 messages in order, once each");
  const redelivered = await a.page.evaluate(
    (old) => Object.keys(window.chat.deliveries).filter((id) => old.includes(id)),
    Object.keys(deliveries),
  );
  check(redelivered.length === 0, "the reload resumed from the saved point: no old message was delivered again");
  const bobTexts = await shownTexts(b.page);
  check(JSON.stringify(bobTexts) === JSON.stringify(expected), "bob shows the same 27 messages in the same order");

  if (screenshot) {
    await sendAll(b.page, ["all caught up, alice?"]);
    await sendAll(a.page, ["yes: 20 while offline, 5 during the reload, each once and in order"]);
    await waitFor(a.page, () => window.chat.messages().length === 29, undefined, "the last two messages");
    await a.page.fill("#text", "see you later!");
    await a.page.screenshot({ path: screenshot, fullPage: true });
    log(`screenshot written to ${screenshot}`);
  }
}

async function cleanup() {
  for (const f of cleanups.reverse()) {
    try {
      await f();
    } catch (e) {
      log(`cleanup: ${e.message}`);
    }
  }
  cleanups.length = 0;
}

for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, async () => {
    log(`${signal}: stopping`);
    await cleanup();
    process.exit(130);
  });
}

try {
  await main();
  log("PASS: browser chat test");
} catch (e) {
  failed = true;
  log(`FAIL: ${e.stack ?? e}`);
} finally {
  await cleanup();
}
process.exit(failed ? 1 : 0);
