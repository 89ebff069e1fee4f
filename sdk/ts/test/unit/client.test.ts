// The client against scripted gateways speaking real frames (see fake.ts): login,
// receipts, ordering, batched acks, resume, rooms, redirect, errors, network events and
// discovery.

import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import {
  FrameType,
  TetherClient,
  TetherError,
  encodeLogin,
  type ClientOptions,
  type Frame,
  type Message,
  type WebSocketLike,
} from "../../src/index.js";
import { encodeDown, encodeError, encodeLoginAck, encodePong, encodeRedirect, encodeUpAck } from "../../src/server.js";
import { FakeGateway, FakeWebSocket, resetGateways, until, type ServerSide } from "./fake.js";

const text = (s: string) => new TextEncoder().encode(s);
const clients: TetherClient[] = [];

function client(options: Partial<ClientOptions> = {}): TetherClient {
  const c = new TetherClient({
    app: "demo",
    did: "dev-1",
    endpoints: ["ws://gw1/ws"],
    token: "tok-1",
    WebSocket: FakeWebSocket as unknown as WebSocketLike,
    reconnect: { minMs: 5, maxMs: 20 },
    watchNetwork: false,
    ...options,
  });
  clients.push(c);
  return c;
}

/** Collects messages and acks. */
function recorder(c: TetherClient) {
  const messages: Message[] = [];
  c.on("message", (m) => messages.push(m));
  return messages;
}

const acks = (conn: ServerSide) => conn.of<Frame & { seq: number }>(FrameType.DOWN_ACK).map((f) => f.seq);
const ups = (conn: ServerSide) =>
  conn.of<Frame & { up: { clientMsgId: number; session: string }; body: Uint8Array }>(FrameType.UP);

let gw1: FakeGateway;

beforeEach(() => {
  resetGateways();
  gw1 = new FakeGateway("gw-1", "ws://gw1/ws");
});

afterEach(() => {
  for (const c of clients.splice(0)) c.close();
  vi.unstubAllGlobals();
});

describe("login", () => {
  it("sends did, app, token, resume point, room cursors and sdk; resolves at LOGIN_ACK", async () => {
    const c = client({ resumeSeq: 7, rooms: { lobby: 3 } });
    const connected: string[] = [];
    c.on("connected", (e) => connected.push(e.gateway));
    await c.connect();
    expect(gw1.last.login).toEqual({
      token: "tok-1",
      did: "dev-1",
      app: "demo",
      resumeSeq: 7,
      rooms: [{ session: "lobby", roomSeq: 3 }],
      sdk: "ts/0.1.0",
    });
    expect(connected).toEqual(["gw-1"]);
    expect(c.state).toBe("connected");
  });

  it("rejects connect on a fatal login error and does not retry", async () => {
    gw1.onLogin = () => encodeError({ code: 8, text: "no such app" }, true);
    const c = client();
    const error = await c.connect().catch((e: TetherError) => e);
    expect(error).toBeInstanceOf(TetherError);
    expect((error as TetherError).code).toBe("wrong_app");
    expect(c.state).toBe("closed");
    expect(gw1.conns.length).toBe(1);
  });

  it("asks the token provider again after bad_token", async () => {
    let n = 0;
    gw1.onLogin = (login) => (login.token === "tok-1" ? encodeError({ code: 6, text: "bad" }, true) : undefined);
    const c = client({ token: () => `tok-${++n}` });
    await c.connect();
    expect(gw1.logins.map((l) => l.token)).toEqual(["tok-1", "tok-2"]);
  });
});

describe("send", () => {
  it("resolves on UP_ACK 0 and rejects with the typed code otherwise", async () => {
    gw1.onFrame = (f, conn) => {
      if (f.type !== FrameType.UP || !("up" in f)) return;
      const body = new TextDecoder().decode(f.body);
      if (body === "ok") conn.send(encodeUpAck({ clientMsgId: f.up.clientMsgId, serverMsgId: "m-1" }));
      if (body === "muted") conn.send(encodeUpAck({ clientMsgId: f.up.clientMsgId, code: 18, message: "muted" }));
      if (body === "slow") conn.send(encodeUpAck({ clientMsgId: f.up.clientMsgId, code: 12 }));
    };
    const c = client();
    await c.connect();
    const receipt = await c.send("ok", { session: "lobby" });
    expect(receipt.serverMsgId).toBe("m-1");
    expect(ups(gw1.last)[0].up.session).toBe("lobby");
    const rejected = await c.send("muted").catch((e: TetherError) => e);
    expect(rejected).toMatchObject({ code: "rejected", retryable: false });
    const limited = await c.send("slow").catch((e: TetherError) => e);
    expect(limited).toMatchObject({ code: "rate_limited", retryable: true });
    const timeout = await c.send("never", { timeoutMs: 30 }).catch((e: TetherError) => e);
    expect(timeout).toMatchObject({ code: "timeout", retryable: true });
    const big = await c.send(new Uint8Array(70000)).catch((e: TetherError) => e);
    expect(big).toMatchObject({ code: "frame_too_large" });
  });

  it("uses unique, increasing client_msg_ids", async () => {
    const c = client();
    await c.connect();
    void c.send("a").catch(() => {});
    void c.send("b").catch(() => {});
    await until(() => ups(gw1.last).length === 2, "two UPs");
    const [a, b] = ups(gw1.last).map((u) => u.up.clientMsgId);
    expect(b).toBeGreaterThan(a);
    expect(Number.isSafeInteger(b)).toBe(true);
  });

  it("queues while disconnected and resends unanswered UPs with the same id after reconnect", async () => {
    const c = client();
    await c.connect();
    const sent = c.send("hello");
    await until(() => ups(gw1.last).length === 1, "first UP");
    const id = ups(gw1.last)[0].up.clientMsgId;
    gw1.last.close();
    await until(() => gw1.conns.length === 2 && ups(gw1.last).length === 1, "resent UP");
    expect(ups(gw1.last)[0].up.clientMsgId).toBe(id);
    gw1.last.send(encodeUpAck({ clientMsgId: id, serverMsgId: "m-7" }));
    expect((await sent).serverMsgId).toBe("m-7");
  });
});

describe("delivery", () => {
  it("delivers QoS1 in order exactly once and acks a burst with one cumulative DOWN_ACK", async () => {
    const c = client();
    const got = recorder(c);
    await c.connect();
    const conn = gw1.last;
    for (const seq of [2, 1, 1, 3, 2]) conn.send(encodeDown({ seq }, true, text(`m${seq}`)));
    await until(() => acks(conn).length > 0, "an ack");
    expect(got.map((m) => [m.seq, m.text])).toEqual([
      [1, "m1"],
      [2, "m2"],
      [3, "m3"],
    ]);
    expect(acks(conn)).toEqual([3]);
    expect(c.resumeSeq).toBe(3);
  });

  it("acknowledges duplicates so the server stops resending", async () => {
    const c = client({ resumeSeq: 5 });
    await c.connect();
    gw1.last.send(encodeDown({ seq: 4 }, true, text("old")));
    await until(() => acks(gw1.last).length === 1, "ack of a duplicate");
    expect(acks(gw1.last)).toEqual([5]);
  });

  it("passes QoS0 through without acks and exposes meta and JSON", async () => {
    const c = client();
    const got = recorder(c);
    await c.connect();
    gw1.last.send(encodeDown({ session: "s", sentAtMs: 12, meta: { kind: "chat" } }, false, text('{"a":1}')));
    await until(() => got.length === 1, "a message");
    expect(got[0]).toMatchObject({ seq: 0, qos1: false, session: "s", sentAtMs: 12, meta: { kind: "chat" } });
    expect(got[0].json()).toEqual({ a: 1 });
    expect(acks(gw1.last)).toEqual([]);
  });

  it("resumes from H after a reconnect and adopts the server's ack point", async () => {
    const saved: unknown[] = [];
    const c = client({ store: { load: () => null, save: (s) => saved.push(s) } });
    const got = recorder(c);
    await c.connect();
    gw1.last.send(encodeDown({ seq: 1 }, true, text("a")));
    gw1.last.send(encodeDown({ seq: 2 }, true, text("b")));
    await until(() => got.length === 2, "two messages");
    gw1.lastAckedSeq = 4; // e.g. acked through another path before the cut
    gw1.last.close();
    await until(() => gw1.logins.length === 2, "second login");
    expect(gw1.last.login?.resumeSeq).toBe(2);
    await until(() => c.resumeSeq === 4, "adopted ack point");
    gw1.last.send(encodeDown({ seq: 3 }, true, text("dup")));
    gw1.last.send(encodeDown({ seq: 5 }, true, text("e")));
    await until(() => got.length === 3, "third message");
    expect(got.map((m) => m.text)).toEqual(["a", "b", "e"]);
    expect(saved[saved.length - 1]).toEqual({ resumeSeq: 5, rooms: {} });
  });
});

describe("rooms", () => {
  it("delivers each room_seq once, sends cursors at the next login and reports gaps", async () => {
    const c = client();
    const got = recorder(c);
    const gaps: unknown[] = [];
    c.on("gap", (g) => gaps.push(g));
    await c.connect();
    const conn = gw1.last;
    for (const roomSeq of [1, 2, 2, 1, 3]) conn.send(encodeDown({ session: "lobby", roomSeq }, false, text(`r${roomSeq}`)));
    await until(() => got.length === 3, "three room messages");
    expect(got.map((m) => m.roomSeq)).toEqual([1, 2, 3]);
    expect(c.roomCursors).toEqual({ lobby: 3 });
    conn.send(encodeError({ code: 19, text: "room lobby: messages 4..9 are no longer stored" }, false));
    await until(() => gaps.length === 1, "gap");
    expect(gaps[0]).toMatchObject({ session: "lobby", from: 4, to: 9 });
    conn.close();
    await until(() => gw1.logins.length === 2, "second login");
    expect(gw1.last.login?.rooms).toEqual([{ session: "lobby", roomSeq: 3 }]);
  });
});

describe("errors, redirect and reconnect", () => {
  it("reports a non-closing ERROR and carries on", async () => {
    const c = client();
    const errors: TetherError[] = [];
    c.on("error", (e) => errors.push(e));
    await c.connect();
    gw1.last.send(encodeError({ code: 12, retryAfterMs: 1500 }, false));
    await until(() => errors.length === 1, "error event");
    expect(errors[0]).toMatchObject({ code: "rate_limited", retryAfterMs: 1500 });
    expect(c.state).toBe("connected");
  });

  it("stops on replaced and fails what is pending", async () => {
    const c = client();
    const disconnects: unknown[] = [];
    c.on("disconnected", (d) => disconnects.push(d));
    await c.connect();
    const pending = c.send("x").catch((e: TetherError) => e);
    gw1.last.send(encodeError({ code: 9, text: "replaced" }, true));
    expect(await pending).toMatchObject({ code: "closed" });
    expect(disconnects).toEqual([{ code: "replaced", reason: "replaced", reconnecting: false }]);
    expect(c.state).toBe("closed");
    expect(gw1.conns.length).toBe(1);
  });

  it("stops on replaced even when it comes right behind LOGIN_ACK", async () => {
    gw1.onLogin = (_login, conn) => {
      conn.send(encodeLoginAck({ connId: 1, gateway: "gw-1", heartbeatSecs: 300, serverTimeMs: 0, lastAckedSeq: 0 }));
      return encodeError({ code: 9, text: "replaced" }, true);
    };
    const c = client();
    await c.connect();
    await until(() => c.state === "closed", "stopped");
    expect(gw1.conns.length).toBe(1);
  });

  it("tries another endpoint first after going_away", async () => {
    const gw2 = new FakeGateway("gw-2", "ws://gw2/ws");
    const c = client({ endpoints: ["ws://gw1/ws", "ws://gw2/ws"] });
    const gateways: string[] = [];
    c.on("connected", (e) => gateways.push(e.gateway));
    await c.connect();
    gw1.last.send(encodeError({ code: 14, text: "draining" }, true));
    await until(() => gateways.length === 2, "reconnect");
    expect(gateways).toEqual(["gw-1", "gw-2"]);
    expect(gw2.last.login?.token).toBe("tok-1");
  });

  it("follows a REDIRECT: logs in there with its token and resume point, then leaves the old link", async () => {
    const gw2 = new FakeGateway("gw-2", "ws://gw2/ws");
    const c = client();
    const got = recorder(c);
    const gateways: string[] = [];
    c.on("connected", (e) => gateways.push(e.gateway));
    await c.connect();
    const old = gw1.last;
    old.send(encodeDown({ seq: 1 }, true, text("a")));
    await until(() => got.length === 1, "first message");
    old.send(encodeRedirect({ endpoint: "ws://gw2/ws", token: "tok-gw2", reason: "drain" }));
    await until(() => gateways.length === 2, "redirected");
    expect(gw2.last.login).toMatchObject({ token: "tok-gw2", did: "dev-1", resumeSeq: 1 });
    await until(() => old.closed, "old link closed");
    // Overlap is absorbed by seq.
    gw2.last.send(encodeDown({ seq: 1 }, true, text("a")));
    gw2.last.send(encodeDown({ seq: 2 }, true, text("b")));
    await until(() => got.length === 2, "second message");
    expect(got.map((m) => m.text)).toEqual(["a", "b"]);
    expect(c.gateway).toBe("gw-2");
  });

  it("keeps following a REDIRECT when the old gateway closes the old link before the new LOGIN_ACK", async () => {
    const gw2 = new FakeGateway("gw-2", "ws://gw2/ws");
    const c = client();
    const got = recorder(c);
    const gateways: string[] = [];
    const disconnects: unknown[] = [];
    c.on("connected", (e) => gateways.push(e.gateway));
    c.on("disconnected", (d) => disconnects.push(d));
    await c.connect();
    const old = gw1.last;
    old.send(encodeDown({ seq: 1 }, true, text("a")));
    await until(() => got.length === 1, "first message");
    // The new gateway registers the login: the old one closes the redirected link at once
    // (no ERROR), and the LOGIN_ACK reaches the client only afterwards.
    let ackNow: (() => void) | undefined;
    gw2.onLogin = (login, conn) => {
      old.send(encodeDown({ seq: 2 }, true, text("b")));
      setTimeout(() => old.close(), 5);
      ackNow = () =>
        conn.send(encodeLoginAck({ connId: 7, gateway: "gw-2", heartbeatSecs: 300, serverTimeMs: 0, lastAckedSeq: login.resumeSeq }));
      return encodePong();
    };
    old.send(encodeRedirect({ endpoint: "ws://gw2/ws", token: "tok-gw2", reason: "handoff" }));
    await until(() => ackNow !== undefined && got.length === 2, "second message, on the old link");
    await until(() => old.closed, "old link closed by its gateway");
    await new Promise((r) => setTimeout(r, 30));
    expect(disconnects).toEqual([]);
    ackNow!();
    await until(() => gateways.length === 2, "redirected");
    expect(gw2.last.login).toMatchObject({ token: "tok-gw2", did: "dev-1", resumeSeq: 1 });
    // The new gateway resends what the old link delivered but was not acknowledged yet.
    gw2.last.send(encodeDown({ seq: 2 }, true, text("b")));
    gw2.last.send(encodeDown({ seq: 3 }, true, text("c")));
    await until(() => got.length === 3, "third message");
    expect(got.map((m) => m.text)).toEqual(["a", "b", "c"]);
    expect(disconnects).toEqual([]);
    expect(gateways).toEqual(["gw-1", "gw-2"]);
    expect(gw1.conns.length).toBe(1);
    expect(c.state).toBe("connected");
  });

  it("falls back to a normal reconnect when the old link closed and the redirect fails", async () => {
    const gw2 = new FakeGateway("gw-2", "ws://gw2/ws");
    const c = client({ endpoints: ["ws://gw1/ws"] });
    const disconnects: { reason: string }[] = [];
    c.on("disconnected", (d) => disconnects.push(d as { reason: string }));
    await c.connect();
    const old = gw1.last;
    gw2.onLogin = () => {
      old.close();
      setTimeout(() => gw2.last.close(), 5);
      return encodePong();
    };
    old.send(encodeRedirect({ endpoint: "ws://gw2/ws", token: "tok-gw2", reason: "handoff" }));
    await until(() => disconnects.length === 1, "the redirect's failure ends the old link");
    expect(disconnects[0]).toMatchObject({ reason: "redirect failed" });
    await until(() => gw1.logins.length === 2 && c.state === "connected", "logged in again through the normal path");
  });

  it("reconnects with backoff while no gateway accepts", async () => {
    const c = client();
    await c.connect();
    gw1.accepting = false;
    gw1.last.close();
    await until(() => c.state === "waiting" || c.state === "connecting", "reconnecting");
    gw1.accepting = true;
    await until(() => gw1.logins.length === 2 && c.state === "connected", "back");
  });

  it("pings every heartbeat and drops a link that stays silent", async () => {
    gw1.heartbeatSecs = 1;
    const c = client({ pongTimeoutMs: 50 });
    await c.connect();
    const first = gw1.last;
    // The fake gateway never answers PINGs: the client gives up on the link and logs in again.
    await until(() => first.of(FrameType.PING).length === 1, "a ping", 5000);
    await until(() => gw1.logins.length === 2, "a new login after a silent ping", 5000);
  });
});

describe("browser network events", () => {
  it("drops the link when the browser goes offline and logs in again when it is back", async () => {
    const target = new EventTarget();
    const nav = { onLine: true };
    vi.stubGlobal("addEventListener", target.addEventListener.bind(target));
    vi.stubGlobal("removeEventListener", target.removeEventListener.bind(target));
    vi.stubGlobal("navigator", nav);
    const c = client({ watchNetwork: true });
    const states: string[] = [];
    c.on("state", (s) => states.push(s));
    await c.connect();
    nav.onLine = false;
    target.dispatchEvent(new Event("offline"));
    await until(() => c.state === "offline", "offline state");
    expect(gw1.last.closed).toBe(true);
    nav.onLine = true;
    target.dispatchEvent(new Event("online"));
    await until(() => c.state === "connected" && gw1.logins.length === 2, "online again");
    expect(states).toContain("offline");
  });
});

describe("discovery through ipconfig", () => {
  const answer = (token: string, exp = Math.floor(Date.now() / 1000) + 600) => ({
    app: "demo",
    uid: "alice",
    did: "dev-1",
    region: "",
    endpoints: [{ gw: "gw-1", tcp: "127.0.0.1:7400", ws: "ws://gw1/ws", score: 1 }],
    token,
    token_exp: exp,
  });

  it("sends the credential, uses the offered ws endpoint and token", async () => {
    const fetchMock = vi.fn(async (url: string, init: RequestInit) => {
      expect(url).toBe("http://ipconfig/v1/endpoints?app=demo");
      expect((init.headers as Record<string, string>).Authorization).toBe("Bearer cred-1");
      return new Response(JSON.stringify(answer("gw-token")), { status: 200 });
    });
    vi.stubGlobal("fetch", fetchMock);
    const c = client({ endpoints: undefined, token: undefined, ipconfig: "http://ipconfig/", credential: "cred-1" });
    await c.connect();
    expect(gw1.last.login?.token).toBe("gw-token");
  });

  it("gets a fresh credential after ipconfig refuses one", async () => {
    let n = 0;
    vi.stubGlobal(
      "fetch",
      vi.fn(async (_url: string, init: RequestInit) => {
        const auth = (init.headers as Record<string, string>).Authorization;
        if (auth === "Bearer cred-1")
          return new Response(JSON.stringify({ error: { code: "token_expired", message: "old" } }), { status: 401 });
        return new Response(JSON.stringify(answer("gw-token")), { status: 200 });
      }),
    );
    const c = client({ endpoints: undefined, token: undefined, ipconfig: "http://ipconfig", credential: () => `cred-${++n}` });
    await c.connect();
    expect(n).toBe(2);
  });

  it("falls back to the cached answer while ipconfig is down", async () => {
    let up = true;
    vi.stubGlobal(
      "fetch",
      vi.fn(async () => {
        if (!up) throw new TypeError("fetch failed");
        return new Response(JSON.stringify(answer("gw-token")), { status: 200 });
      }),
    );
    const c = client({ endpoints: undefined, token: undefined, ipconfig: "http://ipconfig", credential: "cred" });
    await c.connect();
    up = false;
    await new Promise((r) => setTimeout(r, 1100)); // past the one-second reuse of the answer
    gw1.last.close();
    await until(() => gw1.logins.length === 2, "login from the cache");
    expect(gw1.last.login?.token).toBe("gw-token");
  });

  it("stops when ipconfig refuses the app", async () => {
    vi.stubGlobal(
      "fetch",
      vi.fn(async () => new Response(JSON.stringify({ error: { code: "wrong_app", message: "no" } }), { status: 403 })),
    );
    const c = client({ endpoints: undefined, token: undefined, ipconfig: "http://ipconfig", credential: "cred" });
    await expect(c.connect()).rejects.toMatchObject({ code: "wrong_app" });
  });
});

describe("frames the client sends", () => {
  it("LOGIN encodes like the reference for the same fields", () => {
    // Same bytes as PROTOCOL.md's login vector (checked in vectors.test.ts); here the
    // client's own field order with an empty room list omits field 5.
    const bytes = encodeLogin({ token: "t", did: "d", app: "a" });
    expect([...bytes.slice(10)]).toEqual([0x0a, 1, 0x74, 0x12, 1, 0x64, 0x1a, 1, 0x61]);
  });
});
