//! swarmtune's trainer: everything that turns tokens into better LoRA weights, with no
//! networking. Models (Llama family, GPT-2) in burn, LoRA and PEFT I/O, data and shards, the
//! local training loop of one lease, the delta codec, aggregation math, evaluation and
//! generation.

pub mod aggregate;
pub mod bench;
pub mod builtin;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod delta;
pub mod device;
pub mod error;
pub mod eval;
mod fused;
pub mod generate;
pub mod gpt2;
pub mod llama;
pub mod lora;
pub mod model;
pub mod optim;
pub mod pretrain;
mod simd;
pub mod tensors;
pub mod train;
