//! Test topologies of real nats-server processes on free loopback ports.
//!
//! Each server gets its own temporary store directory; every process is stopped when its
//! topology is dropped (also on a panicking test) and killed with the thread that started
//! it if the test process dies. Starting a topology blocks until every server is ready.
//!
//! ```no_run
//! let single = tether_nats::harness::single().unwrap();
//! let url = single.client_url();
//! ```

use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;

use crate::connect::BusError;
use crate::server::{ClusterSpec, NatsServer, ServerSpec, free_port, locate_binary};

const HOST: &str = "127.0.0.1";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const START_ATTEMPTS: usize = 3;

/// One JetStream node.
pub struct Single {
    /// The server.
    pub server: NatsServer,
    _dir: TempDir,
}

impl Single {
    /// Client URL of the node.
    pub fn client_url(&self) -> String {
        self.server.client_url()
    }
}

impl Drop for Single {
    fn drop(&mut self) {
        eprintln!("harness: stopping single node {}", self.server.name());
    }
}

/// Starts a single JetStream node.
pub fn single() -> Result<Single, BusError> {
    let binary = locate_binary()?;
    retry(|| {
        let dir = temp_dir()?;
        let spec = ServerSpec::single(
            "single",
            HOST,
            free_port(HOST)?,
            free_port(HOST)?,
            dir.path().join("single"),
        );
        let server = NatsServer::start(spec, &binary, READY_TIMEOUT)?;
        eprintln!("harness: single node ready at {}", server.client_url());
        Ok(Single { server, _dir: dir })
    })
}

/// A 3-node JetStream cluster.
pub struct Cluster {
    /// The nodes, in start order.
    pub servers: Vec<NatsServer>,
    _dir: TempDir,
}

impl Cluster {
    /// A client URL listing every node (clients fail over between them).
    pub fn client_url(&self) -> String {
        self.servers
            .iter()
            .map(NatsServer::client_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Kills node `index` (SIGKILL, as a crash).
    pub fn kill(&mut self, index: usize) {
        if let Some(server) = self.servers.get_mut(index) {
            eprintln!("harness: killing cluster node {}", server.name());
            server.kill();
        }
    }

    /// Restarts node `index` with its ports and store, waiting until it is ready.
    pub fn restart(&mut self, index: usize) -> Result<(), BusError> {
        let server = self
            .servers
            .get_mut(index)
            .ok_or_else(|| BusError::Server(format!("no cluster node {index}")))?;
        eprintln!("harness: restarting cluster node {}", server.name());
        server.restart(READY_TIMEOUT)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        eprintln!("harness: stopping 3-node cluster");
    }
}

/// Starts a 3-node JetStream cluster and waits until every node is ready.
pub fn cluster3() -> Result<Cluster, BusError> {
    let binary = locate_binary()?;
    retry(|| {
        let dir = temp_dir()?;
        let route_ports = [free_port(HOST)?, free_port(HOST)?, free_port(HOST)?];
        let mut servers = Vec::with_capacity(3);
        for (i, route_port) in route_ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let mut spec = ServerSpec::single(
                &name,
                HOST,
                free_port(HOST)?,
                free_port(HOST)?,
                dir.path().join(&name),
            );
            spec.cluster = Some(ClusterSpec {
                name: "tether-test".into(),
                port: *route_port,
                routes: route_ports.to_vec(),
            });
            servers.push(NatsServer::spawn(spec, &binary)?);
        }
        for server in &mut servers {
            server.wait_ready(READY_TIMEOUT)?;
        }
        let cluster = Cluster { servers, _dir: dir };
        eprintln!("harness: 3-node cluster ready at {}", cluster.client_url());
        Ok(cluster)
    })
}

/// A hub with two leaf-node regions, each its own JetStream domain.
pub struct LeafRegions {
    /// The hub (JetStream domain `hub`).
    pub hub: NatsServer,
    /// Region A (JetStream domain `region-a`), a leaf of the hub.
    pub region_a: NatsServer,
    /// Region B (JetStream domain `region-b`), a leaf of the hub.
    pub region_b: NatsServer,
    _dir: TempDir,
}

impl LeafRegions {
    /// JetStream domain of region A.
    pub const DOMAIN_A: &'static str = "region-a";
    /// JetStream domain of region B.
    pub const DOMAIN_B: &'static str = "region-b";
    /// JetStream domain of the hub.
    pub const DOMAIN_HUB: &'static str = "hub";
}

impl Drop for LeafRegions {
    fn drop(&mut self) {
        eprintln!("harness: stopping hub and leaf regions");
    }
}

/// Starts a hub and two leaf regions, and waits until both leaves are connected to the hub.
pub fn leaf_regions() -> Result<LeafRegions, BusError> {
    let binary = locate_binary()?;
    retry(|| {
        let dir = temp_dir()?;
        let leaf_port = free_port(HOST)?;
        let mut hub_spec = ServerSpec::single(
            "hub",
            HOST,
            free_port(HOST)?,
            free_port(HOST)?,
            dir.path().join("hub"),
        );
        hub_spec.domain = Some(LeafRegions::DOMAIN_HUB.into());
        hub_spec.leaf_listen = Some(leaf_port);
        let hub = NatsServer::start(hub_spec, &binary, READY_TIMEOUT)?;
        let leaf = |name: &str, domain: &str| -> Result<NatsServer, BusError> {
            let mut spec = ServerSpec::single(
                name,
                HOST,
                free_port(HOST)?,
                free_port(HOST)?,
                dir.path().join(name),
            );
            spec.domain = Some(domain.into());
            spec.leaf_remotes = vec![leaf_port];
            NatsServer::start(spec, &binary, READY_TIMEOUT)
        };
        let region_a = leaf("region-a", LeafRegions::DOMAIN_A)?;
        let region_b = leaf("region-b", LeafRegions::DOMAIN_B)?;
        wait_leafs(&hub, 2)?;
        eprintln!(
            "harness: hub {} with leaf regions {} and {} ready",
            hub.client_url(),
            region_a.client_url(),
            region_b.client_url()
        );
        Ok(LeafRegions {
            hub,
            region_a,
            region_b,
            _dir: dir,
        })
    })
}

/// Waits until the hub's `/leafz` lists `count` leaf connections.
fn wait_leafs(hub: &NatsServer, count: usize) -> Result<(), BusError> {
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    let needle = "\"leafnodes\":";
    while std::time::Instant::now() < deadline {
        if let Some(body) = http_get(&hub.spec().host, hub.spec().http_port, "/leafz") {
            let compact: String = body.split_whitespace().collect();
            if let Some(rest) = compact.split(needle).nth(1) {
                let n: String = rest.chars().take_while(char::is_ascii_digit).collect();
                if n.parse::<usize>().unwrap_or(0) >= count {
                    return Ok(());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(BusError::Server(format!(
        "hub saw fewer than {count} leaf connections"
    )))
}

fn http_get(host: &str, port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect((host, port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    Some(body)
}

fn temp_dir() -> Result<TempDir, BusError> {
    tempfile::Builder::new()
        .prefix("tether-nats-")
        .tempdir()
        .map_err(|e| BusError::Server(format!("temp dir: {e}")))
}

/// Retries a topology start a few times: a free port found by binding port 0 can be taken
/// by another test before the server binds it.
fn retry<T>(mut start: impl FnMut() -> Result<T, BusError>) -> Result<T, BusError> {
    let mut last = None;
    for attempt in 1..=START_ATTEMPTS {
        match start() {
            Ok(topology) => return Ok(topology),
            Err(error) => {
                eprintln!("harness: start attempt {attempt} failed: {error}");
                last = Some(error);
            }
        }
    }
    Err(last.unwrap_or_else(|| BusError::Server("no start attempt".into())))
}

/// The directory of a temp store, for tests that want to inspect it.
pub fn store_dir(server: &NatsServer) -> &Path {
    &server.spec().store_dir
}
