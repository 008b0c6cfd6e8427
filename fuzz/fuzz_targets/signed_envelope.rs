//! Fuzz target `signed_envelope`: v1::Signed decode + signed::verify for JobSpec, DeltaEnvelope, JobAnnouncement, ModuleManifest.
//! The body is `swarmtune_fuzz::signed_envelope` (fuzz/src/lib.rs); a panic, abort, timeout or oversized
//! allocation is the bug hunted, an `Err` is the decoder doing its job.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = swarmtune_fuzz::signed_envelope(data);
});
