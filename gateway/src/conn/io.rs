//! Socket I/O of a connection: plain TCP or TLS, read without holding a buffer while idle,
//! write queued frames in batches.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

const SCRATCH_LEN: usize = 16 * 1024;
const MAX_SLICES: usize = 64;

thread_local! {
    /// One read buffer per worker thread, shared by every connection on it.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH_LEN].into_boxed_slice());
}

/// A client socket.
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP (rustls keeps its own buffers).
    Tls(Box<TlsStream<TcpStream>>),
    /// A plain socket out of the runtime while its connection is dormant (see
    /// [`super::dormant`]); no I/O until it is registered again.
    Dormant(std::net::TcpStream),
    /// No socket: it could not be registered with the runtime again. Every I/O fails,
    /// so the connection closes.
    Gone,
}

fn unavailable() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "socket not registered")
}

impl Stream {
    /// Waits for input and appends it to `input`; `Ok(0)` means the peer closed.
    pub async fn read_into(&mut self, input: &mut BytesMut) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read_into(cx, input)).await
    }

    /// Polls for input and appends it to `input`; `Ok(0)` means the peer closed.
    ///
    /// Waits for readiness without a buffer and reads into the thread's scratch buffer, so
    /// an idle connection pins no read buffer (TLS: rustls keeps its own).
    pub fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        input: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        match self {
            Stream::Plain(stream) => loop {
                ready!(stream.poll_read_ready(cx))?;
                let read = SCRATCH.with(|scratch| {
                    let mut scratch = scratch.borrow_mut();
                    let n = stream.try_read(&mut scratch)?;
                    input.extend_from_slice(&scratch[..n]);
                    Ok::<usize, io::Error>(n)
                });
                match read {
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                    other => return Poll::Ready(other),
                }
            },
            Stream::Tls(stream) => SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let mut buf = ReadBuf::new(&mut scratch);
                ready!(Pin::new(&mut **stream).poll_read(cx, &mut buf))?;
                input.extend_from_slice(buf.filled());
                Poll::Ready(Ok(buf.filled().len()))
            }),
            Stream::Dormant(_) | Stream::Gone => Poll::Ready(Err(unavailable())),
        }
    }

    /// Writes every frame in order, `prefix(frame)` bytes before each (WebSocket headers),
    /// in as few system calls as possible.
    pub async fn write_frames(&mut self, frames: &[Bytes], headers: &[Bytes]) -> io::Result<usize> {
        let mut parts: Vec<&[u8]> = Vec::with_capacity(frames.len() * 2);
        for (i, frame) in frames.iter().enumerate() {
            if let Some(header) = headers.get(i).filter(|h| !h.is_empty()) {
                parts.push(header);
            }
            parts.push(frame);
        }
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut part = 0;
        let mut offset = 0;
        while part < parts.len() {
            let mut slices: Vec<IoSlice<'_>> =
                Vec::with_capacity(MAX_SLICES.min(parts.len() - part));
            slices.push(IoSlice::new(&parts[part][offset..]));
            slices.extend(
                parts[part + 1..]
                    .iter()
                    .take(MAX_SLICES - 1)
                    .map(|p| IoSlice::new(p)),
            );
            let mut written = match self {
                Stream::Plain(stream) => stream.write_vectored(&slices).await?,
                Stream::Tls(stream) => stream.write_vectored(&slices).await?,
                Stream::Dormant(_) | Stream::Gone => return Err(unavailable()),
            };
            if written == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "socket closed while writing",
                ));
            }
            while written > 0 && part < parts.len() {
                let left = parts[part].len() - offset;
                if written >= left {
                    written -= left;
                    part += 1;
                    offset = 0;
                } else {
                    offset += written;
                    written = 0;
                }
            }
        }
        if let Stream::Tls(stream) = self {
            stream.flush().await?;
        }
        Ok(total)
    }

    /// Writes raw bytes (handshake answers, control frames).
    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(stream) => stream.write_all(bytes).await,
            Stream::Tls(stream) => {
                stream.write_all(bytes).await?;
                stream.flush().await
            }
            Stream::Dormant(_) | Stream::Gone => Err(unavailable()),
        }
    }

    /// Closes the write side (TCP FIN, TLS close_notify).
    pub async fn shutdown(&mut self) {
        let _ = match self {
            Stream::Plain(stream) => stream.shutdown().await,
            Stream::Tls(stream) => stream.shutdown().await,
            Stream::Dormant(_) | Stream::Gone => Ok(()),
        };
    }
}
