//! The business API (PROTOCOL.md section 11) against a real nats-server: the Rust SDK
//! (`tether-business`) and the Python example service (`examples/chat_service.py`).
//!
//! There is no state service here: each test plays state with a plain NATS client, sending
//! uplink requests on `tether.<app>.biz.up` and answering pushes on `tether.<app>.push`.
//! Timeouts only guard against hangs.

mod support;

use std::time::Duration;

use async_nats::{HeaderMap, Message};
use bytes::Bytes;
use futures::StreamExt;
use support::python::{PythonService, Res};
use support::{APP, TestResult, WAIT};
use tether_business::wire::headers;
use tether_business::{
    Business, BusinessError, ErrorCode, HeaderCodec, PresenceEvent, Push, Uplink, UplinkReply,
};
use tether_nats::harness;
use tether_nats::subjects;
use tokio::sync::mpsc;
use tokio::time::timeout;

fn uplink_headers(uid: &str, did: &str, msg_id: u64, session: Option<&str>) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.insert(headers::APP, APP);
    map.insert(headers::UID, uid);
    map.insert(headers::DID, did);
    map.insert(headers::MSG_ID, msg_id.to_string().as_str());
    if let Some(session) = session {
        map.insert(headers::SESSION, session);
    }
    map.insert(headers::GATEWAY, "gw1");
    map.insert(headers::CONN, "4295032833");
    map
}

/// Sends an uplink request as state does, retrying while nobody is subscribed yet.
async fn request_uplink(
    nats: &async_nats::Client,
    map: HeaderMap,
    body: &'static [u8],
) -> Res<Message> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let sent = nats
            .request_with_headers(
                subjects::business_up(APP),
                map.clone(),
                Bytes::from_static(body),
            )
            .await;
        match sent {
            Ok(reply) => return Ok(reply),
            Err(error)
                if error.kind() == async_nats::RequestErrorKind::NoResponders
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

fn json(message: &Message) -> Res<serde_json::Value> {
    Ok(serde_json::from_slice(&message.payload)?)
}

fn header<'a>(message: &'a Message, name: &str) -> Option<&'a str> {
    message.headers.as_ref()?.get(name).map(|v| v.as_str())
}

#[tokio::test]
async fn sdk_serves_uplinks() -> TestResult {
    let node = harness::single()?;
    let nats = tether_nats::connect(&node.client_url(), "biz-test-state").await?;
    let biz = Business::new(
        tether_nats::connect(&node.client_url(), "biz-test-service").await?,
        APP,
    );

    let (seen_tx, mut seen) = mpsc::unbounded_channel::<Uplink>();
    let server = tokio::spawn(async move {
        biz.serve_uplinks("tether-biz", move |up: Uplink| {
            let seen_tx = seen_tx.clone();
            async move {
                let answer = if up.body.as_ref() == b"bad" {
                    UplinkReply::rejected("nope")
                } else {
                    UplinkReply::stored(Some(format!("id-{}", up.msg_id)))
                };
                let _ = seen_tx.send(up);
                answer
            }
        })
        .await
    });

    // Stored, with every header decoded.
    let reply = request_uplink(
        &nats,
        uplink_headers("alice", "phone1", 7, Some("room-1")),
        b"hello",
    )
    .await?;
    assert_eq!(
        json(&reply)?,
        serde_json::json!({"status": "stored", "id": "id-7"})
    );
    let up = timeout(WAIT, seen.recv())
        .await?
        .ok_or("handler not called")?;
    assert_eq!(
        up,
        Uplink {
            app: APP.into(),
            uid: "alice".into(),
            did: "phone1".into(),
            msg_id: 7,
            session: Some("room-1".into()),
            gw: "gw1".into(),
            conn: 4_295_032_833,
            body: Bytes::from_static(b"hello"),
        }
    );

    // Refused by the handler; no session header.
    let reply = request_uplink(&nats, uplink_headers("alice", "phone1", 8, None), b"bad").await?;
    assert_eq!(
        json(&reply)?,
        serde_json::json!({"status": "error", "code": "rejected", "message": "nope"})
    );
    let up = timeout(WAIT, seen.recv())
        .await?
        .ok_or("handler not called")?;
    assert_eq!(up.session, None);

    // Malformed request: answered bad_request by the SDK, the handler never sees it.
    let mut map = uplink_headers("alice", "phone1", 9, None);
    map.insert(headers::MSG_ID, "nine");
    let reply = request_uplink(&nats, map, b"x").await?;
    let answer = json(&reply)?;
    assert_eq!(answer["status"], "error");
    assert_eq!(answer["code"], "bad_request");
    assert!(seen.try_recv().is_err());

    server.abort();
    Ok(())
}

#[tokio::test]
async fn sdk_pushes_and_reads_presence() -> TestResult {
    let node = harness::single()?;
    let nats = tether_nats::connect(&node.client_url(), "biz-test").await?;
    // One connection for both roles: the server handles a connection's SUB before its
    // later PUBs, so no push or presence event can race ahead of the test's subscriptions.
    let biz = Business::new(nats.clone(), APP);
    let mut pushes = nats.subscribe(subjects::push(APP)).await?;
    nats.flush().await?;

    // QoS1 to users (chosen explicitly), with session and meta; state answers with
    // accepted devices.
    let push = Push::to_uids(["alice", "bob"], "hi")
        .qos1()
        .session("room-1")
        .meta("Kind", "chat");
    let sending = tokio::spawn({
        let biz = biz.clone();
        async move { biz.push(push).await }
    });
    let request = timeout(WAIT, pushes.next()).await?.ok_or("no push")?;
    assert_eq!(request.payload.as_ref(), b"hi");
    assert_eq!(header(&request, headers::UID), Some("alice,bob"));
    assert_eq!(header(&request, headers::DID), None);
    assert_eq!(header(&request, headers::QOS), Some("1"));
    assert_eq!(header(&request, headers::SESSION), Some("room-1"));
    assert_eq!(header(&request, "Tether-Meta-kind"), Some("chat"));
    // What state would decode from it.
    let decoded = Push::from_message(request.headers.as_ref(), request.payload.clone())?;
    assert_eq!(decoded.uids, ["alice", "bob"]);
    assert_eq!(decoded.qos1, Some(true));
    // Without .qos1()/.qos0() no Tether-Qos is sent: the app's qos_default decides.
    let default_qos = Push::to_dids(["d1"], "x").to_headers()?;
    assert_eq!(default_qos.get(headers::QOS), None);
    assert_eq!(decoded.meta.get("kind").map(String::as_str), Some("chat"));
    nats.publish(
        request.reply.clone().ok_or("push without reply subject")?,
        Bytes::from_static(
            br#"{"accepted":[{"did":"a1","seq":12},{"did":"b1","seq":3}],"offline":[]}"#,
        ),
    )
    .await?;
    let reply = timeout(WAIT, sending).await???;
    assert_eq!(reply.accepted.len(), 2);
    assert_eq!(
        (reply.accepted[0].did.as_str(), reply.accepted[0].seq),
        ("a1", 12)
    );
    assert!(reply.offline.is_empty());

    // QoS0 to devices; state refuses it.
    let sending = tokio::spawn({
        let biz = biz.clone();
        async move { biz.push(Push::to_dids(["d1", "d2"], "typing").qos0()).await }
    });
    let request = timeout(WAIT, pushes.next()).await?.ok_or("no push")?;
    assert_eq!(header(&request, headers::DID), Some("d1,d2"));
    assert_eq!(header(&request, headers::QOS), Some("0"));
    nats.publish(
        request.reply.clone().ok_or("push without reply subject")?,
        Bytes::from_static(br#"{"error":{"code":"not_found","message":"no such device"}}"#),
    )
    .await?;
    match timeout(WAIT, sending).await?? {
        Err(BusinessError::Refused(ErrorCode::NotFound, message)) => {
            assert_eq!(message, "no such device")
        }
        other => return Err(format!("expected a refusal, got {other:?}").into()),
    }

    // Invalid pushes never leave the SDK.
    for bad in [
        Push::to_dids(Vec::<String>::new(), "x"),
        Push::to_dids(["not.a.did"], "x"),
    ] {
        match biz.push(bad).await {
            Err(BusinessError::Refused(ErrorCode::BadRequest, _)) => {}
            other => return Err(format!("expected bad_request, got {other:?}").into()),
        }
    }

    // Fire and forget.
    biz.push_nowait(Push::to_dids(["d3"], "later")).await?;
    let request = timeout(WAIT, pushes.next()).await?.ok_or("no push")?;
    assert_eq!(header(&request, headers::DID), Some("d3"));
    assert_eq!(request.payload.as_ref(), b"later");

    // Presence: what state publishes comes out as typed events.
    let mut presence = biz.presence().await?;
    nats.publish(subjects::presence(APP), Bytes::from_static(b"not json"))
        .await?;
    nats.publish(
        subjects::presence(APP),
        Bytes::from_static(
            br#"{"app":"demo","uid":"alice","did":"phone1","gw":"gw1","conn":4295032833,"online":true,"at_ms":1795686000000}"#,
        ),
    )
    .await?;
    let event = timeout(WAIT, presence.next()).await?.ok_or("no presence")?;
    assert_eq!(
        event,
        PresenceEvent {
            app: APP.into(),
            uid: "alice".into(),
            did: "phone1".into(),
            gw: "gw1".into(),
            conn: 4_295_032_833,
            online: true,
            at_ms: 1_795_686_000_000,
        }
    );
    Ok(())
}

#[tokio::test]
async fn python_example_stores_idempotently_and_pushes() -> TestResult {
    let node = harness::single()?;
    let nats = tether_nats::connect(&node.client_url(), "biz-test-state").await?;
    let mut pushes = nats.subscribe(subjects::push(APP)).await?;
    nats.flush().await?;
    let mut service = PythonService::start(&node.client_url()).await?;

    // A chat message to bob: stored, then pushed QoS1 to every device of bob.
    let chat: &[u8] = br#"{"to_uid":"bob","text":"hi bob"}"#;
    let reply = request_uplink(&nats, uplink_headers("alice", "phone1", 7, None), chat).await?;
    let answer = json(&reply)?;
    assert_eq!(answer["status"], "stored", "{answer}");
    let id = answer["id"].as_str().ok_or("no id")?.to_owned();

    let push = timeout(WAIT, pushes.next()).await?.ok_or("no push")?;
    assert_eq!(header(&push, headers::UID), Some("bob"));
    assert_eq!(header(&push, headers::DID), None);
    assert_eq!(header(&push, headers::QOS), Some("1"));
    assert_eq!(
        json(&push)?,
        serde_json::json!({"from_uid": "alice", "text": "hi bob"})
    );
    nats.publish(
        push.reply
            .clone()
            .ok_or("python pushed without waiting for a reply")?,
        Bytes::from_static(br#"{"accepted":[],"offline":[]}"#),
    )
    .await?;
    service.expect("pushed uid=bob").await?;

    // The same msg id again (state retrying): stored again with the same id, no new push.
    let reply = request_uplink(&nats, uplink_headers("alice", "phone1", 7, None), chat).await?;
    assert_eq!(
        json(&reply)?,
        serde_json::json!({"status": "stored", "id": id})
    );
    service.expect("duplicate did=phone1 msg_id=7").await?;

    // Anything else is echoed to the sender's device.
    let reply = request_uplink(
        &nats,
        uplink_headers("alice", "phone1", 8, None),
        b"echo me",
    )
    .await?;
    assert_eq!(json(&reply)?["status"], "stored");
    let push = timeout(WAIT, pushes.next()).await?.ok_or("no echo push")?;
    // Had the retry above pushed again, that push would arrive here first.
    assert_eq!(header(&push, headers::DID), Some("phone1"));
    assert_eq!(header(&push, headers::UID), None);
    assert_eq!(header(&push, headers::QOS), Some("1"));
    assert_eq!(push.payload.as_ref(), b"echo me");
    nats.publish(
        push.reply.clone().ok_or("no reply subject")?,
        Bytes::from_static(br#"{"accepted":[{"did":"phone1","seq":1}],"offline":[]}"#),
    )
    .await?;
    service.expect("pushed did=phone1").await?;

    // SIGTERM: a clean exit.
    let pid = service.child.id().ok_or("child already gone")?;
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    assert!(killed.success());
    let status = timeout(WAIT, service.child.wait()).await??;
    assert!(status.success(), "chat_service.py exited with {status}");
    Ok(())
}

/// State asks again when an answer was lost (a NATS node restarting drops replies) or a
/// device resends after a timeout: the handler still sees each `(did, msg_id)` once. A
/// repeat while it runs waits for its answer, a later repeat gets the stored answer; an
/// error answer is not kept, so a resend is tried again.
#[tokio::test]
async fn repeats_of_one_uplink_reach_the_handler_once() -> TestResult {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let node = harness::single()?;
    let nats = tether_nats::connect(&node.client_url(), "biz-test-state").await?;
    let biz = Business::new(
        tether_nats::connect(&node.client_url(), "biz-test-service").await?,
        APP,
    );
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let server = tokio::spawn(async move {
        biz.serve_uplinks("tether-biz", move |up: Uplink| {
            let calls = counted.clone();
            async move {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                // A slow store: repeats arrive while it runs.
                tokio::time::sleep(Duration::from_millis(300)).await;
                if up.msg_id == 2 && n == 2 {
                    UplinkReply::error(tether_schemas::ErrorCode::Unavailable, "store down")
                } else {
                    UplinkReply::stored(Some(format!("id-{}-{n}", up.msg_id)))
                }
            }
        })
        .await
    });

    // Three at once, then one more after the answer.
    let headers = || uplink_headers("alice", "phone1", 1, None);
    let first = request_uplink(&nats, headers(), b"hello").await?;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let repeats =
        futures::future::join_all((0..3).map(|_| request_uplink(&nats, headers(), b"hello"))).await;
    let later = request_uplink(&nats, headers(), b"hello").await?;
    for reply in repeats {
        assert_eq!(json(&reply?)?, json(&first)?);
    }
    assert_eq!(json(&later)?, json(&first)?);
    assert_eq!(
        json(&first)?,
        serde_json::json!({"status": "stored", "id": "id-1-0"})
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one call for msg 1");

    // Concurrent repeats while the first runs share its answer.
    let together = futures::future::join_all(
        (0..3).map(|_| request_uplink(&nats, uplink_headers("alice", "phone1", 3, None), b"x")),
    )
    .await;
    let answers: Vec<serde_json::Value> = together
        .into_iter()
        .map(|reply| json(&reply?))
        .collect::<Res<_>>()?;
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one call for msg 3");

    // An error answer is not kept: the resend is handled again and stored.
    let refused = request_uplink(&nats, uplink_headers("alice", "phone1", 2, None), b"y").await?;
    assert_eq!(json(&refused)?["code"], "unavailable");
    let stored = request_uplink(&nats, uplink_headers("alice", "phone1", 2, None), b"y").await?;
    assert_eq!(json(&stored)?["status"], "stored");
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    server.abort();
    Ok(())
}
