//! Two regions on this machine, for `tether bench p2p --regions 2` (docs/multi-region.md):
//! a hub nats-server and two leaf regions, each its own JetStream domain with leaf remotes
//! that deny the regional-only subjects ([`tether_nats::harness::leaf_regions`], the
//! topology of the multi-region tests), and in each region a `tether gateway` and a
//! `tether state` process (state peering with the other region). Both regions' gateways
//! verify tokens of one key. Everything is stopped on drop: the roles, then the servers.

use serde::Serialize;
use tether_nats::harness::{self, LeafRegions};

use crate::BenchError;
use crate::stack::{self, RegionRoles, Stack, StackSpec};

/// Pushes relayed from region A to region B, read from both states' counters
/// (`tether_state_relay_out_total` of A, `tether_state_relay_in_total` of B).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Relayed {
    /// Appended to A's relay stream.
    pub out_of_a: u64,
    /// Delivered in B from its relay input.
    pub into_b: u64,
}

impl Relayed {
    /// What was counted between `before` and `self`.
    pub fn since(self, before: Relayed) -> Relayed {
        Relayed {
            out_of_a: self.out_of_a.saturating_sub(before.out_of_a),
            into_b: self.into_b.saturating_sub(before.into_b),
        }
    }
}

/// The hub, both regions' nats-servers and their roles.
pub struct TwoRegions {
    /// Region A's gateway and state (domain `region-a`).
    pub a: Stack,
    /// Region B's gateway and state (domain `region-b`), same token key as A.
    pub b: Stack,
    /// Declared last: dropped after the roles that use it.
    _nats: LeafRegions,
}

impl TwoRegions {
    /// Name of region A (also its JetStream domain).
    pub const A: &'static str = LeafRegions::DOMAIN_A;
    /// Name of region B (also its JetStream domain).
    pub const B: &'static str = LeafRegions::DOMAIN_B;

    /// Starts the hub and the regions (waiting until both leaf links are up), then A's
    /// roles, then B's. A first: B's state sources A's relay stream, which exists once
    /// A's state has started, so the A → B direction needs no source retry.
    pub async fn start() -> Result<TwoRegions, BenchError> {
        let nats = harness::leaf_regions()
            .map_err(|e| BenchError::Setup(format!("hub and leaf regions: {e}")))?;
        for server in [&nats.hub, &nats.region_a, &nats.region_b] {
            if let Some(pid) = server.pid() {
                crate::pin::server_process(pid);
            }
        }
        let roles = |name: &str, peer: &str, nats_url: String| RegionRoles {
            name: name.into(),
            peers: vec![peer.into()],
            nats_url,
        };
        let a = Stack::start(&StackSpec {
            gateways: 1,
            state: true,
            region: Some(roles(Self::A, Self::B, nats.url_a())),
            ..StackSpec::default()
        })
        .await?;
        let b = Stack::start(&StackSpec {
            gateways: 1,
            state: true,
            key: Some(a.key_path.clone()),
            region: Some(roles(Self::B, Self::A, nats.url_b())),
            ..StackSpec::default()
        })
        .await?;
        eprintln!(
            "started hub {} with regions {} and {}",
            nats.hub.client_url(),
            Self::A,
            Self::B
        );
        Ok(TwoRegions { a, b, _nats: nats })
    }

    /// The relay counters now.
    pub async fn relayed(&self) -> Result<Relayed, BenchError> {
        let admin = |stack: &Stack| {
            stack
                .state_admin
                .ok_or_else(|| BenchError::Setup("a region without state".into()))
        };
        let out = stack::metric(admin(&self.a)?, "tether_state_relay_out_total").await?;
        let into = stack::metric(admin(&self.b)?, "tether_state_relay_in_total").await?;
        Ok(Relayed {
            out_of_a: out as u64,
            into_b: into as u64,
        })
    }
}
