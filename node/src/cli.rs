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
    /// Run the whole network on this machine: a coordinator and three volunteers on
    /// 127.0.0.1 teach the built-in base a skill, then show base and module side by side.
    Demo(DemoArgs),
    /// Volunteer: lend this machine's CPU or GPU to train modules for the swarm.
    Node(NodeArgs),
    /// Host training jobs: hand out leases, verify and merge deltas, publish module versions.
    Coordinator(CoordinatorArgs),
    /// Submit a training job (a TOML file such as examples/job.toml) to a coordinator.
    Submit(SubmitArgs),
    /// Show a coordinator's jobs, or one job's rounds, versions, peers and verdicts.
    Status(StatusArgs),
    /// Download a module version as a PEFT adapter directory (loads in swarmtune and PEFT).
    Pull(PullArgs),
    /// Print this data dir's peer id (creating its key on first use).
    Id(IdArgs),
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

/// Where a command keeps its key, blobs and settings.
#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// Data directory: identity key, blobs, database, cached models [default:
    /// $SWARMTUNE_HOME, else ~/.swarmtune].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Settings file (TOML) [default: DATA_DIR/config.toml, if present]; flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Where a node or coordinator is reachable and how it joins.
#[derive(Args, Debug, Clone)]
pub struct SwarmArgs {
    /// Address to listen on, e.g. /ip4/0.0.0.0/tcp/4001 (repeatable) [default: TCP and QUIC
    /// on all interfaces].
    #[arg(long, value_name = "MULTIADDR")]
    pub listen: Vec<String>,
    /// A peer to join the swarm through, ending in /p2p/PEERID (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<String>,
    /// Do not look for peers on the local network (mDNS).
    #[arg(long)]
    pub no_mdns: bool,
}

/// `swarmtune node`
#[derive(Args, Debug)]
pub struct NodeArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub swarm: SwarmArgs,
    /// Compute backend: cpu (burn-flex), ndarray or gpu (a build with the gpu feature).
    #[arg(long)]
    pub device: Option<DeviceKind>,
    /// CPU threads for training (0: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Memory training may use, in GB (told to coordinators, which size leases to it).
    #[arg(long, value_name = "GB")]
    pub max_memory: Option<f64>,
}

/// `swarmtune coordinator`
#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub swarm: SwarmArgs,
    /// CPU threads for verification replays and evaluation (0: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// How a client command reaches its coordinator.
#[derive(Args, Debug, Clone)]
pub struct CoordinatorAddr {
    /// The coordinator's address, ending in /p2p/PEERID (it prints it at start) [default:
    /// `coordinator` in the config file].
    #[arg(long, value_name = "MULTIADDR")]
    pub coordinator: Option<String>,
    /// Seconds to wait for the coordinator to answer.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}

/// `swarmtune submit`
#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// The job file (TOML), e.g. examples/job.toml.
    pub job: PathBuf,
    #[command(flatten)]
    pub to: CoordinatorAddr,
    #[command(flatten)]
    pub data: DataArgs,
    /// Seconds to keep serving the dataset while the coordinator fetches it.
    #[arg(long, default_value_t = 600)]
    pub upload_timeout: u64,
}

/// `swarmtune status`
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// A job id (or a prefix of it); without one, every job of the coordinator.
    pub job: Option<String>,
    #[command(flatten)]
    pub to: CoordinatorAddr,
    #[command(flatten)]
    pub data: DataArgs,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Draw the job's eval loss per version into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

/// `swarmtune pull`
#[derive(Args, Debug)]
pub struct PullArgs {
    /// The module, optionally with a version: shout or shout@3 [default version: the latest].
    pub module: String,
    /// Directory to write the PEFT adapter to (adapter_model.safetensors, adapter_config.json,
    /// manifest.json).
    #[arg(long)]
    pub out: PathBuf,
    /// Also write base + adapter merged as a Hugging Face checkpoint in OUT/merged.
    #[arg(long)]
    pub merged: bool,
    #[command(flatten)]
    pub to: CoordinatorAddr,
    #[command(flatten)]
    pub data: DataArgs,
}

/// `swarmtune id`
#[derive(Args, Debug)]
pub struct IdArgs {
    #[command(flatten)]
    pub data: DataArgs,
}

/// `swarmtune demo`
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Keep the data dirs, the log (DIR/demo.log), a loss plot (DIR/loss.svg) and the
    /// pulled module (DIR/module) here [default: a temporary directory, removed at the end].
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
    /// Volunteers to start.
    #[arg(long, default_value_t = 3)]
    pub volunteers: usize,
    /// Rounds to train [default: the count in examples/job.toml].
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Optimizer steps per lease [default: examples/job.toml's inner_steps].
    #[arg(long)]
    pub inner_steps: Option<u32>,
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
    /// Byzantine volunteers: a job run by honest and malicious volunteers (noise, sign flip,
    /// scaling, freeloading, replays, copies, wrong base, garbage, forged signatures, a slow
    /// drip) at several malicious shares, against the all-honest run.
    Adversary(BenchAdversaryArgs),
    /// Verification economics: how likely a cheater that fakes some of its leases (or part of
    /// each) is to be caught under several verification policies, and what the checks cost.
    Verification(BenchVerificationArgs),
}

/// `swarmtune bench verification`
#[derive(Args, Debug)]
pub struct BenchVerificationArgs {
    /// Seed of the simulation's random draws.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// `swarmtune bench adversary`
#[derive(Args, Debug)]
pub struct BenchAdversaryArgs {
    /// Volunteers in every scenario.
    #[arg(long, default_value_t = 34)]
    pub volunteers: usize,
    /// Shares of malicious volunteers, in percent (the all-honest run always comes first).
    #[arg(long, value_delimiter = ',', default_value = "10,20,30")]
    pub percents: Vec<u32>,
    /// Rounds of the job.
    #[arg(long, default_value_t = 6)]
    pub rounds: u32,
    /// Units of work per round (the job's quorum) [default: one per volunteer].
    #[arg(long)]
    pub quorum: Option<u32>,
    /// The job's bound on a delta's norm.
    #[arg(long, default_value_t = 20.0)]
    pub max_delta_norm: f64,
    /// Attackers attack from their first lease instead of after their probation.
    #[arg(long)]
    pub impatient: bool,
    /// Where the scenarios keep their state [default: a temporary directory].
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
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
    /// Runs of each transfer measurement (plain copies and fetches alike); the best counts.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
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
