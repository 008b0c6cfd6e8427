//! Fuzz target `blob_manifest`: v1::BlobManifest decode + ChunkManifest::try_from + validate.
//! The body is `swarmtune_fuzz::blob_manifest` (fuzz/src/lib.rs); a panic, abort, timeout or oversized
//! allocation is the bug hunted, an `Err` is the decoder doing its job.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = swarmtune_fuzz::blob_manifest(data);
});
