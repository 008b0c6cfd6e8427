//! Fuzz target `lora_state`: trainer::train::LoraState::from_bytes (a segment challenge's answer).
//! The body is `swarmtune_fuzz::lora_state` (fuzz/src/lib.rs); a panic, abort, timeout or oversized
//! allocation is the bug hunted, an `Err` is the decoder doing its job.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = swarmtune_fuzz::lora_state(data);
});
