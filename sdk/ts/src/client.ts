// The client: one logged-in WebSocket link at a time to a Tether gateway, following
// PROTOCOL.md sections 2 and 6 (login, heartbeat, UP/UP_ACK, DOWN/DOWN_ACK, rooms,
// REDIRECT, errors and reconnect) and section 12 for discovery.

import { Discovery, provide, type Provider } from "./discovery.js";
import { TetherError, codeName, codeNumber, type ErrorCodeName } from "./errors.js";
import {
  DEFAULT_MAX_FRAME_LEN,
  FrameType,
  decodeFrame,
  encodeDownAck,
  encodeLogin,
  encodePing,
  encodeUp,
  type Down,
  type ErrorHeader,
  type Frame,
  type LoginAck,
  type Redirect,
  type UpAck,
} from "./frame.js";
import { Inbox } from "./inbox.js";
import { utf8 } from "./proto.js";

/** SDK name and version sent in LOGIN `sdk`. */
export const SDK_VERSION = "ts/0.1.0";

/** What a client resumes from: H and the room cursors (persist them across reloads). */
export interface ResumeState {
  /** Highest contiguous QoS1 seq processed. */
  resumeSeq: number;
  /** Highest room_seq processed per recoverable room. */
  rooms: Record<string, number>;
}

/** Where the client keeps its `ResumeState` (saved after every delivered message). */
export interface ResumeStore {
  /** The saved state, if any. */
  load(): ResumeState | null | undefined;
  /** Saves the state. */
  save(state: ResumeState): void;
}

/** A `ResumeStore` in the browser's `localStorage` under `key`. */
export function localStorageStore(key: string): ResumeStore {
  return {
    load() {
      try {
        const raw = globalThis.localStorage?.getItem(key);
        return raw ? (JSON.parse(raw) as ResumeState) : null;
      } catch {
        return null;
      }
    },
    save(state) {
      globalThis.localStorage?.setItem(key, JSON.stringify(state));
    },
  };
}

/** Reconnect backoff: round n waits `minMs * 2^n` capped at `maxMs`, `jitter` of it random. */
export interface BackoffOptions {
  /** First delay, ms (default 500). */
  minMs?: number;
  /** Largest delay, ms (default 30000). */
  maxMs?: number;
  /** Random share of each delay, 0..1 (default 0.5). */
  jitter?: number;
}

/** Settings of a client. Give `ipconfig` + `credential`, or `endpoints` + `token`. */
export interface ClientOptions {
  /** App id. */
  app: string;
  /** Device id: stable per installation (keep it in localStorage). */
  did: string;
  /** ipconfig base URL(s), e.g. `https://ipconfig.example.com`. */
  ipconfig?: string | string[];
  /** Client credential from the app's backend, or a provider of fresh ones. */
  credential?: Provider;
  /** The device's region for ranking. */
  region?: string;
  /** Seed WebSocket endpoints (`ws://host:port/ws`): used without ipconfig, or when it is down. */
  endpoints?: string[];
  /** Gateway token for the seed endpoints, or a provider of fresh ones. */
  token?: Provider;
  /** Where H and the room cursors are loaded from and saved to. */
  store?: ResumeStore;
  /** Initial H when there is no store (0 = fresh start). */
  resumeSeq?: number;
  /** Initial room cursors when there is no store: room id → highest room_seq processed. */
  rooms?: Record<string, number>;
  /** PING interval override, seconds (default: LOGIN_ACK `heartbeat_secs`). */
  heartbeatSecs?: number;
  /** How long to wait for any frame after a PING before the link counts as dead (default 30 s or the interval if shorter). */
  pongTimeoutMs?: number;
  /** How long `send` waits for UP_ACK, ms (default 30000); queued while offline. */
  sendTimeoutMs?: number;
  /** How long opening a socket and logging in may take, ms (default 10000). */
  connectTimeoutMs?: number;
  /** DOWN_ACK batching window, ms (default 20): one cumulative ack per burst. */
  ackDelayMs?: number;
  /** Reconnect backoff, or `false` to stop at the first loss. */
  reconnect?: BackoffOptions | false;
  /** Largest UP frame, bytes (default 65536). */
  maxFrameLen?: number;
  /** WebSocket constructor (default `globalThis.WebSocket`). */
  WebSocket?: WebSocketLike;
  /** Follow the browser's online/offline events (default true where they exist). */
  watchNetwork?: boolean;
}

/** The constructor shape the client needs (the browser's WebSocket, or `ws` in Node). */
export type WebSocketLike = new (url: string) => WebSocket;

/** A downlink message. */
export class Message {
  constructor(
    /** Per-device seq (QoS1), 0 for QoS0. */
    readonly seq: number,
    /** Sent at-least-once; the client acknowledges it. */
    readonly qos1: boolean,
    /** Session (conversation, room) id; may be empty. */
    readonly session: string,
    /** Per-room seq of a recoverable room broadcast, else 0. */
    readonly roomSeq: number,
    /** When the business service sent it, Unix ms. */
    readonly sentAtMs: number,
    /** Business metadata. */
    readonly meta: Record<string, string>,
    /** The application payload. */
    readonly body: Uint8Array,
  ) {}

  /** The body decoded as UTF-8 (invalid bytes replaced). */
  get text(): string {
    return new TextDecoder().decode(this.body);
  }

  /** The body parsed as JSON. */
  json<T = unknown>(): T {
    return JSON.parse(this.text) as T;
  }
}

/** The receipt of one stored message. */
export interface Receipt {
  /** The client_msg_id it was sent with. */
  clientMsgId: number;
  /** The business service's id for it (may be empty). */
  serverMsgId: string;
}

/** Connection states. */
export type ClientState = "idle" | "connecting" | "connected" | "waiting" | "offline" | "closed";

/** Events and their payloads. */
export interface ClientEvents {
  /** Logged in (first connect, reconnect or redirect). */
  connected: { gateway: string; connId: number; endpoint: string; serverTimeMs: number; lastAckedSeq: number };
  /** The link ended; `reconnecting` false means the client stopped for good. */
  disconnected: { code?: ErrorCodeName; reason: string; reconnecting: boolean };
  /** A downlink: QoS1 ones once and in seq order, room ones once per room_seq, QoS0 as they come. */
  message: Message;
  /** A non-closing ERROR from the gateway, or a problem the client worked around. */
  error: TetherError;
  /** Retention gap (`recovery_gap`): room messages `from..to` are gone; reload the room's state. */
  gap: { session: string; from: number; to: number; text: string };
  /** The connection state changed. */
  state: ClientState;
}

type Handler<T> = (payload: T) => void;

/** Why a link ended. */
interface End {
  code?: ErrorCodeName;
  reason: string;
  _retry?: number;
  /** Stop for good (replaced, fatal code, reconnect off). */
  _stop?: boolean;
  /** Try another endpoint first (going_away, failed redirect). */
  _skip?: boolean;
  /** The token was refused: ask for a fresh one. */
  _refresh?: boolean;
}

/** One WebSocket and its login. */
class Link {
  _ack: LoginAck | undefined;
  /** Why it ended, if it did before becoming the live link. */
  _end: End | undefined;
  _rx = Date.now();
  constructor(
    readonly _ws: WebSocket,
    readonly endpoint: string,
  ) {}

  _send(frame: Uint8Array): void {
    if (this._ws.readyState === 1) this._ws.send(frame);
  }

  _close(): void {
    try {
      this._ws.close(1000);
    } catch {
      // already closed
    }
  }
}

/** How `close()` ends things. */
const BY_APP: End = { reason: "closed by the app", _stop: true };

/** Codes after which reconnecting cannot help (section 6.7): bad_frame, frame_too_large,
 * unsupported_version, login_required, wrong_app, replaced, forbidden, rejected, not_found,
 * bad_request. */
const FATAL_CODES = [1, 2, 3, 4, 8, 9, 15, 18, 20, 22];
const fatal = (code: string) => FATAL_CODES.includes(codeNumber(code));

/**
 * A Tether client over WebSocket.
 *
 * ```ts
 * const client = new TetherClient({ app: "demo", did, ipconfig, credential });
 * client.on("message", (m) => console.log(m.seq, m.text));
 * await client.connect();
 * const receipt = await client.send("hello", { session: "lobby" });
 * ```
 */
export class TetherClient {
  private readonly _o: ClientOptions;
  private readonly _handlers: { [K in keyof ClientEvents]?: Set<Handler<ClientEvents[K]>> } = {};
  private readonly _discovery: Discovery | undefined;
  private _inbox: Inbox<Message>;
  private _rooms: Map<string, number>;
  private readonly _pending = new Map<
    number,
    { _frame: Uint8Array; _resolve: (r: Receipt) => void; _reject: (e: TetherError) => void; _timer: ReturnType<typeof setTimeout> }
  >();
  private _lastMsgId = 0;
  private _current: Link | undefined;
  private _endCurrent: ((end: End) => void) | undefined;
  private _redirecting = false;
  private _adopted: [endpoint: string, token: string] | undefined;
  private _pingTimer: ReturnType<typeof setTimeout> | undefined;
  private _deadTimer: ReturnType<typeof setTimeout> | undefined;
  private _ackTimer: ReturnType<typeof setTimeout> | undefined;
  private _wake: (() => void) | undefined;
  private _ready: Promise<void> | undefined;
  private _closed = false;
  private _online = true;
  private _refreshToken = false;
  private _skipEndpoint: string | undefined;
  private _first: [() => void, (e: TetherError) => void] | undefined;
  private _stateNow: ClientState = "idle";
  private readonly _unwatch: (() => void) | undefined;

  constructor(options: ClientOptions) {
    this._o = options;
    const discovery = options.ipconfig && options.credential !== undefined;
    if (!options.app || !options.did || !(discovery || (options.endpoints?.length && options.token !== undefined)))
      throw new TetherError("bad_request", "need app, did, ipconfig+credential or endpoints+token");
    if (discovery) this._discovery = new Discovery({ ...options, ipconfig: options.ipconfig!, credential: options.credential! });
    const saved = options.store?.load();
    this._inbox = new Inbox(saved?.resumeSeq ?? options.resumeSeq ?? 0);
    this._rooms = new Map(Object.entries(saved?.rooms ?? options.rooms ?? {}));
    const g = globalThis as unknown as {
      addEventListener?: (t: string, f: () => void) => void;
      removeEventListener?: (t: string, f: () => void) => void;
      navigator?: { onLine?: boolean };
    };
    if (options.watchNetwork !== false && typeof g.addEventListener === "function" && g.navigator) {
      this._online = g.navigator.onLine !== false;
      const off = () => this._setOnline(false);
      const on = () => this._setOnline(true);
      g.addEventListener("offline", off);
      g.addEventListener("online", on);
      this._unwatch = () => {
        g.removeEventListener?.("offline", off);
        g.removeEventListener?.("online", on);
      };
    }
  }

  /** Subscribes to an event; returns the function that unsubscribes. */
  on<K extends keyof ClientEvents>(event: K, handler: Handler<ClientEvents[K]>): () => void {
    let set = this._handlers[event] as Set<Handler<ClientEvents[K]>> | undefined;
    if (!set) this._handlers[event] = set = new Set() as never;
    set.add(handler);
    return () => set!.delete(handler);
  }

  /** The connection state. */
  get state(): ClientState {
    return this._stateNow;
  }

  /** H: the highest contiguous QoS1 seq processed (LOGIN `resume_seq`). */
  get resumeSeq(): number {
    return this._inbox._delivered;
  }

  /** The room cursors sent at the next login. */
  get roomCursors(): Record<string, number> {
    return Object.fromEntries(this._rooms);
  }

  /** The gateway of the live link, if logged in. */
  get gateway(): string | undefined {
    return this._current?._ack?.gateway;
  }

  /**
   * Starts the client; resolves at the first login. Failures that may pass (no gateway,
   * network) are retried with backoff; a fatal one (credential refused, wrong app) or
   * `close()` rejects.
   */
  connect(): Promise<void> {
    if (this._closed) return Promise.reject(new TetherError("closed", "client closed"));
    if (!this._ready) {
      this._ready = new Promise((resolve, reject) => (this._first = [resolve, reject]));
      void this._run();
    }
    return this._ready;
  }

  /**
   * Sends `body` (bytes, or a string sent as UTF-8) as one UP and resolves with the
   * receipt once the business service stored it (UP_ACK code 0). Rejects with a
   * `TetherError`: the UP_ACK's code (`rejected`, `rate_limited`, `timeout`, …), `timeout`
   * when no UP_ACK came within `sendTimeoutMs` (outcome unknown), `frame_too_large`, or
   * `closed`. While disconnected the UP waits and goes out after the next login;
   * unanswered UPs are resent after every reconnect with the same client_msg_id.
   */
  send(body: Uint8Array | string, options: { session?: string; timeoutMs?: number } = {}): Promise<Receipt> {
    if (this._closed) return Promise.reject(new TetherError("closed", "client closed"));
    const id = this._nextMsgId();
    let frame: Uint8Array;
    try {
      frame = encodeUp(
        { clientMsgId: id, session: options.session },
        typeof body === "string" ? utf8(body) : body,
        this._o.maxFrameLen ?? DEFAULT_MAX_FRAME_LEN,
      );
    } catch (e) {
      return Promise.reject(e);
    }
    return new Promise<Receipt>((resolve, reject) => {
      const timeout = options.timeoutMs ?? this._o.sendTimeoutMs ?? 30000;
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new TetherError("timeout", `no up_ack in ${timeout} ms`));
      }, timeout);
      this._pending.set(id, { _frame: frame, _resolve: resolve, _reject: reject, _timer: timer });
      if (this._current?._ack) this._current._send(frame);
    });
  }

  /** Closes the link and stops for good; pending sends reject with `closed`. */
  close(): void {
    if (this._closed) return;
    this._closed = true;
    this._unwatch?.();
    this._flushAck();
    this._stopLink(BY_APP);
    this._wake?.();
    this._finish(BY_APP);
  }

  private _emit<K extends keyof ClientEvents>(event: K, payload: ClientEvents[K]): void {
    const set = this._handlers[event] as Set<Handler<ClientEvents[K]>> | undefined;
    if (!set) return;
    for (const h of [...set]) {
      try {
        h(payload);
      } catch (e) {
        // A throwing handler must not break the protocol state.
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  private _setState(state: ClientState): void {
    if (state === this._stateNow) return;
    this._stateNow = state;
    this._emit("state", state);
  }

  private _nextMsgId(): number {
    // Unique per device across reloads: time-based, then counting up (stays below 2^53).
    const id = Math.max(this._lastMsgId + 1, Date.now() * 1024 + Math.floor(Math.random() * 1024));
    this._lastMsgId = id;
    return id;
  }

  private _setOnline(online: boolean): void {
    if (online === this._online) return;
    this._online = online;
    if (!online) this._stopLink({ reason: "browser offline" });
    this._wake?.();
  }

  /** Sleeps `ms`, or until woken (close, back online). */
  private _sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      function done() {
        clearTimeout(timer);
        resolve();
      }
      this._wake = () => {
        this._wake = undefined;
        done();
      };
    });
  }

  private _backoff(attempt: number): number {
    const b = this._o.reconnect || {};
    const min = b.minMs ?? 500;
    const max = b.maxMs ?? 30000;
    const jitter = Math.min(1, Math.max(0, b.jitter ?? 0.5));
    const ceiling = Math.min(max, min * 2 ** Math.min(attempt, 30));
    return ceiling * (1 - jitter + jitter * Math.random());
  }

  /** Connects, serves links and reconnects until the client stops. */
  private async _run(): Promise<void> {
    let attempt = 0;
    let wait = 0;
    for (;;) {
      if (this._closed) return this._finish(BY_APP);
      if (!this._online) {
        this._setState("offline");
        await this._sleep(2 ** 31 - 1);
        attempt = wait = 0;
        continue;
      }
      if (wait > 0) {
        this._setState("waiting");
        await this._sleep(wait);
        wait = 0;
        if (this._closed || !this._online) continue;
      }
      this._setState("connecting");
      let link: Link;
      try {
        link = await this._openRound();
      } catch (e) {
        const error = e instanceof TetherError ? e : new TetherError("internal", String(e));
        if (this._closed || !this._online) continue;
        if (fatal(error.code) || this._o.reconnect === false) {
          this._emit("error", error);
          return this._finish({ code: error.code, reason: error.message, _stop: true });
        }
        this._emit("error", error);
        wait = Math.max(this._backoff(attempt++), error.retryAfterMs);
        continue;
      }
      if (this._closed || !this._online) {
        link._close();
        continue;
      }
      attempt = 0;
      const end = await this._serve(link);
      if (this._closed) continue;
      if (end._stop || this._o.reconnect === false) return this._finish(end);
      this._emit("disconnected", { code: end.code, reason: end.reason, reconnecting: true });
      if (end._skip) this._skipEndpoint = link.endpoint;
      if (end._refresh) this._refreshToken = true;
      wait = Math.max(this._backoff(0), end._retry ?? 0);
    }
  }

  /** Stops for good: rejects what waits, tells the app. */
  private _finish(end: End): void {
    if (this._stateNow === "closed") return;
    this._closed = true;
    this._unwatch?.();
    this._setState("closed");
    const error = new TetherError(end.code && end.code !== "ok" ? end.code : "closed", end.reason);
    for (const [id, p] of this._pending) {
      clearTimeout(p._timer);
      p._reject(new TetherError("closed", end.reason));
      this._pending.delete(id);
    }
    this._first?.[1](error);
    this._first = undefined;
    this._emit("disconnected", { code: end.code, reason: end.reason, reconnecting: false });
  }

  /** One round: endpoints and token (ipconfig or seeds), then each endpoint in order. */
  private async _openRound(): Promise<Link> {
    const candidates: [endpoint: string, token: Provider][] = [];
    if (this._adopted) {
      candidates.push(this._adopted);
      this._adopted = undefined;
    }
    let discoveryError: TetherError | undefined;
    if (this._discovery) {
      try {
        const answer = await this._discovery.discover(this._refreshToken);
        for (const e of answer.endpoints) if (e.ws) candidates.push([e.ws, answer.token]);
      } catch (e) {
        discoveryError = e as TetherError;
        if (!this._o.endpoints?.length || this._o.token === undefined || !discoveryError.retryable) throw discoveryError;
      }
    }
    if (!this._discovery || discoveryError) {
      for (const endpoint of this._o.endpoints ?? []) candidates.push([endpoint, this._o.token!]);
    }
    this._refreshToken = false;
    if (this._skipEndpoint) {
      const skip = this._skipEndpoint;
      this._skipEndpoint = undefined;
      candidates.sort((a, b) => Number(a[0] === skip) - Number(b[0] === skip));
    }
    if (candidates.length === 0) throw new TetherError("unavailable", "no ws endpoint");
    let last = new TetherError("unavailable", "no endpoint");
    for (const [endpoint, token] of candidates) {
      if (this._closed || !this._online) break;
      try {
        return await this._login(endpoint, await provide(token));
      } catch (e) {
        last = e as TetherError;
        if (last.code === "bad_token" || last.code === "token_expired") {
          this._refreshToken = true;
          if (this._discovery) throw last;
        } else if (fatal(last.code)) throw last;
      }
    }
    throw last;
  }

  /** Opens a socket to `endpoint` and logs in; resolves once LOGIN_ACK arrives. */
  private _login(endpoint: string, token: string): Promise<Link> {
    const Ctor = this._o.WebSocket ?? (globalThis as { WebSocket?: WebSocketLike }).WebSocket;
    if (!Ctor) return Promise.reject(new TetherError("bad_request", "no WebSocket"));
    return new Promise<Link>((resolve, reject) => {
      let ws: WebSocket;
      try {
        ws = new Ctor(endpoint);
      } catch (e) {
        reject(new TetherError("unavailable", `${endpoint}: ${(e as Error).message}`));
        return;
      }
      ws.binaryType = "arraybuffer";
      const link = new Link(ws, endpoint);
      let settled = false;
      const fail = (error: TetherError) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        link._close();
        reject(error);
      };
      const timer = setTimeout(
        () => fail(new TetherError("timeout", `${endpoint}: no login_ack`)),
        this._o.connectTimeoutMs ?? 10000,
      );
      ws.onopen = () => {
        link._send(
          encodeLogin({
            token,
            did: this._o.did,
            app: this._o.app,
            resumeSeq: this._inbox._delivered,
            rooms: [...this._rooms].map(([session, roomSeq]) => ({ session, roomSeq })),
            sdk: SDK_VERSION,
          }),
        );
      };
      ws.onclose = (ev) => {
        // An error event is always followed by this close event.
        if (!settled) fail(new TetherError("unavailable", `${endpoint}: closed (${ev.code})`));
        else this._endLink(link, { reason: `closed (${ev.code})` });
      };
      ws.onmessage = (ev) => {
        link._rx = Date.now();
        const data = new Uint8Array(ev.data as ArrayBuffer);
        let frame: Frame;
        try {
          frame = decodeFrame(data);
        } catch (e) {
          // A malformed frame is skipped (one frame per message: the framing is intact);
          // bad magic or another version ends the connection (section 3.1).
          if (data[0] === 0x54 && data[1] === 1) return;
          const error = e as TetherError;
          if (!settled) fail(error);
          else this._endLink(link, { code: error.code, reason: error.message });
          return;
        }
        if (settled) {
          this._onFrame(link, frame);
        } else if (frame.type === FrameType.LOGIN_ACK) {
          settled = true;
          clearTimeout(timer);
          link._ack = (frame as { ack: LoginAck }).ack;
          resolve(link);
        } else if (frame.type === FrameType.ERROR) {
          const { error } = frame as { error: ErrorHeader };
          fail(new TetherError(codeName(error.code), error.text, error.retryAfterMs));
        }
        // Any other frame before LOGIN_ACK is ignored.
      };
    });
  }

  /** Serves a logged-in link (and those it is redirected to) until it ends. */
  private _serve(link: Link): Promise<End> {
    return new Promise<End>((resolve) => {
      this._endCurrent = resolve;
      this._adopt(link);
      this._first?.[0]();
      this._first = undefined;
    });
  }

  /** Makes `link` the live one: adopt the server's ack point, tell the app, resend pending UPs. */
  private _adopt(link: Link): void {
    const ack = link._ack!;
    this._current = link;
    this._setState("connected");
    this._deliver(this._inbox._ackedByServer(ack.lastAckedSeq));
    this._save();
    this._emit("connected", {
      gateway: ack.gateway,
      connId: ack.connId,
      endpoint: link.endpoint,
      serverTimeMs: ack.serverTimeMs,
      lastAckedSeq: ack.lastAckedSeq,
    });
    for (const p of this._pending.values()) link._send(p._frame);
    this._schedulePing();
    // Ended between LOGIN_ACK and now (e.g. an ERROR right after it): end it here.
    if (link._end) this._endLink(link, link._end);
  }

  private _heartbeatMs(): number {
    const secs = this._o.heartbeatSecs ?? (this._current?._ack?.heartbeatSecs || 300);
    return Math.max(1, secs) * 1000;
  }

  /** Next PING after the interval, moved by up to ±10% (at most ±30 s, section 6.2). */
  private _schedulePing(): void {
    clearTimeout(this._pingTimer);
    const interval = this._heartbeatMs();
    const jitter = Math.min(30000, interval / 10);
    this._pingTimer = setTimeout(() => this._ping(), interval + (Math.random() * 2 - 1) * jitter);
  }

  private _ping(): void {
    const link = this._current;
    if (!link) return;
    const sentAt = Date.now();
    link._send(encodePing());
    clearTimeout(this._deadTimer);
    const limit = this._o.pongTimeoutMs ?? Math.min(30000, this._heartbeatMs());
    this._deadTimer = setTimeout(() => {
      if (this._current === link && link._rx < sentAt) this._endLink(link, { reason: "ping timeout", _skip: true });
    }, limit);
    this._schedulePing();
  }

  /** Ends a link: the live one now, another when it becomes live (it remembers why). */
  private _endLink(link: Link, end: End): void {
    link._close();
    if (link === this._current && this._redirecting && !end._stop) {
      // The old gateway closes a redirected link once the new login is registered,
      // possibly before its LOGIN_ACK reaches us (section 6.6): the redirect's outcome
      // decides, not the old link's end.
      link._end ??= end;
      return;
    }
    if (link === this._current) this._stopLink(end);
    else link._end ??= end;
  }

  private _stopLink(end: End): void {
    const link = this._current;
    clearTimeout(this._pingTimer);
    clearTimeout(this._deadTimer);
    this._current = undefined;
    link?._close();
    const done = this._endCurrent;
    this._endCurrent = undefined;
    done?.(end);
  }

  /** One frame from a logged-in link (the live one, or one being left for a redirect). */
  private _onFrame(link: Link, frame: Frame): void {
    switch (frame.type) {
      case FrameType.UP_ACK: {
        const { ack } = frame as { ack: UpAck };
        const p = this._pending.get(ack.clientMsgId);
        if (!p) return;
        this._pending.delete(ack.clientMsgId);
        clearTimeout(p._timer);
        if (ack.code === 0) p._resolve({ clientMsgId: ack.clientMsgId, serverMsgId: ack.serverMsgId });
        else p._reject(new TetherError(codeName(ack.code), ack.message));
        return;
      }
      case FrameType.DOWN: {
        const { down: d, qos1, body } = frame as { down: Down; qos1: boolean; body: Uint8Array };
        this._onDown(new Message(d.seq, qos1, d.session, d.roomSeq, d.sentAtMs, d.meta, body));
        return;
      }
      case FrameType.REDIRECT: {
        const { redirect } = frame as { redirect: Redirect };
        if (link === this._current) this._redirect(link, redirect.endpoint, redirect.token);
        return;
      }
      case FrameType.ERROR: {
        const { error, close } = frame as { error: ErrorHeader; close: boolean };
        const { code: n, text, retryAfterMs } = error;
        const code = codeName(n);
        if (close) {
          this._endLink(link, closingEnd(code, text, retryAfterMs));
        } else if (code === "recovery_gap") {
          const m = /room (\S+): messages (\d+)\.\.(\d+)/.exec(text);
          this._emit("gap", { session: m?.[1] ?? "", from: Number(m?.[2] ?? 0), to: Number(m?.[3] ?? 0), text });
        } else {
          this._emit("error", new TetherError(code, text, retryAfterMs));
        }
        return;
      }
      default:
        // PONG refreshes _rx only; unknown types are skipped (section 3.3).
        return;
    }
  }

  private _onDown(message: Message): void {
    if (message.roomSeq > 0 && message.session) {
      // Recoverable room: each room_seq once, in order; the cursor goes into the next LOGIN.
      const cursor = this._rooms.get(message.session) ?? 0;
      if (message.roomSeq <= cursor) return;
      this._rooms.set(message.session, message.roomSeq);
    }
    if (!message.qos1 || message.seq === 0) {
      this._emit("message", message);
      if (message.roomSeq > 0) this._save();
      return;
    }
    this._deliver(this._inbox._offer(message.seq, message));
    if (this._ackTimer === undefined) this._ackTimer = setTimeout(() => this._flushAck(), this._o.ackDelayMs ?? 20);
  }

  private _deliver(messages: Message[]): void {
    for (const m of messages) this._emit("message", m);
    if (messages.length) this._save();
  }

  /** Sends one cumulative DOWN_ACK for everything delivered since the last one. */
  private _flushAck(): void {
    clearTimeout(this._ackTimer);
    this._ackTimer = undefined;
    const seq = this._inbox._takeAck();
    if (seq !== undefined) this._current?._send(encodeDownAck(seq));
  }

  private _save(): void {
    this._o.store?.save({ resumeSeq: this._inbox._delivered, rooms: Object.fromEntries(this._rooms) });
  }

  /** REDIRECT (section 6.6): log in at the new endpoint, then leave the old link. */
  private _redirect(old: Link, endpoint: string, token: string): void {
    if (this._redirecting) return;
    if (!/^wss?:\/\//.test(endpoint)) {
      this._emit("error", new TetherError("bad_request", `redirect to ${endpoint}: not ws`));
      this._endLink(old, { reason: "redirect not ws", _skip: true });
      return;
    }
    this._redirecting = true;
    this._login(endpoint, token).then(
      (next) => {
        this._redirecting = false;
        if (this._current !== old || this._closed) {
          next._close();
          return;
        }
        this._adopted = [endpoint, token];
        old._close();
        this._adopt(next);
      },
      (error: TetherError) => {
        this._redirecting = false;
        this._emit("error", new TetherError(error.code, `redirect to ${endpoint}: ${error.message}`));
        // Fall back to ipconfig (section 6.6).
        this._endLink(old, { reason: "redirect failed", _skip: true });
      },
    );
  }
}

/** What an ERROR with CLOSE means (section 6.7). */
function closingEnd(code: ErrorCodeName, text: string, retryAfterMs: number): End {
  const end: End = { code, reason: text || code, _retry: retryAfterMs };
  if (fatal(code)) end._stop = true;
  if (code === "bad_token" || code === "token_expired") end._refresh = true;
  if (code === "going_away") end._skip = true;
  return end;
}
