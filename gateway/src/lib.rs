//! tether-gateway (placeholder, filled by its issue).
