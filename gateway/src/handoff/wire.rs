//! The hand-off socket: length-prefixed JSON messages over a unix stream socket, with file
//! descriptors attached by `SCM_RIGHTS` (at most [`MAX_FDS`] per `sendmsg`).
//!
//! Ancillary data is bound to the first byte of the `sendmsg` that carried it and the
//! kernel never merges two such sends into one read, so the receiver queues descriptors in
//! arrival order and a message that announces `n` of them takes the next `n`.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use bytes::{Buf, BytesMut};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::Interest;
use tokio::net::UnixStream;

/// Most descriptors one `sendmsg` may carry (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;
/// Largest message accepted (the commit of 20,000 connections with queued output fits).
const MAX_MESSAGE: usize = 512 * 1024 * 1024;
const READ_CHUNK: usize = 256 * 1024;

/// What can go wrong on the hand-off socket.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket failed.
    #[error("hand-off socket: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the socket.
    #[error("the other process closed the hand-off socket")]
    Closed,
    /// A message could not be encoded or decoded.
    #[error("hand-off message: {0}")]
    Codec(#[from] serde_json::Error),
    /// A message announced more descriptors than arrived, or was too large.
    #[error("hand-off protocol: {0}")]
    Protocol(String),
}

/// One end of the hand-off socket.
pub struct Wire {
    stream: UnixStream,
    input: BytesMut,
    /// Read buffer, allocated once (a fresh one per read would fault its pages in again).
    chunk: Box<[u8]>,
    fds: VecDeque<OwnedFd>,
}

impl Wire {
    /// Wraps a connected unix stream.
    pub fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            input: BytesMut::new(),
            chunk: vec![0u8; READ_CHUNK].into_boxed_slice(),
            fds: VecDeque::new(),
        }
    }

    /// Sends `message` with `fds` attached (at most [`MAX_FDS`]).
    pub async fn send<T: Serialize>(
        &mut self,
        message: &T,
        fds: &[RawFd],
    ) -> Result<(), WireError> {
        if fds.len() > MAX_FDS {
            return Err(WireError::Protocol(format!(
                "{} descriptors in one message (at most {MAX_FDS})",
                fds.len()
            )));
        }
        let mut bytes = vec![0u8; 4];
        serde_json::to_writer(&mut bytes, message)?;
        let len = u32::try_from(bytes.len() - 4)
            .map_err(|_| WireError::Protocol("message too large".into()))?;
        bytes[..4].copy_from_slice(&len.to_be_bytes());
        let mut sent = 0;
        let raw = self.stream.as_raw_fd();
        while sent < bytes.len() {
            let rest = &bytes[sent..];
            // The descriptors travel with the first byte only.
            let with_fds = sent == 0 && !fds.is_empty();
            let n = self
                .stream
                .async_io(Interest::WRITABLE, || {
                    let iov = [IoSlice::new(rest)];
                    let cmsg = [ControlMessage::ScmRights(fds)];
                    let cmsgs: &[ControlMessage<'_>] = if with_fds { &cmsg } else { &[] };
                    sendmsg::<()>(raw, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                        .map_err(io::Error::from)
                })
                .await?;
            if n == 0 {
                return Err(WireError::Closed);
            }
            sent += n;
        }
        Ok(())
    }

    /// Receives the next message and the descriptors it announces (`fd_count`).
    pub async fn recv<T: DeserializeOwned>(
        &mut self,
        fd_count: impl Fn(&T) -> usize,
    ) -> Result<(T, Vec<OwnedFd>), WireError> {
        loop {
            if self.input.len() >= 4 {
                let len = u32::from_be_bytes([
                    self.input[0],
                    self.input[1],
                    self.input[2],
                    self.input[3],
                ]) as usize;
                if len > MAX_MESSAGE {
                    return Err(WireError::Protocol(format!("message of {len} bytes")));
                }
                if self.input.len() >= 4 + len {
                    self.input.advance(4);
                    let body = self.input.split_to(len);
                    let message: T = serde_json::from_slice(&body)?;
                    let wanted = fd_count(&message);
                    if wanted > self.fds.len() {
                        return Err(WireError::Protocol(format!(
                            "message announces {wanted} descriptors, {} arrived",
                            self.fds.len()
                        )));
                    }
                    let fds = self.fds.drain(..wanted).collect();
                    return Ok((message, fds));
                }
                // Room for the whole message at once, not by doubling.
                self.input.reserve(4 + len - self.input.len());
            }
            self.fill().await?;
        }
    }

    /// Reads more bytes and any descriptors that came with them.
    #[allow(unsafe_code)]
    async fn fill(&mut self) -> Result<(), WireError> {
        let raw = self.stream.as_raw_fd();
        let chunk = &mut self.chunk;
        let (n, fds) = self
            .stream
            .async_io(Interest::READABLE, || {
                let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
                let mut iov = [IoSliceMut::new(chunk)];
                let msg =
                    recvmsg::<()>(raw, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
                        .map_err(io::Error::from)?;
                let mut fds = Vec::new();
                for cmsg in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(received) = cmsg {
                        fds.extend(received);
                    }
                }
                if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
                    // Keep what arrived, but say so: the sender broke the per-send limit.
                    tracing::warn!("hand-off control data truncated (descriptors lost)");
                }
                Ok((msg.bytes, fds))
            })
            .await?;
        for fd in fds {
            // SAFETY: the kernel just installed `fd` in this process by SCM_RIGHTS; nothing
            // else owns it.
            self.fds.push_back(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        if n == 0 {
            return Err(WireError::Closed);
        }
        self.input.extend_from_slice(&self.chunk[..n]);
        Ok(())
    }
}
