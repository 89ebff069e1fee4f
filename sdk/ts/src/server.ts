// Server-side encoders of the frames a gateway sends (LOGIN_ACK, PONG, UP_ACK, DOWN,
// REDIRECT, ERROR): for tests and tools, not part of the client bundle.

import {
  FLAG_CLOSE,
  FLAG_QOS1,
  FrameType,
  encodeHeader,
  encodeRaw,
  type Down,
  type ErrorHeader,
  type LoginAck,
  type Redirect,
  type UpAck,
} from "./frame.js";

/** Encodes a LOGIN_ACK frame. */
export function encodeLoginAck(ack: LoginAck): Uint8Array {
  return encodeRaw(FrameType.LOGIN_ACK, 0, encodeHeader(FrameType.LOGIN_ACK, ack));
}

/** Encodes a PONG frame echoing a PING's body. */
export function encodePong(body: Uint8Array = new Uint8Array(0)): Uint8Array {
  return encodeRaw(FrameType.PONG, 0, undefined, body);
}

/** Encodes an UP_ACK frame. */
export function encodeUpAck(ack: Partial<UpAck> & { clientMsgId: number }): Uint8Array {
  return encodeRaw(FrameType.UP_ACK, 0, encodeHeader(FrameType.UP_ACK, ack));
}

/** Encodes a DOWN frame; map entries sorted by key like the reference encoder. */
export function encodeDown(down: Partial<Down>, qos1: boolean, body: Uint8Array): Uint8Array {
  return encodeRaw(FrameType.DOWN, qos1 ? FLAG_QOS1 : 0, encodeHeader(FrameType.DOWN, down), body);
}

/** Encodes a REDIRECT frame. */
export function encodeRedirect(r: Partial<Redirect>): Uint8Array {
  return encodeRaw(FrameType.REDIRECT, 0, encodeHeader(FrameType.REDIRECT, r));
}

/** Encodes an ERROR frame, with the CLOSE flag if `close`. */
export function encodeError(e: Partial<ErrorHeader> & { code: number }, close: boolean): Uint8Array {
  return encodeRaw(FrameType.ERROR, close ? FLAG_CLOSE : 0, encodeHeader(FrameType.ERROR, e));
}
