// An in-memory stand-in for gateways behind WebSocket URLs, speaking real frames: the
// client under test encodes and decodes every byte exactly as it would on a socket.

import { FrameType, decodeFrame, type Frame, type Login } from "../../src/index.js";
import { encodeLoginAck } from "../../src/server.js";

type Listener = ((ev: unknown) => void) | null;

/** A server-side socket: what the fake gateway sees of one client connection. */
export class ServerSide {
  readonly frames: Frame[] = [];
  login: Login | undefined;
  closed = false;
  constructor(
    readonly gateway: FakeGateway,
    readonly client: FakeWebSocket,
  ) {}

  /** Sends raw frame bytes to the client. */
  send(bytes: Uint8Array): void {
    if (this.closed) return;
    const copy = bytes.slice().buffer;
    queueMicrotask(() => this.client.deliver(copy));
  }

  /** Closes the connection from the server side. */
  close(code = 1006): void {
    if (this.closed) return;
    this.closed = true;
    this.client.remoteClose(code);
  }

  /** Frames of one type received from the client. */
  of<T extends Frame>(type: number): T[] {
    return this.frames.filter((f) => f.type === type) as T[];
  }
}

/** A scripted gateway: answers LOGIN with LOGIN_ACK (or what `onLogin` returns). */
export class FakeGateway {
  readonly conns: ServerSide[] = [];
  accepting = true;
  lastAckedSeq = 0;
  heartbeatSecs = 300;
  /** Return frame bytes to answer a LOGIN with something else than LOGIN_ACK. */
  onLogin: ((login: Login, conn: ServerSide) => Uint8Array | undefined) | undefined;
  /** Called for every frame after LOGIN. */
  onFrame: ((frame: Frame, conn: ServerSide) => void) | undefined;

  constructor(
    readonly id: string,
    readonly url: string,
  ) {
    gateways.set(url, this);
  }

  /** The newest connection. */
  get last(): ServerSide {
    const c = this.conns[this.conns.length - 1];
    if (!c) throw new Error(`no connection to ${this.id}`);
    return c;
  }

  /** Connections that logged in. */
  get logins(): Login[] {
    return this.conns.map((c) => c.login).filter((l): l is Login => !!l);
  }

  receive(conn: ServerSide, bytes: Uint8Array): void {
    const frame = decodeFrame(bytes);
    conn.frames.push(frame);
    if (frame.type === FrameType.LOGIN && "login" in frame) {
      conn.login = frame.login;
      const answer = this.onLogin?.(frame.login, conn);
      if (answer) {
        conn.send(answer);
        return;
      }
      conn.send(
        encodeLoginAck({
          connId: this.conns.length,
          gateway: this.id,
          heartbeatSecs: this.heartbeatSecs,
          serverTimeMs: Date.now(),
          lastAckedSeq: this.lastAckedSeq,
        }),
      );
      return;
    }
    this.onFrame?.(frame, conn);
  }
}

const gateways = new Map<string, FakeGateway>();

/** Forgets every fake gateway. */
export function resetGateways(): void {
  gateways.clear();
}

/** The browser WebSocket API, as much of it as the client uses. */
export class FakeWebSocket {
  readyState = 0;
  binaryType = "blob";
  onopen: Listener = null;
  onmessage: Listener = null;
  onerror: Listener = null;
  onclose: Listener = null;
  private server: ServerSide | undefined;

  constructor(readonly url: string) {
    setTimeout(() => {
      const gw = gateways.get(url);
      if (!gw || !gw.accepting) {
        this.readyState = 3;
        this.onerror?.({});
        this.onclose?.({ code: 1006 });
        return;
      }
      this.server = new ServerSide(gw, this);
      gw.conns.push(this.server);
      this.readyState = 1;
      this.onopen?.({});
    }, 0);
  }

  send(data: Uint8Array): void {
    if (this.readyState !== 1 || !this.server) throw new Error("not open");
    const server = this.server;
    const copy = data.slice();
    queueMicrotask(() => {
      if (!server.closed) server.gateway.receive(server, copy);
    });
  }

  close(code = 1000): void {
    if (this.readyState >= 2) return;
    this.readyState = 3;
    if (this.server) this.server.closed = true;
    setTimeout(() => this.onclose?.({ code }), 0);
  }

  deliver(data: ArrayBuffer): void {
    if (this.readyState === 1) this.onmessage?.({ data });
  }

  remoteClose(code: number): void {
    if (this.readyState >= 2) return;
    this.readyState = 3;
    setTimeout(() => this.onclose?.({ code }), 0);
  }
}

/** Waits until `check` holds (generous timeout: only for waiting, never a threshold). */
export async function until(check: () => boolean, what = "condition", timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}
