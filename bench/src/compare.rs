//! Tether against its peers in one invocation: every scenario produces one [`Outcome`]
//! per target (tether, nats, mosquitto); [`Comparison`] prints them side by side with the
//! ratio Tether/peer of each figure and renders the one-line JSON.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use serde_json::{Value, json};

/// One comparable number.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Stable key (JSON, ratios).
    pub key: &'static str,
    /// The value.
    pub value: f64,
    /// Unit for humans: `B`, `/s`, `µs`.
    pub unit: &'static str,
}

impl Figure {
    /// A figure.
    pub fn new(key: &'static str, value: f64, unit: &'static str) -> Figure {
        Figure { key, value, unit }
    }
}

/// What one target did in one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// `tether`, `nats` or `mosquitto`.
    pub target: String,
    /// The numbers compared across targets.
    pub figures: Vec<Figure>,
    /// The full report of the scenario for this target.
    pub detail: Value,
}

/// The outcomes of one scenario, Tether first.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Scenario name.
    pub scenario: String,
    /// The parameters it ran with.
    pub params: Value,
    /// One per target.
    pub outcomes: Vec<Outcome>,
}

impl Comparison {
    /// The outcome of `target`.
    pub fn get(&self, target: &str) -> Option<&Outcome> {
        self.outcomes.iter().find(|o| o.target == target)
    }

    /// Ratio Tether/peer of every figure both have, per peer.
    pub fn ratios(&self) -> BTreeMap<String, BTreeMap<&'static str, f64>> {
        let Some(tether) = self.get("tether") else {
            return BTreeMap::new();
        };
        self.outcomes
            .iter()
            .filter(|o| o.target != "tether")
            .map(|peer| {
                let ratios = tether
                    .figures
                    .iter()
                    .filter_map(|t| {
                        let p = peer.figures.iter().find(|p| p.key == t.key)?;
                        (p.value != 0.0).then(|| (t.key, round3(t.value / p.value)))
                    })
                    .collect();
                (peer.target.clone(), ratios)
            })
            .collect()
    }

    /// Peers with ratios, in the order they ran.
    fn peer_names<'a>(
        &'a self,
        ratios: &BTreeMap<String, BTreeMap<&'static str, f64>>,
    ) -> Vec<&'a str> {
        self.outcomes
            .iter()
            .map(|o| o.target.as_str())
            .filter(|t| ratios.contains_key(*t))
            .collect()
    }

    /// The JSON object printed on the last line.
    pub fn to_json(&self) -> Value {
        let mut object = json!({
            "scenario": self.scenario,
            "params": self.params,
            "ratios": self.ratios(),
        });
        for outcome in &self.outcomes {
            let figures: BTreeMap<_, _> =
                outcome.figures.iter().map(|f| (f.key, f.value)).collect();
            object[outcome.target.as_str()] = json!({
                "figures": figures,
                "detail": outcome.detail,
            });
        }
        object
    }

    /// Prints the table to stdout and, with `json`, the JSON object as the last line.
    pub fn print(&self, json: bool) {
        println!("{self}");
        if json {
            println!("{}", self.to_json());
        }
    }
}

/// The outcome of a target whose run failed: no figures, the error in `detail`.
pub fn failed(target: &str, error: &dyn std::fmt::Display) -> Outcome {
    Outcome {
        target: target.into(),
        figures: Vec::new(),
        detail: json!({ "error": error.to_string() }),
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// `12,345` style for integers, 3 significant digits below 100.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    if v.abs() < 100.0 && v.fract() != 0.0 {
        return format!("{v:.2}");
    }
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ratios = self.ratios();
        let mut keys: Vec<(&'static str, &'static str)> = Vec::new();
        for figure in self.outcomes.iter().flat_map(|o| &o.figures) {
            if !keys.iter().any(|(k, _)| *k == figure.key) {
                keys.push((figure.key, figure.unit));
            }
        }
        write!(f, "{:<24}", format!("{} figure", self.scenario))?;
        for o in &self.outcomes {
            write!(f, " {:>17}", o.target)?;
        }
        if self.outcomes.is_empty() {
            return writeln!(f, " (no outcome)");
        }
        for peer in self.peer_names(&ratios) {
            write!(f, " {:>17}", format!("tether/{peer}"))?;
        }
        writeln!(f)?;
        for (key, unit) in keys {
            write!(f, "{:<24}", format!("{key} ({unit})"))?;
            for o in &self.outcomes {
                let v = o.figures.iter().find(|x| x.key == key);
                write!(f, " {:>17}", v.map_or("-".into(), |v| fmt_num(v.value)))?;
            }
            for r in self
                .peer_names(&ratios)
                .iter()
                .filter_map(|p| ratios.get(*p))
            {
                let v = r.get(key);
                write!(f, " {:>17}", v.map_or("-".into(), |v| format!("{v:.2}×")))?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_and_json() {
        let c = Comparison {
            scenario: "fanout".into(),
            params: json!({"n": 2}),
            outcomes: vec![
                Outcome {
                    target: "tether".into(),
                    figures: vec![Figure::new("rate", 300.0, "/s")],
                    detail: json!({}),
                },
                Outcome {
                    target: "nats".into(),
                    figures: vec![Figure::new("rate", 100.0, "/s")],
                    detail: json!({}),
                },
            ],
        };
        assert_eq!(c.ratios()["nats"]["rate"], 3.0);
        let line = c.to_json().to_string();
        assert!(!line.contains('\n'));
        assert!(line.contains("\"ratios\":{\"nats\":{\"rate\":3.0}}"));
        assert!(c.to_string().contains("3.00×"));
        assert_eq!(fmt_num(1234567.0), "1,234,567");
    }
}
