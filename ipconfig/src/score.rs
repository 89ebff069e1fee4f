//! Ranking gateways for one request: which gateways may be offered, their score, and the
//! order (ties shuffled). Pure functions over heartbeats, so every ipconfig instance
//! ranks the same gateways the same way (up to the order of ties).
//!
//! # The rule (also in PROTOCOL.md section 12.3)
//!
//! A gateway is **offered** only if it has a fresh heartbeat, at least one endpoint,
//! `capacity > 0`, `connections < capacity`, and belongs to the app's pool: an app in the
//! shared pool gets gateways whose `pools` list is empty; an app with dedicated pool `P`
//! gets only gateways whose `pools` contain `P`. Draining gateways are left out, or put
//! after every other gateway when `offer_draining` is set.
//!
//! Its **score** is
//!
//! ```text
//! free  = 1 - connections / capacity          (share of capacity still free, 0..1)
//! idle  = 1 - clamp(cpu, 0, 1)                (share of the machine's CPU still idle)
//! score = 0.7 * free + 0.3 * idle             (0..1)
//!       + 1.0 if the request names a region and the gateway is in it
//! ```
//!
//! so a gateway in the requester's region always ranks above one outside it, and within a
//! region the least loaded ranks first. Scores are cut into bands of `tie_band` (0.05 by
//! default): gateways in the same band are ties and are shuffled for every request, so a
//! burst of logins between two heartbeats spreads over equally good gateways instead of
//! landing on one.

use rand::Rng;
use rand::seq::SliceRandom;
use tether_schemas::bus::GatewayHeartbeat;

/// Weight of free capacity in the score.
pub const FREE_WEIGHT: f64 = 0.7;
/// Weight of idle CPU in the score.
pub const IDLE_WEIGHT: f64 = 0.3;
/// Added when the gateway is in the requested region.
pub const REGION_BONUS: f64 = 1.0;

/// What one request asks for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Want<'a> {
    /// The requester's region, if known.
    pub region: Option<&'a str>,
    /// The app's dedicated pool; `None` is the shared pool.
    pub pool: Option<&'a str>,
}

/// How ranking treats draining gateways and ties.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Put draining gateways last instead of leaving them out.
    pub offer_draining: bool,
    /// Width of a score band whose members count as ties (0 = exact ties only).
    pub tie_band: f64,
    /// Most gateways returned.
    pub max: usize,
}

/// A gateway chosen for an answer.
#[derive(Debug, Clone, Copy)]
pub struct Ranked<'a> {
    /// Its heartbeat.
    pub gateway: &'a GatewayHeartbeat,
    /// Its score (see the module docs).
    pub score: f64,
}

/// The score of `gateway` for a requester in `region` (no eligibility checks).
pub fn score(gateway: &GatewayHeartbeat, region: Option<&str>) -> f64 {
    let used = if gateway.capacity == 0 {
        1.0
    } else {
        (gateway.connections as f64 / gateway.capacity as f64).clamp(0.0, 1.0)
    };
    let cpu = if gateway.cpu.is_finite() {
        gateway.cpu.clamp(0.0, 1.0)
    } else {
        1.0
    };
    let mut score = FREE_WEIGHT * (1.0 - used) + IDLE_WEIGHT * (1.0 - cpu);
    if region.is_some_and(|r| !r.is_empty() && r == gateway.region) {
        score += REGION_BONUS;
    }
    score
}

/// Whether `gateway` may be offered for `want`, draining aside.
pub fn eligible(gateway: &GatewayHeartbeat, want: &Want<'_>) -> bool {
    let has_endpoint = gateway.endpoints.tcp.is_some() || gateway.endpoints.ws.is_some();
    let in_pool = match want.pool {
        None => gateway.pools.is_empty(),
        Some(pool) => gateway.pools.iter().any(|p| p == pool),
    };
    has_endpoint && in_pool && gateway.capacity > 0 && gateway.connections < gateway.capacity
}

/// Ranks `gateways` for `want`: eligible ones, best first, ties shuffled with `rng`,
/// draining ones last (if offered at all), at most `policy.max`.
pub fn rank<'a>(
    gateways: impl IntoIterator<Item = &'a GatewayHeartbeat>,
    want: &Want<'_>,
    policy: &Policy,
    rng: &mut impl Rng,
) -> Vec<Ranked<'a>> {
    let mut ranked: Vec<(bool, i64, Ranked<'a>)> = gateways
        .into_iter()
        .filter(|g| eligible(g, want) && (policy.offer_draining || !g.draining))
        .map(|g| {
            let score = score(g, want.region);
            (
                g.draining,
                band(score, policy.tie_band),
                Ranked { gateway: g, score },
            )
        })
        .collect();
    // Shuffle first; the sort is stable, so members of one band keep the shuffled order.
    ranked.shuffle(rng);
    ranked.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    ranked.truncate(policy.max);
    ranked.into_iter().map(|(_, _, r)| r).collect()
}

/// The band of `score`: equal bands are ties.
fn band(score: f64, width: f64) -> i64 {
    if width > 0.0 {
        (score / width).floor() as i64
    } else {
        // Exact ties only: scores are in 0..2, so a micro-unit grid keeps every order.
        (score * 1e9).round() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use std::collections::HashMap;
    use tether_schemas::bus::AdvertisedEndpoints;

    fn gw(id: &str, connections: u64, capacity: u64) -> GatewayHeartbeat {
        GatewayHeartbeat {
            id: id.into(),
            region: "eu".into(),
            endpoints: AdvertisedEndpoints {
                tcp: Some(format!("{id}:7400")),
                ws: None,
            },
            connections,
            capacity,
            ..Default::default()
        }
    }

    const POLICY: Policy = Policy {
        offer_draining: false,
        tie_band: 0.05,
        max: 8,
    };

    fn ids(ranked: &[Ranked<'_>]) -> Vec<String> {
        ranked.iter().map(|r| r.gateway.id.clone()).collect()
    }

    #[test]
    fn least_loaded_first() {
        let gws = [gw("busy", 90, 100), gw("idle", 5, 100), gw("half", 50, 100)];
        let mut rng = StdRng::seed_from_u64(1);
        let ranked = rank(&gws, &Want::default(), &POLICY, &mut rng);
        assert_eq!(ids(&ranked), ["idle", "half", "busy"]);
        let mut cpu_bound = gw("cpu", 5, 100);
        cpu_bound.cpu = 0.9;
        let gws = [cpu_bound, gw("calm", 20, 100)];
        assert_eq!(
            ids(&rank(&gws, &Want::default(), &POLICY, &mut rng)),
            ["calm", "cpu"]
        );
    }

    #[test]
    fn score_formula() {
        let mut g = gw("a", 25, 100);
        g.cpu = 0.5;
        let expected = 0.7 * 0.75 + 0.3 * 0.5;
        assert!((score(&g, None) - expected).abs() < 1e-9);
        assert!((score(&g, Some("eu")) - expected - 1.0).abs() < 1e-9);
        assert!((score(&g, Some("us")) - expected).abs() < 1e-9);
        g.cpu = f64::NAN;
        assert!((score(&g, None) - 0.7 * 0.75).abs() < 1e-9);
    }

    #[test]
    fn full_empty_capacity_and_endpointless_gateways_are_not_offered() {
        let mut no_endpoint = gw("none", 0, 10);
        no_endpoint.endpoints = AdvertisedEndpoints::default();
        let gws = [
            gw("full", 10, 10),
            gw("zero", 0, 0),
            no_endpoint,
            gw("ok", 9, 10),
        ];
        let mut rng = StdRng::seed_from_u64(2);
        assert_eq!(
            ids(&rank(&gws, &Want::default(), &POLICY, &mut rng)),
            ["ok"]
        );
    }

    #[test]
    fn draining_excluded_or_last() {
        let mut draining = gw("draining", 0, 100);
        draining.draining = true;
        let gws = [draining, gw("busy", 80, 100)];
        let mut rng = StdRng::seed_from_u64(3);
        assert_eq!(
            ids(&rank(&gws, &Want::default(), &POLICY, &mut rng)),
            ["busy"]
        );
        let offer = Policy {
            offer_draining: true,
            ..POLICY
        };
        assert_eq!(
            ids(&rank(&gws, &Want::default(), &offer, &mut rng)),
            ["busy", "draining"]
        );
    }

    #[test]
    fn region_first_then_load() {
        let mut us = gw("us-idle", 0, 100);
        us.region = "us".into();
        let gws = [gw("eu-busy", 90, 100), us];
        let mut rng = StdRng::seed_from_u64(4);
        let want = |region| Want {
            region: Some(region),
            pool: None,
        };
        assert_eq!(
            ids(&rank(&gws, &want("eu"), &POLICY, &mut rng)),
            ["eu-busy", "us-idle"]
        );
        assert_eq!(
            ids(&rank(&gws, &want("us"), &POLICY, &mut rng)),
            ["us-idle", "eu-busy"]
        );
        assert_eq!(
            ids(&rank(&gws, &Want::default(), &POLICY, &mut rng)),
            ["us-idle", "eu-busy"]
        );
    }

    #[test]
    fn pools_are_honoured() {
        let mut vip = gw("vip-1", 50, 100);
        vip.pools = vec!["vip".into()];
        let gws = [gw("shared-1", 0, 100), vip];
        let mut rng = StdRng::seed_from_u64(5);
        assert_eq!(
            ids(&rank(&gws, &Want::default(), &POLICY, &mut rng)),
            ["shared-1"]
        );
        let dedicated = Want {
            region: None,
            pool: Some("vip"),
        };
        assert_eq!(ids(&rank(&gws, &dedicated, &POLICY, &mut rng)), ["vip-1"]);
        let other = Want {
            region: None,
            pool: Some("other"),
        };
        assert!(rank(&gws, &other, &POLICY, &mut rng).is_empty());
    }

    #[test]
    fn ties_are_spread_and_answers_capped() {
        // Ten equally loaded gateways (within one band): every one of them comes first
        // for some requests, and no answer has more than `max`.
        let gws: Vec<_> = (0..10)
            .map(|i| gw(&format!("g{i}"), 10 + (i % 2), 100))
            .collect();
        let mut rng = StdRng::seed_from_u64(6);
        let mut first: HashMap<String, usize> = HashMap::new();
        for _ in 0..1000 {
            let ranked = rank(&gws, &Want::default(), &POLICY, &mut rng);
            assert_eq!(ranked.len(), 8);
            *first.entry(ranked[0].gateway.id.clone()).or_default() += 1;
        }
        assert_eq!(first.len(), 10, "{first:?}");
        assert!(first.values().all(|&n| n > 30), "{first:?}");
    }
}
