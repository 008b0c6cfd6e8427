//! Text generation with a KV cache: the prompt is run once, then one token at a time, each
//! picked greedily or sampled with temperature, top-k and top-p, and handed to a callback as
//! soon as it exists so the terminal can stream it.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Result, TrainerError};
use crate::model::{CausalLm, ForwardOptions, KvCache, TokenBatch, download};

/// How the next token is chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// 0 picks the most likely token (greedy); higher values flatten the distribution.
    pub temperature: f32,
    /// Keep only the k most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p.
    pub top_p: Option<f32>,
    /// Seed of the sampler.
    pub seed: u64,
    /// Stop after any of these tokens (usually the EOS token).
    pub stop_tokens: Vec<u32>,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            stop_tokens: Vec::new(),
        }
    }
}

impl Sampling {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(TrainerError::InvalidInput(m.into()));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature must be a non-negative number");
        }
        if self.top_k == Some(0) {
            return bad("top_k must be at least 1");
        }
        if self.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            return bad("top_p must be in (0, 1]");
        }
        Ok(())
    }
}

/// Generates up to `sampling.max_new_tokens` tokens after `prompt`, calling `on_token` with
/// each one as it is produced; `on_token` returns false to stop early. Returns the new tokens.
pub fn generate(
    model: &CausalLm,
    opts: ForwardOptions<'_>,
    prompt: &[u32],
    sampling: &Sampling,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<Vec<u32>> {
    sampling.validate()?;
    if prompt.is_empty() {
        return Err(TrainerError::InvalidInput(
            "the prompt has no tokens".into(),
        ));
    }
    let limit = model.config().max_positions();
    let mut rng = StdRng::seed_from_u64(sampling.seed);
    let mut cache = KvCache::new(model.config().num_layers());
    let mut next_input = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < sampling.max_new_tokens && cache.len() + next_input.len() <= limit {
        let n = next_input.len();
        let batch = TokenBatch::new(next_input, 1, n)?;
        let hidden = model.hidden(&batch, opts, Some(&mut cache))?;
        let last = hidden.narrow(0, n - 1, 1);
        let logits = download(model.head(last))?.data;
        let token = pick(&logits, sampling, &mut rng);
        out.push(token);
        if !on_token(token) || sampling.stop_tokens.contains(&token) {
            break;
        }
        next_input = vec![token];
    }
    Ok(out)
}

/// Chooses a token from one row of logits.
fn pick(logits: &[f32], s: &Sampling, rng: &mut StdRng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 { (i, v) } else { best }
            })
            .0 as u32
    };
    if s.temperature == 0.0 {
        return argmax();
    }
    let mut order: Vec<usize> = (0..logits.len())
        .filter(|&i| logits[i].is_finite())
        .collect();
    if order.is_empty() {
        return argmax();
    }
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if let Some(k) = s.top_k {
        order.truncate(k.max(1));
    }
    let max = logits[order[0]];
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| f64::from((logits[i] - max) / s.temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(top_p) = s.top_p {
        let mut cumulative = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                cumulative += p;
                cumulative >= f64::from(top_p)
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        order.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut r = rng.random::<f64>() * total;
    for (p, &i) in probs.iter().zip(&order) {
        r -= p;
        if r <= 0.0 {
            return i as u32;
        }
    }
    order[order.len() - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_top_k_one_is_greedy() {
        let logits = [0.1, 3.0, -1.0, 2.9];
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(pick(&logits, &Sampling::default(), &mut rng), 1);
        let s = Sampling {
            temperature: 1.0,
            top_k: Some(1),
            ..Sampling::default()
        };
        for _ in 0..20 {
            assert_eq!(pick(&logits, &s, &mut rng), 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Token 0 holds ~88% of the mass; with p = 0.5 only it may be drawn.
        let logits = [4.0, 2.0, 0.0, 0.0];
        let s = Sampling {
            temperature: 1.0,
            top_p: Some(0.5),
            ..Sampling::default()
        };
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..50 {
            assert_eq!(pick(&logits, &s, &mut rng), 0);
        }
        // Without the nucleus cut, other tokens do appear.
        let s = Sampling {
            temperature: 1.0,
            ..Sampling::default()
        };
        assert!((0..200).any(|_| pick(&logits, &s, &mut rng) != 0));
    }
}
