// Discovery through ipconfig (PROTOCOL.md section 12): present the credential the app's
// backend signed, get ranked gateway endpoints and a gateway token.

import { TetherError, type ErrorCodeName } from "./errors.js";

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
  }

  /**
   * Endpoints and a token (section 12.6). Reuses an answer younger than a second unless
   * `fresh` (a gateway refused the token). Tries each ipconfig in order; when none
   * answers (network error, 5xx), falls back to the last answer while its token has 30 s
   * left. Throws `TetherError`: the refusal's code (`bad_token`, `token_expired`,
   * `wrong_app`, …) for a 4xx, after asking a credential provider once more for
   * `bad_token`/`token_expired`; `unavailable` when nothing answered and no usable
   * cache remains.
   */
  async discover(fresh = false): Promise<Endpoints> {
    const o = this._options;
    if (!fresh && this._last && Date.now() - this._lastAt < 1000) return this._last;
    let error = new TetherError("unavailable", "no ipconfig answered");
    let refreshed = false;
    const query = new URLSearchParams();
    if (o.app) query.set("app", o.app);
    if (o.region) query.set("region", o.region);
    for (let i = 0; i < this._urls.length; i++) {
      if (this._credential === undefined) this._credential = await provide(o.credential);
      let status: number;
      let body: { error?: { code?: ErrorCodeName; message?: string } } & Partial<Endpoints>;
      let retry: string | null;
      try {
        const r = await fetch(`${this._urls[i]}/v1/endpoints?${query}`, {
          headers: { Authorization: `Bearer ${this._credential}` },
          cache: "no-store",
        });
        status = r.status;
        retry = r.headers.get("retry-after");
        body = await r.json().catch(() => ({}));
      } catch (e) {
        error = new TetherError("unavailable", `${this._urls[i]}: ${(e as Error).message}`);
        continue;
      }
      if (status < 300 && body.token && Array.isArray(body.endpoints)) {
        this._lastAt = Date.now();
        return (this._last = body as Endpoints);
      }
      const code = body.error?.code ?? (status >= 500 ? "unavailable" : status === 401 ? "bad_token" : "bad_request");
      error = new TetherError(code, body.error?.message ?? `ipconfig: ${status}`, Number(retry) * 1000 || 0);
      if ((code === "bad_token" || code === "token_expired") && !refreshed && typeof o.credential === "function") {
        // The credential was refused: get a fresh one from the app's backend, once.
        refreshed = true;
        this._credential = undefined;
        i--;
      } else if (status >= 400 && status < 500) throw error;
    }
    const cached = this._last;
    if (cached && cached.token_exp - Date.now() / 1000 > 30) return cached;
    throw error;
  }
}
