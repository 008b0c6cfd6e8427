//! Evaluation of a base model with or without an adapter: mean next-token loss and perplexity
//! over held-out sequences, and exact-match accuracy of greedy completions of held-out prompts.

use tokenizers::Tokenizer;

use crate::data::{Example, Shard};
use crate::error::{Result, TrainerError};
use crate::generate::{Sampling, generate};
use crate::model::{CausalLm, ForwardOptions, TokenBatch};

/// Loss over a held-out split.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalLoss {
    /// Mean cross-entropy per target token (nats).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Target tokens the mean is over.
    pub target_tokens: u64,
}

/// Mean next-token loss over every sequence of `shards`, weighted by target tokens, in
/// batches of `batch_size` sequences.
pub fn eval_loss(
    model: &CausalLm,
    opts: ForwardOptions<'_>,
    shards: &[Shard],
    batch_size: usize,
) -> Result<EvalLoss> {
    let batch_size = batch_size.max(1);
    let mut total = 0f64;
    let mut count = 0u64;
    for shard in shards {
        let seq = shard.seq_len as usize;
        let n = shard.n_seqs();
        for start in (0..n).step_by(batch_size) {
            let end = (start + batch_size).min(n);
            let mask = &shard.loss_mask[start * seq..end * seq];
            // Position 0 is never a target; a batch with no other targets adds nothing.
            if !mask
                .iter()
                .enumerate()
                .any(|(i, &m)| m != 0 && i % seq != 0)
            {
                continue;
            }
            let batch = TokenBatch::new(
                shard.tokens[start * seq..end * seq].to_vec(),
                end - start,
                seq,
            )?;
            let (loss, targets) = model.next_token_loss(&batch, Some(mask), opts)?;
            total += f64::from(loss.into_scalar::<f32>()) * targets as f64;
            count += targets as u64;
        }
    }
    if count == 0 {
        return Err(TrainerError::InvalidInput(
            "the eval split has no target tokens".into(),
        ));
    }
    let loss = total / count as f64;
    Ok(EvalLoss {
        loss,
        perplexity: loss.exp(),
        target_tokens: count,
    })
}

/// One prompt's greedy answer next to the expected one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The prompt.
    pub prompt: String,
    /// The completion in the dataset.
    pub expected: String,
    /// What the model produced.
    pub produced: String,
}

impl Answer {
    /// Whether the produced text equals the expected one, ignoring surrounding whitespace.
    pub fn is_exact(&self) -> bool {
        self.produced.trim() == self.expected.trim()
    }
}

/// Greedy answers to the prompt/completion examples (plain-text examples are skipped), each
/// limited to the expected completion's token count plus `slack` tokens and cut at `eos`.
pub fn answers(
    model: &CausalLm,
    opts: ForwardOptions<'_>,
    tokenizer: &Tokenizer,
    examples: &[Example],
    eos: Option<u32>,
    slack: usize,
) -> Result<Vec<Answer>> {
    let encode = |text: &str| -> Result<Vec<u32>> {
        tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TrainerError::InvalidInput(format!("cannot tokenize {text:?}: {e}")))
    };
    let mut out = Vec::new();
    for example in examples {
        let Example::PromptCompletion { prompt, completion } = example else {
            continue;
        };
        let prompt_ids = encode(prompt)?;
        let expected_len = encode(completion)?.len();
        let sampling = Sampling {
            max_new_tokens: expected_len + slack,
            stop_tokens: eos.into_iter().collect(),
            ..Sampling::default()
        };
        let mut ids = generate(model, opts, &prompt_ids, &sampling, &mut |_| true)?;
        if let Some(e) = eos
            && ids.last() == Some(&e)
        {
            ids.pop();
        }
        let produced = tokenizer
            .decode(&ids, true)
            .map_err(|e| TrainerError::InvalidInput(format!("cannot decode tokens: {e}")))?;
        out.push(Answer {
            prompt: prompt.clone(),
            expected: completion.clone(),
            produced,
        });
    }
    Ok(out)
}

/// Share of `answers` that match exactly (0 when there are none).
pub fn exact_match(answers: &[Answer]) -> f64 {
    if answers.is_empty() {
        return 0.0;
    }
    answers.iter().filter(|a| a.is_exact()).count() as f64 / answers.len() as f64
}
