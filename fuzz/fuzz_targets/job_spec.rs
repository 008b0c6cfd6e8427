//! Fuzz target `job_spec`: signed JobSpec: signed::verify + spec::validate_spec + spec::check_lora_fits.
//! The body is `swarmtune_fuzz::job_spec` (fuzz/src/lib.rs); a panic, abort, timeout or oversized
//! allocation is the bug hunted, an `Err` is the decoder doing its job.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = swarmtune_fuzz::job_spec(data);
});
