// Every hex vector of schemas/PROTOCOL.md section 9, read from the document itself:
// each decodes to the content its description gives and re-encodes to the same bytes.

import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import {
  TetherError,
  FrameType,
  codeNumber,
  decodeFrame,
  encodeDownAck,
  encodeLogin,
  encodePing,
  encodeUp,
} from "../../src/index.js";
import {
  encodeDown,
  encodeError,
  encodeLoginAck,
  encodePong,
  encodeRedirect,
  encodeUpAck,
} from "../../src/server.js";

const protocol = readFileSync(
  fileURLToPath(new URL("../../../../schemas/PROTOCOL.md", import.meta.url)),
  "utf8",
);

/** name → bytes of every ```hex name=… block. */
function vectors(): Map<string, Uint8Array> {
  const out = new Map<string, Uint8Array>();
  for (const m of protocol.matchAll(/```hex name=(\w+)\n([\s\S]*?)```/g)) {
    const hex = m[2].replace(/\s+/g, "");
    out.set(m[1], Uint8Array.from(hex.match(/../g)!.map((h) => parseInt(h, 16))));
  }
  return out;
}

const all = vectors();
const vec = (name: string) => {
  const v = all.get(name);
  if (!v) throw new Error(`vector ${name} missing from PROTOCOL.md`);
  return v;
};
const text = (s: string) => new TextEncoder().encode(s);

describe("PROTOCOL.md section 9 vectors", () => {
  it("finds all fourteen vectors", () => {
    expect([...all.keys()].sort()).toEqual(
      [
        "down",
        "down_ack",
        "down_qos0",
        "error",
        "error_rate_limited",
        "login",
        "login_ack",
        "ping",
        "ping_empty",
        "pong",
        "redirect",
        "up",
        "up_ack",
        "up_ack_rejected",
      ].sort(),
    );
  });

  it("login", () => {
    const f = decodeFrame(vec("login"));
    expect(f).toEqual({
      type: FrameType.LOGIN,
      login: {
        token: "tok-abc",
        did: "dev-1",
        app: "chat",
        resumeSeq: 41,
        rooms: [{ session: "room-9", roomSeq: 7 }],
        sdk: "rust/0.1.0",
      },
    });
    const bytes = encodeLogin({
      token: "tok-abc",
      did: "dev-1",
      app: "chat",
      resumeSeq: 41,
      rooms: [{ session: "room-9", roomSeq: 7 }],
      sdk: "rust/0.1.0",
    });
    expect(bytes).toEqual(vec("login"));
  });

  it("login_ack", () => {
    const ack = { connId: 1001, gateway: "gw-1", heartbeatSecs: 300, serverTimeMs: 1700000000000, lastAckedSeq: 40 };
    expect(decodeFrame(vec("login_ack"))).toEqual({ type: FrameType.LOGIN_ACK, ack });
    expect(encodeLoginAck(ack)).toEqual(vec("login_ack"));
  });

  it("ping, ping_empty, pong", () => {
    expect(decodeFrame(vec("ping"))).toEqual({ type: FrameType.PING, body: text("hb-1") });
    expect(encodePing(text("hb-1"))).toEqual(vec("ping"));
    expect(decodeFrame(vec("ping_empty"))).toEqual({ type: FrameType.PING, body: new Uint8Array(0) });
    expect(encodePing()).toEqual(vec("ping_empty"));
    expect(decodeFrame(vec("pong"))).toEqual({ type: FrameType.PONG, body: text("hb-1") });
    expect(encodePong(text("hb-1"))).toEqual(vec("pong"));
  });

  it("up", () => {
    expect(decodeFrame(vec("up"))).toEqual({
      type: FrameType.UP,
      up: { clientMsgId: 17, session: "s-42" },
      body: text("hello"),
    });
    expect(encodeUp({ clientMsgId: 17, session: "s-42" }, text("hello"))).toEqual(vec("up"));
  });

  it("up_ack and up_ack_rejected", () => {
    expect(decodeFrame(vec("up_ack"))).toEqual({
      type: FrameType.UP_ACK,
      ack: { clientMsgId: 17, code: 0, message: "", serverMsgId: "m-9001" },
    });
    expect(encodeUpAck({ clientMsgId: 17, serverMsgId: "m-9001" })).toEqual(vec("up_ack"));
    expect(decodeFrame(vec("up_ack_rejected"))).toEqual({
      type: FrameType.UP_ACK,
      ack: { clientMsgId: 18, code: 18, message: "muted", serverMsgId: "" },
    });
    expect(encodeUpAck({ clientMsgId: 18, code: 18, message: "muted" })).toEqual(vec("up_ack_rejected"));
  });

  it("down (QoS1, meta) and down_qos0 (room_seq)", () => {
    const down = { seq: 42, session: "s-42", roomSeq: 0, sentAtMs: 1700000000123, meta: { from: "u-7" } };
    expect(decodeFrame(vec("down"))).toEqual({ type: FrameType.DOWN, down, qos1: true, body: text("hi there") });
    expect(encodeDown(down, true, text("hi there"))).toEqual(vec("down"));
    const live = { seq: 0, session: "room-9", roomSeq: 8, sentAtMs: 1700000000456, meta: {} };
    expect(decodeFrame(vec("down_qos0"))).toEqual({ type: FrameType.DOWN, down: live, qos1: false, body: text("live") });
    expect(encodeDown(live, false, text("live"))).toEqual(vec("down_qos0"));
  });

  it("down_ack", () => {
    expect(decodeFrame(vec("down_ack"))).toEqual({ type: FrameType.DOWN_ACK, seq: 42 });
    expect(encodeDownAck(42)).toEqual(vec("down_ack"));
    // seq 0 is the empty message: hlen 0.
    expect(encodeDownAck(0)).toEqual(Uint8Array.from([0x54, 1, 8, 0, 0, 0, 0, 0, 0, 0]));
  });

  it("redirect", () => {
    const redirect = { endpoint: "10.0.0.2:7000", token: "tok-new", reason: "drain" };
    expect(decodeFrame(vec("redirect"))).toEqual({ type: FrameType.REDIRECT, redirect });
    expect(encodeRedirect(redirect)).toEqual(vec("redirect"));
  });

  it("error (CLOSE) and error_rate_limited", () => {
    expect(decodeFrame(vec("error"))).toEqual({
      type: FrameType.ERROR,
      error: { code: 7, text: "token expired", retryAfterMs: 0 },
      close: true,
    });
    expect(encodeError({ code: 7, text: "token expired" }, true)).toEqual(vec("error"));
    expect(decodeFrame(vec("error_rate_limited"))).toEqual({
      type: FrameType.ERROR,
      error: { code: 12, text: "", retryAfterMs: 1500 },
      close: false,
    });
    expect(encodeError({ code: 12, retryAfterMs: 1500 }, false)).toEqual(vec("error_rate_limited"));
  });
});

describe("decoder edge cases (sections 3 and 4)", () => {
  const frame = (bytes: number[]) => Uint8Array.from(bytes);

  it("refuses bad magic, other versions and inconsistent lengths", () => {
    const good = [...vec("down_ack")];
    const code = (bytes: Uint8Array) => {
      try {
        decodeFrame(bytes);
        return 0;
      } catch (e) {
        expect(e).toBeInstanceOf(TetherError);
        return codeNumber((e as TetherError).code);
      }
    };
    expect(code(frame([0x55, ...good.slice(1)]))).toBe(1);
    expect(code(frame([0x54, 2, ...good.slice(2)]))).toBe(3);
    expect(code(frame(good.slice(0, 11)))).toBe(1);
    expect(code(frame([...good, 0]))).toBe(1);
    expect(code(frame([0x54, 1]))).toBe(1);
  });

  it("refuses frames announcing more than the max length, from the fixed header alone", () => {
    const header = frame([0x54, 1, 7, 0, 0, 0, 0, 1, 0, 0]); // blen 65536
    expect(() => decodeFrame(header)).toThrowError(/65546 > 65536/);
  });

  it("refuses a body on a frame type that has none", () => {
    expect(() => decodeFrame(frame([0x54, 1, 6, 0, 0, 0, 0, 0, 0, 1, 0x41]))).toThrowError(TetherError);
  });

  it("skips unknown fields and decodes unknown frame types as skippable", () => {
    // DownAck { seq: 5, field 9 varint 1, field 10 string "x" }
    const hdr = [0x08, 0x05, 0x48, 0x01, 0x52, 0x01, 0x78];
    expect(decodeFrame(frame([0x54, 1, 8, 0, 0, hdr.length, 0, 0, 0, 0, ...hdr]))).toEqual({
      type: FrameType.DOWN_ACK,
      seq: 5,
    });
    expect(decodeFrame(frame([0x54, 1, 42, 0, 0, 0, 0, 0, 0, 1, 9]))).toEqual({ type: 42, unknown: true });
  });

  it("ignores reserved flag bits and treats invalid UTF-8 as a bad frame", () => {
    const qos1Reserved = [...vec("down")];
    qos1Reserved[3] = 0xfd; // QOS1 + reserved bits
    const f = decodeFrame(Uint8Array.from(qos1Reserved));
    expect(f.type === FrameType.DOWN && "qos1" in f && f.qos1).toBe(true);
    // Error { text: 0xff }
    expect(() => decodeFrame(frame([0x54, 1, 10, 0, 0, 3, 0, 0, 0, 0, 0x12, 0x01, 0xff]))).toThrowError(TetherError);
  });

  it("round-trips large u64 values exactly up to 2^53 - 1", () => {
    const big = Number.MAX_SAFE_INTEGER;
    const f = decodeFrame(encodeUp({ clientMsgId: big }, new Uint8Array(0)));
    expect(f.type === FrameType.UP && "up" in f && f.up.clientMsgId).toBe(big);
  });

  it("refuses to encode an UP over the frame limit", () => {
    expect(() => encodeUp({ clientMsgId: 1 }, new Uint8Array(65536))).toThrowError(TetherError);
  });
});
