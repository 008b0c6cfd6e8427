//! `swarmtune bench train`: LoRA training speed on this machine (tokens per second of forward,
//! backward and optimizer step), step time and peak memory, on the built-in base's shape or on
//! a SmolLM2-135M-shaped model with random weights.

use std::time::Instant;

use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::config::{LlamaConfig, ModelConfig, RopeScaling};
use crate::data::Shard;
use crate::error::{Result, TrainerError};
use crate::lora::{Adapter, LoraConfig};
use crate::model::CausalLm;
use crate::pretrain::init_weights;
use crate::train::{LeaseData, LocalTrainer, LoraState, PhaseTimes, Provenance, TrainSpec};

/// Model shapes the benchmark knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchShape {
    /// The built-in base (random weights of its shape).
    Builtin,
    /// SmolLM2-135M: hidden 576, 30 layers, 9 heads, 3 kv heads, intermediate 1536, vocab
    /// 49152, tied embeddings.
    Smollm2_135m,
}

impl std::str::FromStr for BenchShape {
    type Err = TrainerError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "builtin" => Ok(Self::Builtin),
            "smollm2-135m" => Ok(Self::Smollm2_135m),
            other => Err(TrainerError::InvalidInput(format!(
                "unknown shape {other:?}: use builtin or smollm2-135m"
            ))),
        }
    }
}

impl BenchShape {
    /// The name `--shape` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Builtin => "builtin",
            Self::Smollm2_135m => "smollm2-135m",
        }
    }

    fn config(self) -> LlamaConfig {
        let (hidden, layers, heads, kv, inter, vocab) = match self {
            Self::Builtin => (256, 4, 8, 4, 688, 257),
            Self::Smollm2_135m => (576, 30, 9, 3, 1536, 49152),
        };
        LlamaConfig {
            model_type: "llama".into(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim: hidden / heads,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::None,
            attention_bias: false,
            o_bias: false,
            mlp_bias: false,
            tie_word_embeddings: true,
            max_position_embeddings: 8192,
            eos_token_id: None,
            bos_token_id: None,
        }
    }
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct TrainBench {
    /// Model shape.
    pub shape: BenchShape,
    /// Tokens per sequence.
    pub seq: usize,
    /// Sequences per step.
    pub batch: usize,
    /// LoRA rank (alpha = 2·rank) on q_proj and v_proj.
    pub rank: usize,
    /// Measured steps (after 2 warm-up steps).
    pub steps: usize,
}

/// The result; `--json` prints it as one object.
#[derive(Clone, Debug, Serialize)]
pub struct TrainBenchReport {
    /// Model shape.
    pub shape: String,
    /// burn backend.
    pub backend: String,
    /// CPU threads.
    pub threads: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Sequences per step.
    pub batch: usize,
    /// LoRA rank.
    pub rank: usize,
    /// Trainable parameters.
    pub trainable_parameters: usize,
    /// Median step time, milliseconds.
    pub step_ms: f64,
    /// Training tokens per second at the median step time.
    pub tokens_per_s: f64,
    /// Median forward time (with the loss), milliseconds.
    pub forward_ms: f64,
    /// Median backward time, milliseconds.
    pub backward_ms: f64,
    /// Median optimizer time, milliseconds.
    pub optimizer_ms: f64,
    /// Peak resident memory of the process, bytes (0 where the OS does not say).
    pub peak_rss_bytes: u64,
}

/// Runs the benchmark on `device` (a plain device); `backend` and `threads` are recorded.
pub fn train_bench(
    b: &TrainBench,
    device: &burn::tensor::Device,
    backend: &str,
    threads: usize,
) -> Result<TrainBenchReport> {
    if b.seq < 2 || b.batch == 0 || b.rank == 0 || b.steps == 0 {
        return Err(TrainerError::InvalidInput(
            "seq ≥ 2 and batch, rank, steps ≥ 1 are needed".into(),
        ));
    }
    let config = b.shape.config();
    let weights = init_weights(&config, 0)?;
    let vocab = config.vocab_size;
    let model = CausalLm::from_checkpoint(
        ModelConfig::Llama(config),
        Checkpoint::from_tensors("random", weights),
        device,
    )?
    .to_autodiff();
    let lora = LoraConfig {
        rank: b.rank,
        alpha: 2.0 * b.rank as f32,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
    };
    let trainer = LocalTrainer::new(&model, lora.clone(), Provenance::here(backend, threads))?;
    let adapter = Adapter::init(lora, trainer.sites(), 0);
    let trainable_parameters = adapter.tensors.values().map(|t| t.len()).sum();
    // Random tokens, every position a target: the cost of a step does not depend on the text.
    let n = b.batch * b.seq;
    let tokens = (0..n)
        .map(|i| ((i as u64 * 2_654_435_761) % vocab as u64) as u32)
        .collect();
    let shard = Shard::new(b.seq as u32, tokens, vec![1; n], [0; 32])
        .map_err(|e| TrainerError::InvalidInput(e.to_string()))?;
    let shards = [shard];
    let data = LeaseData::new(&shards, vocab)?;
    let spec = TrainSpec {
        inner_steps: b.steps + 2,
        batch_size: b.batch,
        micro_batch: b.batch,
        ..TrainSpec::default()
    };
    let mut state = LoraState::start(&adapter);
    let mut times = Vec::with_capacity(b.steps);
    let mut phases = Vec::with_capacity(b.steps);
    for i in 0..b.steps + 2 {
        let clock = Instant::now();
        trainer.step(&mut state, &data, &spec)?;
        let phase = trainer.take_times();
        if i >= 2 {
            times.push(clock.elapsed().as_secs_f64());
            phases.push(phase);
        }
    }
    let median = |mut v: Vec<f64>| -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let phase_ms = |f: fn(&PhaseTimes) -> f64| median(phases.iter().map(f).collect()) * 1e3;
    let (forward_ms, backward_ms, optimizer_ms) = (
        phase_ms(|p| p.forward),
        phase_ms(|p| p.backward),
        phase_ms(|p| p.optimizer),
    );
    let median = median(times);
    Ok(TrainBenchReport {
        shape: b.shape.name().to_owned(),
        backend: backend.to_owned(),
        threads,
        seq: b.seq,
        batch: b.batch,
        rank: b.rank,
        trainable_parameters,
        step_ms: median * 1e3,
        tokens_per_s: n as f64 / median,
        forward_ms,
        backward_ms,
        optimizer_ms,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// The process's peak resident set size, from `/proc/self/status` (`VmHWM`).
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
