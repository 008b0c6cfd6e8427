//! Fuzz target `job_file`: coordinator spec::parse_job_file + JobFile::to_spec.
//! The body is `swarmtune_fuzz::job_file` (fuzz/src/lib.rs); a panic, abort, timeout or oversized
//! allocation is the bug hunted, an `Err` is the decoder doing its job.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = swarmtune_fuzz::job_file(data);
});
