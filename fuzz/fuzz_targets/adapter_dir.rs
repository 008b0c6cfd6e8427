//! Fuzz target `adapter_dir`: trainer::lora::Adapter::load (adapter_config.json + adapter_model.safetensors).
//! The body is `swarmtune_fuzz::adapter_dir` (fuzz/src/lib.rs); a panic, abort, timeout or oversized
//! allocation is the bug hunted, an `Err` is the decoder doing its job.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = swarmtune_fuzz::adapter_dir(data);
});
