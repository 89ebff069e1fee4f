//! Messages per app through this gateway: uplinks received and frames written, counted
//! per app so the heartbeat can carry each app's rates (the ops view's msgs/s per app).
//!
//! The counters are also the app's one shared name: a connection's identity points at its
//! app's [`AppCounters`] (looked up once, at login) instead of holding its own copy of the
//! app id, so the hot path is one relaxed atomic add per batch of frames and an idle
//! connection pays a pointer for its app.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

/// One app's running totals, and its id.
#[derive(Debug)]
pub struct AppCounters {
    name: Arc<str>,
    msgs_in: AtomicU64,
    msgs_out: AtomicU64,
}

impl AppCounters {
    /// Counters at zero for app `name`.
    pub fn new(name: Arc<str>) -> Self {
        Self {
            name,
            msgs_in: AtomicU64::new(0),
            msgs_out: AtomicU64::new(0),
        }
    }

    /// The app id.
    pub fn name(&self) -> &str {
        &self.name
    }

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
    /// The counters of `app`, made on first use (the same `Arc` for every caller).
    pub fn counters(&self, app: &str) -> Arc<AppCounters> {
        if let Some(counters) = self
            .apps
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(app)
        {
            return counters.clone();
        }
        let name: Arc<str> = app.into();
        self.apps
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.clone())
            .or_insert_with(|| Arc::new(AppCounters::new(name)))
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
        traffic.counters("a").received(2);
        traffic.counters("a").written(3);
        traffic.counters("b").written(1);
        assert!(Arc::ptr_eq(&traffic.counters("a"), &traffic.counters("a")));
        assert_eq!(traffic.counters("b").name(), "b");
        let totals = traffic.totals();
        assert_eq!(totals.get("a"), Some(&(2, 3)));
        assert_eq!(totals.get("b"), Some(&(0, 1)));
    }
}
