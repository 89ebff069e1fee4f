//! tether-state (placeholder, filled by its issue).
