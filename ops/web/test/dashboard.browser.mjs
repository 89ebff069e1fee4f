// Browser test of the ops dashboard, in Debian's Chromium driven by playwright-core (from
// sdk/ts's dev dependencies; no browser is downloaded), against real processes: `tether up`
// (nats-server, gateway, state, ipconfig, ops, demo page) plus a second `tether gateway`.
//
//   node ops/web/test/dashboard.browser.mjs [--screenshot docs/ops-dashboard.png]
//
// Environment: TETHER_BIN (default target/debug/tether), CHROMIUM (default
// /usr/bin/chromium). Exits 0 when every step passed; stops every process it started.
//
// Steps: the dashboard loads and lists both gateways, the state instance's partitions and
// the ipconfig instance; 100 devices connect (WebSocket, through ipconfig, from a second
// page using the browser SDK) and the live connection count rises to 100; the Restart
// button of the second gateway (started with a hand-off socket), confirmed, restarts it by
// socket hand-off: the progress table shows the roll running, then `done` with a new pid,
// and no device loses its connection; the Drain button of the gateway holding the most
// devices, confirmed, moves them: its count falls to 0 while the total stays 100.

import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, existsSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "../../..");
const { chromium } = createRequire(join(repo, "sdk/ts/package.json"))("playwright-core");
const tetherBin = process.env.TETHER_BIN ?? join(repo, "target/debug/tether");
const chromiumPath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const screenshotArg = process.argv.indexOf("--screenshot");
const screenshot = screenshotArg > 0 ? resolve(process.argv[screenshotArg + 1]) : undefined;

/** Generous waits: only for waiting, never a pass/fail threshold. */
const WAIT = 90_000;
const DEVICES = 100;

const cleanups = [];

function log(...parts) {
  console.log(`[ops-browser-test ${new Date().toISOString().slice(11, 23)}]`, ...parts);
}

function check(condition, what) {
  if (!condition) throw new Error(`check failed: ${what}`);
  log(`ok: ${what}`);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function portFree(port) {
  return new Promise((done) => {
    const server = createServer();
    server.once("error", () => done(false));
    server.listen(port, "127.0.0.1", () => server.close(() => done(true)));
  });
}

/** A base port whose offsets `tether up` and the second gateway use are all free. */
async function freePorts() {
  const offsets = [0, 1, 2, 10, 20, 21, 30, 40, 50, 51, 60, 61, 62];
  for (let attempt = 0; attempt < 50; attempt++) {
    const base = 20000 + Math.floor(Math.random() * 400) * 100;
    let free = true;
    for (const o of offsets) if (!(await portFree(base + o))) free = false;
    if (free) return base;
  }
  throw new Error("no free ports found");
}

/** Spawns a process, stopped (SIGTERM, then SIGKILL) at the end; resolves its output getter. */
function start(name, args, env = {}) {
  const child = spawn(tetherBin, args, {
    cwd: repo,
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "warn", ...env },
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
      log(`${name} did not stop on SIGTERM; killing it`);
      child.kill("SIGKILL");
      await exited;
    }
  });
  return { child, output: () => output };
}

/** Stops the process named by `pidFile` (a gateway's successor after a restart). */
async function stopPid(pidFile) {
  let pid;
  try {
    pid = Number(readFileSync(pidFile, "utf8").trim());
  } catch {
    return;
  }
  if (!pid) return;
  const alive = () => {
    try {
      process.kill(pid, 0);
      return true;
    } catch {
      return false;
    }
  };
  if (!alive()) return;
  process.kill(pid, "SIGTERM");
  for (let i = 0; i < 200 && alive(); i++) await sleep(100);
  if (alive()) {
    log(`gateway pid ${pid} did not stop on SIGTERM; killing it`);
    process.kill(pid, "SIGKILL");
  }
}

async function startStack() {
  if (!existsSync(tetherBin)) throw new Error(`${tetherBin} not found (cargo build -p tether)`);
  const base = await freePorts();
  const data = mkdtempSync(join(tmpdir(), "tether-ops-browser-"));
  cleanups.push(() => rmSync(data, { recursive: true, force: true }));
  const up = start("tether up", [
    "up", "--data", data, "--base-port", String(base),
    "--nats-port", String(base + 50), "--nats-http-port", String(base + 51),
    "--web-root", repo,
  ]);
  const deadline = Date.now() + 120_000;
  while (!up.output().includes("Tether is up.")) {
    if (up.child.exitCode !== null) throw new Error(`tether up exited early:\n${up.output()}`);
    if (Date.now() > deadline) throw new Error(`tether up did not come up:\n${up.output()}`);
    await sleep(100);
  }
  const dashboard = up.output().match(/dashboard\s+(http:\/\/\S+)/)?.[1];
  check(Boolean(dashboard), `tether up prints the dashboard URL (${dashboard})`);
  // Restartable by hand-off: a successor process replaces it (in its own session, so it is
  // not our child); the pid file names whichever process serves, stopped at the end.
  const pidFile = join(data, "gw-two.pid");
  cleanups.push(() => stopPid(pidFile));
  const gw2 = start("second gateway", [
    "gateway", "--nats", `nats://127.0.0.1:${base + 50}`, "--id", "gw-two",
    "--tcp", `127.0.0.1:${base + 60}`, "--ws", `127.0.0.1:${base + 61}`, "--admin", `127.0.0.1:${base + 62}`,
    "--token-public-key", join(data, "token.key.pub"),
    "--handoff-socket", join(data, "gw-two.sock"),
  ], {
    TETHER_GATEWAY_PID_FILE: pidFile,
    TETHER_GATEWAY_RESTART_LOG: join(data, "gw-two.restart.log"),
    TETHER_GATEWAY_HEARTBEAT_INTERVAL_MS: "500",
  });
  cleanups.push(() => gw2.output() && log(`second gateway output:\n${gw2.output().slice(-2000)}`));
  return { dashboard, chat: `http://127.0.0.1:${base + 40}/` };
}

async function waitFor(page, fn, arg, what) {
  try {
    await page.waitForFunction(fn, arg, { timeout: WAIT, polling: 100 });
  } catch (e) {
    const state = await page.evaluate(() => ({ log: document.getElementById("oplog")?.innerText, live: document.getElementById("live")?.textContent, restart: window.cluster?.restart, cluster: window.cluster }));
    throw new Error(`timed out waiting for ${what}: ${e.message}\npage: ${JSON.stringify(state).slice(0, 4000)}`);
  }
  log(`ok: ${what}`);
}

const conns = (page, gw) => page.evaluate((g) => Number(document.querySelector(`tr[data-gw="${g}"] .conns`)?.textContent ?? "NaN"), gw);

async function main() {
  const stack = await startStack();
  const browser = await chromium.launch({
    executablePath: chromiumPath,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  cleanups.push(() => browser.close());
  log(`chromium ${browser.version()}`);

  const dash = await (await browser.newContext({ viewport: { width: 1400, height: 1000 } })).newPage();
  dash.on("pageerror", (e) => log(`dashboard page error: ${e.message}`));
  await dash.goto(stack.dashboard);
  await waitFor(dash, () => document.getElementById("live").dataset.state === "live", undefined, "the dashboard is live (server-sent events)");
  await waitFor(dash, () => document.querySelectorAll("#gateways tbody tr").length === 2, undefined, "the dashboard lists both gateways");
  await waitFor(dash, () => document.querySelectorAll("#partitions div").length === 32 && ![...document.querySelectorAll("#partitions div")].some((d) => d.title.endsWith("not leased")), undefined, "the partition map shows every partition leased");
  await waitFor(dash, () => document.querySelectorAll("#ipconfigs tbody tr").length >= 1, undefined, "the dashboard lists the ipconfig instance");
  const gateways = await dash.evaluate(() => [...document.querySelectorAll("#gateways tbody tr")].map((tr) => tr.dataset.gw));
  const before = await dash.evaluate(() => window.cluster.totals.connections);

  // 100 devices, WebSocket through ipconfig, from a page that has the browser SDK.
  const devices = await (await browser.newContext()).newPage();
  devices.on("pageerror", (e) => log(`devices page error: ${e.message}`));
  await devices.goto(stack.chat);
  await devices.evaluate(async (n) => {
    const { TetherClient } = await import("/sdk/tether.min.js");
    window.connected = new Set();
    window.disconnects = 0;
    window.clients = [];
    for (let i = 0; i < n; i++) {
      const did = `load-${i}`;
      const client = new TetherClient({
        app: "demo",
        did,
        ipconfig: location.origin,
        credential: async () => (await (await fetch(`/demo/credential?uid=u-${did}&did=${did}`)).json()).credential,
      });
      client.on("connected", () => window.connected.add(did));
      client.on("disconnected", () => window.disconnects++);
      client.connect().catch((e) => console.error(`${did}: ${e.message}`));
      window.clients.push(client);
    }
  }, DEVICES);
  await devices.waitForFunction((n) => window.connected.size === n, DEVICES, { timeout: WAIT, polling: 100 });
  log(`ok: ${DEVICES} devices connected`);
  await waitFor(dash, (n) => Number(document.getElementById("total-conns").textContent.replace(/,/g, "")) >= n, before + DEVICES, `the live connection count rises to ${before + DEVICES}`);
  const counts = {};
  for (const gw of gateways) counts[gw] = await conns(dash, gw);
  const busiest = gateways.reduce((a, b) => (counts[a] >= counts[b] ? a : b));
  check(counts[busiest] > 0, `gateway ${busiest} holds ${counts[busiest]} devices (${JSON.stringify(counts)})`);

  // Restart the second gateway (started with a hand-off socket) from its button, by socket
  // hand-off, with the devices it holds. Every state the progress table shows is recorded
  // as it appears (a MutationObserver), so the test sees the roll live, not only its end.
  const target = "gw-two";
  log(`restarting ${target}, which holds ${await conns(dash, target)} devices`);
  const oldPid = await dash.evaluate((gw) => window.cluster.gateways.find((g) => g.id === gw)?.pid, target);
  await dash.evaluate(() => {
    window.restartSeen = [];
    const note = () => {
      const text = `${document.getElementById("restart-state").textContent} | ${[...document.querySelectorAll("#restart-steps tbody tr")].map((tr) => `${tr.dataset.gw}:${tr.dataset.step}`).join(",")}`;
      if (window.restartSeen.at(-1) !== text) window.restartSeen.push(text);
    };
    new MutationObserver(note).observe(document.getElementById("restart"), { subtree: true, childList: true, characterData: true, attributes: true });
  });
  await dash.click(`tr[data-gw="${target}"] button[data-op="restart"]`);
  await dash.waitForSelector("#confirm:not([hidden])");
  check((await dash.textContent("#confirm-text")).includes(`Restart ${target}`), "the restart asks for confirmation");
  await dash.click("#confirm-ok");
  await waitFor(dash, () => window.restartSeen.some((t) => t.startsWith("running")), undefined, "the restart shows as running");
  await waitFor(dash, (gw) => document.querySelector(`#restart-steps tr[data-gw="${gw}"]`)?.dataset.step === "done", target, `the restart of ${target} reaches done`);
  const seen = await dash.evaluate(() => window.restartSeen);
  log(`restart progress seen: ${JSON.stringify(seen)}`);
  check(seen.some((t) => t.startsWith("running")) && seen.some((t) => t.startsWith("done")), "the progress went from running to done, live");
  const newPid = await dash.evaluate((gw) => window.cluster.restart?.gateways.find((g) => g.gw === gw)?.new_pid, target);
  check(newPid && newPid !== oldPid, `${target} runs as a new process (pid ${oldPid} -> ${newPid})`);
  await waitFor(dash, (n) => Number(document.getElementById("total-conns").textContent.replace(/,/g, "")) >= n, before + DEVICES, "every device is still connected after the restart");
  const disconnects = await devices.evaluate(() => window.disconnects);
  check(disconnects === 0, "no device lost its connection in the restart");

  // Drain it from the dashboard: button, confirmation, then its count falls to 0 and the
  // devices are on the other gateway (the total stays).
  await dash.click(`tr[data-gw="${busiest}"] button[data-op="drain"]`);
  await dash.waitForSelector("#confirm:not([hidden])");
  await dash.click("#confirm-ok");
  await waitFor(dash, (gw) => document.querySelector(`tr[data-gw="${gw}"] .state`)?.textContent.includes("draining"), busiest, `${busiest} shows draining`);
  await waitFor(dash, (gw) => document.querySelector(`tr[data-gw="${gw}"] .conns`)?.textContent === "0", busiest, `the connection count of ${busiest} falls to 0`);
  await waitFor(dash, (n) => Number(document.getElementById("total-conns").textContent.replace(/,/g, "")) >= n, before + DEVICES, "every device is connected elsewhere (the total stays)");
  const connectedNow = await devices.evaluate(() => window.clients.filter((c) => c.state === "connected").length);
  log(`devices connected after the drain: ${connectedNow}`);


  if (screenshot) {
    await dash.screenshot({ path: screenshot, fullPage: true });
    log(`screenshot saved to ${screenshot}`);
  }
}

let failed = false;
try {
  await main();
  log("PASS");
} catch (e) {
  failed = true;
  log(`FAIL: ${e.stack ?? e}`);
} finally {
  for (const cleanup of cleanups.reverse()) {
    try {
      await cleanup();
    } catch (e) {
      log(`cleanup: ${e.message}`);
    }
  }
}
process.exit(failed ? 1 : 0);
