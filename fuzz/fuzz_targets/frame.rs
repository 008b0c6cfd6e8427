//! Fuzz target `frame`: net::codec::read_frame (every protocol, both directions) + what a peer does with the message.
//! The body is `swarmtune_fuzz::frame` (fuzz/src/lib.rs); a panic, abort, timeout or oversized
//! allocation is the bug hunted, an `Err` is the decoder doing its job.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = swarmtune_fuzz::frame(data);
});
