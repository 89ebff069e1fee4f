// Discovery through ipconfig (PROTOCOL.md section 12): present the credential the app's
// backend signed, get ranked gateway endpoints and a gateway token.

import { TetherError, codeName, type ErrorCodeName } from "./errors.js";

/** A string, or a function giving a fresh one (called again after a refusal). */
export type Provider = string | (() => string | Promise<string>);

/** One gateway offered by ipconfig. */
export interface EndpointInfo {
  /** Gateway id. */
  gw: string;
  /** Gateway region. */
  region?: string;
  /** TCP endpoint (`host:port`), unused by this SDK. */
  tcp?: string;
  /** WebSocket URL. */
  ws?: string;
  /** Informative rank score. */
  score?: number;
  /** Set on a draining gateway offered last. */
  draining?: boolean;
}

/** The answer of `GET /v1/endpoints`. */
export interface Endpoints {
  /** App id of the credential. */
  app: string;
  /** User id of the credential. */
  uid: string;
  /** Device id of the credential. */
  did: string;
  /** Region used for ranking. */
  region: string;
  /** Gateways, best first. */
  endpoints: EndpointInfo[];
  /** Gateway token for LOGIN. */
  token: string;
  /** Token expiry, Unix seconds. */
  token_exp: number;
}

/** Settings of discovery. */
export interface DiscoveryOptions {
  /** ipconfig base URLs (`http://host:port`), tried in order. */
  ipconfig: string | string[];
  /** The client credential, or a provider of fresh ones. */
  credential: Provider;
  /** The app the client expects (sent as `app`). */
  app?: string;
  /** The device's region (sent as `region`). */
  region?: string;
}

/** A cached token is used only while it has this much life left (section 12.6). */
const TOKEN_MARGIN_SECS = 30;
/** No second request within this long of the last answer (section 12.6). */
const FRESH_MS = 1000;

/** Resolves a provider. */
export async function provide(p: Provider): Promise<string> {
  return typeof p === "function" ? await p() : p;
}

/** Asks ipconfig for endpoints and a token; keeps the last answer for outages. */
export class Discovery {
  private readonly _urls: string[];
  private _credential: string | undefined;
  private _last: Endpoints | undefined;
  private _lastAt = 0;

  constructor(private readonly _options: DiscoveryOptions) {
    this._urls = ([] as string[]).concat(_options.ipconfig).map((u) => u.replace(/\/+$/, ""));
    if (this._urls.length === 0) throw new TetherError("bad_request", "no ipconfig URL");
  }

  /** The last answer, if any. */
  get cached(): Endpoints | undefined {
    return this._last;
  }

  /**
   * Endpoints and a token. Reuses an answer younger than a second unless `fresh` (a
   * gateway refused the token). When no ipconfig answers (network error, 5xx), falls
   * back to the last answer while its token has 30 s left. Throws `TetherError`:
   * `bad_token`, `token_expired`, `wrong_app`, … when ipconfig refuses the credential
   * even after asking the provider for a fresh one; `unavailable` when nothing answered
   * and no usable cache remains.
   */
  async discover(fresh = false): Promise<Endpoints> {
    if (!fresh && this._last && Date.now() - this._lastAt < FRESH_MS) return this._last;
    let lastError = new TetherError("unavailable", "ipconfig unreachable");
    let refreshed = false;
    for (let i = 0; i < this._urls.length; i++) {
      if (this._credential === undefined) this._credential = await provide(this._options.credential);
      const outcome = await this._ask(this._urls[i], this._credential);
      if ("answer" in outcome) {
        this._last = outcome.answer;
        this._lastAt = Date.now();
        return outcome.answer;
      }
      lastError = outcome.error;
      if (outcome.error.code === "bad_token" || outcome.error.code === "token_expired") {
        // The credential was refused: get a fresh one from the app's backend, once.
        if (refreshed || typeof this._options.credential !== "function") throw outcome.error;
        refreshed = true;
        this._credential = undefined;
        i--;
        continue;
      }
      if (!outcome.fallback) throw outcome.error;
    }
    const cached = this._last;
    if (cached && cached.token_exp - Date.now() / 1000 > TOKEN_MARGIN_SECS) return cached;
    throw lastError;
  }

  private async _ask(
    base: string,
    credential: string,
  ): Promise<{ answer: Endpoints } | { error: TetherError; fallback: boolean }> {
    const query = new URLSearchParams();
    if (this._options.app) query.set("app", this._options.app);
    if (this._options.region) query.set("region", this._options.region);
    const qs = query.toString();
    let response: Response;
    try {
      response = await fetch(`${base}/v1/endpoints${qs ? `?${qs}` : ""}`, {
        headers: { Authorization: `Bearer ${credential}` },
        cache: "no-store",
      });
    } catch (e) {
      return { error: new TetherError("unavailable", `ipconfig ${base}: ${(e as Error).message}`), fallback: true };
    }
    let body: unknown;
    try {
      body = await response.json();
    } catch {
      body = undefined;
    }
    if (response.ok && isEndpoints(body)) return { answer: body };
    const err = (body as { error?: { code?: string; message?: string } } | undefined)?.error;
    const code = (err?.code ?? (response.ok ? "internal" : statusCode(response.status))) as ErrorCodeName;
    const retryAfter = Number(response.headers.get("retry-after") ?? 0) * 1000;
    return {
      error: new TetherError(code, err?.message ?? `ipconfig answered ${response.status}`, retryAfter || 0),
      fallback: response.ok || response.status >= 500,
    };
  }
}

function isEndpoints(body: unknown): body is Endpoints {
  const b = body as Endpoints | undefined;
  return !!b && typeof b.token === "string" && Array.isArray(b.endpoints);
}

function statusCode(status: number): ErrorCodeName {
  if (status === 401) return "bad_token";
  if (status === 403) return "wrong_app";
  if (status === 429) return "rate_limited";
  if (status >= 500) return "unavailable";
  return codeName(22);
}
