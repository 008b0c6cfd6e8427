//! The command line: every subcommand and flag, with help a newcomer understands.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use swarmtune_trainer::device::DeviceKind;

/// Fine-tune open language models together: volunteers lend their CPUs and GPUs to train LoRA
/// modules, and anyone can pull the result.
#[derive(Parser, Debug)]
#[command(name = "swarmtune", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check a checkpoint against a reference: write its logits or LoRA gradients.
    #[command(subcommand)]
    Inspect(InspectCommand),
    /// Generate text from a model, optionally with a LoRA adapter, streamed to the terminal.
    Generate(GenerateArgs),
    /// Pretrain a small base model from scratch, from a recipe (how the built-in base was made).
    Pretrain(PretrainArgs),
    /// Measure: how well a module learns the demo's skill, and how fast LoRA trains here.
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// `swarmtune bench ...`
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Train a module for the demo's skill on this machine and score base and module on
    /// held-out prompts (exact match).
    Skill(BenchSkillArgs),
    /// LoRA training speed: tokens per second, step time and peak memory.
    Train(BenchTrainArgs),
    /// Network speed on 127.0.0.1: blob transfer (against a plain TCP copy of the same file)
    /// from 1 to N fetchers, and gossip delivery latency across in-process nodes.
    Net(BenchNetArgs),
    /// A round's merge: verify and aggregate N int8 deltas of a 4.9M-parameter module, timed
    /// against reading the same bytes from memory, with peak memory.
    Merge(BenchMergeArgs),
}

/// `swarmtune bench merge`
#[derive(Args, Debug)]
pub struct BenchMergeArgs {
    /// Numbers of deltas to merge, each measured in turn.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    pub deltas: Vec<usize>,
    /// Aggregation rules: mean, trimmed-mean (a job's default), median, centered-clipping.
    #[arg(long, value_delimiter = ',', default_value = "trimmed-mean,mean")]
    pub rules: Vec<swarmtune_coordinator::merge::bench::BenchRule>,
    /// LoRA rank on every linear layer of the SmolLM2-135M-shaped module (16: 4.9M parameters).
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// CPU threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `swarmtune bench net`
#[derive(Args, Debug)]
pub struct BenchNetArgs {
    /// Size of the blob moved, in MiB.
    #[arg(long, default_value_t = 64)]
    pub size_mib: usize,
    /// Fetch with 1, 2, 4, … up to this many nodes at once.
    #[arg(long, default_value_t = 4)]
    pub fetchers: usize,
    /// Nodes in the gossip mesh.
    #[arg(long, default_value_t = 20)]
    pub gossip_nodes: usize,
    /// Messages published for the latency figures.
    #[arg(long, default_value_t = 50)]
    pub gossip_messages: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `swarmtune bench train`
#[derive(Args, Debug)]
pub struct BenchTrainArgs {
    /// Model shape with random weights: builtin or smollm2-135m.
    #[arg(long, default_value = "smollm2-135m")]
    pub shape: swarmtune_trainer::bench::BenchShape,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// LoRA rank on q_proj and v_proj (alpha = 2 × rank).
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Measured steps, after two warm-up steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// `swarmtune bench skill`
#[derive(Args, Debug)]
pub struct BenchSkillArgs {
    /// Base model directory [default: the built-in base].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 500)]
    pub steps: usize,
    /// The skill: shout, number-words or add.
    #[arg(long, default_value = "shout")]
    pub skill: swarmtune_trainer::builtin::skill::Skill,
    /// Write the trained module (a PEFT adapter) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// `swarmtune pretrain`
#[derive(Args, Debug)]
pub struct PretrainArgs {
    /// The recipe (TOML), e.g. recipes/builtin-base.toml.
    pub recipe: PathBuf,
    /// Directory to write the model to (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// `swarmtune inspect ...`
#[derive(Subcommand, Debug)]
pub enum InspectCommand {
    /// Write the logits of a model (optionally with an adapter) for given token ids.
    Logits(InspectLogitsArgs),
    /// Write the gradient of every LoRA tensor of the mean next-token cross-entropy, and the loss.
    Grads(InspectGradsArgs),
}

/// Where the math runs.
#[derive(Args, Debug, Clone)]
pub struct ComputeArgs {
    /// Compute backend: cpu (burn-flex), ndarray (burn-ndarray) or gpu (needs the gpu feature).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceKind,
    /// CPU threads for the math (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// What both `inspect` subcommands read and write.
#[derive(Args, Debug)]
pub struct InspectIo {
    /// Hugging Face model directory (config.json, model.safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// safetensors file holding `input_ids`, I64 [batch, seq].
    #[arg(long)]
    pub ids: PathBuf,
    /// Output safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// `swarmtune inspect logits`: writes `logits`, F32 [batch, seq, vocab].
#[derive(Args, Debug)]
pub struct InspectLogitsArgs {
    #[command(flatten)]
    pub io: InspectIo,
    /// PEFT adapter directory (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

/// `swarmtune inspect grads`: writes each LoRA tensor's gradient under its PEFT name and
/// `loss` F32 [1].
#[derive(Args, Debug)]
pub struct InspectGradsArgs {
    #[command(flatten)]
    pub io: InspectIo,
    /// PEFT adapter directory.
    #[arg(long)]
    pub adapter: PathBuf,
}

/// `swarmtune generate`
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Hugging Face model directory (with tokenizer.json) [default: the built-in base].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// PEFT adapter directory.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The text to continue.
    #[arg(long)]
    pub prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 always picks the most likely token.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample only among the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities add up to p.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub compute: ComputeArgs,
}
