//! The load generator's client codec: the raw client protocols it speaks (Tether frames,
//! also over WebSocket, the NATS text protocol and MQTT 3.1.1 at QoS 0/1), each just far
//! enough for the scenarios, and the stamped payload they carry.
//!
//! The scenarios open tens of thousands of sockets, so there is no client library per
//! connection: a connection is a `TcpStream` plus, while it reads, one buffer. Each
//! protocol gives a *hello* (what the client sends after connecting: LOGIN, CONNECT+PING,
//! CONNECT[+SUBSCRIBE]), a check that the hello was accepted, and a decoder for what
//! arrives afterwards.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::Serialize;
use tether_schemas::{Frame, limits::DEFAULT_MAX_FRAME_LEN, pb, split_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Which server the load generator talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// A Tether gateway (binary frames).
    Tether,
    /// A Tether gateway over WebSocket (`/ws`, one frame per binary message).
    TetherWs,
    /// nats-server alone (text protocol).
    Nats,
    /// Mosquitto (MQTT 3.1.1).
    Mqtt,
}

impl Proto {
    /// The name used in reports: `tether`, `nats` or `mosquitto`.
    pub fn target_name(self) -> &'static str {
        match self {
            Proto::Tether | Proto::TetherWs => "tether",
            Proto::Nats => "nats",
            Proto::Mqtt => "mosquitto",
        }
    }

    /// Parses `tether`, `nats`, `mqtt`/`mosquitto`.
    pub fn parse(s: &str) -> Option<Proto> {
        match s {
            "tether" => Some(Proto::Tether),
            "nats" => Some(Proto::Nats),
            "mqtt" | "mosquitto" => Some(Proto::Mqtt),
            _ => None,
        }
    }
}

/// Unix time in nanoseconds (comparable across the processes of one machine).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Size of every benchmark payload, bytes.
pub const PAYLOAD_LEN: usize = 64;

/// A payload of [`PAYLOAD_LEN`] bytes starting with `stamp_ns` (big endian) and `tag`.
pub fn payload(stamp_ns: u64, tag: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(PAYLOAD_LEN);
    b.put_u64(stamp_ns);
    b.put_u64(tag);
    b.resize(PAYLOAD_LEN, b'x');
    b.freeze()
}

/// The stamp and tag of a [`payload`], `None` if it is too short.
pub fn read_payload(body: &[u8]) -> Option<(u64, u64)> {
    if body.len() < 16 {
        return None;
    }
    let mut b = body;
    Some((b.get_u64(), b.get_u64()))
}

/// Connects from `source` (port chosen at connect time, so many sockets can share one
/// source address) to `endpoint`, with TCP_NODELAY.
pub async fn connect_from(source: IpAddr, endpoint: SocketAddr) -> Result<TcpStream, String> {
    let socket = if endpoint.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {e}"))?;
    // Best effort: without it, each source address gives fewer connections.
    let _ = nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    );
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| format!("bind {source}: {e}"))?;
    let stream = socket
        .connect(endpoint)
        .await
        .map_err(|e| format!("connect {endpoint} from {source}: {e}"))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

// ---------------------------------------------------------------- hellos

/// A Tether LOGIN frame.
pub fn tether_login(app: &str, did: &str, token: String) -> Bytes {
    Frame::Login(pb::Login {
        token,
        did: did.to_owned(),
        app: app.to_owned(),
        sdk: "tether-bench".into(),
        ..Default::default()
    })
    .encode()
}

/// NATS CONNECT (no echo, no verbose) + optional `SUB subject 1` + PING.
pub fn nats_hello(subscribe: Option<&str>) -> Bytes {
    let mut s = String::from(
        "CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false,\"lang\":\"bench\",\"version\":\"0\",\"protocol\":1}\r\n",
    );
    if let Some(subject) = subscribe {
        s.push_str(&format!("SUB {subject} 1\r\n"));
    }
    s.push_str("PING\r\n");
    Bytes::from(s)
}

/// NATS `PUB subject len\r\npayload\r\n`.
pub fn nats_pub(out: &mut BytesMut, subject: &str, payload: &[u8]) {
    out.put_slice(format!("PUB {subject} {}\r\n", payload.len()).as_bytes());
    out.put_slice(payload);
    out.put_slice(b"\r\n");
}

fn mqtt_remaining_len(out: &mut BytesMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if len == 0 {
            break;
        }
    }
}

fn mqtt_str(out: &mut BytesMut, s: &str) {
    out.put_u16(u16::try_from(s.len()).unwrap_or(u16::MAX));
    out.put_slice(s.as_bytes());
}

/// MQTT 3.1.1 CONNECT (clean session, no keepalive) + optional SUBSCRIBE (QoS 0).
pub fn mqtt_hello(client_id: &str, subscribe: Option<&str>) -> Bytes {
    let mut out = BytesMut::with_capacity(64);
    out.put_u8(0x10);
    mqtt_remaining_len(&mut out, 10 + 2 + client_id.len());
    mqtt_str(&mut out, "MQTT");
    out.put_u8(4); // protocol level 3.1.1
    out.put_u8(0x02); // clean session
    out.put_u16(0); // keepalive off
    mqtt_str(&mut out, client_id);
    if let Some(topic) = subscribe {
        out.put_u8(0x82);
        mqtt_remaining_len(&mut out, 2 + 2 + topic.len() + 1);
        out.put_u16(1);
        mqtt_str(&mut out, topic);
        out.put_u8(0);
    }
    out.freeze()
}

/// MQTT PUBLISH; QoS1 when `packet_id` is given.
pub fn mqtt_publish(out: &mut BytesMut, topic: &str, payload: &[u8], packet_id: Option<u16>) {
    out.put_u8(if packet_id.is_some() { 0x32 } else { 0x30 });
    let len = 2 + topic.len() + packet_id.map_or(0, |_| 2) + payload.len();
    mqtt_remaining_len(out, len);
    mqtt_str(out, topic);
    if let Some(id) = packet_id {
        out.put_u16(id);
    }
    out.put_slice(payload);
}

/// A WebSocket upgrade request for `/ws` followed by `frame` in one masked binary
/// message (the gateway reads frame data that follows the request).
pub fn ws_hello(frame: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(200 + frame.len());
    out.put_slice(
        b"GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Protocol: tether.v1\r\n\r\n",
    );
    ws_binary(&mut out, frame);
    out.freeze()
}

/// One masked binary WebSocket message carrying `payload` (client → server).
pub fn ws_binary(out: &mut BytesMut, payload: &[u8]) {
    const MASK: [u8; 4] = [0x5a, 0x17, 0xc3, 0x99];
    out.put_u8(0x82);
    match payload.len() {
        n @ 0..126 => out.put_u8(0x80 | n as u8),
        n @ 126..65_536 => {
            out.put_u8(0x80 | 126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(0x80 | 127);
            out.put_u64(n as u64);
        }
    }
    out.put_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
}

/// Appends one Tether UP frame carrying `body` to `out`: as it is, or in a masked
/// WebSocket binary message for [`Proto::TetherWs`].
pub fn tether_up(out: &mut BytesMut, proto: Proto, client_msg_id: u64, body: Bytes) {
    let frame = Frame::Up {
        header: pb::Up {
            client_msg_id,
            session: String::new(),
        },
        body,
    }
    .encode();
    if proto == Proto::TetherWs {
        ws_binary(out, &frame);
    } else {
        out.extend_from_slice(&frame);
    }
}

/// Appends one Tether DOWN_ACK frame acknowledging every QoS1 DOWN up to `seq` to `out`
/// (in a masked WebSocket binary message for [`Proto::TetherWs`]).
pub fn tether_down_ack(out: &mut BytesMut, proto: Proto, seq: u64) {
    let frame = Frame::DownAck(pb::DownAck { seq }).encode();
    if proto == Proto::TetherWs {
        ws_binary(out, &frame);
    } else {
        out.extend_from_slice(&frame);
    }
}

// ---------------------------------------------------------------- decoding

/// One thing that arrived from the server.
#[derive(Debug)]
pub enum Incoming {
    /// An application payload (Tether QoS0 DOWN body, NATS MSG payload, MQTT PUBLISH
    /// payload).
    Payload(Bytes),
    /// A stored (QoS1) Tether DOWN: its per-device sequence, to acknowledge with
    /// [`tether_down_ack`], and its body.
    Stored {
        /// Per-device sequence.
        seq: u64,
        /// The body.
        body: Bytes,
    },
    /// The hello was accepted (LOGIN_ACK, PONG, CONNACK/SUBACK).
    Ready,
    /// A receipt: Tether UP_ACK with code 0 (`client_msg_id`), MQTT PUBACK (packet id).
    Receipt(u64),
    /// The server pings (NATS): answer with PONG.
    Ping,
    /// The server reported an error.
    Error(String),
    /// Anything else (INFO, PONG after ready, …).
    Other,
}

/// Takes the next complete unit from `buf`, `Ok(None)` if more bytes are needed.
pub fn decode(proto: Proto, buf: &mut BytesMut) -> Result<Option<Incoming>, String> {
    match proto {
        Proto::Tether => decode_tether(buf),
        Proto::TetherWs => decode_ws(buf),
        Proto::Nats => decode_nats(buf),
        Proto::Mqtt => decode_mqtt(buf),
    }
}

fn decode_tether(buf: &mut BytesMut) -> Result<Option<Incoming>, String> {
    let Some(raw) = split_frame(buf, DEFAULT_MAX_FRAME_LEN).map_err(|e| format!("frame: {e}"))?
    else {
        return Ok(None);
    };
    Ok(Some(
        match Frame::decode(&raw).map_err(|e| format!("frame: {e}"))? {
            Frame::LoginAck(_) => Incoming::Ready,
            Frame::Down {
                header,
                qos1: true,
                body,
            } if header.seq > 0 => Incoming::Stored {
                seq: header.seq,
                body,
            },
            Frame::Down { body, .. } => Incoming::Payload(body),
            Frame::UpAck(ack) if ack.code == 0 => Incoming::Receipt(ack.client_msg_id),
            Frame::UpAck(ack) => Incoming::Error(format!("up_ack code {}", ack.code)),
            Frame::Error { error, .. } => {
                Incoming::Error(format!("error {} {}", error.code, error.text))
            }
            _ => Incoming::Other,
        },
    ))
}

fn decode_ws(buf: &mut BytesMut) -> Result<Option<Incoming>, String> {
    if buf.starts_with(b"HTTP/") {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Ok(None);
        };
        let ok = buf.starts_with(b"HTTP/1.1 101");
        let head = String::from_utf8_lossy(&buf[..end.min(80)]).into_owned();
        buf.advance(end + 4);
        return Ok(Some(if ok {
            Incoming::Other
        } else {
            Incoming::Error(format!("upgrade refused: {head}"))
        }));
    }
    if buf.len() < 2 {
        return Ok(None);
    }
    let (opcode, short) = (buf[0] & 0x0f, buf[1] & 0x7f);
    let (len, header) = match short {
        126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => {
            let mut b = &buf[2..10];
            (
                usize::try_from(b.get_u64()).map_err(|_| "ws: huge frame")?,
                10,
            )
        }
        126 | 127 => return Ok(None),
        n => (usize::from(n), 2),
    };
    if buf[1] & 0x80 != 0 {
        return Err("ws: masked frame from the server".into());
    }
    if buf.len() < header + len {
        return Ok(None);
    }
    buf.advance(header);
    let mut payload = buf.split_to(len);
    Ok(Some(match opcode {
        0x2 => decode_tether(&mut payload)?.unwrap_or(Incoming::Other),
        0x8 => Incoming::Error("ws: closed by the server".into()),
        _ => Incoming::Other,
    }))
}

fn decode_nats(buf: &mut BytesMut) -> Result<Option<Incoming>, String> {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() > 64 * 1024 {
            return Err("nats: control line too long".into());
        }
        return Ok(None);
    };
    let line = &buf[..eol];
    if line.starts_with(b"MSG ") {
        let len: usize = std::str::from_utf8(line)
            .ok()
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .ok_or("nats: bad MSG line")?;
        if buf.len() < eol + 2 + len + 2 {
            return Ok(None);
        }
        buf.advance(eol + 2);
        let payload = buf.split_to(len).freeze();
        buf.advance(2);
        return Ok(Some(Incoming::Payload(payload)));
    }
    let item = if line.starts_with(b"PING") {
        Incoming::Ping
    } else if line.starts_with(b"PONG") {
        Incoming::Ready
    } else if line.starts_with(b"-ERR") {
        Incoming::Error(String::from_utf8_lossy(line).into_owned())
    } else {
        Incoming::Other
    };
    buf.advance(eol + 2);
    Ok(Some(item))
}

fn decode_mqtt(buf: &mut BytesMut) -> Result<Option<Incoming>, String> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (mut len, mut shift, mut at) = (0usize, 0u32, 1usize);
    loop {
        let Some(&byte) = buf.get(at) else {
            return Ok(None);
        };
        len |= usize::from(byte & 0x7f) << shift;
        at += 1;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Err("mqtt: bad remaining length".into());
        }
    }
    if buf.len() < at + len {
        return Ok(None);
    }
    let kind = buf[0];
    buf.advance(at);
    let mut body = buf.split_to(len).freeze();
    Ok(Some(match kind >> 4 {
        2 => match body.get(1) {
            Some(0) => Incoming::Ready,
            code => Incoming::Error(format!("mqtt connack refused: {code:?}")),
        },
        9 => Incoming::Ready,
        4 if body.len() >= 2 => Incoming::Receipt(u64::from(body.get_u16())),
        3 => {
            let qos = (kind >> 1) & 3;
            if body.len() < 2 {
                return Err("mqtt: short publish".into());
            }
            let topic_len = usize::from(body.get_u16());
            let skip = topic_len + if qos > 0 { 2 } else { 0 };
            if body.len() < skip {
                return Err("mqtt: short publish".into());
            }
            body.advance(skip);
            Incoming::Payload(body)
        }
        _ => Incoming::Other,
    }))
}

/// Sends `hello` on `stream` and reads until the server accepted it (`readies`
/// [`Incoming::Ready`] answers: 2 for an MQTT CONNECT with a SUBSCRIBE, else 1); returns
/// what was read past the acceptance. Fails on an error answer, a close, or after
/// `timeout`.
pub async fn handshake(
    stream: &mut TcpStream,
    proto: Proto,
    hello: &[u8],
    readies: usize,
    timeout: Duration,
) -> Result<BytesMut, String> {
    let attempt = async {
        stream
            .write_all(hello)
            .await
            .map_err(|e| format!("write hello: {e}"))?;
        let needed = readies.max(1);
        let mut ready = 0;
        let mut buf = BytesMut::with_capacity(512);
        loop {
            while let Some(item) = decode(proto, &mut buf)? {
                match item {
                    Incoming::Ready => {
                        ready += 1;
                        if ready == needed {
                            return Ok(buf);
                        }
                    }
                    Incoming::Error(e) => return Err(format!("refused: {e}")),
                    _ => {}
                }
            }
            let n = stream
                .read_buf(&mut buf)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("closed before the hello was accepted".to_string());
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("hello not accepted within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trip() {
        let p = payload(123, 7);
        assert_eq!(p.len(), PAYLOAD_LEN);
        assert_eq!(read_payload(&p), Some((123, 7)));
        assert_eq!(read_payload(b"short"), None);
    }

    #[test]
    fn nats_msg_decodes() {
        let mut buf = BytesMut::from(&b"INFO {}\r\nMSG room 1 3\r\nabc\r\nPING\r\nMSG r"[..]);
        assert!(matches!(
            decode(Proto::Nats, &mut buf),
            Ok(Some(Incoming::Other))
        ));
        match decode(Proto::Nats, &mut buf) {
            Ok(Some(Incoming::Payload(p))) => assert_eq!(&p[..], b"abc"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            decode(Proto::Nats, &mut buf),
            Ok(Some(Incoming::Ping))
        ));
        assert!(matches!(decode(Proto::Nats, &mut buf), Ok(None)));
    }

    #[test]
    fn mqtt_publish_round_trip() {
        let mut out = BytesMut::new();
        let body = vec![9u8; 200];
        mqtt_publish(&mut out, "room", &body, None);
        mqtt_publish(&mut out, "room", b"q1", Some(5));
        match decode(Proto::Mqtt, &mut out) {
            Ok(Some(Incoming::Payload(p))) => assert_eq!(&p[..], &body[..]),
            other => panic!("unexpected {other:?}"),
        }
        match decode(Proto::Mqtt, &mut out) {
            Ok(Some(Incoming::Payload(p))) => assert_eq!(&p[..], b"q1"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(out.is_empty());
        let mut acks = BytesMut::from(&[0x20u8, 2, 0, 0, 0x90, 3, 0, 1, 0, 0x40, 2, 0, 5][..]);
        assert!(matches!(
            decode(Proto::Mqtt, &mut acks),
            Ok(Some(Incoming::Ready))
        ));
        assert!(matches!(
            decode(Proto::Mqtt, &mut acks),
            Ok(Some(Incoming::Ready))
        ));
        assert!(matches!(
            decode(Proto::Mqtt, &mut acks),
            Ok(Some(Incoming::Receipt(5)))
        ));
    }
}
