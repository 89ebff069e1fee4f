//! What a p2p run reports: each leg's deliveries, rate and latency, and with
//! `--regions 2` the cross-region leg beside the same-region one.

use serde::Serialize;

use crate::compare::Figure;
use crate::regions::{Relayed, TwoRegions};
use crate::scenario::Report;
use crate::stats::Percentiles;

/// What one set of pairs delivered.
#[derive(Debug, Clone, Serialize)]
pub struct Leg {
    /// Messages sent.
    pub sent: u64,
    /// Messages that reached their receiver.
    pub delivered: u64,
    /// Stored (QoS1) DOWNs received again (resent before the receiver's ack arrived);
    /// not in `delivered`.
    pub repeated: u64,
    /// Receipts the senders got (Tether UP_ACK).
    pub receipts: u64,
    /// Delivered per second (first intended send → last arrival).
    pub achieved_rate: f64,
    /// Intended send → arrival at the receiver.
    pub latency: Percentiles,
}

impl std::fmt::Display for Leg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} delivered ({} receipts{}), {:.0}/s achieved",
            self.delivered,
            self.sent,
            self.receipts,
            if self.repeated > 0 {
                format!(", {} resent", self.repeated)
            } else {
                String::new()
            },
            self.achieved_rate
        )
    }
}

/// Cross-region over same-region, figure by figure (`--regions 2`).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CrossOverSame {
    /// Achieved rate.
    pub achieved_rate: f64,
    /// Median latency.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
}

impl CrossOverSame {
    /// The ratios of `cross` to `same` (0 where `same` is 0).
    pub fn of(cross: &Leg, same: &Leg) -> CrossOverSame {
        let ratio = |c: f64, s: f64| {
            if s > 0.0 {
                (c / s * 100.0).round() / 100.0
            } else {
                0.0
            }
        };
        let (c, s) = (&cross.latency, &same.latency);
        CrossOverSame {
            achieved_rate: ratio(cross.achieved_rate, same.achieved_rate),
            p50: ratio(c.p50_us as f64, s.p50_us as f64),
            p99: ratio(c.p99_us as f64, s.p99_us as f64),
            p999: ratio(c.p999_us as f64, s.p999_us as f64),
        }
    }
}

/// The cross-region leg of a `--regions 2` run.
#[derive(Debug, Clone, Serialize)]
pub struct CrossRegion {
    /// Senders in region A, receivers in region B.
    #[serde(flatten)]
    pub leg: Leg,
    /// This leg over the same-region one.
    pub vs_same_region: CrossOverSame,
    /// Pushes relayed from A to B during this leg, warm-up included (every one of the leg
    /// crosses on the relay streams).
    pub relayed: Relayed,
    /// The same during the same-region leg (none crosses).
    pub relayed_in_same_region_leg: Relayed,
}

/// Results of one p2p run.
#[derive(Debug, Clone, Serialize)]
pub struct P2pReport {
    /// `tether`, `nats` or `mosquitto`.
    pub target: String,
    /// Pairs.
    pub pairs: usize,
    /// Offered messages per second.
    pub offered_rate: u32,
    /// Regions Tether ran as (1 for the peers).
    pub regions: u8,
    /// The echo pushed QoS1 (stored, acknowledged by the receivers).
    pub qos1: bool,
    /// The pairs within one region (with `--regions 2`: region A).
    #[serde(flatten)]
    pub leg: Leg,
    /// With `--regions 2`: the same pairs with their receivers in region B.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cross_region: Option<CrossRegion>,
}

impl std::fmt::Display for P2pReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(cross) = &self.cross_region else {
            writeln!(
                f,
                "p2p [{}]: {} pairs at {}/s offered: {}",
                self.target, self.pairs, self.offered_rate, self.leg
            )?;
            return write!(
                f,
                "  end-to-end latency (from intended send): {}",
                self.leg.latency
            );
        };
        let r = &cross.vs_same_region;
        writeln!(
            f,
            "p2p [{}, {} regions]: {} pairs at {}/s offered, each leg; {} pushes",
            self.target,
            self.regions,
            self.pairs,
            self.offered_rate,
            if self.qos1 { "QoS1" } else { "QoS0" }
        )?;
        writeln!(
            f,
            "  same-region  ({0} → {0}): {1}",
            TwoRegions::A,
            self.leg
        )?;
        writeln!(f, "    latency (from intended send): {}", self.leg.latency)?;
        writeln!(
            f,
            "  cross-region ({} → {}): {}",
            TwoRegions::A,
            TwoRegions::B,
            cross.leg
        )?;
        writeln!(f, "    latency (from intended send): {}", cross.leg.latency)?;
        let (x, s) = (&cross.relayed, &cross.relayed_in_same_region_leg);
        writeln!(
            f,
            "  relayed {} → {} (state counters, warm-ups included): cross-region leg {} out, {} in; same-region leg {} out, {} in",
            TwoRegions::A,
            TwoRegions::B,
            x.out_of_a,
            x.into_b,
            s.out_of_a,
            s.into_b
        )?;
        write!(
            f,
            "  cross/same: achieved {:.2}×, p50 {:.2}×, p99 {:.2}×, p99.9 {:.2}×",
            r.achieved_rate, r.p50, r.p99, r.p999
        )
    }
}

impl Report for P2pReport {
    fn target(&self) -> &str {
        &self.target
    }

    fn figures(&self) -> Vec<Figure> {
        let rate = Figure::new("achieved_rate", self.leg.achieved_rate, "/s");
        let mut figures: Vec<Figure> = std::iter::once(rate)
            .chain(self.leg.latency.figures(true))
            .collect();
        if let Some(cross) = &self.cross_region {
            let (l, r) = (&cross.leg.latency, &cross.vs_same_region);
            figures.extend([
                Figure::new("xr_achieved_rate", cross.leg.achieved_rate, "/s"),
                Figure::new("xr_p50", l.p50_us as f64, "µs"),
                Figure::new("xr_p99", l.p99_us as f64, "µs"),
                Figure::new("xr_p999", l.p999_us as f64, "µs"),
                Figure::new("xr/same_rate", r.achieved_rate, "×"),
                Figure::new("xr/same_p50", r.p50, "×"),
                Figure::new("xr/same_p99", r.p99, "×"),
                Figure::new("xr/same_p999", r.p999, "×"),
            ]);
        }
        figures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leg(rate: f64, p50_us: u64, p99_us: u64) -> Leg {
        Leg {
            sent: 100,
            delivered: 100,
            repeated: 0,
            receipts: 100,
            achieved_rate: rate,
            latency: Percentiles {
                count: 100,
                p50_us,
                p99_us,
                ..Percentiles::default()
            },
        }
    }

    #[test]
    fn cross_over_same_is_figure_by_figure_and_zero_without_a_base() {
        let r = CrossOverSame::of(&leg(900.0, 3_000, 9_000), &leg(1_000.0, 2_000, 3_000));
        assert_eq!(
            (r.achieved_rate, r.p50, r.p99, r.p999),
            (0.9, 1.5, 3.0, 0.0)
        );
    }

    #[test]
    fn a_two_region_report_has_the_cross_region_figures_and_ratios() {
        let same = leg(1_000.0, 2_000, 4_000);
        let cross = leg(1_000.0, 3_000, 8_000);
        let report = P2pReport {
            target: "tether".into(),
            pairs: 2,
            offered_rate: 1_000,
            regions: 2,
            qos1: false,
            cross_region: Some(CrossRegion {
                vs_same_region: CrossOverSame::of(&cross, &same),
                leg: cross,
                relayed: Relayed {
                    out_of_a: 110,
                    into_b: 110,
                },
                relayed_in_same_region_leg: Relayed::default(),
            }),
            leg: same,
        };
        let figures: Vec<_> = report.figures().iter().map(|f| (f.key, f.value)).collect();
        assert!(figures.contains(&("p50", 2_000.0)), "{figures:?}");
        assert!(figures.contains(&("xr_p50", 3_000.0)), "{figures:?}");
        assert!(figures.contains(&("xr/same_p99", 2.0)), "{figures:?}");
        let text = report.to_string();
        assert!(
            text.contains("cross/same: achieved 1.00×, p50 1.50×, p99 2.00×"),
            "{text}"
        );
        let json = serde_json::to_value(&report).unwrap_or_default();
        assert_eq!(json["delivered"], 100, "{json}");
        assert_eq!(json["cross_region"]["relayed"]["into_b"], 110, "{json}");
    }
}
