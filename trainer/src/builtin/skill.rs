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
