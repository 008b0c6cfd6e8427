//! End-to-end test harness (filled by later issues).
