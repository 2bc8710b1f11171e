//! clb test harness.
