//! Fuzz target `base_model`: trainer::model::CausalLm::load (config.json + model.safetensors).
//! The body is `swarmtune_fuzz::base_model` (fuzz/src/lib.rs); a panic, abort, timeout or oversized
//! allocation is the bug hunted, an `Err` is the decoder doing its job.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = swarmtune_fuzz::base_model(data);
});
