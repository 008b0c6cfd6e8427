//! Fuzz target `tokenizer`: tokenizer.json: data::tokenizer_from_bytes + find_eos_token + data::build_shards.
//! The body is `swarmtune_fuzz::tokenizer` (fuzz/src/lib.rs); a panic, abort, timeout or oversized
//! allocation is the bug hunted, an `Err` is the decoder doing its job.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = swarmtune_fuzz::tokenizer(data);
});
