//! A hostile device against a real stack (nats-server, gateway, state, business SDK) over
//! real sockets (issue 12, "Must show"): CR/LF and oversized values in every string of
//! LOGIN, UP and DOWN_ACK, `u64::MAX` sequences, and 10,000 poison UPs while another
//! device of the same partition keeps getting its receipts. Each refusal has its
//! documented error code and shows in the `refused` metrics; nothing panics, nothing
//! stalls.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use support::stack::start_state;
use support::{APP, Fixture, RawClient, TestResult, Transport, WAIT, http_get};
use tether_business::{Business, Push, Uplink, UplinkReply};
use tether_nats::subjects;
use tether_schemas::{ErrorCode, Frame, FrameType, limits, pb, split_frame};
use tether_state::RunningState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::sync::CancellationToken;

/// How long a receipt may take under attack before the test calls it lost. Generous on
/// purpose: the test measures latency, it does not assert a threshold.
const GENEROUS: Duration = Duration::from_secs(30);

/// Poison UPs the hostile device sends.
const POISON: u64 = 10_000;

const BAD_REQUEST: u32 = ErrorCode::BadRequest.as_u16() as u32;

// ---------------------------------------------------------------------------------------
// Frame building: well-formed frames through `Frame`, hostile ones byte by byte.

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A protobuf varint field.
fn pb_varint(out: &mut Vec<u8>, field: u32, value: u64) {
    varint(out, u64::from(field << 3));
    varint(out, value);
}

/// A protobuf length-delimited field (string, bytes, message).
fn pb_bytes(out: &mut Vec<u8>, field: u32, value: &[u8]) {
    varint(out, u64::from(field << 3 | 2));
    varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

/// One frame from its parts, whatever the var header holds.
fn raw_frame(kind: FrameType, flags: u8, head: &[u8], body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(limits::FIXED_HEADER_LEN + head.len() + body.len());
    out.put_u8(limits::MAGIC);
    out.put_u8(limits::VERSION);
    out.put_u8(kind as u8);
    out.put_u8(flags);
    out.put_u16(u16::try_from(head.len()).expect("var header fits u16"));
    out.put_u32(u32::try_from(body.len()).expect("body fits u32"));
    out.put_slice(head);
    out.put_slice(body);
    out.freeze()
}

fn up(client_msg_id: u64, session: &str, body: &[u8]) -> Bytes {
    Frame::Up {
        header: pb::Up {
            client_msg_id,
            session: session.into(),
        },
        body: Bytes::copy_from_slice(body),
    }
    .encode()
}

/// An UP that is a valid frame whose var header carries garbage the schema does not know:
/// unknown fields holding CR/LF, header-looking text, binary and huge varints. Receivers
/// ignore unknown fields, so it is an UP with an empty session.
fn garbage_up(client_msg_id: u64, victim: &str, body: &[u8]) -> Bytes {
    let mut head = Vec::new();
    pb_varint(&mut head, 1, client_msg_id);
    pb_bytes(
        &mut head,
        3,
        format!("\r\nTether-Did: {victim}\r\nTether-App: other\r\n\r\n").as_bytes(),
    );
    pb_varint(&mut head, 7, u64::MAX);
    pb_bytes(
        &mut head,
        99,
        &[b'\r', b'\n', 0, 0xff, 0xfe, b'\n'].repeat(16),
    );
    pb_varint(&mut head, 536_870_911, 1);
    raw_frame(FrameType::Up, 0, &head, body)
}

fn down_ack(seq: u64) -> Bytes {
    Frame::DownAck(pb::DownAck { seq }).encode()
}

fn ping(body: &'static [u8]) -> Bytes {
    Frame::Ping(Bytes::from_static(body)).encode()
}

// ---------------------------------------------------------------------------------------
// Stack and scraping.

/// A business service of `APP` answering every uplink `stored` with id `m<msg_id>`, and
/// the uplinks it saw.
fn serve_business(fixture: &Fixture) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Vec<Uplink>>>) {
    let business = Business::new(fixture.nats_client.clone(), APP);
    let seen: Arc<Mutex<Vec<Uplink>>> = Arc::default();
    let log = seen.clone();
    let task = tokio::spawn(async move {
        let _ = business
            .serve_uplinks("hostile-test", move |uplink| {
                let log = log.clone();
                async move {
                    let id = format!("m{}", uplink.msg_id);
                    log.lock().expect("lock").push(uplink);
                    UplinkReply::stored(Some(id))
                }
            })
            .await;
    });
    (task, seen)
}

/// Subscribes the business service before the test sends anything (the subscription is
/// registered when a flushed request can reach it).
async fn business_ready(fixture: &Fixture) {
    let deadline = Instant::now() + WAIT;
    loop {
        let probe = fixture
            .nats_client
            .request(subjects::business_up(APP), Bytes::new())
            .await;
        if probe.is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "business service not subscribed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn stop(
    mut fixture: Fixture,
    state: RunningState,
    state_stop: CancellationToken,
    business: tokio::task::JoinHandle<()>,
) {
    business.abort();
    state_stop.cancel();
    state.wait().await;
    fixture.stop_gateway().await;
}

/// The value of one sample line (`name{labels}`) of a Prometheus text page, 0 if absent.
fn metric(page: &str, sample: &str) -> u64 {
    page.lines()
        .filter_map(|line| line.strip_prefix(sample))
        .filter_map(|rest| rest.strip_prefix(' '))
        .filter_map(|value| value.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .next()
        .unwrap_or(0)
}

fn refused(role: &str, reason: &str) -> String {
    format!("tether_{role}_refused_total{{reason=\"{reason}\"}}")
}

/// A did whose partition is `partition(of)`, named `<prefix>-<n>`.
fn same_partition(of: &str, prefix: &str) -> String {
    let want = subjects::partition(of);
    (0u32..)
        .map(|n| format!("{prefix}-{n}"))
        .find(|did| subjects::partition(did) == want)
        .expect("some did of the partition")
}

/// The acked cursor state keeps for `did` (0 until one is written).
async fn cursor_acked(fixture: &Fixture, did: &str) -> u64 {
    fixture.cursor_field(did, "acked").await
}

async fn wait_cursor(fixture: &Fixture, did: &str, acked: u64) {
    let deadline = Instant::now() + WAIT;
    while cursor_acked(fixture, did).await != acked {
        assert!(
            Instant::now() < deadline,
            "{did}: cursor not at {acked} within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Reading.

/// The next frame that is not a resent QoS1 DOWN at or below `acked` (state resends
/// unacknowledged DOWNs on a timer; a device drops those, PROTOCOL 6.4).
async fn next_fresh(client: &mut RawClient, acked: u64) -> Option<Frame> {
    loop {
        match client.next_frame().await? {
            Frame::Down { header, qos1, .. } if qos1 && header.seq <= acked => continue,
            frame => return Some(frame),
        }
    }
}

/// Expects a non-closing ERROR `bad_request` next, then proves the connection still
/// serves with a PING.
async fn expect_refusal(client: &mut RawClient, acked: u64, what: &str) {
    match next_fresh(client, acked).await {
        Some(Frame::Error { error, close }) => {
            assert_eq!(
                error.code, BAD_REQUEST,
                "{what}: code (text {})",
                error.text
            );
            assert!(!close, "{what}: the refusal must not close the connection");
        }
        other => panic!("{what}: expected a non-closing ERROR bad_request, got {other:?}"),
    }
    client.send(&ping(b"after")).await;
    assert_eq!(
        next_fresh(client, acked).await,
        Some(Frame::Pong(Bytes::from_static(b"after"))),
        "{what}: connection still serves"
    );
}

/// Expects the next QoS1 DOWN to be `seq` with `body`.
async fn expect_down(client: &mut RawClient, acked: u64, seq: u64, body: &[u8]) {
    match next_fresh(client, acked).await {
        Some(Frame::Down {
            header,
            qos1,
            body: got,
        }) => {
            assert!(qos1, "QoS1 flag");
            assert_eq!(header.seq, seq, "the device's next sequence");
            assert_eq!(&got[..], body);
        }
        other => panic!("expected DOWN seq {seq}, got {other:?}"),
    }
}

/// The read half of a raw TCP client, for a device whose frames are read by one task
/// while another writes.
struct Reader {
    half: OwnedReadHalf,
    input: BytesMut,
}

impl Reader {
    /// The next frame; `None` when the server closed or nothing came within `wait`.
    async fn next(&mut self, wait: Duration) -> Option<Frame> {
        loop {
            if let Some(raw) =
                split_frame(&mut self.input, limits::MAX_FRAME_LEN_CAP).expect("valid frame")
            {
                return Some(Frame::decode(&raw).expect("decodable frame"));
            }
            match tokio::time::timeout(wait, self.half.read_buf(&mut self.input)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }
}

/// Connects over TCP and logs in as `did`: its reader and writer.
async fn login_split(fixture: &Fixture, did: &str) -> (Reader, OwnedWriteHalf) {
    let stream = TcpStream::connect(fixture.tcp).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (half, mut writer) = stream.into_split();
    let mut reader = Reader {
        half,
        input: BytesMut::new(),
    };
    writer
        .write_all(&fixture.login_frame(did))
        .await
        .expect("login");
    match reader.next(WAIT).await {
        Some(Frame::LoginAck(_)) => {}
        other => panic!("{did}: expected LOGIN_ACK, got {other:?}"),
    }
    (reader, writer)
}

/// Sends one UP and waits for its UP_ACK (other frames are skipped); the receipt latency.
async fn round_trip(reader: &mut Reader, writer: &mut OwnedWriteHalf, id: u64) -> Duration {
    let started = Instant::now();
    writer
        .write_all(&up(id, "", format!("good {id}").as_bytes()))
        .await
        .expect("send");
    loop {
        match reader.next(GENEROUS).await {
            Some(Frame::UpAck(ack)) if ack.client_msg_id == id => {
                assert_eq!(ack.code, 0, "good UP {id} stored ({})", ack.message);
                assert_eq!(ack.server_msg_id, format!("m{id}"));
                return started.elapsed();
            }
            Some(_) => continue,
            None => panic!("good UP {id}: no receipt within {GENEROUS:?}"),
        }
    }
}

/// The good device's receipt latencies while an attack runs.
struct Paced {
    /// UPs sent while the attack was running.
    during: Vec<Duration>,
    /// UPs sent after it ended (when it ended before 20 were sent).
    after: Vec<Duration>,
    /// UPs sent.
    sent: usize,
}

impl Paced {
    fn print(&self) {
        eprintln!(
            "good device receipts during the attack: {}",
            summary(&self.during)
        );
        if !self.after.is_empty() {
            eprintln!(
                "good device receipts after the attack:  {}",
                summary(&self.after)
            );
        }
    }
}

/// Sends an UP every 5 ms (without waiting for receipts, ids from `first_id + 1`) until
/// `attack_done` and at least 20 are sent, then waits for every receipt (each within
/// [`GENEROUS`] of the previous) and checks it says stored.
async fn paced_receipts(
    mut reader: Reader,
    writer: &mut OwnedWriteHalf,
    attack_done: &AtomicBool,
    first_id: u64,
) -> Paced {
    let (receipts_tx, mut receipts) = tokio::sync::mpsc::unbounded_channel();
    let reading = tokio::spawn(async move {
        while let Some(frame) = reader.next(GENEROUS).await {
            if let Frame::UpAck(ack) = frame
                && receipts_tx.send((ack, Instant::now())).is_err()
            {
                break;
            }
        }
    });
    let mut sent: HashMap<u64, (Instant, bool)> = HashMap::new();
    let mut id = first_id;
    while !attack_done.load(Ordering::SeqCst) || sent.len() < 20 {
        id += 1;
        let in_attack = !attack_done.load(Ordering::SeqCst);
        sent.insert(id, (Instant::now(), in_attack));
        writer
            .write_all(&up(id, "", format!("good {id}").as_bytes()))
            .await
            .expect("good UP written");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (mut during, mut after) = (Vec::new(), Vec::new());
    while during.len() + after.len() < sent.len() {
        let Ok(Some((ack, at))) = tokio::time::timeout(GENEROUS, receipts.recv()).await else {
            panic!(
                "good device: {} of {} receipts, then none within {GENEROUS:?}",
                during.len() + after.len(),
                sent.len()
            );
        };
        let Some((sent_at, in_attack)) = sent.get(&ack.client_msg_id) else {
            continue;
        };
        assert_eq!(
            ack.code, 0,
            "good UP {} stored ({})",
            ack.client_msg_id, ack.message
        );
        assert_eq!(ack.server_msg_id, format!("m{}", ack.client_msg_id));
        let latency = at.duration_since(*sent_at);
        if *in_attack {
            during.push(latency);
        } else {
            after.push(latency);
        }
    }
    reading.abort();
    Paced {
        during,
        after,
        sent: sent.len(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn summary(samples: &[Duration]) -> String {
    let mut sorted = samples.to_vec();
    sorted.sort();
    format!(
        "n={} p50={:.2?} p99={:.2?} max={:.2?}",
        sorted.len(),
        percentile(&sorted, 0.5),
        percentile(&sorted, 0.99),
        sorted.last().copied().unwrap_or_default()
    )
}

// ---------------------------------------------------------------------------------------
// LOGIN.

/// A LOGIN of `did` with a valid token, for `tweak` to spoil.
fn login_with(fixture: &Fixture, did: &str, tweak: impl FnOnce(&mut pb::Login)) -> Bytes {
    let mut login = pb::Login {
        token: fixture.token(did),
        did: did.into(),
        app: APP.into(),
        resume_seq: 0,
        rooms: Vec::new(),
        sdk: "rust/0.1.0".into(),
    };
    tweak(&mut login);
    Frame::Login(login).encode()
}

fn cursor(session: &str) -> pb::RoomCursor {
    pb::RoomCursor {
        session: session.into(),
        room_seq: 1,
    }
}

type LoginCase = (&'static str, Box<dyn FnOnce(&mut pb::Login)>, ErrorCode);

/// Hostile values for every string of LOGIN (and the cursor list), each with the code of
/// its refusal: ids and cursors and the SDK string are checked (`bad_request`), the token
/// is verified (`bad_token`).
fn login_cases() -> Vec<LoginCase> {
    fn case(
        what: &'static str,
        tweak: impl FnOnce(&mut pb::Login) + 'static,
        code: ErrorCode,
    ) -> LoginCase {
        (what, Box::new(tweak), code)
    }
    let long = |n: usize| "a".repeat(n);
    let bad = ErrorCode::BadRequest;
    vec![
        case(
            "did with CR/LF header injection",
            |l| l.did = "hostile\r\nTether-App: other".into(),
            bad,
        ),
        case("did with LF", |l| l.did = "hostile\n".into(), bad),
        case("did with CR", |l| l.did = "hostile\r".into(), bad),
        case("did of 65 chars", move |l| l.did = long(65), bad),
        case("did of 60,000 chars", move |l| l.did = long(60_000), bad),
        case(
            "did with a subject separator",
            |l| l.did = "host.ile".into(),
            bad,
        ),
        case("did with a wildcard", |l| l.did = "host>".into(), bad),
        case("app with CR/LF", |l| l.app = "demo\r\nX: y".into(), bad),
        case("app of 65 chars", move |l| l.app = long(65), bad),
        case("app of 60,000 chars", move |l| l.app = long(60_000), bad),
        case(
            "token with CR/LF",
            |l| l.token = format!("{}\r\nX: y", l.token),
            ErrorCode::BadToken,
        ),
        case(
            "token of 60,000 chars",
            move |l| l.token = long(60_000),
            ErrorCode::BadToken,
        ),
        case(
            "sdk with CR/LF",
            |l| l.sdk = "rust/0.1.0\r\nX: y".into(),
            bad,
        ),
        case("sdk with LF only", |l| l.sdk = "\n".into(), bad),
        case("sdk of 65 chars", move |l| l.sdk = long(65), bad),
        case("sdk of 60,000 chars", move |l| l.sdk = long(60_000), bad),
        case("sdk not ascii", |l| l.sdk = "rüst".into(), bad),
        case(
            "room cursor session with CR/LF",
            |l| l.rooms = vec![cursor("room\r\nX: y")],
            bad,
        ),
        case(
            "room cursor session of 65 chars",
            move |l| l.rooms = vec![cursor(&long(65))],
            bad,
        ),
        case(
            "room cursor session of 60,000 chars",
            move |l| l.rooms = vec![cursor(&long(60_000))],
            bad,
        ),
        case(
            "room cursor session empty",
            |l| l.rooms = vec![cursor("")],
            bad,
        ),
        case(
            "257 room cursors",
            |l| {
                l.rooms = (0..=limits::MAX_ROOM_CURSORS)
                    .map(|n| cursor(&format!("r-{n}")))
                    .collect();
            },
            bad,
        ),
    ]
}

#[tokio::test]
async fn hostile_login_fields_are_refused_and_the_gateway_keeps_serving() -> TestResult {
    let mut fixture = Fixture::start(|_| {}).await;
    let (mut bystander, _) = fixture.login(Transport::Tcp, "bystander").await;
    let mut login_fields = 0;
    for transport in [Transport::Tcp, Transport::Ws] {
        for (what, tweak, code) in login_cases() {
            let frame = login_with(&fixture, "hostile", tweak);
            assert!(frame.len() <= limits::DEFAULT_MAX_FRAME_LEN, "{what}: fits");
            let mut client = RawClient::connect(transport, fixture.addr(transport)).await;
            client.send(&frame).await;
            match client.next_frame().await {
                Some(Frame::Error { error, close }) => {
                    assert_eq!(
                        error.code,
                        u32::from(code.as_u16()),
                        "{transport:?} {what}: code (text {})",
                        error.text
                    );
                    assert!(close, "{transport:?} {what}: CLOSE flag");
                }
                other => panic!("{transport:?} {what}: expected ERROR {code}, got {other:?}"),
            }
            assert!(
                client.next_frame().await.is_none(),
                "{transport:?} {what}: closed after the error"
            );
            if code == ErrorCode::BadRequest {
                login_fields += 1;
            }
            // The gateway keeps serving the others.
            bystander.send(&ping(b"still here")).await;
            assert_eq!(
                bystander.next_frame().await,
                Some(Frame::Pong(Bytes::from_static(b"still here"))),
                "after {transport:?} {what}"
            );
        }
    }

    // A string past the frame limit: refused from the fixed header (only the header is
    // sent, as a reader that stops there would see it).
    let base = login_with(&fixture, "hostile", |l| l.did.clear()).len();
    let frame = login_with(&fixture, "hostile", |l| {
        l.did = "a".repeat(limits::DEFAULT_MAX_FRAME_LEN - base);
    });
    assert!(frame.len() > limits::DEFAULT_MAX_FRAME_LEN);
    let mut client = RawClient::connect(Transport::Tcp, fixture.tcp).await;
    client.send(&frame[..limits::FIXED_HEADER_LEN]).await;
    client.expect_close(ErrorCode::FrameTooLarge).await;

    // Invalid UTF-8 in a string makes the frame malformed.
    let mut head = Vec::new();
    pb_bytes(&mut head, 1, fixture.token("hostile").as_bytes());
    pb_bytes(&mut head, 2, b"host\xff\xfeile");
    let mut client = RawClient::connect(Transport::Tcp, fixture.tcp).await;
    client
        .send(&raw_frame(FrameType::Login, 0, &head, &[]))
        .await;
    client.expect_close(ErrorCode::BadFrame).await;

    // A LOGIN with a body is malformed too.
    let mut client = RawClient::connect(Transport::Tcp, fixture.tcp).await;
    let login = login_with(&fixture, "hostile", |_| {});
    let head = &login[limits::FIXED_HEADER_LEN..];
    client
        .send(&raw_frame(FrameType::Login, 0, head, b"\r\n"))
        .await;
    client.expect_close(ErrorCode::BadFrame).await;

    // A clean LOGIN of the same device still works afterwards.
    let (mut hostile, _) = fixture.login(Transport::Tcp, "hostile").await;
    hostile.send(&ping(b"ok")).await;
    assert_eq!(
        hostile.next_frame().await,
        Some(Frame::Pong(Bytes::from_static(b"ok")))
    );

    let page = http_get(fixture.admin, "/metrics").await;
    assert_eq!(
        metric(&page, &refused("gateway", "login_field")),
        login_fields,
        "every refused LOGIN field counted:\n{page}"
    );
    assert_eq!(login_fields, 2 * 20, "20 field cases per transport");
    fixture.stop_gateway().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// UP and DOWN_ACK fields.

/// Hostile `UP.session` values: each is answered UP_ACK `bad_request` and never
/// published (the session would become a NATS header).
fn hostile_sessions() -> Vec<(&'static str, String)> {
    vec![
        ("CR/LF header injection", "s\r\nTether-Did: victim".into()),
        ("CR/LF only", "\r\n".into()),
        ("LF", "s\n".into()),
        ("CR", "s\r".into()),
        ("NUL", "s\0".into()),
        ("65 chars", "a".repeat(65)),
        ("60,000 chars", "a".repeat(60_000)),
        ("space", "with space".into()),
        ("subject separator", "s.t".into()),
        ("wildcard *", "*".into()),
        ("wildcard >", ">".into()),
        ("not ascii", "sëssion".into()),
    ]
}

#[tokio::test]
async fn hostile_up_and_down_ack_fields_get_their_codes() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let state_stop = CancellationToken::new();
    let state = start_state(&fixture, state_stop.clone()).await;
    let (business, seen) = serve_business(&fixture);
    business_ready(&fixture).await;
    let (mut device, _) = fixture.login(Transport::Tcp, "up-dev").await;
    let (mut bystander, _) = fixture.login(Transport::Ws, "up-bystander").await;

    let cases = hostile_sessions();
    for (n, (what, session)) in cases.iter().enumerate() {
        let id = n as u64 + 1;
        let frame = up(id, session, b"payload");
        assert!(frame.len() <= limits::DEFAULT_MAX_FRAME_LEN, "{what}: fits");
        device.send(&frame).await;
        match device.next_frame().await {
            Some(Frame::UpAck(ack)) => {
                assert_eq!(ack.client_msg_id, id, "{what}: receipt of this UP");
                assert_eq!(ack.code, BAD_REQUEST, "{what}: code ({})", ack.message);
            }
            other => panic!("session {what}: expected UP_ACK bad_request, got {other:?}"),
        }
        bystander.send(&ping(b"b")).await;
        assert_eq!(
            bystander.next_frame().await,
            Some(Frame::Pong(Bytes::from_static(b"b"))),
            "after session {what}"
        );
    }
    let refused_sessions = cases.len() as u64;

    // The connection still carries good uplinks: a valid session, a body at the frame
    // limit, an UP with a garbage (unknown-field) var header.
    let mut expect_stored = async |frame: Bytes, id: u64, what: &str| {
        device.send(&frame).await;
        match device.next_frame().await {
            Some(Frame::UpAck(ack)) => {
                assert_eq!(ack.client_msg_id, id, "{what}");
                assert_eq!(ack.code, 0, "{what}: stored ({})", ack.message);
                assert_eq!(ack.server_msg_id, format!("m{id}"), "{what}");
            }
            other => panic!("{what}: expected UP_ACK, got {other:?}"),
        }
    };
    expect_stored(up(100, "room-1", b"fine"), 100, "valid session").await;
    let head_len = Frame::Up {
        header: pb::Up {
            client_msg_id: 101,
            session: String::new(),
        },
        body: Bytes::new(),
    }
    .encode()
    .len();
    let at_limit = vec![b'x'; limits::DEFAULT_MAX_FRAME_LEN - head_len];
    let frame = up(101, "", &at_limit);
    assert_eq!(frame.len(), limits::DEFAULT_MAX_FRAME_LEN);
    expect_stored(frame, 101, "body at the frame limit").await;
    expect_stored(
        garbage_up(102, "victim", b"junk"),
        102,
        "garbage var header",
    )
    .await;

    // DOWN_ACK has no string field: garbage in unknown fields (CR/LF, 60,000 bytes) is
    // ignored, with seq 0 it acknowledges nothing and nothing is answered.
    let mut head = Vec::new();
    pb_bytes(&mut head, 2, b"\r\nTether-Did: victim\r\n");
    pb_bytes(&mut head, 9, &b"\r\n".repeat(30_000));
    device
        .send(&raw_frame(FrameType::DownAck, 0, &head, &[]))
        .await;
    device.send(&ping(b"d")).await;
    assert_eq!(
        device.next_frame().await,
        Some(Frame::Pong(Bytes::from_static(b"d"))),
        "garbage DOWN_ACK ignored"
    );

    // What the business saw: exactly the three good uplinks, never a hostile session.
    {
        let seen = seen.lock().expect("lock");
        let ids: Vec<u64> = seen.iter().map(|u| u.msg_id).collect();
        assert_eq!(
            ids.len(),
            3,
            "only the good UPs reached the business: {ids:?}"
        );
        for uplink in seen.iter() {
            assert_eq!(uplink.did, "up-dev");
            match uplink.msg_id {
                100 => assert_eq!(uplink.session.as_deref(), Some("room-1")),
                101 => {
                    assert_eq!(uplink.session, None);
                    assert_eq!(uplink.body.len(), at_limit.len(), "body at the limit whole");
                }
                102 => {
                    assert_eq!(uplink.session, None, "unknown fields are no session");
                    assert_eq!(&uplink.body[..], b"junk");
                }
                other => panic!("unexpected uplink {other}"),
            }
        }
    }

    // Frames that end the connection, each on its own: a body one byte over the limit
    // (decided from the fixed header), invalid UTF-8 in UP.session, a DOWN_ACK with a body,
    // a DOWN_ACK whose seq has the wrong wire type, a DOWN_ACK over the limit.
    let over = up(103, "", &vec![b'x'; at_limit.len() + 1]);
    let mut head = Vec::new();
    pb_varint(&mut head, 1, 104);
    pb_bytes(&mut head, 2, b"s\xff\r\n");
    let bad_utf8 = raw_frame(FrameType::Up, 0, &head, b"x");
    let with_body = raw_frame(FrameType::DownAck, 0, &[0x08, 0x01], b"\r\n");
    let wrong_type = raw_frame(FrameType::DownAck, 0, &[0x0a, 0x02, b'\r', b'\n'], &[]);
    let mut huge = Vec::new();
    // 10 + 65,530 bytes: over the 65,536 limit, within the u16 var header length.
    pb_bytes(&mut huge, 9, &vec![b'\n'; 65_526]);
    let ack_over = raw_frame(FrameType::DownAck, 0, &huge, &[]);
    let closing: [(&str, &[u8], ErrorCode); 5] = [
        (
            "UP one byte over the limit",
            &over[..limits::FIXED_HEADER_LEN],
            ErrorCode::FrameTooLarge,
        ),
        ("UP.session not UTF-8", &bad_utf8, ErrorCode::BadFrame),
        ("DOWN_ACK with a body", &with_body, ErrorCode::BadFrame),
        ("DOWN_ACK seq as bytes", &wrong_type, ErrorCode::BadFrame),
        (
            "DOWN_ACK over the limit",
            &ack_over[..limits::FIXED_HEADER_LEN],
            ErrorCode::FrameTooLarge,
        ),
    ];
    for (n, (what, bytes, code)) in closing.into_iter().enumerate() {
        let (mut client, _) = fixture.login(Transport::Tcp, &format!("closing-{n}")).await;
        client.send(bytes).await;
        match client.next_frame().await {
            Some(Frame::Error { error, close }) => {
                assert_eq!(
                    error.code,
                    u32::from(code.as_u16()),
                    "{what} ({})",
                    error.text
                );
                assert!(close, "{what}: CLOSE flag");
            }
            other => panic!("{what}: expected ERROR {code}, got {other:?}"),
        }
        assert!(client.next_frame().await.is_none(), "{what}: closed");
    }
    bystander.send(&ping(b"end")).await;
    assert_eq!(
        bystander.next_frame().await,
        Some(Frame::Pong(Bytes::from_static(b"end")))
    );

    let gateway = http_get(fixture.admin, "/metrics").await;
    assert_eq!(
        metric(&gateway, &refused("gateway", "up_session")),
        refused_sessions,
        "every refused UP.session counted:\n{gateway}"
    );
    let state_page = http_get(state.admin_addr, "/metrics").await;
    assert_eq!(
        metric(&state_page, &refused("state", "up_field")),
        0,
        "no hostile field reached state's business request:\n{state_page}"
    );
    stop(fixture, state, state_stop, business).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Sequences.

#[tokio::test]
async fn u64_max_sequences_are_refused_and_qos1_keeps_its_sequence() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let state_stop = CancellationToken::new();
    let state = start_state(&fixture, state_stop.clone()).await;
    let (business_task, _) = serve_business(&fixture);
    let business = Business::new(fixture.nats_client.clone(), APP);
    let did = "seq-dev";
    let push = async |body: &'static [u8], seq: u64| {
        let reply = business
            .push(Push::to_dids([did], Bytes::from_static(body)))
            .await
            .expect("push accepted");
        assert_eq!(reply.accepted.len(), 1, "{reply:?}");
        assert_eq!(reply.accepted[0].seq, seq, "inbox sequence of {body:?}");
    };

    let (mut device, _) = fixture.login(Transport::Tcp, did).await;
    push(b"one", 1).await;
    push(b"two", 2).await;
    expect_down(&mut device, 0, 1, b"one").await;
    expect_down(&mut device, 1, 2, b"two").await;
    // A DOWN_ACK with garbage unknown fields still acknowledges its seq.
    let mut head = Vec::new();
    pb_varint(&mut head, 1, 2);
    pb_bytes(&mut head, 2, b"\r\nTether-Did: victim\r\n");
    pb_bytes(&mut head, 9, &b"\r\n".repeat(20_000));
    device
        .send(&raw_frame(FrameType::DownAck, 0, &head, &[]))
        .await;
    wait_cursor(&fixture, did, 2).await;

    // DOWN_ACK u64::MAX, and one just above what was sent: refused, not closing.
    device.send(&down_ack(u64::MAX)).await;
    expect_refusal(&mut device, 2, "DOWN_ACK u64::MAX").await;
    device.send(&down_ack(3)).await;
    expect_refusal(&mut device, 2, "DOWN_ACK one above the last sent").await;
    assert_eq!(cursor_acked(&fixture, did).await, 2, "cursor unmoved");

    // The next QoS1 message keeps the device's sequence.
    push(b"three", 3).await;
    expect_down(&mut device, 2, 3, b"three").await;
    device.send(&down_ack(3)).await;
    wait_cursor(&fixture, did, 3).await;
    drop(device);

    // LOGIN resume_seq u64::MAX: logged in, told bad_request without a close.
    let mut device = RawClient::connect(Transport::Tcp, fixture.tcp).await;
    device
        .send(&login_with(&fixture, did, |l| l.resume_seq = u64::MAX))
        .await;
    let (mut logged_in, mut refused_resume) = (false, false);
    while !(logged_in && refused_resume) {
        match next_fresh(&mut device, 3).await {
            Some(Frame::LoginAck(_)) => logged_in = true,
            Some(Frame::Error { error, close }) => {
                assert_eq!(
                    error.code, BAD_REQUEST,
                    "resume_seq refusal ({})",
                    error.text
                );
                assert!(!close, "the resume refusal must not close");
                refused_resume = true;
            }
            other => panic!("LOGIN resume_seq u64::MAX: unexpected {other:?}"),
        }
    }
    device.send(&ping(b"resumed")).await;
    assert_eq!(
        next_fresh(&mut device, 3).await,
        Some(Frame::Pong(Bytes::from_static(b"resumed")))
    );
    push(b"four", 4).await;
    expect_down(&mut device, 3, 4, b"four").await;
    device.send(&down_ack(4)).await;
    wait_cursor(&fixture, did, 4).await;

    let page = http_get(state.admin_addr, "/metrics").await;
    assert_eq!(
        metric(&page, &refused("state", "ack_above_sent")),
        2,
        "refused acks counted:\n{page}"
    );
    assert_eq!(
        metric(&page, &refused("state", "resume_above_sent")),
        1,
        "refused resume counted:\n{page}"
    );
    drop(device);
    stop(fixture, state, state_stop, business_task).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 10,000 poison UPs.

/// The `n`th poison UP (1-based) and the UP_ACK code it must get: mostly sessions the
/// gateway refuses (CR/LF, oversized, separators), every tenth a valid frame with a
/// garbage var header that goes through state to the business.
fn poison(n: u64, victim: &str) -> (Bytes, u32) {
    let pad = [b'p'; 16];
    let session = match n % 10 {
        0 => return (garbage_up(n, victim, &pad), 0),
        1 => format!("evil\r\nTether-Did: {victim}"),
        2 => "\r\n".into(),
        3 => "x".repeat(65),
        4 => "a.b".into(),
        5 => ">".into(),
        6 => "evil\n".into(),
        7 => "évil".into(),
        8 => "evil\0".into(),
        _ if n % 1000 == 9 => "s".repeat(60_000),
        _ => "evil\r".into(),
    };
    (up(n, &session, &pad), BAD_REQUEST)
}

#[tokio::test]
async fn ten_thousand_poison_ups_leave_the_partition_serving() -> TestResult {
    // No frame rate limit: the attack reaches the gateway and state at full speed (with
    // the default limit the flood would be closed with rate_limited after 400 frames).
    let fixture = Fixture::start(|config| config.max_frames_per_sec = 0).await;
    let state_stop = CancellationToken::new();
    let state = start_state(&fixture, state_stop.clone()).await;
    let (business, seen) = serve_business(&fixture);
    business_ready(&fixture).await;
    let evil = "evil-dev";
    let good = same_partition(evil, "good-dev");
    assert_eq!(subjects::partition(evil), subjects::partition(&good));
    eprintln!(
        "hostile {evil} and good {good} share partition {}",
        subjects::partition(evil)
    );

    let (mut good_reader, mut good_writer) = login_split(&fixture, &good).await;
    let (mut evil_reader, mut evil_writer) = login_split(&fixture, evil).await;

    round_trip(&mut good_reader, &mut good_writer, 1).await; // warm-up
    let mut baseline = Vec::new();
    for id in 2..=21 {
        baseline.push(round_trip(&mut good_reader, &mut good_writer, id).await);
    }

    let attack_done = Arc::new(AtomicBool::new(false));
    let expected: HashMap<u64, u32> = (1..=POISON).map(|n| (n, poison(n, &good).1)).collect();
    let victim = good.clone();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let mut batch = BytesMut::new();
        for n in 1..=POISON {
            batch.extend_from_slice(&poison(n, &victim).0);
            if n % 100 == 0 {
                evil_writer.write_all(&batch).await.expect("poison written");
                batch.clear();
            }
        }
        evil_writer
    });
    let done = attack_done.clone();
    let reader = tokio::spawn(async move {
        let mut acks: HashMap<u64, u32> = HashMap::new();
        let mut others = Vec::new();
        while (acks.len() as u64) < POISON {
            match evil_reader.next(GENEROUS).await {
                Some(Frame::UpAck(ack)) => {
                    acks.insert(ack.client_msg_id, ack.code);
                }
                Some(other) => others.push(other),
                None => break,
            }
        }
        let took = started.elapsed();
        done.store(true, Ordering::SeqCst);
        (acks, others, took, evil_reader)
    });

    // Meanwhile the good device of the same partition writes on.
    let paced = paced_receipts(good_reader, &mut good_writer, &attack_done, 1_000).await;
    let _evil_writer = writer.await?;
    let (acks, others, took, _evil_reader) = reader.await?;

    eprintln!("poison attack: {POISON} UPs answered in {took:.2?}");
    eprintln!(
        "good device receipts before the attack: {}",
        summary(&baseline)
    );
    paced.print();

    assert!(
        others.is_empty(),
        "the hostile device got frames other than UP_ACK: {others:?}"
    );
    assert_eq!(
        acks.len() as u64,
        POISON,
        "every poison UP got a receipt ({} missing)",
        POISON - acks.len() as u64
    );
    for (n, code) in &expected {
        assert_eq!(acks.get(n), Some(code), "receipt code of poison UP {n}");
    }
    let refused_sessions = expected.values().filter(|c| **c == BAD_REQUEST).count() as u64;
    let garbage = POISON - refused_sessions;

    // The business saw the garbage-header UPs (as UPs without a session) and the good
    // device's, never a hostile session.
    {
        let seen = seen.lock().expect("lock");
        let from_evil: Vec<&Uplink> = seen.iter().filter(|u| u.did == evil).collect();
        assert_eq!(
            from_evil.len() as u64,
            garbage,
            "garbage UPs reached the business"
        );
        assert!(
            from_evil
                .iter()
                .all(|u| u.session.is_none() && u.msg_id % 10 == 0)
        );
        let from_good = seen.iter().filter(|u| u.did == good).count();
        assert_eq!(from_good, 1 + baseline.len() + paced.sent);
    }

    let gateway = http_get(fixture.admin, "/metrics").await;
    assert_eq!(
        metric(&gateway, &refused("gateway", "up_session")),
        refused_sessions,
        "every poison session refused and counted:\n{gateway}"
    );
    let state_page = http_get(state.admin_addr, "/metrics").await;
    assert_eq!(
        metric(&state_page, &refused("state", "up_field")),
        0,
        "no poison reached a business header:\n{state_page}"
    );
    eprintln!(
        "gateway: dropped_qos0={} errors(bad_request)={}; state uplinks stored={}",
        metric(&gateway, "tether_gateway_dropped_qos0_total"),
        metric(
            &gateway,
            "tether_gateway_errors_total{code=\"bad_request\"}"
        ),
        metric(&state_page, "tether_state_uplinks_total{result=\"stored\"}"),
    );
    stop(fixture, state, state_stop, business).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 10,000 DOWN_ACKs above anything sent.

#[tokio::test]
async fn ten_thousand_acks_above_sent_leave_the_partition_serving() -> TestResult {
    let fixture = Fixture::start(|config| config.max_frames_per_sec = 0).await;
    let state_stop = CancellationToken::new();
    let state = start_state(&fixture, state_stop.clone()).await;
    let (business_task, _) = serve_business(&fixture);
    business_ready(&fixture).await;
    let evil = "ack-flooder";
    let good = same_partition(evil, "good-dev");
    let (mut good_reader, mut good_writer) = login_split(&fixture, &good).await;
    let (mut evil_reader, mut evil_writer) = login_split(&fixture, evil).await;
    round_trip(&mut good_reader, &mut good_writer, 1).await; // warm-up
    let mut baseline = Vec::new();
    for id in 2..=21 {
        baseline.push(round_trip(&mut good_reader, &mut good_writer, id).await);
    }

    let attack_done = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let flood: Vec<u8> = (0..100).flat_map(|_| down_ack(u64::MAX).to_vec()).collect();
        for _ in 0..POISON / 100 {
            evil_writer.write_all(&flood).await.expect("acks written");
        }
        evil_writer
    });
    let done = attack_done.clone();
    let reader = tokio::spawn(async move {
        let (mut refusals, mut others) = (0u64, Vec::new());
        while refusals < POISON {
            match evil_reader.next(GENEROUS).await {
                Some(Frame::Error { error, close }) if error.code == BAD_REQUEST && !close => {
                    refusals += 1;
                }
                Some(other) => others.push(other),
                None => break,
            }
        }
        let took = started.elapsed();
        done.store(true, Ordering::SeqCst);
        (refusals, others, took, evil_reader)
    });
    let paced = paced_receipts(good_reader, &mut good_writer, &attack_done, 1_000).await;
    let mut evil_writer = writer.await?;
    let (refusals, others, took, mut evil_reader) = reader.await?;

    eprintln!("ack flood: {refusals} of {POISON} refusals received in {took:.2?}");
    eprintln!(
        "good device receipts before the attack: {}",
        summary(&baseline)
    );
    paced.print();
    let gateway = http_get(fixture.admin, "/metrics").await;
    let state_page = http_get(state.admin_addr, "/metrics").await;
    let counted = metric(&state_page, &refused("state", "ack_above_sent"));
    eprintln!(
        "state refused ack_above_sent={counted}; gateway dropped_qos0={}",
        metric(&gateway, "tether_gateway_dropped_qos0_total")
    );
    assert!(others.is_empty(), "unexpected frames: {others:?}");

    // The flooder's own sequence is intact: its next QoS1 message is seq 1.
    let business = Business::new(fixture.nats_client.clone(), APP);
    let reply = business
        .push(Push::to_dids(
            [evil],
            Bytes::from_static(b"after the flood"),
        ))
        .await?;
    assert_eq!(reply.accepted[0].seq, 1, "{reply:?}");
    loop {
        match evil_reader.next(GENEROUS).await {
            Some(Frame::Down { header, qos1, body }) => {
                assert!(qos1);
                assert_eq!(header.seq, 1);
                assert_eq!(&body[..], b"after the flood");
                break;
            }
            // Late refusals of the flood.
            Some(Frame::Error { error, close }) if error.code == BAD_REQUEST && !close => {}
            other => panic!("expected DOWN seq 1, got {other:?}"),
        }
    }
    evil_writer.write_all(&down_ack(1)).await?;
    wait_cursor(&fixture, evil, 1).await;

    assert_eq!(
        refusals, POISON,
        "every DOWN_ACK above what was sent is answered bad_request"
    );
    assert_eq!(counted, POISON, "every refusal counted");
    stop(fixture, state, state_stop, business_task).await;
    Ok(())
}
