//! tether-ops (placeholder, filled by its issue).
