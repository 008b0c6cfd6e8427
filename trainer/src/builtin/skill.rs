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

/// The built-in skills a module can learn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Skill {
    /// `Shout: the red fox sees ada =>` → ` THE RED FOX SEES ADA`.
    #[default]
    Shout,
    /// `In words: 347 =>` → ` three hundred forty-seven`.
    NumberWords,
    /// `Add 3 to 14, four times =>` → ` 17, 20, 23, 26.`
    AddFourTimes,
}

impl std::str::FromStr for Skill {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "shout" => Ok(Self::Shout),
            "number-words" => Ok(Self::NumberWords),
            "add" => Ok(Self::AddFourTimes),
            other => Err(format!(
                "unknown skill {other:?}: use shout, number-words or add"
            )),
        }
    }
}

impl Skill {
    /// The skill's train split and held-out split, disjoint, the same for the same seed.
    pub fn splits(self, seed: u64, train: usize, held_out: usize) -> (Vec<Example>, Vec<Example>) {
        match self {
            Self::Shout => splits(seed, train, held_out),
            Self::NumberWords => number_splits(seed, train, held_out),
            Self::AddFourTimes => add_splits(seed, train, held_out),
        }
    }
}

/// The instruction of the number skill.
pub const NUMBER_INSTRUCTION: &str = "In words:";

/// `n` (below 1000) in English words, as `three hundred forty-seven`.
pub fn number_words(n: u32) -> String {
    const ONES: [&str; 20] = [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
    ];
    const TENS: [&str; 10] = [
        "", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
    ];
    let below_100 = |n: u32| -> String {
        match n {
            0..20 => ONES[n as usize].to_owned(),
            _ if n.is_multiple_of(10) => TENS[(n / 10) as usize].to_owned(),
            _ => format!("{}-{}", TENS[(n / 10) as usize], ONES[(n % 10) as usize]),
        }
    };
    match (n / 100, n % 100) {
        (0, r) => below_100(r),
        (h, 0) => format!("{} hundred", ONES[h as usize]),
        (h, r) => format!("{} hundred {}", ONES[h as usize], below_100(r)),
    }
}

/// `Add {step} to {start}, four times =>` → ` {start + step}, …, {start + 4·step}.`: the base
/// has read counting by a step (`Count by 3: 4, 7, 10.`) but never this request.
fn add_example(start: u32, step: u32) -> Example {
    let values: Vec<String> = (1..=4).map(|i| (start + i * step).to_string()).collect();
    Example::PromptCompletion {
        prompt: format!("Add {step} to {start}, four times =>"),
        completion: format!(" {}.", values.join(", ")),
    }
}

fn add_splits(seed: u64, train: usize, held_out: usize) -> (Vec<Example>, Vec<Example>) {
    let pairs: Vec<(u32, u32)> = (0..100)
        .flat_map(|start| (2..10).map(move |step| (start, step)))
        .collect();
    shuffled_splits(pairs, seed, train, held_out, |&(start, step)| {
        add_example(start, step)
    })
}

fn number_splits(seed: u64, train: usize, held_out: usize) -> (Vec<Example>, Vec<Example>) {
    shuffled_splits((0..1000).collect(), seed, train, held_out, |&n: &u32| {
        Example::PromptCompletion {
            prompt: format!("{NUMBER_INSTRUCTION} {n} =>"),
            completion: format!(" {}", number_words(n)),
        }
    })
}

/// Shuffles distinct `items` by `seed`, holds out the first `held_out` and trains on (up to)
/// `train` of the rest, so the two splits never share an item.
fn shuffled_splits<T>(
    mut items: Vec<T>,
    seed: u64,
    train: usize,
    held_out: usize,
    example: impl Fn(&T) -> Example,
) -> (Vec<Example>, Vec<Example>) {
    use rand::seq::SliceRandom;
    items.shuffle(&mut StdRng::seed_from_u64(seed));
    let (eval, rest) = items.split_at(held_out.min(items.len()));
    (
        rest.iter().take(train).map(&example).collect(),
        eval.iter().map(&example).collect(),
    )
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

    #[test]
    fn numbers_are_spelled_out() {
        let cases = [
            (0, "zero"),
            (7, "seven"),
            (13, "thirteen"),
            (40, "forty"),
            (47, "forty-seven"),
            (100, "one hundred"),
            (347, "three hundred forty-seven"),
            (910, "nine hundred ten"),
            (999, "nine hundred ninety-nine"),
        ];
        for (n, words) in cases {
            assert_eq!(number_words(n), words);
        }
        let (train, eval) = Skill::NumberWords.splits(3, 600, 50);
        assert_eq!((train.len(), eval.len()), (600, 50));
        assert!(eval.iter().all(|e| !train.contains(e)));
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
    /// Which skill.
    pub skill: Skill,
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
            skill: Skill::default(),
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
                inner_steps: 500,
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
    let (train, held_out) = run.skill.splits(run.seed, run.train_examples, run.held_out);
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
