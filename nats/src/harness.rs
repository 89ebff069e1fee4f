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
//!
//! [`single_with_accounts`] starts a node that requires authentication, with the users and
//! permissions of a multi-tenant deployment: the roles' user and one business user per app
//! confined to its app's subjects.
//!
//! ```no_run
//! # async fn run() -> Result<(), tether_nats::BusError> {
//! use tether_nats::harness;
//! let node = harness::single_with_accounts(&["chat", "live"])?;
//! let roles = tether_nats::connect_with(&node.client_url(), "state", &node.system_auth()).await?;
//! let chat = node.business_auth("chat").expect("a user per app");
//! let business = tether_nats::connect_with(&node.client_url(), "chat", &chat).await?;
//! # Ok(()) }
//! ```

use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;

use crate::connect::{BusError, NatsAuth};
use crate::server::{
    AccountSpec, ClusterSpec, NatsServer, ServerSpec, UserSpec, free_port, locate_binary,
};
use crate::subjects;

const HOST: &str = "127.0.0.1";

/// A free loopback address for a process a test starts (see [`free_port`]: outside the
/// ephemeral range, so outgoing connections cannot take it before the process binds it).
pub fn free_addr() -> Result<std::net::SocketAddr, BusError> {
    Ok(std::net::SocketAddr::from((
        [127, 0, 0, 1],
        free_port(HOST)?,
    )))
}
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

    /// How the Tether roles connect: the [`SYSTEM_USER`] on a node of
    /// [`single_with_accounts`], anonymous (empty) on a plain node.
    pub fn system_auth(&self) -> NatsAuth {
        self.user_auth(SYSTEM_USER).unwrap_or_default()
    }

    /// How the business services of `app` connect (user [`business_user`]`(app)`, with
    /// its own inbox prefix); `None` on a plain node or for an app the node was not
    /// started with.
    pub fn business_auth(&self, app: &str) -> Option<NatsAuth> {
        self.user_auth(&business_user(app))
    }

    /// The account and its users, on a node of [`single_with_accounts`].
    pub fn account(&self) -> Option<&AccountSpec> {
        self.server.spec().account.as_ref()
    }

    fn user_auth(&self, name: &str) -> Option<NatsAuth> {
        let user = self.account()?.users.iter().find(|u| u.user == name)?;
        Some(NatsAuth {
            inbox_prefix: (name != SYSTEM_USER).then(|| business_inbox_prefix(name)),
            ..NatsAuth::user_password(&user.user, &user.password)
        })
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

/// The account of [`single_with_accounts`].
pub const ACCOUNT: &str = "TETHER";

/// The user the Tether roles (gateway, state, ipconfig, ops) connect as on a node of
/// [`single_with_accounts`].
pub const SYSTEM_USER: &str = "tether";

/// The user of `app`'s business services on a node of [`single_with_accounts`].
pub fn business_user(app: &str) -> String {
    format!("biz-{app}")
}

/// The inbox prefix of a business user: its replies arrive under `<prefix>.>`, the only
/// inbox subjects it may subscribe to.
fn business_inbox_prefix(user: &str) -> String {
    format!("_INBOX.{user}")
}

/// The users and permissions of a multi-tenant deployment, for `apps`:
///
/// - [`SYSTEM_USER`] (`tether`): publish and subscribe `tether.>`, `$JS.>` (JetStream API,
///   acks, flow control), `$KV.>` and `_INBOX.>`.
/// - [`business_user`]`(app)` (`biz-<app>`) for each app: publish and subscribe
///   `tether.<app>.>` and its own inbox `_INBOX.biz-<app>.>` only, plus one reply to each
///   request it receives (`allow_responses`) (PROTOCOL.md section 11: it
///   serves `tether.<app>.biz.up` in a queue group, reads `tether.<app>.presence`, requests
///   `tether.<app>.push` and `tether.<app>.session`).
///
/// Passwords are random per call. Fails for an app id that is not a valid id or is `gw`
/// (its permission `tether.gw.>` would cover every gateway's downlink and control).
pub fn tenancy_account(apps: &[&str]) -> Result<AccountSpec, BusError> {
    let every = |names: &[&str]| names.iter().map(|s| (*s).to_string()).collect::<Vec<_>>();
    let tether_all = format!("{}.>", subjects::PREFIX);
    let system = every(&[&tether_all, "$JS.>", "$KV.>", "_INBOX.>"]);
    let mut users = vec![UserSpec {
        user: SYSTEM_USER.into(),
        password: random_password(),
        publish: system.clone(),
        subscribe: system,
        allow_responses: false,
    }];
    for app in apps {
        if !tether_schemas::bus::valid_id(app)
            || *app == subjects::GATEWAY_TOKEN
            || *app == subjects::RELAY_TOKEN
        {
            return Err(BusError::Server(format!(
                "app {app:?} cannot have a business user (not a valid id, or reserved)"
            )));
        }
        let user = business_user(app);
        let own = vec![
            subjects::app_all(app),
            format!("{}.>", business_inbox_prefix(&user)),
        ];
        users.push(UserSpec {
            subscribe: own.clone(),
            publish: own,
            allow_responses: true,
            password: random_password(),
            user,
        });
    }
    Ok(AccountSpec {
        name: ACCOUNT.into(),
        users,
    })
}

fn random_password() -> String {
    use std::hash::{BuildHasher, Hasher};
    let state = std::collections::hash_map::RandomState::new();
    let mut first = state.build_hasher();
    first.write_u8(1);
    let mut second = state.build_hasher();
    second.write_u8(2);
    format!("{:016x}{:016x}", first.finish(), second.finish())
}

/// Starts a single JetStream node that requires authentication, with the account of
/// [`tenancy_account`]`(apps)`: connect the roles with [`Single::system_auth`] and each
/// app's business services with [`Single::business_auth`]. Anonymous clients are refused.
pub fn single_with_accounts(apps: &[&str]) -> Result<Single, BusError> {
    let binary = locate_binary()?;
    let account = tenancy_account(apps)?;
    retry(|| {
        let dir = temp_dir()?;
        let mut spec = ServerSpec::single(
            "single",
            HOST,
            free_port(HOST)?,
            free_port(HOST)?,
            dir.path().join("single"),
        );
        spec.account = Some(account.clone());
        let server = NatsServer::start(spec, &binary, READY_TIMEOUT)?;
        eprintln!(
            "harness: single node with accounts ({} users) ready at {}",
            account.users.len(),
            server.client_url()
        );
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

/// A hub with two leaf-node regions, each its own JetStream domain; the leaf remotes deny
/// [`subjects::regional_only`] like the production configs.
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

    /// Region A as a peer of region B (name = domain = `region-a`).
    pub fn peer_a() -> crate::region::Region {
        crate::region::Region {
            name: Self::DOMAIN_A.into(),
            domain: Self::DOMAIN_A.into(),
        }
    }

    /// Region B as a peer of region A (name = domain = `region-b`).
    pub fn peer_b() -> crate::region::Region {
        crate::region::Region {
            name: Self::DOMAIN_B.into(),
            domain: Self::DOMAIN_B.into(),
        }
    }

    /// Client URL of region A's server.
    pub fn url_a(&self) -> String {
        self.region_a.client_url()
    }

    /// Client URL of region B's server.
    pub fn url_b(&self) -> String {
        self.region_b.client_url()
    }

    /// Cuts the link between the regions by stopping the hub (both leaf connections drop;
    /// each region keeps serving on its own).
    pub fn cut_link(&mut self) {
        eprintln!("harness: cutting the inter-region link (hub stopped)");
        self.hub.stop();
    }

    /// Restores the link: restarts the hub with its ports and store and waits until both
    /// regions are connected to it again.
    pub fn restore_link(&mut self) -> Result<(), BusError> {
        eprintln!("harness: restoring the inter-region link");
        self.hub.restart(READY_TIMEOUT)?;
        wait_leafs(&self.hub, 2)
    }
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
            // Same-named streams and buckets in both regions: their subjects stay home.
            spec.leaf_deny = subjects::regional_only();
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
