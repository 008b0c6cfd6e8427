//! swarmtune's trainer: everything that turns tokens into better LoRA weights, with no
//! networking. Models (Llama family, GPT-2) in burn, LoRA and PEFT I/O, data and shards, the
//! local training loop of one lease, the delta codec, aggregation math, evaluation and
//! generation.

pub mod tensors;
