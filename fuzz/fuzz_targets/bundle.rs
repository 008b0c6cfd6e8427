//! Fuzz target `bundle`: v1::Bundle decode + bundle::files (path checks).
//! The body is `swarmtune_fuzz::bundle` (fuzz/src/lib.rs); a panic, abort, timeout or oversized
//! allocation is the bug hunted, an `Err` is the decoder doing its job.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = swarmtune_fuzz::bundle(data);
});
