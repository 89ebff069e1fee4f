//! A live progress bar on stderr: `label [#####.....] 45% done/total extra`, redrawn
//! five times a second by a background task until [`Progress::finish`].

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A progress bar shared by the tasks that advance it. Cheap to clone.
#[derive(Clone)]
pub struct Progress {
    inner: Arc<Inner>,
}

struct Inner {
    label: String,
    total: u64,
    done: AtomicU64,
    extra: Mutex<String>,
    started: Instant,
    stopped: AtomicBool,
}

const WIDTH: u64 = 30;

impl Progress {
    /// Starts drawing a bar for `total` units (needs a tokio runtime).
    pub fn start(label: impl Into<String>, total: u64) -> Progress {
        let progress = Progress {
            inner: Arc::new(Inner {
                label: label.into(),
                total: total.max(1),
                done: AtomicU64::new(0),
                extra: Mutex::new(String::new()),
                started: Instant::now(),
                stopped: AtomicBool::new(false),
            }),
        };
        // The drawer holds a weak reference: a bar dropped without `finish` (an error
        // path) stops drawing too.
        let drawer = Arc::downgrade(&progress.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                let Some(inner) = drawer.upgrade() else { break };
                if inner.stopped.load(Ordering::Relaxed) {
                    break;
                }
                Progress { inner }.draw();
            }
        });
        progress
    }

    /// Sets the units done.
    pub fn set(&self, done: u64) {
        self.inner.done.store(done, Ordering::Relaxed);
    }

    /// Adds units done.
    pub fn add(&self, n: u64) {
        self.inner.done.fetch_add(n, Ordering::Relaxed);
    }

    /// Sets the free text after the counts.
    pub fn note(&self, text: impl Into<String>) {
        if let Ok(mut extra) = self.inner.extra.lock() {
            *extra = text.into();
        }
    }

    fn draw(&self) {
        let inner = &self.inner;
        let done = inner.done.load(Ordering::Relaxed).min(inner.total);
        let filled = done * WIDTH / inner.total;
        let bar: String = (0..WIDTH)
            .map(|i| if i < filled { '#' } else { '.' })
            .collect();
        let extra = inner.extra.lock().map(|e| e.clone()).unwrap_or_default();
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{} [{bar}] {:>3}% {done}/{} {:.1}s {extra}   ",
            inner.label,
            done * 100 / inner.total,
            inner.total,
            inner.started.elapsed().as_secs_f64()
        );
        let _ = err.flush();
    }

    /// Draws the final state, ends the line and stops redrawing.
    pub fn finish(&self) {
        self.inner.stopped.store(true, Ordering::Relaxed);
        self.draw();
        eprintln!();
    }
}
