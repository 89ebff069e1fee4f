// Frames of PROTOCOL.md sections 3 to 5: a 10-byte fixed header, a protobuf variable
// header and an opaque body. One frame per WebSocket binary message (section 2).

import { TetherError } from "./errors.js";
import { Writer, fromUtf8, readFields } from "./proto.js";

/** Magic byte, ASCII `T`. */
export const MAGIC = 0x54;
/** Protocol version carried in every frame. */
export const VERSION = 1;
/** Length of the fixed header. */
export const FIXED_HEADER_LEN = 10;
/** Default max total frame length a receiver accepts (section 3.4). */
export const DEFAULT_MAX_FRAME_LEN = 65536;
/** Flag on DOWN: at-least-once, acknowledge with DOWN_ACK. */
export const FLAG_QOS1 = 0x01;
/** Flag on ERROR: the server closes the connection after this frame. */
export const FLAG_CLOSE = 0x02;

/** Frame types (byte 2 of the fixed header). */
export const FrameType = {
  LOGIN: 1,
  LOGIN_ACK: 2,
  PING: 3,
  PONG: 4,
  UP: 5,
  UP_ACK: 6,
  DOWN: 7,
  DOWN_ACK: 8,
  REDIRECT: 9,
  ERROR: 10,
} as const;

/** Where a client stands in one recoverable room (LOGIN `rooms`). */
export interface RoomCursor {
  /** Session (room) id. */
  session: string;
  /** Highest room_seq processed in that room. */
  roomSeq: number;
}

/** LOGIN variable header. */
export interface Login {
  /** Gateway token. */
  token: string;
  /** Device id. */
  did: string;
  /** App id. */
  app: string;
  /** Highest contiguous QoS1 seq processed (0 = fresh start). */
  resumeSeq?: number;
  /** Per-room recovery cursors. */
  rooms?: RoomCursor[];
  /** SDK name and version. */
  sdk?: string;
}

/** LOGIN_ACK variable header. */
export interface LoginAck {
  /** Connection id. */
  connId: number;
  /** Gateway id. */
  gateway: string;
  /** PING interval in seconds (0: use the default). */
  heartbeatSecs: number;
  /** Server wall clock at login, Unix ms. */
  serverTimeMs: number;
  /** Highest DOWN seq the server counts as acknowledged. */
  lastAckedSeq: number;
}

/** UP variable header. */
export interface Up {
  /** Client-chosen id, unique per device. */
  clientMsgId: number;
  /** Target session, may be empty. */
  session?: string;
}

/** UP_ACK variable header. */
export interface UpAck {
  /** The client_msg_id answered. */
  clientMsgId: number;
  /** Error code, 0 = stored. */
  code: number;
  /** Detail for a non-zero code. */
  message: string;
  /** Business id of the stored message. */
  serverMsgId: string;
}

/** DOWN variable header. */
export interface Down {
  /** Per-device seq (QoS1), 0 for QoS0. */
  seq: number;
  /** Session the message belongs to. */
  session: string;
  /** Per-room seq of a recoverable room broadcast, else 0. */
  roomSeq: number;
  /** When the business service sent it, Unix ms. */
  sentAtMs: number;
  /** Business metadata. */
  meta: Record<string, string>;
}

/** REDIRECT variable header. */
export interface Redirect {
  /** Where to connect (a ws:// or wss:// URL for WebSocket clients). */
  endpoint: string;
  /** Token for the LOGIN there. */
  token: string;
  /** Why (informational). */
  reason: string;
}

/** ERROR variable header. */
export interface ErrorHeader {
  /** Error code (section 8). */
  code: number;
  /** Human-readable detail. */
  text: string;
  /** Wait at least this long before retrying, ms (0: no hint). */
  retryAfterMs: number;
}

/** A decoded frame. */
export type Frame =
  | { type: typeof FrameType.LOGIN; login: Login }
  | { type: typeof FrameType.LOGIN_ACK; ack: LoginAck }
  | { type: typeof FrameType.PING | typeof FrameType.PONG; body: Uint8Array }
  | { type: typeof FrameType.UP; up: Up; body: Uint8Array }
  | { type: typeof FrameType.UP_ACK; ack: UpAck }
  | { type: typeof FrameType.DOWN; down: Down; qos1: boolean; body: Uint8Array }
  | { type: typeof FrameType.DOWN_ACK; seq: number }
  | { type: typeof FrameType.REDIRECT; redirect: Redirect }
  | { type: typeof FrameType.ERROR; error: ErrorHeader; close: boolean }
  | { type: number; unknown: true };

const EMPTY = new Uint8Array(0);

// Variable headers as tables: entry i describes field number i + 1 as [property, kind].
// Kind U is a uint64 varint, S a string; a `Nested` handles the repeated room cursors and
// the meta map. Missing fields decode to their defaults (0, "", [] or {}); defaults are
// omitted when encoding (section 4).
const U = 0;
const S = 1;
interface Nested {
  init: () => unknown;
  dec: (bytes: Uint8Array, into: unknown) => void;
  enc: (w: Writer, field: number, value: unknown) => void;
}
type Spec = [string, typeof U | typeof S | Nested][];

function decodeFields<T>(buf: Uint8Array, spec: Spec): T {
  const out: Record<string, unknown> = {};
  for (const [name, kind] of spec) out[name] = kind === U ? 0 : kind === S ? "" : kind.init();
  readFields(buf, (n, wire, read) => {
    const d = spec[n - 1];
    if (!d) return;
    if (wire !== (d[1] === U ? 0 : 2)) throw new Error(`wire type of ${d[0]}`);
    const v = read();
    if (d[1] === U) out[d[0]] = v;
    else if (d[1] === S) out[d[0]] = fromUtf8(v as Uint8Array);
    else d[1].dec(v as Uint8Array, out[d[0]]);
  });
  return out as T;
}

function encodeFields(spec: Spec, value: object): Uint8Array {
  const w = new Writer();
  const v = value as Record<string, unknown>;
  spec.forEach(([name, kind], i) => {
    if (kind === U) w._uint(i + 1, v[name] as number);
    else if (kind === S) w._string(i + 1, v[name] as string);
    else if (v[name] !== undefined) kind.enc(w, i + 1, v[name]);
  });
  return w._finish();
}

const ROOM: Spec = [
  ["session", S],
  ["roomSeq", U],
];
const ROOMS: Nested = {
  init: () => [],
  dec: (b, into) => (into as RoomCursor[]).push(decodeFields(b, ROOM)),
  enc: (w, f, v) => (v as RoomCursor[]).forEach((c) => w._bytesField(f, encodeFields(ROOM, c))),
};
const ENTRY: Spec = [
  ["k", S],
  ["v", S],
];
const META: Nested = {
  init: () => ({}),
  dec: (b, into) => {
    const e = decodeFields<{ k: string; v: string }>(b, ENTRY);
    (into as Record<string, string>)[e.k] = e.v;
  },
  enc: (w, f, v) => {
    const m = v as Record<string, string>;
    for (const k of Object.keys(m).sort()) w._bytesField(f, encodeFields(ENTRY, { k, v: m[k] }));
  },
};

/** Variable header tables, by frame type: [property of the decoded frame, table, body allowed]. */
const HEADERS: Record<number, [string, Spec, boolean]> = {
  1: ["login", [["token", S], ["did", S], ["app", S], ["resumeSeq", U], ["rooms", ROOMS], ["sdk", S]], false],
  2: ["ack", [["connId", U], ["gateway", S], ["heartbeatSecs", U], ["serverTimeMs", U], ["lastAckedSeq", U]], false],
  5: ["up", [["clientMsgId", U], ["session", S]], true],
  6: ["ack", [["clientMsgId", U], ["code", U], ["message", S], ["serverMsgId", S]], false],
  7: ["down", [["seq", U], ["session", S], ["roomSeq", U], ["sentAtMs", U], ["meta", META]], true],
  8: ["", [["seq", U]], false],
  9: ["redirect", [["endpoint", S], ["token", S], ["reason", S]], false],
  10: ["error", [["code", U], ["text", S], ["retryAfterMs", U]], false],
};

/** Encodes the variable header of frame `type` from an object with its properties. */
export function encodeHeader(type: number, value: object): Uint8Array {
  return encodeFields(HEADERS[type][1], value);
}

/** Builds one frame from its parts. */
export function encodeRaw(
  type: number,
  flags: number,
  header: Uint8Array = EMPTY,
  body: Uint8Array = EMPTY,
  maxLen = DEFAULT_MAX_FRAME_LEN,
): Uint8Array {
  if (header.length > 0xffff) throw new TetherError("bad_frame", "hlen > 65535");
  const total = FIXED_HEADER_LEN + header.length + body.length;
  if (total > maxLen) throw new TetherError("frame_too_large", `${total} > ${maxLen} bytes`);
  const out = new Uint8Array(total);
  out.set([MAGIC, VERSION, type, flags, header.length >> 8, header.length & 255]);
  new DataView(out.buffer).setUint32(6, body.length);
  out.set(header, FIXED_HEADER_LEN);
  out.set(body, FIXED_HEADER_LEN + header.length);
  return out;
}

/** Encodes a LOGIN frame. */
export function encodeLogin(login: Login): Uint8Array {
  return encodeRaw(FrameType.LOGIN, 0, encodeHeader(FrameType.LOGIN, login));
}

/** Encodes a PING frame with an optional opaque body. */
export function encodePing(body: Uint8Array = EMPTY): Uint8Array {
  return encodeRaw(FrameType.PING, 0, EMPTY, body);
}

/** Encodes an UP frame; throws `TetherError` `frame_too_large` if it exceeds `maxLen`. */
export function encodeUp(up: Up, body: Uint8Array, maxLen = DEFAULT_MAX_FRAME_LEN): Uint8Array {
  return encodeRaw(FrameType.UP, 0, encodeHeader(FrameType.UP, up), body, maxLen);
}

/** Encodes a DOWN_ACK frame: every QoS1 DOWN with seq <= `seq` is acknowledged. */
export function encodeDownAck(seq: number): Uint8Array {
  return encodeRaw(FrameType.DOWN_ACK, 0, encodeHeader(FrameType.DOWN_ACK, { seq }));
}

/**
 * Decodes one complete frame (one WebSocket message). Throws `TetherError`:
 * `bad_frame` for bad magic, lengths that disagree with the message, a malformed variable
 * header (invalid UTF-8 included), a variable header or body where none is allowed;
 * `unsupported_version` for another version; `frame_too_large` when the fixed header
 * announces more than `maxLen` bytes. A reserved or unknown type decodes to
 * `{ type, unknown: true }` so that the caller can skip it.
 */
export function decodeFrame(bytes: Uint8Array, maxLen = DEFAULT_MAX_FRAME_LEN): Frame {
  if (bytes.length < FIXED_HEADER_LEN) throw new TetherError("bad_frame", "short frame");
  if (bytes[0] !== MAGIC) throw new TetherError("bad_frame", "bad magic");
  if (bytes[1] !== VERSION) throw new TetherError("unsupported_version", `version ${bytes[1]}`);
  const [, , type, flags] = bytes;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const hlen = view.getUint16(4);
  const blen = view.getUint32(6);
  const total = FIXED_HEADER_LEN + hlen + blen;
  if (total > maxLen) throw new TetherError("frame_too_large", `${total} > ${maxLen} bytes`);
  if (total !== bytes.length) throw new TetherError("bad_frame", "bad lengths");
  const body = bytes.subarray(FIXED_HEADER_LEN + hlen);
  if (type === FrameType.PING || type === FrameType.PONG) {
    if (hlen) throw new TetherError("bad_frame", "hlen on ping/pong");
    return { type, body };
  }
  const h = HEADERS[type];
  if (!h) return { type, unknown: true };
  if (blen && !h[2]) throw new TetherError("bad_frame", "body not allowed");
  let header: Record<string, unknown>;
  try {
    header = decodeFields(bytes.subarray(FIXED_HEADER_LEN, FIXED_HEADER_LEN + hlen), h[1]);
  } catch (e) {
    throw new TetherError("bad_frame", (e as Error).message);
  }
  if (type === FrameType.DOWN_ACK) return { type, seq: header.seq as number };
  const frame: Record<string, unknown> = { type, [h[0]]: header };
  if (type === FrameType.DOWN) frame.qos1 = (flags & FLAG_QOS1) !== 0;
  if (type === FrameType.ERROR) frame.close = (flags & FLAG_CLOSE) !== 0;
  if (h[2]) frame.body = body;
  return frame as Frame;
}
