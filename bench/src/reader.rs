//! Per-connection reader tasks: decode what arrives, record the one-way latency of every
//! stamped payload into a shared [`Sink`], count receipts, answer NATS PINGs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::client_codec::{self, Incoming, Proto, now_ns};
use crate::stats::{Sink, since_us};

/// Counters shared by reader tasks besides the latency sink.
#[derive(Default)]
pub struct Counters {
    /// Receipts (UP_ACK code 0, PUBACK).
    pub receipts: AtomicU64,
    /// Error answers or decoding failures.
    pub errors: AtomicU64,
    /// Readers that ended (connection closed or failed).
    pub closed: AtomicU64,
    /// Stored (QoS1) DOWNs at or below a sequence the reader already had: resent by the
    /// server, not counted as arrivals.
    pub repeated: AtomicU64,
}

/// Reads `stream` until it closes, recording stamped payloads into `sink` (shard
/// `key`). `buf` holds bytes already read past the hello. NATS PINGs are answered on
/// `pong` when given, and stored Tether DOWNs acknowledged there (one cumulative
/// DOWN_ACK per batch read), as a device does.
pub async fn read_loop<R, W>(
    key: usize,
    proto: Proto,
    mut stream: R,
    mut pong: Option<W>,
    mut buf: BytesMut,
    sink: Arc<Sink>,
    counters: Arc<Counters>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut latencies = Vec::with_capacity(64);
    // Highest stored sequence received, and acknowledged.
    let (mut highest, mut acked) = (0u64, 0u64);
    let mut out = BytesMut::new();
    loop {
        let now = now_ns();
        loop {
            match client_codec::decode(proto, &mut buf) {
                Ok(Some(Incoming::Payload(p))) => {
                    if let Some((stamp, _)) = client_codec::read_payload(&p) {
                        latencies.push(since_us(stamp, now));
                    }
                }
                Ok(Some(Incoming::Stored { seq, body })) => {
                    if seq <= highest {
                        counters.repeated.fetch_add(1, Ordering::Relaxed);
                    } else {
                        highest = seq;
                        if let Some((stamp, _)) = client_codec::read_payload(&body) {
                            latencies.push(since_us(stamp, now));
                        }
                    }
                }
                Ok(Some(Incoming::Receipt(_))) => {
                    counters.receipts.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(Incoming::Ping)) => {
                    if let Some(w) = pong.as_mut() {
                        let _ = w.write_all(b"PONG\r\n").await;
                    }
                }
                Ok(Some(Incoming::Error(_))) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    counters.closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        sink.record_batch(key, now, &latencies);
        latencies.clear();
        if highest > acked
            && let Some(w) = pong.as_mut()
        {
            client_codec::tether_down_ack(&mut out, proto, highest);
            let _ = w.write_all(&out).await;
            out.clear();
            acked = highest;
        }
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(4096);
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    counters.closed.fetch_add(1, Ordering::Relaxed);
}

/// [`read_loop`] over a whole `TcpStream` (PINGs answered on it).
pub async fn read_stream(
    key: usize,
    proto: Proto,
    stream: tokio::net::TcpStream,
    buf: BytesMut,
    sink: Arc<Sink>,
    counters: Arc<Counters>,
) {
    let (r, w) = stream.into_split();
    read_loop(key, proto, r, Some(w), buf, sink, counters).await;
}

/// Waits until `done()` holds, or nothing changed in `progress()` for `idle`, or
/// `limit` passed. Returns whether `done()` held.
pub async fn wait_until(
    done: impl Fn() -> bool,
    progress: impl Fn() -> u64,
    idle: std::time::Duration,
    limit: std::time::Duration,
) -> bool {
    let start = std::time::Instant::now();
    let (mut last, mut last_change) = (progress(), std::time::Instant::now());
    while !done() {
        if start.elapsed() > limit || last_change.elapsed() > idle {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let now = progress();
        if now != last {
            (last, last_change) = (now, std::time::Instant::now());
        }
    }
    true
}

/// Waits until `sink` counted `n` arrivals, or nothing new arrived for `idle`, or `limit`
/// passed. Returns whether all arrived.
pub async fn arrived(sink: &Sink, n: u64, idle: Duration, limit: Duration) -> bool {
    wait_until(|| sink.count() >= n, || sink.count(), idle, limit).await
}
