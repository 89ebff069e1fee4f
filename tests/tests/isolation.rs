//! Tenancy isolation (issue 12, item 1): a hostile business service of app A, connected
//! as NATS user `biz-app-a` (allowed only `tether.app-a.>` and its own inbox), tries every
//! way it has to reach app B, and app B's device and business service see none of it.
//!
//! Real nats-server with accounts and permissions (`harness::single_with_accounts`), a
//! gateway and a state instance connected as the `tether` user, raw device clients over
//! TCP (every frame they receive is checked), business SDK clients as `biz-app-a` and
//! `biz-app-b`.
//!
//! How "saw none of it" is proven without sleeping: after an attack, a barrier shows that
//! the attack was processed (a gateway or state counter moved, or a later message on the
//! same ordered path arrived), then app B's business pushes a canary to its device. The
//! device's next frame must be that canary: a forged frame queued for it would have come
//! first. Refusals must show in the metrics:
//! `tether_gateway_refused_total{reason=…}` (gateway) and
//! `tether_state_refused_total{reason=…}` (state).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::{ConnectOptions, Event as NatsEvent, HeaderMap};
use bytes::Bytes;
use futures::StreamExt;
use support::stack::start_state;
use support::{Fixture, GW, RawClient, http_get};
use tether_business::{Business, Push, SessionRequest, Uplink, UplinkReply};
use tether_nats::headers::{self, HeaderCodec};
use tether_nats::{NatsAuth, harness, subjects};
use tether_schemas::bus::PresenceEvent;
use tether_schemas::bus::events::{ConnEvent, Event, SessionChange};
use tether_schemas::{ErrorCode, Frame, pb};
use tether_state::RunningState;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The hostile tenant.
const A: &str = "app-a";
/// The victim tenant.
const B: &str = "app-b";
const A_DID: &str = "a-phone";
const B_DID: &str = "b-phone";
/// A session of app A with a-phone in it (recoverable: a room).
const A_ROOM: &str = "room-a";
/// A session of app B with b-phone in it (recoverable: a room).
const B_ROOM: &str = "room-b";
/// How long a barrier may take before the test gives up (generous; not a threshold).
const BARRIER: Duration = Duration::from_secs(30);

/// Everything of one isolation test.
struct Tenancy {
    fixture: Fixture,
    state_admin: SocketAddr,
    _state: RunningState,
    biz_a: Business,
    biz_b: Business,
    /// Errors the NATS server sent to `biz-app-a` (permission violations).
    a_errors: mpsc::UnboundedReceiver<String>,
    a_dev: RawClient,
    b_dev: RawClient,
    /// b-phone's connection id.
    b_conn: u64,
    /// Uplink requests served by app A's and app B's business services.
    a_uplinks: mpsc::UnboundedReceiver<Uplink>,
    b_uplinks: mpsc::UnboundedReceiver<Uplink>,
    /// Presence events of app B.
    b_presence: mpsc::UnboundedReceiver<PresenceEvent>,
    canaries: u32,
}

impl Tenancy {
    async fn start() -> Self {
        let nats = harness::single_with_accounts(&[A, B]).expect("nats-server with accounts");
        let url = nats.client_url();
        let a_auth = nats.business_auth(A).expect("user biz-app-a");
        let b_auth = nats.business_auth(B).expect("user biz-app-b");
        let system = nats.system_auth();
        let fixture = Fixture::start_on(nats, system, |_| {}).await;
        let state = start_state(&fixture, CancellationToken::new()).await;
        let (a_client, a_errors) = connect_watching(&url, &a_auth).await;
        let (b_client, _) = connect_watching(&url, &b_auth).await;
        let biz_a = Business::new(a_client, A);
        let biz_b = Business::new(b_client, B);
        let a_uplinks = serve_uplinks(&biz_a).await;
        let b_uplinks = serve_uplinks(&biz_b).await;
        let b_presence = watch_presence(&biz_b).await;

        let (a_dev, _) = fixture.login_as(A, A_DID).await;
        let (b_dev, b_ack) = fixture.login_as(B, B_DID).await;
        let mut tenancy = Tenancy {
            state_admin: state.admin_addr,
            _state: state,
            fixture,
            biz_a,
            biz_b,
            a_errors,
            a_dev,
            b_dev,
            b_conn: b_ack.conn_id,
            a_uplinks,
            b_uplinks,
            b_presence,
            canaries: 0,
        };
        // b-phone is online in app B, as its business sees it.
        let online = tokio::time::timeout(BARRIER, async {
            loop {
                match tenancy.b_presence.recv().await {
                    Some(event) if event.did == B_DID && event.online => return event,
                    Some(_) => continue,
                    None => panic!("presence stream of app B ended"),
                }
            }
        })
        .await
        .expect("b-phone reported online to app B");
        assert_eq!(online.conn, tenancy.b_conn);
        // Each device in a recoverable room of its app.
        for (business, did, room) in [
            (&tenancy.biz_a, A_DID, A_ROOM),
            (&tenancy.biz_b, B_DID, B_ROOM),
        ] {
            business
                .sessions(SessionRequest::configure(room, true))
                .await
                .expect("configure room");
            let reply = business
                .sessions(SessionRequest::bind([did], [room]))
                .await
                .expect("bind");
            assert_eq!(reply.devices, 1);
        }
        wait_members(tenancy.fixture.admin, A, A_ROOM, 1).await;
        wait_members(tenancy.fixture.admin, B, B_ROOM, 1).await;
        tenancy.canary().await;
        tenancy
    }

    /// App B's business pushes a canary to b-phone: it must be accepted (b-phone online in
    /// app B) and be b-phone's next frame (nothing forged was queued before it).
    async fn canary(&mut self) {
        self.canaries += 1;
        let body = format!("canary-{}", self.canaries);
        let reply = self
            .biz_b
            .push(Push::to_dids([B_DID], body.clone()).qos0())
            .await
            .expect("push to b-phone");
        assert!(
            reply.accepted.iter().any(|a| a.did == B_DID),
            "b-phone is no longer online in app B: push reply {reply:?}"
        );
        expect_down(&mut self.b_dev, "b-phone", body.as_bytes()).await;
    }

    /// App A's business broadcasts a marker DOWN to its own devices; it must be a-phone's
    /// next frame. Published after an attack on the same subject by the same client, so
    /// the gateway has handled the attack when a-phone sees it.
    async fn marker_a(&mut self, tag: &str) {
        self.biz_a
            .client()
            .publish(subjects::broadcast(A), down(tag.as_bytes(), ""))
            .await
            .expect("publish marker");
        expect_down(&mut self.a_dev, "a-phone", tag.as_bytes()).await;
    }

    async fn gateway_metric(&self, series: &str) -> u64 {
        metric(self.fixture.admin, series).await
    }

    async fn state_metric(&self, series: &str) -> u64 {
        metric(self.state_admin, series).await
    }

    /// Publishes as `biz-app-a` and makes sure the server has processed it.
    async fn publish_as_a(&self, subject: String, headers: HeaderMap, payload: Bytes) {
        let client = self.biz_a.client();
        client
            .publish_with_headers(subject, headers, payload)
            .await
            .expect("publish");
        tether_nats::sync_with_server(client)
            .await
            .expect("round trip");
    }

    /// b-phone's route in `tether_routes` (state's view of where it is connected).
    async fn route_of_b(&self) -> Option<serde_json::Value> {
        let routes = async_nats::jetstream::new(self.fixture.nats_client.clone())
            .get_key_value(tether_nats::layout::ROUTES_BUCKET)
            .await
            .expect("routes bucket");
        let route = routes
            .get(tether_nats::keys::route(B, B_DID))
            .await
            .expect("read route")?;
        Some(serde_json::from_slice(&route).expect("route json"))
    }

    /// Waits until gateway downlink messages reach `count` (every one handled).
    async fn wait_gateway_downlinks(&self, count: u64) {
        wait_metric(
            self.fixture.admin,
            "tether_gateway_downlink_messages_total",
            count,
        )
        .await;
    }
}

/// Connects with `auth`, reporting the server's `-ERR`s on the returned channel.
async fn connect_watching(
    url: &str,
    auth: &NatsAuth,
) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = auth
        .apply(ConnectOptions::new())
        .await
        .expect("auth settings")
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let NatsEvent::ServerError(error) = event {
                    let _ = tx.send(error.to_string());
                }
            }
        })
        .connect(url)
        .await
        .expect("business connects");
    (client, rx)
}

/// Serves `business`'s uplinks (answering `stored`) and reports each on the channel.
async fn serve_uplinks(business: &Business) -> mpsc::UnboundedReceiver<Uplink> {
    let (tx, rx) = mpsc::unbounded_channel();
    let serving = business.clone();
    tokio::spawn(async move {
        let _ = serving
            .serve_uplinks("tether-biz", move |uplink: Uplink| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(uplink);
                    UplinkReply::stored(None)
                }
            })
            .await;
    });
    tether_nats::sync_with_server(business.client())
        .await
        .expect("round trip");
    rx
}

async fn watch_presence(business: &Business) -> mpsc::UnboundedReceiver<PresenceEvent> {
    let mut events = business.presence().await.expect("presence");
    tether_nats::sync_with_server(business.client())
        .await
        .expect("round trip");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            let _ = tx.send(event);
        }
    });
    rx
}

/// Everything received so far.
fn drain<T>(channel: &mut mpsc::UnboundedReceiver<T>) -> Vec<T> {
    std::iter::from_fn(|| channel.try_recv().ok()).collect()
}

/// A QoS0 DOWN frame with `body`, in `session` when not empty.
fn down(body: &[u8], session: &str) -> Bytes {
    Frame::Down {
        header: pb::Down {
            session: session.into(),
            ..Default::default()
        },
        qos1: false,
        body: Bytes::copy_from_slice(body),
    }
    .encode()
}

/// The frames a business may not send to devices (issue 12: DOWN only).
fn control_frames() -> Vec<(&'static str, Bytes)> {
    vec![
        (
            "ERROR replaced + CLOSE",
            Frame::Error {
                error: pb::Error {
                    code: u32::from(ErrorCode::Replaced.as_u16()),
                    text: "logged in elsewhere".into(),
                    ..Default::default()
                },
                close: true,
            }
            .encode(),
        ),
        (
            "ERROR going_away",
            Frame::Error {
                error: pb::Error {
                    code: u32::from(ErrorCode::GoingAway.as_u16()),
                    text: "leave".into(),
                    retry_after_ms: 1,
                },
                close: false,
            }
            .encode(),
        ),
        (
            "REDIRECT",
            Frame::Redirect(pb::Redirect {
                endpoint: "127.0.0.1:1".into(),
                token: "stolen".into(),
                reason: "moved".into(),
            })
            .encode(),
        ),
        (
            "UP_ACK",
            Frame::UpAck(pb::UpAck {
                client_msg_id: 1,
                code: 0,
                message: String::new(),
                server_msg_id: "forged".into(),
            })
            .encode(),
        ),
    ]
}

fn header_map(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(*name, *value);
    }
    map
}

/// The next frame of `client` must be a DOWN carrying `body`.
async fn expect_down(client: &mut RawClient, who: &str, body: &[u8]) {
    match client.next_frame().await {
        Some(Frame::Down { body: got, .. }) if got == body => {}
        other => panic!(
            "{who}: expected the DOWN {:?}, got {other:?} (a forged or control frame reached it)",
            String::from_utf8_lossy(body)
        ),
    }
}

/// The sum of the samples of `series` (a metric name with its labels, as exposed) on the
/// admin server at `admin`; 0 when absent.
async fn metric(admin: SocketAddr, series: &str) -> u64 {
    let text = http_get(admin, "/metrics").await;
    text.lines()
        .filter_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .filter_map(|value| value.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Waits until `series` on `admin` reaches `at_least`.
async fn wait_metric(admin: SocketAddr, series: &str, at_least: u64) {
    let deadline = tokio::time::Instant::now() + BARRIER;
    loop {
        let have = metric(admin, series).await;
        if have >= at_least {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} on {admin} is {have}, expected at least {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Local members of `app`'s `session` on the gateway at `admin`.
async fn local_members(admin: SocketAddr, app: &str, session: &str) -> u64 {
    let response = http_get(admin, &format!("/v1/sessions/{app}/{session}")).await;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["members"].as_u64())
        .unwrap_or(0)
}

async fn wait_members(admin: SocketAddr, app: &str, session: &str, want: u64) {
    let deadline = tokio::time::Instant::now() + BARRIER;
    loop {
        let have = local_members(admin, app, session).await;
        if have == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{app}/{session}: {have} local members on the gateway, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn gateway_refused(reason: &str) -> String {
    format!("tether_gateway_refused_total{{reason=\"{reason}\"}}")
}

fn state_refused(reason: &str) -> String {
    format!("tether_state_refused_total{{reason=\"{reason}\"}}")
}

/// (a) A broadcast on A's own subject with a forged `Tether-App: app-b` (alone, with
/// b-phone as target, with B's session) reaches no device: not app B's (the subject
/// says A), nor app A's (the header disagrees with the subject).
#[tokio::test]
async fn broadcast_with_forged_app_header_reaches_no_device_of_the_other_app() {
    let mut t = Tenancy::start().await;
    let forged = down(b"forged-bcast", "");
    let in_room = down(b"forged-bcast", B_ROOM);
    let before = t.gateway_metric(&gateway_refused("foreign_app")).await;
    t.publish_as_a(
        subjects::broadcast(A),
        header_map(&[(headers::APP, B)]),
        forged.clone(),
    )
    .await;
    t.publish_as_a(
        subjects::broadcast(A),
        header_map(&[(headers::APP, B), (headers::DID, B_DID)]),
        forged,
    )
    .await;
    t.publish_as_a(
        subjects::broadcast(A),
        header_map(&[(headers::APP, B), (headers::SESSION, B_ROOM)]),
        in_room,
    )
    .await;
    t.marker_a("marker-a").await;
    t.canary().await;
    assert!(
        t.gateway_metric(&gateway_refused("foreign_app")).await >= before + 3,
        "the three forged broadcasts are counted as {}",
        gateway_refused("foreign_app")
    );
}

/// (b) Control frames (ERROR replaced with CLOSE, ERROR, REDIRECT, UP_ACK) published by a
/// business on its own broadcast and room subjects reach no device, of either app: a
/// business may send DOWN frames only.
#[tokio::test]
async fn control_frames_from_a_business_reach_no_device() {
    let mut t = Tenancy::start().await;
    let before = t.gateway_metric(&gateway_refused("frame_type")).await;
    let downlinks = t
        .gateway_metric("tether_gateway_downlink_messages_total")
        .await;
    let frames = control_frames();
    for (_, frame) in &frames {
        t.publish_as_a(subjects::broadcast(A), HeaderMap::new(), frame.clone())
            .await;
        t.publish_as_a(
            subjects::broadcast(A),
            header_map(&[(headers::APP, B)]),
            frame.clone(),
        )
        .await;
        // On the room subject, with a room sequence: only the frame type is wrong.
        t.publish_as_a(
            subjects::room(A, A_ROOM),
            header_map(&[(headers::SEQ, "1000")]),
            frame.clone(),
        )
        .await;
    }
    let published = 3 * frames.len() as u64;
    t.wait_gateway_downlinks(downlinks + published).await;
    t.marker_a("marker-a").await;
    t.canary().await;
    let refused = t.gateway_metric(&gateway_refused("frame_type")).await - before;
    assert!(
        refused >= 2 * frames.len() as u64,
        "control frames on a business's subjects are counted as {} ({refused} of {published})",
        gateway_refused("frame_type")
    );
}

/// (c) A forged uplink in A's part of the uplink stream, whose headers name app B and
/// b-phone's connection: app B's business never gets it, b-phone gets no receipt for
/// it, and state refuses it (headers that disagree with the subject) instead of serving
/// it to anyone.
#[tokio::test]
async fn forged_uplink_never_reaches_the_other_apps_business() {
    let mut t = Tenancy::start().await;
    let forged_up = Frame::Up {
        header: pb::Up {
            client_msg_id: 777,
            session: String::new(),
        },
        body: Bytes::from_static(b"forged-up"),
    }
    .encode();
    let as_b = Uplink {
        app: B.into(),
        uid: format!("u-{B_DID}"),
        did: B_DID.into(),
        msg_id: 777,
        session: None,
        gw: GW.into(),
        conn: t.b_conn,
        body: Bytes::new(),
    }
    .to_headers()
    .expect("headers");
    let before = t.state_metric(&state_refused("uplink_identity")).await;
    // On b-phone's did in A's stream subjects, and on a-phone's did with b-phone's headers.
    t.publish_as_a(subjects::uplink(A, B_DID), as_b.clone(), forged_up.clone())
        .await;
    t.publish_as_a(subjects::uplink(A, A_DID), as_b, forged_up)
        .await;

    // b-phone's own uplink is served by app B and acknowledged.
    t.b_dev
        .send(
            &Frame::Up {
                header: pb::Up {
                    client_msg_id: 1,
                    session: String::new(),
                },
                body: Bytes::from_static(b"real-up"),
            }
            .encode(),
        )
        .await;
    let real = tokio::time::timeout(BARRIER, t.b_uplinks.recv())
        .await
        .expect("app B's business gets b-phone's uplink")
        .expect("serving");
    assert_eq!(
        (
            real.app.as_str(),
            real.did.as_str(),
            real.msg_id,
            &real.body[..]
        ),
        (B, B_DID, 1, &b"real-up"[..]),
        "app B's business got a forged uplink: {real:?}"
    );
    match t.b_dev.next_frame().await {
        Some(Frame::UpAck(ack)) if ack.client_msg_id == 1 && ack.code == 0 => {}
        other => panic!("b-phone: expected UP_ACK for its uplink 1, got {other:?}"),
    }

    // Barrier: state has refused both forged uplinks. Meanwhile nobody may serve them.
    let deadline = tokio::time::Instant::now() + BARRIER;
    loop {
        if let Ok(uplink) = t.b_uplinks.try_recv() {
            panic!("app B's business got a forged uplink: {uplink:?}");
        }
        if let Ok(uplink) = t.a_uplinks.try_recv() {
            panic!(
                "a forged uplink whose headers name another app was served instead of \
                 refused: {uplink:?}"
            );
        }
        let refused = t.state_metric(&state_refused("uplink_identity")).await - before;
        if refused >= 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "state counted {refused} of 2 forged uplinks as {}",
            state_refused("uplink_identity")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // No receipt of the forged uplink reached b-phone.
    t.canary().await;
}

/// (d) Forged connection and session events in A's part of the event log, whose JSON
/// names app B and b-phone (`conn.down` with b-phone's real connection, `conn.up` moving
/// it to another gateway, `sess.replace []`, `sess.unbind`): b-phone stays online, routed
/// to its gateway, and in its session.
#[tokio::test]
async fn forged_events_do_not_touch_the_other_apps_devices() {
    let mut t = Tenancy::start().await;
    let conn = ConnEvent {
        app: B.into(),
        uid: format!("u-{B_DID}"),
        did: B_DID.into(),
        gw: GW.into(),
        region: "local".into(),
        conn: t.b_conn,
        remote: "127.0.0.1:1".into(),
        ..Default::default()
    };
    let forged = [
        (
            subjects::conn_events(A, B_DID),
            Event::ConnDown(ConnEvent {
                reason: Some("client_closed".into()),
                ..conn.clone()
            }),
        ),
        (
            subjects::conn_events(A, B_DID),
            Event::ConnUp(ConnEvent {
                gw: "gw-evil".into(),
                conn: 42,
                ..conn
            }),
        ),
        (
            subjects::session_events(A, B_DID),
            Event::SessReplace(SessionChange {
                app: B.into(),
                did: B_DID.into(),
                sessions: Vec::new(),
                at_ms: 0,
            }),
        ),
        (
            subjects::session_events(A, B_DID),
            Event::SessUnbind(SessionChange {
                app: B.into(),
                did: B_DID.into(),
                sessions: vec![B_ROOM.into()],
                at_ms: 0,
            }),
        ),
    ];
    let before = t.state_metric(&state_refused("event_identity")).await;
    for (subject, event) in &forged {
        t.publish_as_a(
            subject.clone(),
            HeaderMap::new(),
            event.to_json().expect("json"),
        )
        .await;
    }

    // Barrier: a real change of b-phone's sessions, later in the same partition's log,
    // is applied by its gateway (so every forged event before it was handled).
    t.biz_b
        .sessions(SessionRequest::bind([B_DID], ["after-forgery"]))
        .await
        .expect("bind");
    let deadline = tokio::time::Instant::now() + BARRIER;
    while local_members(t.fixture.admin, B, "after-forgery").await != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b-phone's gateway never got its new session: state no longer routes b-phone \
             to its connection (route now {:?}, presence of app B {:?})",
            t.route_of_b().await,
            drain(&mut t.b_presence)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Still in its room, on the gateway and for a session push.
    assert_eq!(
        local_members(t.fixture.admin, B, B_ROOM).await,
        1,
        "b-phone was removed from {B_ROOM} by a forged session event"
    );
    let reply = t
        .biz_b
        .push(Push::to_session(B_ROOM, "room-canary"))
        .await
        .expect("session push");
    assert_eq!(
        reply.members,
        Some(1),
        "{B_ROOM} lost its member: {reply:?}"
    );
    expect_down(&mut t.b_dev, "b-phone", b"room-canary").await;
    // Still routed to its real connection, and online.
    let route = t.route_of_b().await.expect("b-phone has a route");
    assert_eq!(
        (route["gw"].as_str(), route["conn"].as_u64()),
        (Some(GW), Some(t.b_conn)),
        "b-phone's route was changed by a forged event: {route}"
    );
    t.canary().await;
    for event in drain(&mut t.b_presence) {
        assert!(
            event.did != B_DID || event.online,
            "app B was told b-phone went offline: {event:?}"
        );
    }
    let refused = t.state_metric(&state_refused("event_identity")).await - before;
    assert!(
        refused >= forged.len() as u64,
        "state counted {refused} of {} forged events as {}",
        forged.len(),
        state_refused("event_identity")
    );
}

/// (e) A raw publish on A's room subject named like B's room, without the room sequence
/// header (with and without a forged `Tether-App: app-b`), reaches no member.
#[tokio::test]
async fn raw_room_publish_reaches_no_member_of_the_other_app() {
    let mut t = Tenancy::start().await;
    let seq_before = t.gateway_metric(&gateway_refused("room_seq")).await;
    let app_before = t.gateway_metric(&gateway_refused("foreign_app")).await;
    let downlinks = t
        .gateway_metric("tether_gateway_downlink_messages_total")
        .await;
    let forged = down(b"forged-room", B_ROOM);
    t.publish_as_a(
        subjects::room(A, B_ROOM),
        header_map(&[(headers::APP, B)]),
        forged.clone(),
    )
    .await;
    t.publish_as_a(subjects::room(A, B_ROOM), HeaderMap::new(), forged)
        .await;
    // And into A's own room without a sequence: not delivered either.
    t.publish_as_a(
        subjects::room(A, A_ROOM),
        HeaderMap::new(),
        down(b"raw-room", A_ROOM),
    )
    .await;
    t.wait_gateway_downlinks(downlinks + 3).await;
    t.marker_a("marker-a").await;
    t.canary().await;
    let by_header = t.gateway_metric(&gateway_refused("foreign_app")).await - app_before;
    let by_seq = t.gateway_metric(&gateway_refused("room_seq")).await - seq_before;
    assert!(
        by_header + by_seq >= 3,
        "raw room publishes are counted: {} {by_header}, {} {by_seq}",
        gateway_refused("foreign_app"),
        gateway_refused("room_seq")
    );
    assert!(
        by_seq >= 2,
        "room publishes without a sequence are counted as {} ({by_seq})",
        gateway_refused("room_seq")
    );
}

/// (e, continued) A raw publish into a room subject without the sequence header does not
/// reset the room's sequence: the next room push continues where the room was.
#[tokio::test]
async fn raw_room_publish_does_not_reset_the_room_sequence() {
    let mut t = Tenancy::start().await;
    let first = t
        .biz_a
        .push(Push::to_session(A_ROOM, "room-1"))
        .await
        .expect("room push");
    assert_eq!(first.mode.as_deref(), Some("room"), "{first:?}");
    let first_seq = first.room_seq.expect("room_seq");
    expect_down(&mut t.a_dev, "a-phone", b"room-1").await;

    t.publish_as_a(
        subjects::room(A, A_ROOM),
        HeaderMap::new(),
        down(b"raw-room", A_ROOM),
    )
    .await;
    let second = t
        .biz_a
        .push(Push::to_session(A_ROOM, "room-2"))
        .await
        .expect("room push");
    assert_eq!(
        second.room_seq,
        Some(first_seq + 1),
        "a raw publish without a sequence reset the room's sequence: {second:?}"
    );
    match t.a_dev.next_frame().await {
        Some(Frame::Down { header, body, .. }) if &body[..] == b"room-2" => {
            assert_eq!(header.room_seq, first_seq + 1);
        }
        other => panic!("a-phone: expected room-2, got {other:?}"),
    }
}

/// NATS itself refuses `biz-app-a` every subject of app B and of the gateways, for
/// publishing and subscribing; app B sees nothing.
#[tokio::test]
async fn the_server_refuses_another_apps_subjects() {
    let mut t = Tenancy::start().await;
    let up = Frame::Up {
        header: pb::Up {
            client_msg_id: 9,
            session: String::new(),
        },
        body: Bytes::from_static(b"x"),
    }
    .encode();
    let attempts: Vec<(String, Bytes)> = vec![
        (subjects::broadcast(B), down(b"forged", "")),
        (subjects::room(B, B_ROOM), down(b"forged", B_ROOM)),
        (subjects::push(B), Bytes::from_static(b"forged")),
        (subjects::session(B), Bytes::from_static(b"{}")),
        (subjects::uplink(B, B_DID), up),
        (
            subjects::conn_events(B, B_DID),
            Bytes::from_static(b"{\"kind\":\"conn.down\"}"),
        ),
        (subjects::gateway_down(GW), down(b"forged", "")),
        (
            subjects::gateway_ctl(GW),
            Bytes::from_static(b"{\"op\":\"sessions\"}"),
        ),
    ];
    for (subject, payload) in &attempts {
        let headers = header_map(&[(headers::APP, B), (headers::DID, B_DID)]);
        t.publish_as_a(subject.clone(), headers, payload.clone())
            .await;
        expect_violation(&mut t.a_errors, "Publish", subject).await;
    }
    for subject in [
        subjects::app_all(B),
        subjects::broadcast_all(),
        subjects::gateway_down_all(),
        "_INBOX.>".to_string(),
    ] {
        let _denied = t
            .biz_a
            .client()
            .subscribe(subject.clone())
            .await
            .expect("subscribe call");
        tether_nats::sync_with_server(t.biz_a.client())
            .await
            .expect("round trip");
        expect_violation(&mut t.a_errors, "Subscription", &subject).await;
    }
    t.canary().await;
    assert!(
        t.b_uplinks.try_recv().is_err(),
        "app B's business got an uplink"
    );
}

async fn expect_violation(errors: &mut mpsc::UnboundedReceiver<String>, kind: &str, subject: &str) {
    let error = tokio::time::timeout(BARRIER, errors.recv())
        .await
        .unwrap_or_else(|_| panic!("no permissions violation for {kind} {subject}"))
        .expect("open channel");
    assert!(
        error.to_lowercase().contains("permissions violation")
            && error.contains(kind)
            && error.contains(subject),
        "expected a permissions violation for {kind} to {subject}, got {error:?}"
    );
}
