//! The harness node with accounts enforces what a multi-tenant deployment relies on:
//! anonymous clients are refused, the roles' user runs the bus layout, a business user
//! reaches its own app's subjects and its own inbox only, and can answer requests.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use async_nats::{ConnectOptions, Event};
use bytes::Bytes;
use futures::StreamExt;
use tether_nats::{NatsAuth, harness, subjects};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

/// Connects with `auth`, reporting the server's `-ERR`s (permission violations) on the
/// returned channel.
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
                if let Event::ServerError(error) = event {
                    let _ = tx.send(error.to_string());
                }
            }
        })
        .connect(url)
        .await
        .expect("connect");
    (client, rx)
}

async fn expect_violation(errors: &mut mpsc::UnboundedReceiver<String>, subject: &str) {
    let error = tokio::time::timeout(WAIT, errors.recv())
        .await
        .expect("a server error in time")
        .expect("open channel");
    let lower = error.to_lowercase();
    assert!(
        lower.contains("permissions violation") && error.contains(subject),
        "expected a permissions violation for {subject}, got {error:?}"
    );
}

#[tokio::test]
async fn accounts_confine_business_users_to_their_app() {
    let node = harness::single_with_accounts(&["app-a", "app-b"]).expect("nats-server");
    let url = node.client_url();

    // No credentials, or wrong ones: refused.
    assert!(tether_nats::connect(&url, "anonymous").await.is_err());
    let wrong = NatsAuth::user_password(harness::SYSTEM_USER, "not-the-password");
    assert!(
        tether_nats::connect_with(&url, "wrong", &wrong)
            .await
            .is_err()
    );
    assert!(node.business_auth("app-c").is_none());

    // The roles' user creates and uses the streams and buckets.
    let system = tether_nats::connect_with(&url, "roles", &node.system_auth())
        .await
        .expect("system user connects");
    let js = async_nats::jetstream::new(system.clone());
    tether_nats::ensure_layout(&js, &tether_nats::BusLayout::default())
        .await
        .expect("layout as the system user");

    let a_auth = node.business_auth("app-a").expect("biz-app-a");
    assert_eq!(a_auth.user.as_deref(), Some("biz-app-a"));
    let (biz_a, mut a_errors) = connect_watching(&url, &a_auth).await;
    let biz_b = tether_nats::connect_with(&url, "biz-b", &node.business_auth("app-b").unwrap())
        .await
        .expect("biz-app-b connects");

    // biz-a serves its uplink requests and answers the system user (allow_responses).
    let mut served = biz_a
        .queue_subscribe(subjects::business_up("app-a"), "tether-biz".into())
        .await
        .unwrap();
    tether_nats::sync_with_server(&biz_a).await.unwrap();
    let responder = biz_a.clone();
    tokio::spawn(async move {
        while let Some(request) = served.next().await {
            if let Some(reply) = request.reply {
                let _ = responder.publish(reply, Bytes::from_static(b"ok")).await;
            }
        }
    });
    let answer = tokio::time::timeout(
        WAIT,
        system.request(subjects::business_up("app-a"), Bytes::from_static(b"up")),
    )
    .await
    .expect("in time")
    .expect("biz-a answers a request of the system user");
    assert_eq!(&answer.payload[..], b"ok");

    // The system user answers biz-a's requests into biz-a's own inbox.
    let mut pushes = system.subscribe(subjects::push_all()).await.unwrap();
    tether_nats::sync_with_server(&system).await.unwrap();
    let server_side = system.clone();
    tokio::spawn(async move {
        while let Some(request) = pushes.next().await {
            if let Some(reply) = request.reply {
                assert!(reply.starts_with("_INBOX.biz-app-a."), "reply {reply}");
                let _ = server_side
                    .publish(reply, Bytes::from_static(b"accepted"))
                    .await;
            }
        }
    });
    let answer = tokio::time::timeout(
        WAIT,
        biz_a.request(subjects::push("app-a"), Bytes::from_static(b"push")),
    )
    .await
    .expect("in time")
    .expect("the system user answers biz-a");
    assert_eq!(&answer.payload[..], b"accepted");

    // biz-a may not publish into app-b: the server refuses and app-b sees nothing.
    let mut b_sees = biz_b.subscribe(subjects::push("app-b")).await.unwrap();
    tether_nats::sync_with_server(&biz_b).await.unwrap();
    biz_a
        .publish(subjects::push("app-b"), Bytes::from_static(b"forged"))
        .await
        .unwrap();
    biz_a.flush().await.unwrap();
    expect_violation(&mut a_errors, &subjects::push("app-b")).await;
    // A message that biz-b publishes itself arrives; the forged one before it did not.
    biz_b
        .publish(subjects::push("app-b"), Bytes::from_static(b"own"))
        .await
        .unwrap();
    let first = tokio::time::timeout(WAIT, b_sees.next())
        .await
        .expect("in time")
        .expect("message");
    assert_eq!(&first.payload[..], b"own", "app-b got biz-a's publish");

    // Nor subscribe to app-b, nor read other clients' replies under `_INBOX.>`.
    let _denied = biz_a.subscribe(subjects::app_all("app-b")).await.unwrap();
    expect_violation(&mut a_errors, &subjects::app_all("app-b")).await;
    let _denied = biz_a.subscribe("_INBOX.>").await.unwrap();
    expect_violation(&mut a_errors, "_INBOX.>").await;
}

#[test]
fn reserved_and_invalid_app_ids_get_no_business_user() {
    assert!(harness::tenancy_account(&["gw"]).is_err());
    assert!(harness::tenancy_account(&["a.b"]).is_err());
    let account = harness::tenancy_account(&["chat"]).unwrap();
    let users: Vec<&str> = account.users.iter().map(|u| u.user.as_str()).collect();
    assert_eq!(users, [harness::SYSTEM_USER, "biz-chat"]);
}

#[test]
fn auth_settings_are_checked() {
    assert!(NatsAuth::default().validate().is_ok());
    assert!(NatsAuth::default().is_empty());
    assert!(NatsAuth::user_password("u", "p").validate().is_ok());
    let two_ways = NatsAuth {
        token: Some("t".into()),
        ..NatsAuth::user_password("u", "p")
    };
    assert!(two_ways.validate().is_err());
    let no_password = NatsAuth {
        user: Some("u".into()),
        ..NatsAuth::default()
    };
    assert!(no_password.validate().is_err());
    let cert_without_key = NatsAuth {
        tls_cert_file: Some("c.pem".into()),
        ..NatsAuth::default()
    };
    assert!(cert_without_key.validate().is_err());
    let bad_prefix = NatsAuth {
        inbox_prefix: Some("_INBOX.*".into()),
        ..NatsAuth::default()
    };
    assert!(bad_prefix.validate().is_err());
    let debug = format!("{:?}", NatsAuth::user_password("u", "secret-pw"));
    assert!(!debug.contains("secret-pw"), "{debug}");
}

#[test]
fn auth_deserializes_and_refuses_unknown_fields() {
    #[derive(serde::Deserialize)]
    struct Outer {
        nats: NatsAuth,
    }
    let parsed: Outer = serde_json::from_str(
        r#"{"nats":{"creds_file":"/etc/t.creds","tls_ca_file":"/etc/ca.pem"}}"#,
    )
    .unwrap();
    assert_eq!(
        parsed.nats.creds_file.as_deref(),
        Some(std::path::Path::new("/etc/t.creds"))
    );
    assert!(
        serde_json::from_str::<Outer>(r#"{"nats":{"credz":"x"}}"#).is_err(),
        "unknown fields are refused"
    );
}
