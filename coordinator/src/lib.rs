//! The coordinator (issue 6): hosts training jobs, hands out leases, decides which deltas to
//! trust, merges them robustly and publishes module versions. The math is the trainer's, the
//! wire and blobs are the protocol's; this crate holds the rules and the state, all of it in
//! one redb file so that a `kill -9` at any point loses nothing accepted.

pub mod adversary;
pub mod codec;
pub mod engine;
pub mod leases;
pub mod merge;
pub mod records;
pub mod registry;
pub mod service;
pub mod spec;
pub mod status;
pub mod store;
pub mod verify;
