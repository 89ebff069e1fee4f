//! The opening handshake (RFC 6455 §4.2): parsing the client's HTTP/1.1 upgrade
//! request and building the server's answer.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::{BufMut, Bytes, BytesMut};
use sha1::{Digest, Sha1};

/// GUID appended to the client's key to compute `Sec-WebSocket-Accept` (RFC 6455 §1.3).
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The only subprotocol Tether speaks; echoed when the client offers it.
const SUBPROTOCOL: &[u8] = b"tether.v1";

/// Most headers a request may have (kept on the stack while parsing).
const MAX_HEADERS: usize = 32;

/// Result of looking at the bytes received so far on a new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    /// Need more bytes (no `"\r\n\r\n"` yet and under `max_len`).
    Incomplete,
    /// A valid upgrade: send `response` (the 101 answer), then WebSocket frames
    /// follow; `consumed` bytes of `buf` were the request (anything after them is
    /// already frame data).
    Accept {
        /// The complete `101 Switching Protocols` answer.
        response: Bytes,
        /// Length of the request at the front of `buf`.
        consumed: usize,
    },
    /// Not a valid upgrade: send `response` (a complete HTTP/1.1 error answer with
    /// `Connection: close` and a short text body), then close. 400 bad request, 404
    /// for another path, 426 (with `Sec-WebSocket-Version: 13`) for a wrong or
    /// missing WebSocket version, 431 when the request exceeds `max_len` or has too
    /// many headers.
    Reject {
        /// The complete HTTP error answer.
        response: Bytes,
        /// Its status code.
        status: u16,
        /// Why (also the response's body), for logs and metrics.
        reason: &'static str,
    },
}

/// Looks at the bytes received so far on a new connection (`buf`, from its first
/// byte) and decides whether they are a WebSocket upgrade request for `path`.
///
/// `path` is compared with the request target up to any query string (`?...`).
/// A request longer than `max_len` bytes (headers included) is refused with 431.
/// The request must be `GET` over HTTP/1.1 with `Upgrade: websocket`, a `Connection`
/// header holding the `upgrade` token, `Sec-WebSocket-Version: 13` and a
/// `Sec-WebSocket-Key` that is the base64 of 16 bytes. If the client offers the
/// `tether.v1` subprotocol, the answer selects it. Extensions are ignored (none is
/// accepted), as are `Host` and `Origin`.
pub fn parse_upgrade(buf: &[u8], path: &str, max_len: usize) -> Handshake {
    let window = &buf[..buf.len().min(max_len)];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= max_len => {
            return reject(431, "request too large");
        }
        Ok(httparse::Status::Partial) => return Handshake::Incomplete,
        Err(httparse::Error::TooManyHeaders) => return reject(431, "too many headers"),
        Err(_) => return reject(400, "malformed HTTP request"),
    };

    if req.method != Some("GET") {
        return reject(400, "method must be GET");
    }
    if req.version != Some(1) {
        return reject(400, "HTTP/1.1 required");
    }
    let target = req.path.unwrap_or_default();
    let target_path = target.split_once('?').map_or(target, |(p, _)| p);
    if target_path != path {
        return reject(404, "not found");
    }

    let headers = req.headers;
    if !has_token(headers, "upgrade", b"websocket") {
        return reject(400, "missing Upgrade: websocket");
    }
    if !has_token(headers, "connection", b"upgrade") {
        return reject(400, "missing Connection: upgrade");
    }
    let mut versions = values(headers, "sec-websocket-version").peekable();
    if versions.peek().is_none() || !versions.all(|v| v.trim_ascii() == b"13") {
        return reject(426, "Sec-WebSocket-Version 13 required");
    }
    let mut keys = values(headers, "sec-websocket-key");
    let key = match (keys.next(), keys.next()) {
        (Some(key), None) => key.trim_ascii(),
        _ => return reject(400, "missing or repeated Sec-WebSocket-Key"),
    };
    if !key_valid(key) {
        return reject(400, "invalid Sec-WebSocket-Key");
    }
    let subprotocol = has_exact_token(headers, "sec-websocket-protocol", SUBPROTOCOL);

    Handshake::Accept {
        response: accept_response(key, subprotocol),
        consumed,
    }
}

/// `Sec-WebSocket-Accept` for a client key: base64(sha1(key + GUID)).
fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(ACCEPT_GUID);
    STANDARD.encode(sha.finalize())
}

/// Whether `key` is the base64 of exactly 16 bytes.
fn key_valid(key: &[u8]) -> bool {
    let mut decoded = [0u8; 18];
    key.len() == 24 && matches!(STANDARD.decode_slice(key, &mut decoded), Ok(16))
}

/// The 101 answer.
fn accept_response(key: &[u8], subprotocol: bool) -> Bytes {
    let mut out = BytesMut::with_capacity(160);
    out.put_slice(
        b"HTTP/1.1 101 Switching Protocols\r\n\
          Upgrade: websocket\r\n\
          Connection: Upgrade\r\n\
          Sec-WebSocket-Accept: ",
    );
    out.put_slice(accept_key(key).as_bytes());
    out.put_slice(b"\r\n");
    if subprotocol {
        out.put_slice(b"Sec-WebSocket-Protocol: ");
        out.put_slice(SUBPROTOCOL);
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"\r\n");
    out.freeze()
}

/// A `Reject` with a complete error answer whose body is `reason`.
fn reject(status: u16, reason: &'static str) -> Handshake {
    let (phrase, extra): (&str, &str) = match status {
        404 => ("Not Found", ""),
        426 => (
            "Upgrade Required",
            "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
        ),
        431 => ("Request Header Fields Too Large", ""),
        _ => ("Bad Request", ""),
    };
    let body_len = reason.len() + 1;
    let response = format!(
        "HTTP/1.1 {status} {phrase}\r\n\
         Connection: close\r\n\
         {extra}\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {body_len}\r\n\
         \r\n\
         {reason}\n"
    );
    Handshake::Reject {
        response: Bytes::from(response),
        status,
        reason,
    }
}

/// Values of every header named `name` (ASCII case-insensitive).
fn values<'a>(
    headers: &'a [httparse::Header<'a>],
    name: &'a str,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// Comma-separated tokens of every header named `name`, trimmed.
fn tokens<'a>(
    headers: &'a [httparse::Header<'a>],
    name: &'a str,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    values(headers, name).flat_map(|v| v.split(|&b| b == b',').map(<[u8]>::trim_ascii))
}

/// Whether a header named `name` holds `token` (ASCII case-insensitive) in its list.
fn has_token(headers: &[httparse::Header<'_>], name: &str, token: &[u8]) -> bool {
    tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

/// Whether a header named `name` holds exactly `token` (case-sensitive) in its list.
fn has_exact_token(headers: &[httparse::Header<'_>], name: &str, token: &[u8]) -> bool {
    tokens(headers, name).any(|t| t == token)
}
