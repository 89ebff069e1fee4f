//! tether-ipconfig (placeholder, filled by its issue).
