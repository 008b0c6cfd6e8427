//! Fuzz target `gossip`: net::gossip::validate with SignatureVerifier (jobs and modules topics).
//! The body is `swarmtune_fuzz::gossip` (fuzz/src/lib.rs); a panic, abort, timeout or oversized
//! allocation is the bug hunted, an `Err` is the decoder doing its job.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = swarmtune_fuzz::gossip(data);
});
