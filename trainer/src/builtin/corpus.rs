//! The pretraining corpus of the built-in base: short English-like stories, lists, questions
//! with answers, counting, and many copying exercises (sentences, random letter strings, and
//! sentences written again in capitals), generated from a seed by a small grammar. It teaches
//! a tiny byte-level model spelling, word order, and above all to copy what it has read: the
//! grammar alone predicts most words, so random strings are what make copying pay, and a
//! model that copies is what lets a LoRA module learn a new skill in minutes. Generated here, so it
//! carries the project's licence (MIT OR Apache-2.0) and needs no download.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::pick;
use super::words::{ADJECTIVES, ANIMALS, NAMES, PLACES, THINGS, TIMES, VERBS};

/// `count` documents, the same for the same seed.
pub fn documents(seed: u64, count: usize) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count).map(|_| document(&mut rng)).collect()
}

/// `count` copying exercises of random letters: pretraining's warm start
/// (`corpus.copy_first_steps`).
pub fn copying_documents(seed: u64, count: usize) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count).map(|_| copying_random(&mut rng)).collect()
}

fn document(rng: &mut StdRng) -> String {
    match rng.random_range(0..20) {
        0..=2 => story(rng),
        3 => list(rng),
        4 => questions(rng),
        5 => counting(rng),
        6..=10 => copying(rng),
        11..=16 => copying_random(rng),
        17 | 18 => capitals(rng),
        _ => dialogue(rng),
    }
}

fn noun_phrase(rng: &mut StdRng) -> String {
    if rng.random_bool(0.4) {
        capitalize(pick(rng, NAMES))
    } else if rng.random_bool(0.5) {
        format!("the {} {}", pick(rng, ADJECTIVES), pick(rng, ANIMALS))
    } else {
        format!("the {}", pick(rng, ANIMALS))
    }
}

/// One sentence of the grammar, without the final period.
pub(crate) fn sentence(rng: &mut StdRng) -> String {
    let subject = noun_phrase(rng);
    let object = noun_phrase(rng).to_lowercase_first();
    match rng.random_range(0..5) {
        0 => format!("{subject} {} {object}", pick(rng, VERBS)),
        1 => format!(
            "{subject} {} {object} at {}",
            pick(rng, VERBS),
            pick(rng, PLACES)
        ),
        2 => format!(
            "{subject} {} {object} {}",
            pick(rng, VERBS),
            pick(rng, TIMES)
        ),
        3 => format!(
            "{subject} has {} {}",
            rng.random_range(2..20),
            pick(rng, THINGS)
        ),
        _ => format!("{subject} is {}", pick(rng, ADJECTIVES)),
    }
}

fn story(rng: &mut StdRng) -> String {
    let n = rng.random_range(2..6);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(format!("{}.", capitalize(&sentence(rng))));
    }
    out.join(" ")
}

fn list(rng: &mut StdRng) -> String {
    let n = rng.random_range(3..7);
    let items: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "{}. {} {}",
                i + 1,
                rng.random_range(1..10),
                pick(rng, THINGS)
            )
        })
        .collect();
    format!(
        "{} has:\n{}",
        capitalize(pick(rng, NAMES)),
        items.join("\n")
    )
}

fn questions(rng: &mut StdRng) -> String {
    let name = capitalize(pick(rng, NAMES));
    let animal = pick(rng, ANIMALS);
    let place = pick(rng, PLACES);
    let count = rng.random_range(2..10);
    let thing = pick(rng, THINGS);
    format!(
        "{name} sees the {animal} at {place}. {name} has {count} {thing}.\nQ: Where is the {animal}?\nA: At {place}.\nQ: How many {thing} does {name} have?\nA: {count}."
    )
}

fn counting(rng: &mut StdRng) -> String {
    let start = rng.random_range(0..50);
    let step = rng.random_range(1..4);
    let n = rng.random_range(4..10);
    let numbers: Vec<String> = (0..n).map(|i| (start + i * step).to_string()).collect();
    format!("Count by {step}: {}.", numbers.join(", "))
}

/// Repetition teaches the model to attend back and copy, the base of most skills.
fn copying(rng: &mut StdRng) -> String {
    let text = sentence(rng);
    match rng.random_range(0..5) {
        0 => format!("Say it again: {text}. {text}."),
        1 => format!("Copy: {text}\nCopy: {text}"),
        2 => {
            let words: Vec<&str> = text.split(' ').collect();
            format!("Words: {}\nJoined: {text}", words.join(", "))
        }
        3 => format!("Echo: {text} => {text}"),
        _ => format!("Echo: \"{text}\" -> \"{text}\""),
    }
}

/// A few words of random letters: nothing but the text before predicts them, so only a model
/// that looks back and copies gets them right.
fn random_words(rng: &mut StdRng, letters: std::ops::Range<usize>) -> String {
    let n = rng.random_range(3..9);
    (0..n)
        .map(|_| {
            let len = rng.random_range(letters.clone());
            (0..len)
                .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `count` held-out copying prompts, `Echo: <random letters> =>` → ` <the same letters>`:
/// how pretraining measures whether the model has learned to copy.
pub fn copy_probe(seed: u64, count: usize) -> Vec<crate::data::Example> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let text = random_words(&mut rng, 2..7);
            crate::data::Example::PromptCompletion {
                prompt: format!("Echo: {text} =>"),
                completion: format!(" {text}"),
            }
        })
        .collect()
}

fn copying_random(rng: &mut StdRng) -> String {
    if rng.random_bool(0.3) {
        // A short string many times over: the easiest copying there is, and where learning
        // to look back for the previous occurrence starts.
        let len = rng.random_range(3..9);
        let word = distinct_letters(rng, len);
        let times = rng.random_range(4..10);
        return vec![word; times].join(" ");
    }
    // Each letter at most once, so the letter just written points at exactly one place to
    // copy from. With repeated letters a byte-level model must match two or three bytes back
    // before copying pays, and it takes several times as long to start (measured: both seeds
    // of the tiny shape copied by step 1000 on these strings, neither by 2400 on free ones).
    let len = rng.random_range(8..21);
    let mut letters: Vec<char> = distinct_letters(rng, len).chars().collect();
    let words = rng.random_range(2..6);
    let mut cuts: Vec<usize> = (1..letters.len()).collect();
    cuts.shuffle(rng);
    cuts.truncate(words - 1);
    cuts.sort_unstable_by(|a, b| b.cmp(a));
    for cut in cuts {
        letters.insert(cut, ' ');
    }
    let text: String = letters.into_iter().collect();
    match rng.random_range(0..3) {
        0 => format!("Copy: {text}\nCopy: {text}"),
        1 => format!("Echo: {text} => {text}"),
        _ => format!("Say it again: {text}. {text}."),
    }
}

/// `n` (at most 26) different small letters in random order.
fn distinct_letters(rng: &mut StdRng, n: usize) -> String {
    let mut alphabet: Vec<char> = ('a'..='z').collect();
    alphabet.shuffle(rng);
    alphabet.into_iter().take(n).collect()
}

/// The same sentence in small letters and in capitals, as signs and headlines write it, so
/// the base knows both spellings of every word.
fn capitals(rng: &mut StdRng) -> String {
    let text = sentence(rng);
    let upper = text.to_uppercase();
    match rng.random_range(0..3) {
        0 => format!(
            "The sign says: {upper}.\nIn small letters: {}.",
            text.to_lowercase()
        ),
        1 => format!("Headline: {upper}\nStory: {}.", capitalize(&text)),
        _ => format!("{}. {upper}!", capitalize(&text)),
    }
}

fn dialogue(rng: &mut StdRng) -> String {
    let a = capitalize(pick(rng, NAMES));
    let b = capitalize(pick(rng, NAMES));
    let s = sentence(rng);
    format!("{a}: Did you know? {}.\n{b}: Yes, {s}.", capitalize(&s))
}

fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

trait LowercaseFirst {
    fn to_lowercase_first(self) -> String;
}

impl LowercaseFirst for String {
    /// Names stay capitalized; a leading "The" becomes "the" in object position.
    fn to_lowercase_first(self) -> String {
        match self.strip_prefix("The ") {
            Some(rest) => format!("the {rest}"),
            None => self,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_corpus_is_reproducible_and_varied() {
        let a = documents(1, 200);
        assert_eq!(a, documents(1, 200));
        assert_ne!(a, documents(2, 200));
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(distinct.len() > 190);
        assert!(a.iter().all(|d| d.is_ascii() && !d.is_empty()));
        // The corpus never contains the demo skill's instruction.
        assert!(
            a.iter()
                .all(|d| !d.contains(crate::builtin::skill::INSTRUCTION)
                    && !d.contains(crate::builtin::skill::NUMBER_INSTRUCTION))
        );
    }

    #[test]
    fn copying_exercises_write_each_letter_once_and_then_copy_it() {
        for doc in copying_documents(3, 300) {
            let text = ["Copy: ", "Echo: ", "Say it again: "]
                .iter()
                .find_map(|p| doc.strip_prefix(p))
                .map(|rest| rest.split(['\n', '=', '.']).next().unwrap_or("").trim());
            let Some(text) = text else {
                // A word repeated: the same distinct letters each time.
                let words: Vec<&str> = doc.split(' ').collect();
                assert!(
                    words.len() >= 4 && words.iter().all(|w| *w == words[0]),
                    "{doc}"
                );
                let mut letters: Vec<char> = words[0].chars().collect();
                letters.sort_unstable();
                letters.dedup();
                assert_eq!(letters.len(), words[0].len(), "{doc}");
                continue;
            };
            let letters: Vec<char> = text.chars().filter(|c| *c != ' ').collect();
            let mut unique = letters.clone();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(unique.len(), letters.len(), "a letter repeats in {doc:?}");
            assert!((8..=20).contains(&letters.len()), "{doc:?}");
            assert_eq!(
                doc.matches(text).count(),
                2,
                "{doc:?} does not copy {text:?}"
            );
        }
    }
}
