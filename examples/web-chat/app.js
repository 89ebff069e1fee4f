// The demo chat page: @tether/client (its minified bundle, served by `tether up` at
// /sdk/tether.min.js) against app `demo`.
//
// Per tab (sessionStorage, so a reload keeps it and another tab gets its own device):
// the device id, the SDK's resume state (H and room cursors) and the messages shown.
// Chat protocol: examples/web-chat/README.md.

import { TetherClient } from "/sdk/tether.min.js";

const $ = (id) => document.getElementById(id);
const APP = "demo";
const MAX_LOG = 500;

/** What the page exposes to tests and the console. */
const chat = {
  client: undefined,
  /** SDK deliveries of live chat messages per id (exactly once each, if all is well). */
  deliveries: {},
  /** The chat messages shown, in order. */
  messages: () => log.filter((m) => m.type === "chat"),
  /** Sends a chat message to the room; resolves with the receipt. */
  send: (text) => chat.client.send(JSON.stringify({ type: "chat", text }), { session: session.room }),
};
window.chat = chat;

let session = JSON.parse(sessionStorage.getItem("tether-demo-session") || "null");
let log = [];
const shown = new Set();

$("name").value = localStorage.getItem("tether-demo-name") || "";
$("join").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const name = $("name").value.trim();
  const room = $("room").value.trim();
  localStorage.setItem("tether-demo-name", name);
  const did = `${name}-${Math.random().toString(36).slice(2, 8)}`;
  session = { name, room, did };
  sessionStorage.setItem("tether-demo-session", JSON.stringify(session));
  start();
});
$("compose").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = $("text").value;
  if (!text.trim()) return;
  $("text").value = "";
  status("sending…");
  try {
    const receipt = await chat.send(text);
    status(`stored as ${receipt.serverMsgId}`);
  } catch (e) {
    status(`not sent: ${e.message}`);
    $("text").value = text;
  }
});
$("leave").addEventListener("click", async () => {
  try {
    await chat.client.send(JSON.stringify({ type: "leave" }), { session: session.room, timeoutMs: 3000 });
  } catch {
    // leaving anyway
  }
  chat.client.close();
  sessionStorage.removeItem("tether-demo-session");
  location.reload();
});

if (session) start();

function start() {
  const { name, room, did } = session;
  $("join").hidden = true;
  $("chat").hidden = false;
  $("title").textContent = `#${room}`;
  $("me").textContent = name;
  $("did").textContent = did;
  const logKey = `tether-demo-log:${did}`;
  log = JSON.parse(sessionStorage.getItem(logKey) || "[]");
  for (const m of log) if (m.id) shown.add(m.id);
  render();

  const client = new TetherClient({
    app: APP,
    did,
    // ipconfig's /v1/endpoints, passed through by the page server (same origin).
    ipconfig: location.origin,
    credential: async () => {
      const r = await fetch(`/demo/credential?uid=${encodeURIComponent(name)}&did=${encodeURIComponent(did)}`);
      const body = await r.json();
      if (!r.ok) throw new Error(body.error?.message ?? `credential: ${r.status}`);
      return body.credential;
    },
    store: {
      load: () => JSON.parse(sessionStorage.getItem(`tether-demo-resume:${did}`) || "null"),
      save: (state) => sessionStorage.setItem(`tether-demo-resume:${did}`, JSON.stringify(state)),
    },
  });
  chat.client = client;

  client.on("state", (s) => {
    $("state").textContent = s;
    $("state").dataset.state = s;
  });
  client.on("connected", (c) => {
    $("gateway").textContent = `gateway ${c.gateway}`;
    // Join on every login: idempotent, and it brings the presence list up to date.
    client.send(JSON.stringify({ type: "join" }), { session: room }).catch((e) => status(`join failed: ${e.message}`));
  });
  client.on("disconnected", (d) => {
    if (!d.reconnecting) status(`stopped: ${d.code ?? ""} ${d.reason}`);
  });
  client.on("error", (e) => status(e.message));
  client.on("gap", (g) => status(`messages ${g.from}..${g.to} of ${g.session} are gone`));
  client.on("message", (m) => {
    let body;
    try {
      body = m.json();
    } catch {
      body = { type: "system", text: m.text };
    }
    if (body.type === "chat") {
      chat.deliveries[body.id] = (chat.deliveries[body.id] || 0) + 1;
      add(body);
    } else if (body.type === "history") {
      for (const old of body.messages) add(old);
    } else if (body.type === "presence") {
      $("online").replaceChildren(
        ...body.online.map((u) => {
          const li = document.createElement("li");
          li.textContent = u;
          return li;
        }),
      );
      return;
    } else {
      add({ type: "system", text: body.text ?? m.text });
    }
    // Saved before the SDK saves its resume point, so a reload shows every message once.
    sessionStorage.setItem(logKey, JSON.stringify(log.slice(-MAX_LOG)));
    render();
  });
  client.connect().catch((e) => status(`cannot connect: ${e.message}`));
}

/** Adds a message once (history may repeat live ones), ordered by the service's id. */
function add(m) {
  if (m.id) {
    if (shown.has(m.id)) return;
    shown.add(m.id);
  }
  log.push(m);
  log.sort((a, b) => seqOf(a) - seqOf(b));
}

function seqOf(m) {
  return m.id ? Number(m.id.slice(1)) : Number.MAX_SAFE_INTEGER;
}

function render() {
  const list = $("messages");
  list.replaceChildren(
    ...log.map((m) => {
      const li = document.createElement("li");
      if (m.type === "chat") {
        li.dataset.id = m.id;
        if (m.from === session.name) li.className = "mine";
        const who = document.createElement("b");
        who.textContent = m.from;
        const when = document.createElement("time");
        when.textContent = new Date(m.at).toLocaleTimeString();
        li.append(when, who, document.createTextNode(m.text));
      } else {
        li.className = "system";
        li.textContent = m.text;
      }
      return li;
    }),
  );
  list.scrollTop = list.scrollHeight;
}

function status(text) {
  $("status").textContent = text;
}
