//! tether-service (placeholder, filled by its issue).
