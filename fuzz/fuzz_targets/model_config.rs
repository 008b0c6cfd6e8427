//! Fuzz target `model_config`: trainer::config::ModelConfig::from_json.
//! The body is `swarmtune_fuzz::model_config` (fuzz/src/lib.rs); a panic, abort, timeout or oversized
//! allocation is the bug hunted, an `Err` is the decoder doing its job.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = swarmtune_fuzz::model_config(data);
});
