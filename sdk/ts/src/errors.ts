// Error codes of PROTOCOL.md section 8 and the one error class the SDK throws.

/** Code names by number (section 8); an unknown number reads as `internal`. */
const NAMES = (
  "ok bad_frame frame_too_large unsupported_version login_required login_timeout bad_token " +
  "token_expired wrong_app replaced heartbeat_timeout slow_consumer rate_limited " +
  "too_many_connections going_away forbidden internal timeout rejected recovery_gap not_found " +
  "unavailable bad_request app_paused"
).split(" ");

/** A section 8 code name, e.g. `"rejected"`; `"closed"` is the SDK's own (client stopped). */
export type ErrorCodeName =
  | "ok"
  | "bad_frame"
  | "frame_too_large"
  | "unsupported_version"
  | "login_required"
  | "login_timeout"
  | "bad_token"
  | "token_expired"
  | "wrong_app"
  | "replaced"
  | "heartbeat_timeout"
  | "slow_consumer"
  | "rate_limited"
  | "too_many_connections"
  | "going_away"
  | "forbidden"
  | "internal"
  | "timeout"
  | "rejected"
  | "recovery_gap"
  | "not_found"
  | "unavailable"
  | "bad_request"
  | "app_paused"
  | "closed";

/** Retryable codes by number (section 8): login_timeout, heartbeat_timeout, slow_consumer,
 * rate_limited, too_many_connections, going_away, internal, timeout, unavailable,
 * app_paused. */
const RETRYABLE = [5, 10, 11, 12, 13, 14, 16, 17, 21, 23];

/** The name of a wire code; unknown numbers are `internal` (section 8). */
export function codeName(code: number): ErrorCodeName {
  return (NAMES[code] ?? "internal") as ErrorCodeName;
}

/** The wire number of a code name (16, `internal`, for an unknown name). */
export function codeNumber(name: string): number {
  const n = NAMES.indexOf(name);
  return n < 0 ? 16 : n;
}

/** Whether a code is retryable (section 8). */
export function isRetryable(name: ErrorCodeName | string): boolean {
  return RETRYABLE.includes(NAMES.indexOf(name));
}

/**
 * Every failure the SDK reports: a rejected or timed-out `send`, a refused login or
 * discovery, a closed client. `code` is a section 8 name; `retryable` says whether the
 * same request may succeed later unchanged (resending an UP with the same
 * client_msg_id is always safe: the server de-duplicates).
 */
export class TetherError extends Error {
  /** Section 8 code name. */
  readonly code: ErrorCodeName;
  /** Whether retrying unchanged may succeed. */
  readonly retryable: boolean;
  /** Server hint: wait at least this long before retrying (ms, 0 = none). */
  readonly retryAfterMs: number;

  constructor(code: ErrorCodeName, message: string, retryAfterMs = 0) {
    super(message ? `${code}: ${message}` : code);
    this.name = "TetherError";
    this.code = code;
    this.retryable = isRetryable(code);
    this.retryAfterMs = retryAfterMs;
  }
}
