//! Pretraining a small Llama-architecture base from scratch, from a recipe: the byte-level
//! tokenizer, the generated corpus, random initialisation, full-weight AdamW with warmup and
//! cosine decay, periodic held-out evaluation, and a Hugging Face directory as the result
//! (`config.json`, `model.safetensors`, `tokenizer.json`) that transformers loads unchanged.
//! This is how the built-in base that ships with swarmtune was made.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

use crate::builtin::corpus;
use crate::checkpoint::{Checkpoint, read_safetensors, write_atomic, write_safetensors};
use crate::config::{LlamaConfig, ModelConfig, RopeScaling};
use crate::data::{Example, ShardPlan, build_shards};
use crate::error::{Result, TrainerError};
use crate::eval::eval_loss;
use crate::model::{CausalLm, ForwardOptions};
use crate::optim::{AdamW, Moments, clip_grad_norm};
use crate::tensors::{HostTensor, NamedTensors};
use crate::train::LeaseData;

/// The end-of-text token of the byte-level tokenizer.
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// A pretraining recipe, as written in a TOML file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The architecture.
    pub model: BaseShape,
    /// The corpus.
    pub corpus: CorpusRecipe,
    /// The optimisation.
    pub train: PretrainSettings,
}

/// The shape of a Llama-architecture base with a byte-level vocabulary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseShape {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Transformer blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// SwiGLU width.
    pub intermediate_size: usize,
    /// Context the model is trained for.
    pub max_position_embeddings: usize,
    /// RoPE base.
    pub rope_theta: f64,
}

/// Where the text comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorpusRecipe {
    /// Seed of the generated corpus.
    pub seed: u64,
    /// Number of generated documents.
    pub documents: usize,
    /// Share of documents held out for evaluation.
    pub eval_fraction: f32,
    /// Steps at the start that train on copying exercises alone (random letter strings
    /// written twice), before the full mix. Copying is the circuit a tiny model learns last
    /// from mixed text; learning it first is what lets a LoRA module teach the base a skill.
    #[serde(default)]
    pub copy_first_steps: usize,
}

/// How long and how fast to train.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainSettings {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: u32,
    /// Peak learning rate.
    pub learning_rate: f32,
    /// Learning rate at the end of the cosine decay.
    pub min_learning_rate: f32,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// Decoupled weight decay on matrices.
    pub weight_decay: f32,
    /// Gradient-norm clip.
    pub max_grad_norm: f32,
    /// Seed of the initialisation and the batch order.
    pub seed: u64,
    /// Evaluate on the held-out split every this many steps.
    pub eval_every: usize,
}

impl Recipe {
    /// Reads and checks a recipe file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainerError::io(path, e))?;
        let recipe: Self =
            toml::from_str(&text).map_err(|e| TrainerError::config(path, e.to_string()))?;
        recipe
            .validate()
            .map_err(|e| TrainerError::config(path, e))?;
        Ok(recipe)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let m = &self.model;
        if m.hidden_size == 0 || m.num_hidden_layers == 0 || m.intermediate_size == 0 {
            return Err("model sizes must be positive".into());
        }
        if m.num_attention_heads == 0 || !m.hidden_size.is_multiple_of(m.num_attention_heads) {
            return Err("hidden_size must be a multiple of num_attention_heads".into());
        }
        if m.num_key_value_heads == 0
            || !m.num_attention_heads.is_multiple_of(m.num_key_value_heads)
        {
            return Err("num_attention_heads must be a multiple of num_key_value_heads".into());
        }
        if !(m.hidden_size / m.num_attention_heads).is_multiple_of(2) {
            return Err("the head width must be even for RoPE".into());
        }
        let t = &self.train;
        if t.steps == 0 || t.batch_size == 0 || t.seq_len < 2 || t.eval_every == 0 {
            return Err(
                "train.steps, batch_size, eval_every must be positive and seq_len at least 2"
                    .into(),
            );
        }
        if t.seq_len as usize > m.max_position_embeddings {
            return Err("train.seq_len exceeds model.max_position_embeddings".into());
        }
        if !(t.learning_rate > 0.0
            && t.min_learning_rate >= 0.0
            && t.min_learning_rate <= t.learning_rate)
        {
            return Err("need 0 ≤ min_learning_rate ≤ learning_rate and learning_rate > 0".into());
        }
        if self.corpus.copy_first_steps > t.steps {
            return Err("corpus.copy_first_steps exceeds train.steps".into());
        }
        if self.corpus.documents < 10
            || !(0.0..0.5).contains(&self.corpus.eval_fraction)
            || self.corpus.eval_fraction == 0.0
        {
            return Err(
                "corpus needs at least 10 documents and an eval_fraction in (0, 0.5)".into(),
            );
        }
        Ok(())
    }

    /// The learning rate of step `step` (0-based): linear warmup, then cosine decay.
    pub fn learning_rate(&self, step: usize) -> f32 {
        let t = &self.train;
        if step < t.warmup_steps {
            return t.learning_rate * (step + 1) as f32 / t.warmup_steps as f32;
        }
        let span = (t.steps - t.warmup_steps).max(1) as f32;
        let progress = ((step - t.warmup_steps) as f32 / span).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f32::consts::PI * progress).cos());
        t.min_learning_rate + (t.learning_rate - t.min_learning_rate) * cosine
    }
}

/// A byte-level tokenizer: one token per byte (GPT-2's byte-to-character alphabet, no merges)
/// plus the end-of-text token. Any text encodes, and transformers loads it as a fast tokenizer.
pub fn byte_level_tokenizer() -> Result<Tokenizer> {
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let vocab: tokenizers::models::bpe::Vocab = alphabet
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .build()
        .map_err(|e| TrainerError::InvalidInput(format!("byte-level vocabulary: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, false, false)));
    tokenizer.with_decoder(Some(ByteLevel::new(false, false, false)));
    tokenizer.add_special_tokens(&[tokenizers::AddedToken::from(EOS_TOKEN, true)]);
    Ok(tokenizer)
}

/// One evaluation during pretraining.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalPoint {
    /// Steps taken.
    pub step: usize,
    /// Mean training loss over the steps since the last point.
    pub train_loss: f64,
    /// Held-out loss.
    pub eval_loss: f64,
    /// Exact match on held-out copying prompts (`Echo: <random letters> =>`): whether the
    /// model has learned to look back and copy, which the skills it is fine-tuned for need.
    #[serde(default)]
    pub copy_exact_match: f64,
}

/// What a pretraining run did; written next to the model as `pretrain_report.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PretrainReport {
    /// Parameters of the model.
    pub parameters: usize,
    /// Steps taken.
    pub steps: usize,
    /// Tokens trained on.
    pub tokens: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// CPU threads used.
    pub threads: usize,
    /// burn backend.
    pub backend: String,
    /// Evaluations along the way; the last is the final eval loss.
    pub evals: Vec<EvalPoint>,
}

/// Progress for progress bars.
#[derive(Clone, Debug)]
pub enum PretrainProgress {
    /// A step finished with this loss.
    Step {
        /// Steps done.
        step: usize,
        /// Steps in total.
        total: usize,
        /// Its training loss.
        loss: f32,
    },
    /// A held-out evaluation finished.
    Eval(EvalPoint),
    /// An interrupted run in the output directory is continued from this step.
    Resumed(usize),
}

/// Pretrains the recipe's model on `device` (a plain device; autodiff is added here) and
/// writes a Hugging Face directory to `out`.
pub fn pretrain(
    recipe: &Recipe,
    device: &burn::tensor::Device,
    backend: &str,
    threads: usize,
    out: &Path,
    progress: &mut dyn FnMut(PretrainProgress),
    cancel: &AtomicBool,
) -> Result<PretrainReport> {
    recipe.validate().map_err(TrainerError::InvalidInput)?;
    // Before the minutes of corpus building: a directory holding another run fails at once.
    let resumed = ResumeState::read(out, recipe)?;
    let clock = Instant::now();
    let tokenizer = byte_level_tokenizer()?;
    let eos = tokenizer.token_to_id(EOS_TOKEN).ok_or_else(|| {
        TrainerError::InvalidInput("the tokenizer lost its end-of-text token".into())
    })?;
    let config = llama_config(&recipe.model, tokenizer.get_vocab_size(true), eos);
    let model_config = ModelConfig::Llama(config.clone());

    let documents: Vec<Example> = corpus::documents(recipe.corpus.seed, recipe.corpus.documents)
        .into_iter()
        .map(Example::Text)
        .collect();
    let tokenizer_json = tokenizer
        .to_string(true)
        .map_err(|e| TrainerError::InvalidInput(format!("cannot serialise the tokenizer: {e}")))?;
    let tokenizer_hash = *blake3::hash(tokenizer_json.as_bytes()).as_bytes();
    let plan = ShardPlan {
        seq_len: recipe.train.seq_len,
        seqs_per_shard: 4096,
        eval_fraction: recipe.corpus.eval_fraction,
        seed: recipe.corpus.seed,
    };
    let data = build_shards(
        &documents,
        &tokenizer,
        tokenizer_hash,
        Some(eos),
        eos,
        &plan,
    )
    .map_err(|e| TrainerError::InvalidInput(e.to_string()))?;
    let t = &recipe.train;
    let lease = LeaseData::new(&data.train, config.vocab_size)?;
    // The copying warm start: enough copying documents for its steps, packed the same way.
    let copy_data = if recipe.corpus.copy_first_steps > 0 {
        let per_step = t.batch_size * t.seq_len as usize / 16;
        let copying: Vec<Example> = corpus::copying_documents(
            recipe.corpus.seed ^ 0xc09f,
            (recipe.corpus.copy_first_steps * per_step).max(10),
        )
        .into_iter()
        .map(Example::Text)
        .collect();
        let plan = ShardPlan {
            eval_fraction: 0.0,
            ..plan
        };
        Some(
            build_shards(&copying, &tokenizer, tokenizer_hash, Some(eos), eos, &plan)
                .map_err(|e| TrainerError::InvalidInput(e.to_string()))?,
        )
    } else {
        None
    };
    let copy_lease = copy_data
        .as_ref()
        .map(|d| LeaseData::new(&d.train, config.vocab_size))
        .transpose()?;
    // Random strings from a seed of their own (so the corpus almost surely lacks them),
    // scored by exact match at each eval.
    let copy_probe = corpus::copy_probe(recipe.corpus.seed ^ 0x00c0_ffee, 20);

    let (mut params, mut moments, mut evals, first_step, seconds_before) = match resumed {
        Some(state) => {
            progress(PretrainProgress::Resumed(state.step));
            (
                state.params,
                state.moments,
                state.evals,
                state.step,
                state.seconds,
            )
        }
        None => {
            let params = init_weights(&config, recipe.train.seed)?;
            let moments = Moments::zeros_like(&params);
            (params, moments, Vec::new(), 0, 0.0)
        }
    };
    let parameters = params.values().map(HostTensor::len).sum();
    let (mut loss_sum, mut loss_steps) = (0f64, 0usize);
    for step in first_step..t.steps {
        if cancel.load(Ordering::Relaxed) {
            return Err(TrainerError::Cancelled);
        }
        let model = CausalLm::from_checkpoint(
            model_config.clone(),
            Checkpoint::from_tensors("the model being pretrained", params.clone()),
            device,
        )?
        .to_trainable();
        let (batch, mask) = match &copy_lease {
            Some(copy) if step < recipe.corpus.copy_first_steps => {
                copy.batch(t.seed, step, t.batch_size)
            }
            _ => lease.batch(t.seed, step, t.batch_size),
        };
        let (loss, _) = model.next_token_loss(&batch, Some(&mask), ForwardOptions::default())?;
        let grads = loss.backward();
        let loss = loss.into_scalar::<f32>();
        if !loss.is_finite() {
            return Err(TrainerError::InvalidInput(format!(
                "the loss diverged at step {step}"
            )));
        }
        let mut g = model.weight_grads(&grads)?;
        drop(model);
        clip_grad_norm(&mut g, t.max_grad_norm);
        let opt = AdamW {
            lr: recipe.learning_rate(step),
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: t.weight_decay,
        };
        // Decay matrices only, as is usual: not norms, not the embedding.
        opt.step(&mut params, &mut moments, &g, |name| {
            name.ends_with("proj.weight")
        });
        loss_sum += f64::from(loss);
        loss_steps += 1;
        progress(PretrainProgress::Step {
            step: step + 1,
            total: t.steps,
            loss,
        });
        if (step + 1) % t.eval_every == 0 || step + 1 == t.steps {
            let model = CausalLm::from_checkpoint(
                model_config.clone(),
                Checkpoint::from_tensors("the model being pretrained", params.clone()),
                device,
            )?;
            let eval = eval_loss(
                &model,
                ForwardOptions::default(),
                std::slice::from_ref(&data.eval),
                t.batch_size,
            )?;
            let copied = crate::eval::answers(
                &model,
                ForwardOptions::default(),
                &tokenizer,
                &copy_probe,
                Some(eos),
                2,
            )?;
            evals.push(EvalPoint {
                step: step + 1,
                train_loss: loss_sum / loss_steps as f64,
                eval_loss: eval.loss,
                copy_exact_match: crate::eval::exact_match(&copied),
            });
            progress(PretrainProgress::Eval(evals[evals.len() - 1].clone()));
            (loss_sum, loss_steps) = (0.0, 0);
            // Save at every evaluation, so a long run that stops early still leaves a model.
            let report = PretrainReport {
                parameters,
                steps: step + 1,
                tokens: ((step + 1) * t.batch_size) as u64 * u64::from(t.seq_len),
                seconds: seconds_before + clock.elapsed().as_secs_f64(),
                threads,
                backend: backend.to_owned(),
                evals: evals.clone(),
            };
            // The state first: it alone is what a resumed run reads, and it is self-consistent.
            ResumeState::write(out, recipe, &params, &moments, &report)?;
            save(out, &config, &params, &tokenizer_json, &report)?;
            if step + 1 == t.steps {
                return Ok(report);
            }
        }
    }
    Err(TrainerError::InvalidInput(
        "pretraining ended without a final evaluation".into(),
    ))
}

pub(crate) fn llama_config(shape: &BaseShape, vocab_size: usize, eos: u32) -> LlamaConfig {
    LlamaConfig {
        model_type: "llama".into(),
        vocab_size,
        hidden_size: shape.hidden_size,
        intermediate_size: shape.intermediate_size,
        num_hidden_layers: shape.num_hidden_layers,
        num_attention_heads: shape.num_attention_heads,
        num_key_value_heads: shape.num_key_value_heads,
        head_dim: shape.hidden_size / shape.num_attention_heads,
        rms_norm_eps: 1e-5,
        rope_theta: shape.rope_theta,
        rope_scaling: RopeScaling::None,
        attention_bias: false,
        o_bias: false,
        mlp_bias: false,
        tie_word_embeddings: true,
        max_position_embeddings: shape.max_position_embeddings,
        eos_token_id: Some(eos),
        bos_token_id: Some(eos),
    }
}

/// Random weights as transformers initialises a Llama: normal(0, 0.02) matrices, unit norms;
/// the output projections of each block scaled by 1/sqrt(2·layers) (GPT-2's residual scaling)
/// so the residual stream does not grow with depth.
pub(crate) fn init_weights(c: &LlamaConfig, seed: u64) -> Result<NamedTensors> {
    let mut rng = StdRng::seed_from_u64(seed);
    let std = 0.02f32;
    let residual_std = std / (2.0 * c.num_hidden_layers as f32).sqrt();
    let mut out = NamedTensors::new();
    let mut normal = |name: String, shape: Vec<usize>, std: f32, rng: &mut StdRng| -> Result<()> {
        let dist = Normal::new(0.0f32, std)
            .map_err(|e| TrainerError::InvalidInput(format!("init std {std}: {e}")))?;
        let data = (0..shape.iter().product())
            .map(|_| dist.sample(rng))
            .collect();
        out.insert(name, HostTensor { shape, data });
        Ok(())
    };
    let (h, q, kv, i) = (
        c.hidden_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        c.intermediate_size,
    );
    normal(
        "model.embed_tokens.weight".into(),
        vec![c.vocab_size, h],
        std,
        &mut rng,
    )?;
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        normal(
            format!("{p}.self_attn.q_proj.weight"),
            vec![q, h],
            std,
            &mut rng,
        )?;
        normal(
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv, h],
            std,
            &mut rng,
        )?;
        normal(
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv, h],
            std,
            &mut rng,
        )?;
        normal(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, q],
            residual_std,
            &mut rng,
        )?;
        normal(
            format!("{p}.mlp.gate_proj.weight"),
            vec![i, h],
            std,
            &mut rng,
        )?;
        normal(format!("{p}.mlp.up_proj.weight"), vec![i, h], std, &mut rng)?;
        normal(
            format!("{p}.mlp.down_proj.weight"),
            vec![h, i],
            residual_std,
            &mut rng,
        )?;
    }
    let ones = |n| HostTensor {
        shape: vec![n],
        data: vec![1.0; n],
    };
    for l in 0..c.num_hidden_layers {
        out.insert(format!("model.layers.{l}.input_layernorm.weight"), ones(h));
        out.insert(
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            ones(h),
        );
    }
    out.insert("model.norm.weight".into(), ones(h));
    Ok(out)
}

/// What an interrupted run leaves to continue from: weights, AdamW moments, the evaluations
/// so far and the recipe they belong to, in one file written atomically at every evaluation.
struct ResumeState {
    step: usize,
    seconds: f64,
    params: NamedTensors,
    moments: Moments,
    evals: Vec<EvalPoint>,
}

/// The resume file inside the output directory.
pub const RESUME_FILE: &str = "pretrain_state.safetensors";

impl ResumeState {
    fn write(
        out: &Path,
        recipe: &Recipe,
        params: &NamedTensors,
        moments: &Moments,
        report: &PretrainReport,
    ) -> Result<()> {
        let mut tensors = NamedTensors::new();
        for (prefix, set) in [
            ("param.", params),
            ("exp_avg.", &moments.exp_avg),
            ("exp_avg_sq.", &moments.exp_avg_sq),
        ] {
            tensors.extend(set.iter().map(|(n, t)| (format!("{prefix}{n}"), t.clone())));
        }
        let text = |e: String| TrainerError::InvalidInput(e);
        let meta = BTreeMap::from([
            ("format".to_owned(), "swarmtune-pretrain-state".to_owned()),
            ("step".to_owned(), report.steps.to_string()),
            ("optimizer_step".to_owned(), moments.step.to_string()),
            ("seconds".to_owned(), report.seconds.to_string()),
            (
                "recipe".to_owned(),
                toml::to_string(recipe).map_err(|e| text(e.to_string()))?,
            ),
            (
                "evals".to_owned(),
                serde_json::to_string(&report.evals).map_err(|e| text(e.to_string()))?,
            ),
        ]);
        std::fs::create_dir_all(out).map_err(|e| TrainerError::io(out, e))?;
        write_safetensors(&out.join(RESUME_FILE), &tensors, &meta)
    }

    /// The state of an interrupted run of `recipe` in `out`, if there is one. A run of another
    /// recipe is an error rather than silently overwritten; only `train.steps` and
    /// `train.eval_every` may change, so that a run can be extended.
    fn read(out: &Path, recipe: &Recipe) -> Result<Option<Self>> {
        let path = out.join(RESUME_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let bad = |reason: String| TrainerError::Safetensors {
            path: path.clone(),
            reason,
        };
        let (tensors, meta) = read_safetensors(&path)?;
        if meta.get("format").map(String::as_str) != Some("swarmtune-pretrain-state") {
            return Err(bad("not a pretraining state".into()));
        }
        let field = |key: &str| {
            meta.get(key)
                .ok_or_else(|| bad(format!("no {key} in its metadata")))
        };
        let number = |key: &str| -> Result<u64> {
            field(key)?.parse().map_err(|e| bad(format!("{key}: {e}")))
        };
        let saved: Recipe =
            toml::from_str(field("recipe")?).map_err(|e| bad(format!("recipe: {e}")))?;
        let comparable = |r: &Recipe| {
            let mut r = r.clone();
            r.train.steps = 0;
            r.train.eval_every = 0;
            r
        };
        if comparable(&saved) != comparable(recipe) {
            return Err(TrainerError::InvalidInput(format!(
                "{} holds a pretraining run of another recipe; choose another --out or delete it",
                out.display()
            )));
        }
        let step = number("step")? as usize;
        if step >= recipe.train.steps {
            return Err(TrainerError::InvalidInput(format!(
                "{} already holds a run of {step} steps, not fewer than the recipe's {}; raise train.steps to continue it",
                out.display(),
                recipe.train.steps
            )));
        }
        let evals: Vec<EvalPoint> =
            serde_json::from_str(field("evals")?).map_err(|e| bad(format!("evals: {e}")))?;
        let seconds: f64 = field("seconds")?
            .parse()
            .map_err(|e| bad(format!("seconds: {e}")))?;
        let split = |prefix: &str| -> NamedTensors {
            tensors
                .iter()
                .filter_map(|(n, t)| n.strip_prefix(prefix).map(|n| (n.to_owned(), t.clone())))
                .collect()
        };
        let params = split("param.");
        let moments = Moments {
            step: number("optimizer_step")?,
            exp_avg: split("exp_avg."),
            exp_avg_sq: split("exp_avg_sq."),
        };
        if params.is_empty()
            || !crate::tensors::same_layout(&params, &moments.exp_avg)
            || !crate::tensors::same_layout(&params, &moments.exp_avg_sq)
        {
            return Err(bad("weights and moments do not match".into()));
        }
        Ok(Some(Self {
            step,
            seconds,
            params,
            moments,
            evals,
        }))
    }
}

fn save(
    out: &Path,
    config: &LlamaConfig,
    params: &NamedTensors,
    tokenizer_json: &str,
    report: &PretrainReport,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| TrainerError::io(out, e))?;
    let json = |v: &serde_json::Value| {
        serde_json::to_string_pretty(v).map_err(|e| TrainerError::InvalidInput(e.to_string()))
    };
    let meta = BTreeMap::from([("format".to_owned(), "pt".to_owned())]);
    write_safetensors(&out.join("model.safetensors"), params, &meta)?;
    write_atomic(
        &out.join("config.json"),
        json(&config.to_hf_json())?.as_bytes(),
    )?;
    write_atomic(&out.join("tokenizer.json"), tokenizer_json.as_bytes())?;
    let tokenizer_config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "bos_token": EOS_TOKEN,
        "model_max_length": config.max_position_embeddings,
    });
    write_atomic(
        &out.join("tokenizer_config.json"),
        json(&tokenizer_config)?.as_bytes(),
    )?;
    let report =
        serde_json::to_value(report).map_err(|e| TrainerError::InvalidInput(e.to_string()))?;
    write_atomic(&out.join("pretrain_report.json"), json(&report)?.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_tokenizer_round_trips_any_text() {
        let t = byte_level_tokenizer().unwrap();
        assert_eq!(t.get_vocab_size(true), 257);
        for text in ["Shout: the cat => THE CAT", "émoji ✓ and\nnewlines\t", ""] {
            let ids = t.encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(ids.len(), text.len(), "one token per byte");
            assert_eq!(t.decode(&ids, false).unwrap(), text);
        }
        let eos = t.token_to_id(EOS_TOKEN).unwrap();
        assert_eq!(
            t.encode(format!("a{EOS_TOKEN}").as_str(), false)
                .unwrap()
                .get_ids()[1],
            eos
        );
    }

    #[test]
    fn the_schedule_warms_up_then_decays() {
        let recipe: Recipe = toml::from_str(include_str!("../recipes/builtin-base.toml")).unwrap();
        let t = &recipe.train;
        assert!(recipe.learning_rate(0) < recipe.learning_rate(t.warmup_steps));
        assert!((recipe.learning_rate(t.warmup_steps) - t.learning_rate).abs() < 1e-6);
        assert!(
            (recipe.learning_rate(t.steps - 1) - t.min_learning_rate).abs()
                < 1e-3 * t.learning_rate
        );
    }
}
