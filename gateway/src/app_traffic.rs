//! Messages per app through this gateway: uplinks received and frames written, counted
//! per app so the heartbeat can carry each app's rates (the ops view's msgs/s per app).
//!
//! A connection looks its app's counters up once (after login) and keeps them, so the hot
//! path is one relaxed atomic add per batch of frames.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

/// One app's running totals.
#[derive(Debug, Default)]
pub struct AppCounters {
    msgs_in: AtomicU64,
    msgs_out: AtomicU64,
}

impl AppCounters {
    /// Counts `n` uplink frames received from the app's devices.
    pub fn received(&self, n: u64) {
        self.msgs_in.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` frames written to the app's devices.
    pub fn written(&self, n: u64) {
        self.msgs_out.fetch_add(n, Ordering::Relaxed);
    }
}

/// Totals of one app since the gateway started: (received, written).
pub type Totals = (u64, u64);

/// The counters of every app that had a connection here.
#[derive(Debug, Default)]
pub struct AppTraffic {
    apps: RwLock<HashMap<Arc<str>, Arc<AppCounters>>>,
}

impl AppTraffic {
    /// The counters of `app`, made on first use.
    pub fn counters(&self, app: &Arc<str>) -> Arc<AppCounters> {
        if let Some(counters) = self
            .apps
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(app)
        {
            return counters.clone();
        }
        self.apps
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(app.clone())
            .or_default()
            .clone()
    }

    /// Every app's totals so far.
    pub fn totals(&self) -> BTreeMap<String, Totals> {
        self.apps
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(app, c)| {
                (
                    app.to_string(),
                    (
                        c.msgs_in.load(Ordering::Relaxed),
                        c.msgs_out.load(Ordering::Relaxed),
                    ),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_app() {
        let traffic = AppTraffic::default();
        let a: Arc<str> = "a".into();
        traffic.counters(&a).received(2);
        traffic.counters(&a).written(3);
        traffic.counters(&"b".into()).written(1);
        let totals = traffic.totals();
        assert_eq!(totals.get("a"), Some(&(2, 3)));
        assert_eq!(totals.get("b"), Some(&(0, 1)));
    }
}
