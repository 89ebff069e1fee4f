//! A small HTTP/1.1 client over plain TCP, for the NATS monitoring endpoints and for
//! `tether ctl` talking to the ops API (both `http://`, one request per connection).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest answer read.
const MAX_ANSWER: usize = 16 * 1024 * 1024;

/// What went wrong with a request.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL is not `http://host:port/path`.
    #[error("bad url {0:?}: expected http://host:port/path")]
    Url(String),
    /// Connecting, writing or reading failed.
    #[error("{url}: {error}")]
    Io {
        /// The URL.
        url: String,
        /// The error.
        error: std::io::Error,
    },
    /// No answer within the timeout.
    #[error("{0}: no answer in time")]
    Timeout(String),
    /// The answer is not HTTP.
    #[error("{0}: malformed http answer")]
    Malformed(String),
}

/// An answer: status and body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// Splits `http://host:port/path?q` into `(host:port, /path?q)`.
fn split(url: &str) -> Result<(String, String), HttpError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| HttpError::Url(url.into()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains(char::is_whitespace) {
        return Err(HttpError::Url(url.into()));
    }
    let authority = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.to_string()))
}

/// Sends one request (`body` as JSON when given, `token` as bearer when given).
pub async fn request(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Answer, HttpError> {
    tokio::time::timeout(timeout, send(method, url, token, body))
        .await
        .map_err(|_| HttpError::Timeout(url.into()))?
}

async fn send(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
) -> Result<Answer, HttpError> {
    let (authority, path) = split(url)?;
    let io = |error| HttpError::Io {
        url: url.into(),
        error,
    };
    let mut stream = TcpStream::connect(&authority).await.map_err(io)?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nAccept: application/json\r\n"
    );
    if let Some(token) = token {
        head += &format!("Authorization: Bearer {token}\r\n");
    }
    let body = body.unwrap_or_default();
    if !body.is_empty() || method != "GET" {
        head += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    head += "\r\n";
    stream.write_all(head.as_bytes()).await.map_err(io)?;
    stream.write_all(body).await.map_err(io)?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(MAX_ANSWER as u64)
        .read_to_end(&mut raw)
        .await
        .map_err(io)?;
    parse(url, &raw)
}

fn parse(url: &str, raw: &[u8]) -> Result<Answer, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let header_len = match response.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err(HttpError::Malformed(url.into())),
    };
    let status = response
        .code
        .ok_or_else(|| HttpError::Malformed(url.into()))?;
    let chunked = response.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            && String::from_utf8_lossy(h.value)
                .to_ascii_lowercase()
                .contains("chunked")
    });
    let rest = &raw[header_len..];
    let body = if chunked {
        dechunk(rest).ok_or_else(|| HttpError::Malformed(url.into()))?
    } else {
        rest.to_vec()
    };
    Ok(Answer { status, body })
}

/// Joins the chunks of a chunked body.
fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_answers() {
        assert!(split("https://x").is_err());
        assert_eq!(
            split("http://127.0.0.1:8222/varz").ok(),
            Some(("127.0.0.1:8222".into(), "/varz".into()))
        );
        assert_eq!(split("http://h").ok(), Some(("h:80".into(), "/".into())));
        let answer = parse(
            "u",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        );
        assert_eq!(answer.ok().map(|a| a.body), Some(b"abcde".to_vec()));
        assert!(parse("u", b"nonsense").is_err());
    }
}
