//! The demo's skill: "shout" a sentence, writing it back in capital letters. The base has read
//! these words in lowercase and learned to copy, but never to change case on request, so it
//! scores near zero; a LoRA module learns the mapping from a few hundred examples and then
//! shouts sentences it has never seen. A person sees the difference at a glance.

use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::data::Example;

/// The instruction that starts every prompt.
pub const INSTRUCTION: &str = "Shout:";

/// A prompt/completion pair: `Shout: the cat sees ben =>` and ` THE CAT SEES BEN`.
pub fn example(sentence: &str) -> Example {
    Example::PromptCompletion {
        prompt: format!("{INSTRUCTION} {sentence} =>"),
        completion: format!(" {}", sentence.to_uppercase()),
    }
}

/// The skill's train split and held-out split: distinct sentences, the same for the same seed.
pub fn splits(seed: u64, train: usize, held_out: usize) -> (Vec<Example>, Vec<Example>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seen = std::collections::HashSet::new();
    let mut sentences = Vec::with_capacity(train + held_out);
    // The grammar has far more sentences than asked for; the bound only guards a bad request.
    let mut attempts = 0;
    while sentences.len() < train + held_out && attempts < 100 * (train + held_out) {
        attempts += 1;
        let s = super::corpus::sentence(&mut rng).to_lowercase();
        if s.len() <= 48 && seen.insert(s.clone()) {
            sentences.push(s);
        }
    }
    let eval = sentences.split_off(train.min(sentences.len()));
    (
        sentences.iter().map(|s| example(s)).collect(),
        eval.iter().map(|s| example(s)).collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_disjoint_and_reproducible() {
        let (train, eval) = splits(5, 300, 50);
        assert_eq!((train.len(), eval.len()), (300, 50));
        assert_eq!(splits(5, 300, 50).0, train);
        let prompts = |v: &[Example]| -> std::collections::HashSet<String> {
            v.iter()
                .map(|e| match e {
                    Example::PromptCompletion { prompt, .. } => prompt.clone(),
                    Example::Text(t) => t.clone(),
                })
                .collect()
        };
        assert!(prompts(&train).is_disjoint(&prompts(&eval)));
        let Example::PromptCompletion { prompt, completion } = &train[0] else {
            panic!()
        };
        assert!(prompt.starts_with(INSTRUCTION) && prompt.ends_with("=>"));
        assert_eq!(completion.trim(), completion.trim().to_uppercase());
    }
}

/// Settings of one single-machine run of the skill: how many examples, how long to train.
#[derive(Clone, Debug, PartialEq)]
pub struct SkillRun {
    /// Training examples.
    pub train_examples: usize,
    /// Held-out examples scored by exact match.
    pub held_out: usize,
    /// Seed of the examples, the adapter initialisation and the batch order.
    pub seed: u64,
    /// The adapter.
    pub lora: crate::lora::LoraConfig,
    /// The optimisation (its `inner_steps` is the whole run).
    pub spec: crate::train::TrainSpec,
    /// Tokens per packed sequence.
    pub seq_len: u32,
}

impl Default for SkillRun {
    fn default() -> Self {
        Self {
            train_examples: 600,
            held_out: 50,
            seed: 7,
            lora: crate::lora::LoraConfig {
                rank: 8,
                alpha: 16.0,
                dropout: 0.0,
                target_modules: crate::config::LLAMA_LORA_TARGETS
                    .iter()
                    .map(|t| t.to_string())
                    .collect(),
            },
            spec: crate::train::TrainSpec {
                inner_steps: 300,
                batch_size: 16,
                micro_batch: 16,
                learning_rate: 3e-3,
                commit_every: 50,
                ..crate::train::TrainSpec::default()
            },
            seq_len: 64,
        }
    }
}

/// What a skill run measured.
#[derive(Clone, Debug)]
pub struct SkillReport {
    /// Exact match of the base on the held-out prompts.
    pub base_exact_match: f64,
    /// Exact match of base + trained module.
    pub module_exact_match: f64,
    /// Seconds spent training.
    pub train_seconds: f64,
    /// Optimizer steps.
    pub steps: usize,
    /// Base and module answers to the held-out prompts, side by side.
    pub answers: Vec<(crate::eval::Answer, crate::eval::Answer)>,
    /// The trained module.
    pub module: crate::lora::Adapter,
}

/// Trains a module for the skill on one machine and scores base and module on held-out
/// prompts: the numbers the README reports, and what the demo shows.
pub fn run(
    base_dir: &std::path::Path,
    device: &burn::tensor::Device,
    run: &SkillRun,
    progress: &mut dyn FnMut(crate::train::TrainProgress),
) -> crate::error::Result<SkillReport> {
    use crate::error::TrainerError;
    use crate::eval::{answers, exact_match};
    use crate::lora::{Adapter, DeviceLora};
    use crate::model::{CausalLm, ForwardOptions};
    use crate::train::{LeaseData, LocalTrainer, Provenance};

    let (tokenizer, hash) = crate::data::load_tokenizer_with_hash(base_dir.join("tokenizer.json"))
        .map_err(|e| TrainerError::InvalidInput(e.to_string()))?;
    let base = CausalLm::load(base_dir, device)?;
    let eos = base.config().eos_token_id();
    let (train, held_out) = splits(run.seed, run.train_examples, run.held_out);
    let plan = crate::data::ShardPlan {
        seq_len: run.seq_len,
        seqs_per_shard: 256,
        eval_fraction: 0.0,
        seed: run.seed,
    };
    let shards = crate::data::build_shards(&train, &tokenizer, hash, eos, eos.unwrap_or(0), &plan)
        .map_err(|e| TrainerError::InvalidInput(e.to_string()))?;
    let base_answers = answers(
        &base,
        ForwardOptions::default(),
        &tokenizer,
        &held_out,
        eos,
        4,
    )?;

    let trainable = base.to_autodiff();
    let provenance = Provenance::here("run", rayon::current_num_threads());
    let trainer = LocalTrainer::new(&trainable, run.lora.clone(), provenance)?;
    let start = Adapter::init(run.lora.clone(), trainer.sites(), run.seed);
    let lease = LeaseData::new(&shards.train, base.config().vocab_size())?;
    let outcome = trainer.train(
        &start,
        &lease,
        &run.spec,
        progress,
        &std::sync::atomic::AtomicBool::new(false),
    )?;
    let module = Adapter {
        config: run.lora.clone(),
        tensors: outcome.end_state.params,
    };
    let lora = DeviceLora::new(&module, &base.lora_sites(&run.lora), device, false, 0)?;
    let module_answers = answers(
        &base,
        ForwardOptions { lora: Some(&lora) },
        &tokenizer,
        &held_out,
        eos,
        4,
    )?;
    Ok(SkillReport {
        base_exact_match: exact_match(&base_answers),
        module_exact_match: exact_match(&module_answers),
        train_seconds: outcome.stats.seconds,
        steps: outcome.stats.steps,
        answers: base_answers.into_iter().zip(module_answers).collect(),
        module,
    })
}
