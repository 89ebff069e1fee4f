// Tether ops dashboard: live tables and charts from /v1/stream (server-sent events, one
// cluster snapshot a second) and buttons calling the ops API. Plain JavaScript, no
// dependencies, served from the ops binary.
"use strict";

const $ = (id) => document.getElementById(id);
const HISTORY = 120; // seconds kept in the charts
const samples = [];
let token = "";
let source = null;
let last = null;

function readToken() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) {
    sessionStorage.setItem("tether-ops-token", fromHash);
    window.history.replaceState(null, "", location.pathname);
  }
  return fromHash || sessionStorage.getItem("tether-ops-token") || "";
}

function esc(text) {
  return String(text ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

const fmt = {
  n: (v) => (v ?? 0).toLocaleString("en-US"),
  rate: (v) => (v ?? 0).toFixed(1),
  pct: (v) => `${((v ?? 0) * 100).toFixed(0)}%`,
  bytes: (v) => {
    v = v ?? 0;
    if (v > 1 << 30) return `${(v / (1 << 30)).toFixed(1)} GiB`;
    if (v > 1 << 20) return `${(v / (1 << 20)).toFixed(1)} MiB`;
    return `${(v / 1024).toFixed(0)} KiB`;
  },
};

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(`${r.status} ${data.error?.code ?? ""}: ${data.error?.message ?? r.statusText}`);
  return data;
}

function logOp(text, error) {
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  if (error) li.className = "error";
  $("oplog").prepend(li);
}

function confirmOp(text) {
  return new Promise((resolve) => {
    $("confirm-text").textContent = text;
    $("confirm").hidden = false;
    const done = (ok) => {
      $("confirm").hidden = true;
      $("confirm-ok").onclick = $("confirm-cancel").onclick = null;
      resolve(ok);
    };
    $("confirm-ok").onclick = () => done(true);
    $("confirm-cancel").onclick = () => done(false);
  });
}

async function operate(label, method, path, body) {
  if (!(await confirmOp(`${label}?`))) return;
  try {
    const result = await api(method, path, body);
    logOp(`${label}: ok ${JSON.stringify(result).slice(0, 160)}`);
  } catch (e) {
    logOp(`${label}: ${e.message}`, true);
  }
}

// Owner colours of the partition map.
const palette = ["#2f6fde", "#2e8b57", "#c9731a", "#8e44ad", "#c23b3b", "#16a085", "#7f8c8d", "#d35400"];
function colourOf(id, ids) {
  return palette[ids.indexOf(id) % palette.length];
}

function migrationCell(m) {
  if (!m) return "";
  const total = Math.max(m.selected || 0, 1);
  const done = (m.moved || 0) + (m.timed_out || 0);
  const pct = Math.min(100, Math.round((done / total) * 100));
  const state = m.running ? `${m.kind} ${fmt.n(done)}/${fmt.n(m.selected)}` : `${m.kind || "migration"} done`;
  return `<span class="progress"><i style="width:${pct}%"></i></span> <span class="migration-state">${esc(state)}</span>${m.error ? ` <span class="error">${esc(m.error)}</span>` : ""}`;
}

function renderGateways(s) {
  const body = $("gateways").tBodies[0];
  body.innerHTML = s.gateways
    .map((g) => {
      const apps = Object.entries(g.apps || {}).map(([a, n]) => `${esc(a)}: ${fmt.n(n)}`).join(", ");
      const state = g.draining ? `<span class="badge draining">draining</span>` : `<span class="badge">serving</span>`;
      return `<tr data-gw="${esc(g.id)}">
        <td>${esc(g.id)}</td><td>${esc(g.region)}</td>
        <td class="num conns">${g.connections}</td><td class="num">${fmt.n(g.capacity)}</td>
        <td>${apps}</td><td class="num">${fmt.pct(g.cpu)}</td><td class="num">${fmt.bytes(g.mem_bytes)}</td>
        <td class="num">${fmt.rate(g.msgs_in_per_sec)}</td><td class="num">${fmt.rate(g.msgs_out_per_sec)}</td>
        <td class="state">${state}</td><td class="migration">${migrationCell(s.migrations?.[g.id])}</td>
        <td>${g.draining
          ? `<button data-op="undrain">Undrain</button>`
          : `<button class="danger" data-op="drain">Drain</button> <button data-op="migrate">Migrate half</button>`}
          <button data-op="restart">Restart</button></td>
      </tr>`;
    })
    .join("");
}

function renderRestart(s) {
  const r = s.restart;
  $("restart").hidden = !r;
  if (!r) return;
  const done = r.gateways.filter((g) => g.step === "done").length;
  $("restart-state").textContent = r.running
    ? `running: ${done}/${r.gateways.length} done`
    : r.error ? `stopped: ${r.error}` : `done: ${done}/${r.gateways.length}`;
  $("restart-steps").tBodies[0].innerHTML = r.gateways
    .map((g) => `<tr data-gw="${esc(g.gw)}" data-step="${esc(g.step)}">
      <td>${esc(g.gw)}</td><td><span class="badge">${esc(g.step)}</span></td>
      <td class="num">${g.old_pid || ""}</td><td class="num">${g.new_pid ?? ""}</td>
      <td class="num">${g.connections_before}</td><td class="num">${g.moved}</td><td class="num">${g.connections_after}</td>
      <td class="error">${esc(g.error ?? "")}</td></tr>`)
    .join("");
}

function renderStates(s) {
  const ids = s.states.map((st) => st.id);
  $("partitions").innerHTML = s.partitions
    .map((owner, p) => `<div title="partition ${p}: ${esc(owner ?? "not leased")}" data-partition="${p}" style="background:${owner ? colourOf(owner, ids) : "#ccc"}">${p}</div>`)
    .join("");
  $("states").innerHTML = s.states
    .map((st) => `<li data-state="${esc(st.id)}" style="--c:${colourOf(st.id, ids)}">${esc(st.id)}: ${st.partitions.length} partitions</li>`)
    .join("");
}

function renderApps(s) {
  $("apps").tBodies[0].innerHTML = s.apps
    .map((a) => {
      const p = a.pipeline || {};
      const limits = [
        p.max_connections ? `${fmt.n(p.max_connections)} conns` : "",
        p.max_msgs_per_sec ? `${fmt.n(p.max_msgs_per_sec)} msgs/s` : "",
        p.max_bytes_per_sec ? `${fmt.bytes(p.max_bytes_per_sec)}/s` : "",
      ].filter(Boolean).join(", ") || "none";
      return `<tr data-app="${esc(a.id)}">
        <td>${esc(a.id)}</td><td class="num conns">${a.connections}</td>
        <td class="num in">${fmt.rate(a.msgs_in_per_sec)}</td><td class="num out">${fmt.rate(a.msgs_out_per_sec)}</td>
        <td>${p.paused ? `<span class="badge paused">paused</span>` : `<span class="badge">active</span>`}</td>
        <td>${esc(a.pool ?? "shared")}</td><td>${limits}</td><td>${p.broadcast_threshold ?? "default"}</td>
        <td>${p.paused ? `<button data-op="resume">Resume</button>` : `<button class="danger" data-op="pause">Pause</button>`}</td>
      </tr>`;
    })
    .join("");
}

function renderIpconfigs(s) {
  $("ipconfigs").tBodies[0].innerHTML = (s.ipconfigs || [])
    .map((i) => `<tr data-ipconfig="${esc(i.id)}"><td>${esc(i.id)}</td><td>${esc(i.region)}</td><td>${esc(i.http)}</td>
      <td class="num">${fmt.n(i.gateways)}</td><td class="num">${fmt.n(i.apps)}</td><td class="num">${fmt.n(i.requests)}</td>
      <td>${esc(i.version)}</td></tr>`)
    .join("");
}

function renderNats(s) {
  if (!s.nats) return;
  $("nats-section").hidden = false;
  $("nats").tBodies[0].innerHTML = s.nats.servers
    .map((n) => `<tr><td>${esc(n.name || n.url)}</td><td>${esc(n.version)}</td><td class="num">${fmt.n(n.connections)}</td>
      <td class="num">${fmt.bytes(n.mem)}</td><td class="num">${fmt.bytes(n.js_storage)}</td><td class="error">${esc(n.error ?? "")}</td></tr>`)
    .join("");
  $("streams").tBodies[0].innerHTML = s.nats.streams
    .map((st) => {
      const lag = Math.max(0, ...st.consumers.map((c) => c.pending + c.ack_pending));
      return `<tr><td>${esc(st.name)}</td><td class="num">${fmt.n(st.messages)}</td><td class="num">${fmt.bytes(st.bytes)}</td>
        <td class="num">${st.consumers.length}</td><td class="num lag">${fmt.n(lag)}</td></tr>`;
    })
    .join("");
}

function drawChart(canvas, series) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  const max = Math.max(1, ...series.flatMap((s) => s.values));
  ctx.fillStyle = "#6b7685";
  ctx.font = "11px system-ui";
  ctx.fillText(max.toFixed(max < 10 ? 1 : 0), 4, 12);
  for (const s of series) {
    ctx.strokeStyle = s.colour;
    ctx.lineWidth = 2;
    ctx.beginPath();
    s.values.forEach((v, i) => {
      const x = (i / (HISTORY - 1)) * (width - 8) + 4;
      const y = height - 6 - (v / max) * (height - 22);
      if (i === 0) ctx.moveTo(x, y);
      else ctx.lineTo(x, y);
    });
    ctx.stroke();
  }
}

function render(s) {
  last = s;
  window.cluster = s; // for tests and the console
  $("totals").innerHTML = `<b id="total-conns">${fmt.n(s.totals.connections)}</b> connections of ${fmt.n(s.totals.capacity)} ·
    <b>${fmt.rate(s.totals.msgs_in_per_sec)}</b> msgs/s in · <b>${fmt.rate(s.totals.msgs_out_per_sec)}</b> out ·
    ${s.gateways.length} gateways · ${s.states.length} state instances · ${(s.ipconfigs || []).length} ipconfig · ${s.apps.length} apps`;
  const perApp = Object.fromEntries(s.apps.map((a) => [a.id, (a.msgs_in_per_sec ?? 0) + (a.msgs_out_per_sec ?? 0)]));
  const perGateway = Object.fromEntries(s.gateways.map((g) => [g.id, g.connections]));
  samples.push({ ...s.totals, apps: perApp, gateways: perGateway });
  while (samples.length > HISTORY) samples.shift();
  const pad = (values) => Array(HISTORY - values.length).fill(0).concat(values);
  const gwIds = s.gateways.map((g) => g.id);
  drawChart($("chart-conns"), [
    { colour: "#1d2430", values: pad(samples.map((t) => t.connections)) },
    ...gwIds.map((id) => ({ colour: colourOf(id, gwIds), values: pad(samples.map((t) => t.gateways?.[id] ?? 0)) })),
  ]);
  $("gw-legend").innerHTML = gwIds.map((id) => `<span style="color:${colourOf(id, gwIds)}">${esc(id)}</span>`).join(" ");
  drawChart($("chart-msgs"), [
    { colour: "#2f6fde", values: pad(samples.map((t) => t.msgs_in_per_sec)) },
    { colour: "#c9731a", values: pad(samples.map((t) => t.msgs_out_per_sec)) },
  ]);
  const appIds = s.apps.map((a) => a.id);
  drawChart($("chart-apps"), appIds.map((id) => ({ colour: colourOf(id, appIds), values: pad(samples.map((t) => t.apps?.[id] ?? 0)) })));
  $("app-legend").innerHTML = appIds.map((id) => `<span style="color:${colourOf(id, appIds)}">${esc(id)}</span>`).join(" ");
  renderGateways(s);
  renderRestart(s);
  renderStates(s);
  renderApps(s);
  renderIpconfigs(s);
  renderNats(s);
}

function setLive(state) {
  $("live").textContent = state;
  $("live").dataset.state = state;
}

async function connect() {
  try {
    await api("GET", "/v1/cluster");
  } catch (e) {
    if (e.message.startsWith("401") || e.message.startsWith("403")) {
      $("login").hidden = false;
      $("main").hidden = true;
      $("login-error").textContent = token ? e.message : "";
      setLive("locked");
      return;
    }
  }
  $("login").hidden = true;
  $("main").hidden = false;
  source?.close();
  source = new EventSource(`/v1/stream${token ? `?access_token=${encodeURIComponent(token)}` : ""}`);
  source.addEventListener("cluster", (e) => {
    setLive("live");
    render(JSON.parse(e.data));
  });
  source.onerror = () => setLive("offline");
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  token = $("token").value.trim();
  sessionStorage.setItem("tether-ops-token", token);
  connect();
});

$("gateways").addEventListener("click", (e) => {
  const op = e.target.dataset?.op;
  const gw = e.target.closest("tr")?.dataset.gw;
  if (!op || !gw) return;
  const path = `/v1/gateways/${encodeURIComponent(gw)}`;
  if (op === "drain") operate(`Drain ${gw} (its devices move to other gateways)`, "POST", `${path}/drain`);
  if (op === "undrain") operate(`Undrain ${gw}`, "DELETE", `${path}/drain`);
  if (op === "migrate") operate(`Migrate half of ${gw}'s devices`, "POST", `${path}/migrate`, { share: 0.5 });
  if (op === "restart") operate(`Restart ${gw} by socket hand-off`, "POST", "/v1/restart", { gateways: [gw] });
});

$("restart-all").addEventListener("click", () => {
  operate("Restart every gateway by socket hand-off, one after another", "POST", "/v1/restart", { all: true });
});

$("apps").addEventListener("click", (e) => {
  const op = e.target.dataset?.op;
  const app = e.target.closest("tr")?.dataset.app;
  if (!op || !app) return;
  const path = `/v1/apps/${encodeURIComponent(app)}/${op}`;
  operate(op === "pause" ? `Pause ${app} (its devices are disconnected)` : `Resume ${app}`, "POST", path);
});

token = readToken();
connect();
