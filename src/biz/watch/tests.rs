//! The hub and the watch over an in-memory log.
