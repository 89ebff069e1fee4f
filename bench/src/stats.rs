//! Latency recording: HDR histograms in microseconds, a sharded sink that many reader
//! tasks record into, percentiles for reports, and a text form to pass a histogram
//! between processes.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

use crate::client_codec::now_ns;

/// A histogram of 1 µs .. 10 min with 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)
        .or_else(|_| Histogram::new(3))
        .unwrap_or_else(|_| unreachable!("3 significant figures are valid"))
}

/// Records `us` (at least 1) in `h`.
pub fn record(h: &mut Histogram<u64>, us: u64) {
    h.saturating_record(us.max(1));
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest.
    pub max_us: u64,
}

impl Percentiles {
    /// The percentiles of `h`.
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        Percentiles {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

impl Percentiles {
    /// The compared latency figures: p50, p99 and (with `p999`) p99.9, in µs.
    pub fn figures(&self, p999: bool) -> Vec<crate::compare::Figure> {
        use crate::compare::Figure;
        let mut figures = vec![
            Figure::new("p50", self.p50_us as f64, "µs"),
            Figure::new("p99", self.p99_us as f64, "µs"),
        ];
        if p999 {
            figures.push(Figure::new("p999", self.p999_us as f64, "µs"));
        }
        figures
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {} p90 {} p99 {} p99.9 {} max {} ({} samples)",
            fmt_us(self.p50_us),
            fmt_us(self.p90_us),
            fmt_us(self.p99_us),
            fmt_us(self.p999_us),
            fmt_us(self.max_us),
            self.count
        )
    }
}

/// `850 µs`, `12.3 ms`, `4.20 s`.
pub fn fmt_us(us: u64) -> String {
    match us {
        0..1_000 => format!("{us} µs"),
        1_000..1_000_000 => format!("{:.2} ms", us as f64 / 1e3),
        _ => format!("{:.2} s", us as f64 / 1e6),
    }
}

/// A histogram as base64 of its V2 serialization.
pub fn encode(h: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    match V2Serializer::new().serialize(h, &mut bytes) {
        Ok(_) => base64::engine::general_purpose::STANDARD.encode(bytes),
        Err(_) => String::new(),
    }
}

/// The inverse of [`encode`].
pub fn decode(text: &str) -> Option<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    Deserializer::new().deserialize(&mut &bytes[..]).ok()
}

const SHARDS: usize = 16;

/// Where many reader tasks record one-way latencies (payload stamp → arrival).
pub struct Sink {
    shards: Vec<Mutex<Histogram<u64>>>,
    count: AtomicU64,
    first_ns: AtomicU64,
    last_ns: AtomicU64,
}

impl Default for Sink {
    fn default() -> Self {
        Sink {
            shards: (0..SHARDS).map(|_| Mutex::new(histogram())).collect(),
            count: AtomicU64::new(0),
            first_ns: AtomicU64::new(u64::MAX),
            last_ns: AtomicU64::new(0),
        }
    }
}

impl Sink {
    /// Records latencies (µs) that arrived at `now` (Unix ns), into shard `key % 16`.
    pub fn record_batch(&self, key: usize, now: u64, latencies_us: &[u64]) {
        if latencies_us.is_empty() {
            return;
        }
        if let Ok(mut h) = self.shards[key % SHARDS].lock() {
            for &us in latencies_us {
                record(&mut h, us);
            }
        }
        self.count
            .fetch_add(latencies_us.len() as u64, Ordering::Relaxed);
        self.first_ns.fetch_min(now, Ordering::Relaxed);
        self.last_ns.fetch_max(now, Ordering::Relaxed);
    }

    /// Messages recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Unix ns of the first and last arrival (`None` before any).
    pub fn span_ns(&self) -> Option<(u64, u64)> {
        let first = self.first_ns.load(Ordering::Relaxed);
        (first != u64::MAX).then(|| (first, self.last_ns.load(Ordering::Relaxed)))
    }

    /// All shards merged.
    pub fn merged(&self) -> Histogram<u64> {
        let mut all = histogram();
        for shard in &self.shards {
            if let Ok(h) = shard.lock() {
                let _ = all.add(&*h);
            }
        }
        all
    }

    /// Forgets everything recorded (after a warm-up).
    pub fn reset(&self) {
        for shard in &self.shards {
            if let Ok(mut h) = shard.lock() {
                h.reset();
            }
        }
        self.count.store(0, Ordering::Relaxed);
        self.first_ns.store(u64::MAX, Ordering::Relaxed);
        self.last_ns.store(0, Ordering::Relaxed);
    }
}

/// Microseconds from `stamp_ns` to `now_ns` (0 if the stamp is in the future).
pub fn since_us(stamp_ns: u64, now: u64) -> u64 {
    now.saturating_sub(stamp_ns) / 1_000
}

/// Microseconds since `stamp_ns`.
pub fn age_us(stamp_ns: u64) -> u64 {
    since_us(stamp_ns, now_ns())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_text_round_trip() {
        let mut h = histogram();
        for us in [5, 50, 500, 5_000] {
            record(&mut h, us);
        }
        let back = decode(&encode(&h)).expect("decodes");
        assert_eq!(back.len(), 4);
        assert_eq!(Percentiles::of(&back), Percentiles::of(&h));
    }

    #[test]
    fn sink_merges_shards() {
        let sink = Sink::default();
        sink.record_batch(1, 10, &[100, 200]);
        sink.record_batch(2, 20, &[300]);
        assert_eq!(sink.count(), 3);
        assert_eq!(sink.merged().len(), 3);
        assert_eq!(sink.span_ns(), Some((10, 20)));
        sink.reset();
        assert_eq!(sink.count(), 0);
    }
}
