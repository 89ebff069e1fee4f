//! Two state instances as real processes (`tether state`); one is killed with SIGKILL in
//! the middle of a stream of QoS1 pushes and uplinks. Every message is still delivered and
//! every uplink acknowledged, exactly once to the app.

#[path = "../../tests/tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use support::stack::{device, next_message};
use support::{APP, Fixture, TestResult, WAIT};
use tether_business::{Business, Push, UplinkReply};

struct StateProcess {
    child: Child,
    admin: std::net::SocketAddr,
}

impl Drop for StateProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_state(nats_url: &str, name: &str) -> StateProcess {
    let admin = tether_nats::harness::free_addr().expect("free port");
    let child = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["state", "--nats", nats_url, "--admin", &admin.to_string()])
        .env("TETHER_STATE_INSTANCE_ID", name)
        .env("TETHER_STATE_LEASE_TTL_MS", "1000")
        .env("TETHER_STATE_RETRANSMIT_MS", "500")
        .env("TETHER_STATE_RECONNECT_WINDOW_MS", "2000")
        .env("TETHER_STATE_BUSINESS_TIMEOUT_MS", "1000")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("tether state starts");
    StateProcess { child, admin }
}

async fn partitions_owned(admin: std::net::SocketAddr) -> Option<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(admin).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("tether_state_partitions "))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn killing_one_of_two_state_instances_loses_nothing() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let url = fixture.nats.client_url();
    let mut a = Some(spawn_state(&url, "state-a"));
    let mut b = Some(spawn_state(&url, "state-b"));
    // Both instances hold a share of the 32 partitions before the traffic starts.
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    loop {
        let owned_a = partitions_owned(a.as_ref().expect("a").admin)
            .await
            .unwrap_or(0);
        let owned_b = partitions_owned(b.as_ref().expect("b").admin)
            .await
            .unwrap_or(0);
        if owned_a > 0 && owned_b > 0 && owned_a + owned_b == 32 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "partitions not shared: {owned_a} + {owned_b}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The business stores uplinks idempotently: (did, msg id) → times requested.
    let business = Business::new(fixture.nats_client.clone(), APP);
    let stored: Arc<Mutex<HashMap<(String, u64), u32>>> = Arc::default();
    let log = stored.clone();
    let serving = business.clone();
    tokio::spawn(async move {
        let _ = serving
            .serve_uplinks("tether-biz", move |uplink| {
                let log = log.clone();
                async move {
                    *log.lock()
                        .expect("lock")
                        .entry((uplink.did.clone(), uplink.msg_id))
                        .or_default() += 1;
                    UplinkReply::stored(None)
                }
            })
            .await;
    });

    let (receiver, mut inbox) = device(&fixture, fixture.tcp, "receiver").await;
    let (sender, _events) = device(&fixture, fixture.tcp, "sender").await;
    let pushing = tokio::spawn({
        let business = business.clone();
        async move {
            for i in 1..=300u64 {
                let mut attempts = 0;
                // A push request that lands on the dying instance may go unanswered: retry
                // the same push (same Tether-Push-Id), which stores nothing new.
                let push = Push::to_dids(["receiver"], i.to_string().into_bytes());
                loop {
                    match business.push(push.clone()).await {
                        Ok(_) => break,
                        Err(error) => {
                            attempts += 1;
                            assert!(attempts < 10, "push {i} never accepted: {error}");
                        }
                    }
                }
            }
        }
    });
    let sending = tokio::spawn(async move {
        for i in 0..100u32 {
            sender
                .send(Bytes::from(format!("up {i}")))
                .await
                .expect("every uplink acknowledged");
        }
    });

    // The victim is the instance that owns the receiver's partition right now.
    let js = async_nats::jetstream::new(fixture.nats_client.clone());
    let leases = js.get_key_value("tether_leases").await?;
    let partition = tether_nats::subjects::partition("receiver");
    let owner = leases
        .get(format!("part.{partition}"))
        .await?
        .map(|v| String::from_utf8_lossy(&v).to_string());
    let mut first = if owner.as_deref() == Some("state-b") {
        b.take()
    } else {
        a.take()
    };
    let _survivor = (a, b);

    let mut bodies = Vec::new();
    while bodies.len() < 300 {
        let (_, body) = next_message(&mut inbox).await;
        bodies.push(String::from_utf8(body)?);
        if bodies.len() == 100
            && let Some(mut victim) = first.take()
        {
            victim.child.kill()?; // SIGKILL: no lease release, no cleanup
            let _ = victim.child.wait();
        }
    }
    pushing.await?;
    sending.await?;
    drop(receiver);
    // Retried pushes carry their push id: the app gets every push exactly once, in order
    // (bodies are compared as they arrived, nothing de-duplicated).
    let expected: Vec<String> = (1..=300).map(|i: u64| i.to_string()).collect();
    assert_eq!(
        bodies, expected,
        "every push delivered exactly once, in order"
    );
    let stored = stored.lock().expect("lock");
    assert_eq!(
        stored.len(),
        100,
        "each uplink stored once by the idempotent business"
    );
    Ok(())
}
