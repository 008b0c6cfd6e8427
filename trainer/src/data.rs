//! Training data: reading a dataset (plain text or JSONL), tokenizing it, packing it into
//! fixed-length sequences with a loss mask, holding out an eval split, and the shard: the
//! self-describing binary blob a coordinator cuts a job's data into and a volunteer trains on.
//!
//! A shard is little-endian: magic `b"STSHARD\0"`, format version `u16`, flags `u16` (0),
//! `seq_len: u32`, `n_seqs: u32`, the blake3 hash of the `tokenizer.json` (32 bytes), then
//! `n_seqs * seq_len` token ids (`u32`) and as many loss-mask bytes (0 or 1). Mask byte `t` says
//! whether predicting token `t` from the tokens before it counts in the loss.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tokenizers::Tokenizer;

/// Leading bytes of every shard.
const MAGIC: &[u8; 8] = b"STSHARD\0";
/// The shard format version this build writes and reads.
const FORMAT_VERSION: u16 = 1;
/// Bytes before the token ids: magic, version, flags, seq_len, n_seqs, tokenizer hash.
const HEADER_LEN: usize = 8 + 2 + 2 + 4 + 4 + 32;
/// Bytes each token takes in a shard: its `u32` id and its mask byte.
const BYTES_PER_TOKEN: u64 = 5;
/// Texts handed to the tokenizer at once; bounds the memory of the intermediate encodings.
const ENCODE_CHUNK: usize = 256;
/// End-of-sequence strings of common tokenizers, most common first.
const EOS_CANDIDATES: &[&str] = &[
    "<|endoftext|>",
    "</s>",
    "<|im_end|>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<eos>",
];

/// What went wrong while reading a dataset, tokenizing it or decoding a shard.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read.
    #[error("cannot read {file}: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A line of a dataset file is malformed.
    #[error("{file}, line {line}: {reason}")]
    Parse {
        /// The file.
        file: PathBuf,
        /// The line, counting from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A dataset file holds no examples.
    #[error("{file} holds no examples")]
    EmptyFile {
        /// The file.
        file: PathBuf,
    },
    /// A `tokenizer.json` could not be loaded.
    #[error("cannot load tokenizer {file}: {reason}")]
    Tokenizer {
        /// The file.
        file: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The tokenizer failed on the dataset's text.
    #[error("tokenizing the dataset failed: {0}")]
    Tokenize(String),
    /// `build_shards` was given no examples.
    #[error("the dataset has no examples to build shards from")]
    NoExamples,
    /// A `ShardPlan` setting is out of range.
    #[error("invalid shard plan: {0}")]
    InvalidPlan(String),
    /// Shard bytes (or a shard's fields) are malformed.
    #[error("invalid shard: {0}")]
    InvalidShard(String),
    /// A shard was written in a format version this build cannot read.
    #[error(
        "shard format version {0} is not supported (this build reads version {FORMAT_VERSION}); upgrade swarmtune"
    )]
    UnsupportedShardVersion(u16),
    /// A shard holds a token id the model's vocabulary does not have.
    #[error("shard token {position} has id {id}, outside the vocabulary of {vocab_size} tokens")]
    TokenOutOfVocab {
        /// The offending id.
        id: u32,
        /// Its position in the shard's token array.
        position: usize,
        /// The vocabulary size it was checked against.
        vocab_size: u32,
    },
}

/// One training example as read from a dataset file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Example {
    /// A document whose every token is a training target.
    Text(String),
    /// A prompt (context only, never a target) followed by its completion (the targets).
    PromptCompletion {
        /// The context the model is given.
        prompt: String,
        /// What the model learns to produce after the prompt.
        completion: String,
    },
}

/// Reads a dataset, choosing the format by extension: `.jsonl` and `.json` are JSON lines
/// (see [`read_jsonl`]), anything else is plain text (see [`read_text_file`]).
pub fn read_dataset(path: impl AsRef<Path>) -> Result<Vec<Example>, DataError> {
    let path = path.as_ref();
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match extension.as_deref() {
        Some("jsonl" | "json") => read_jsonl(path),
        _ => read_text_file(path),
    }
}

/// Reads a plain-text dataset: documents are separated by one or more blank (or
/// whitespace-only) lines; the lines of a document are joined with `\n`.
pub fn read_text_file(path: impl AsRef<Path>) -> Result<Vec<Example>, DataError> {
    let path = path.as_ref();
    let bytes = read_file(path)?;
    let mut documents = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    for line in utf8_lines(path, &bytes) {
        let (_, line) = line?;
        if !line.trim().is_empty() {
            current.push(line);
        } else if !current.is_empty() {
            documents.push(Example::Text(current.join("\n")));
            current.clear();
        }
    }
    if !current.is_empty() {
        documents.push(Example::Text(current.join("\n")));
    }
    non_empty(path, documents)
}

/// Reads a JSON-lines dataset: every non-blank line is an object with either a `text` string
/// or `prompt` and `completion` strings (other fields are ignored).
pub fn read_jsonl(path: impl AsRef<Path>) -> Result<Vec<Example>, DataError> {
    let path = path.as_ref();
    let bytes = read_file(path)?;
    let mut examples = Vec::new();
    for line in utf8_lines(path, &bytes) {
        let (number, line) = line?;
        if line.trim().is_empty() {
            continue;
        }
        let example = parse_jsonl_line(line).map_err(|reason| DataError::Parse {
            file: path.to_path_buf(),
            line: number,
            reason,
        })?;
        examples.push(example);
    }
    non_empty(path, examples)
}

fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|source| DataError::Io {
        file: path.to_path_buf(),
        source,
    })
}

fn non_empty(path: &Path, examples: Vec<Example>) -> Result<Vec<Example>, DataError> {
    if examples.is_empty() {
        return Err(DataError::EmptyFile {
            file: path.to_path_buf(),
        });
    }
    Ok(examples)
}

/// The lines of a file with their 1-based numbers, without `\r\n` / `\n` and a leading BOM;
/// a line that is not UTF-8 is an error naming the file and line.
fn utf8_lines<'a>(
    path: &'a Path,
    bytes: &'a [u8],
) -> impl Iterator<Item = Result<(usize, &'a str), DataError>> + 'a {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .map(move |(index, line)| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let number = index + 1;
            std::str::from_utf8(line)
                .map(|text| (number, text))
                .map_err(|e| DataError::Parse {
                    file: path.to_path_buf(),
                    line: number,
                    reason: format!(
                        "not valid UTF-8 (at byte {} of the line)",
                        e.valid_up_to() + 1
                    ),
                })
        })
}

fn parse_jsonl_line(line: &str) -> Result<Example, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(object) = value else {
        return Err(format!(
            "expected a JSON object, found {}",
            json_type(&value)
        ));
    };
    let has = |key| object.contains_key(key);
    match (has("text"), has("prompt"), has("completion")) {
        (true, false, false) => {
            let text = string_field(&object, "text")?;
            if text.is_empty() {
                return Err("`text` is empty".into());
            }
            Ok(Example::Text(text))
        }
        (false, true, true) => {
            let prompt = string_field(&object, "prompt")?;
            let completion = string_field(&object, "completion")?;
            if completion.is_empty() {
                return Err("`completion` is empty".into());
            }
            Ok(Example::PromptCompletion { prompt, completion })
        }
        (true, _, _) => Err("has both `text` and `prompt`/`completion`; use one form".into()),
        (false, true, false) => Err("missing `completion` (a `prompt` needs one)".into()),
        (false, false, true) => Err("missing `prompt` (a `completion` needs one)".into()),
        (false, false, false) => {
            Err("expected a `text` field or `prompt` and `completion` fields".into())
        }
    }
}

fn string_field(object: &Map<String, Value>, key: &str) -> Result<String, String> {
    match object.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!(
            "`{key}` must be a string, found {}",
            json_type(other)
        )),
        None => Err(format!("missing `{key}`")),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Loads a `tokenizer.json`.
pub fn load_tokenizer(path: impl AsRef<Path>) -> Result<Tokenizer, DataError> {
    load_tokenizer_with_hash(path).map(|(tokenizer, _)| tokenizer)
}

/// Loads a `tokenizer.json` together with the blake3 hash of its bytes, which shards record.
pub fn load_tokenizer_with_hash(
    path: impl AsRef<Path>,
) -> Result<(Tokenizer, [u8; 32]), DataError> {
    let path = path.as_ref();
    let bytes = read_file(path)?;
    let tokenizer = tokenizer_from_bytes(&bytes).map_err(|reason| DataError::Tokenizer {
        file: path.to_path_buf(),
        reason,
    })?;
    Ok((tokenizer, *blake3::hash(&bytes).as_bytes()))
}

/// Parses the bytes of a `tokenizer.json`; the error says why it is refused.
///
/// tokenizers 0.22 panics on some malformed files instead of returning an error (a syntax
/// error inside "decoder": `.expect("Helper")` in decoders/mod.rs, found by fuzzing). The
/// file may come from a peer, so such a panic is its refusal, not our crash.
pub fn tokenizer_from_bytes(bytes: &[u8]) -> Result<Tokenizer, String> {
    std::panic::catch_unwind(|| Tokenizer::from_bytes(bytes))
        .map_err(|_| "the tokenizer library could not parse it (it panicked)".to_owned())?
        .map_err(|e| e.to_string())
}

/// The id of the tokenizer's end-of-sequence token, looked up among common EOS strings; prefer
/// the model config's `eos_token_id` when there is one.
pub fn find_eos_token(tokenizer: &Tokenizer) -> Option<u32> {
    EOS_CANDIDATES
        .iter()
        .find_map(|token| tokenizer.token_to_id(token))
}

/// Limits a shard decoder enforces before trusting a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardLimits {
    /// Largest encoded shard accepted, in bytes.
    pub max_bytes: u64,
    /// Largest sequence length accepted.
    pub max_seq_len: u32,
    /// Largest `n_seqs * seq_len` accepted.
    pub max_tokens: u64,
}

impl Default for ShardLimits {
    fn default() -> Self {
        Self {
            max_bytes: 512 << 20,
            max_seq_len: 65_536,
            max_tokens: 64 << 20,
        }
    }
}

/// Packed training sequences: `n_seqs` rows of `seq_len` token ids with a loss mask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    /// Tokens per sequence.
    pub seq_len: u32,
    /// `n_seqs * seq_len` token ids, sequence after sequence.
    pub tokens: Vec<u32>,
    /// One byte per token: 1 when predicting that token counts in the loss, else 0.
    pub loss_mask: Vec<u8>,
    /// blake3 hash of the `tokenizer.json` the tokens came from.
    pub tokenizer_hash: [u8; 32],
}

impl Shard {
    /// A shard from its parts, checking that they fit together and the mask is 0/1.
    pub fn new(
        seq_len: u32,
        tokens: Vec<u32>,
        loss_mask: Vec<u8>,
        tokenizer_hash: [u8; 32],
    ) -> Result<Self, DataError> {
        let invalid = |reason: String| Err(DataError::InvalidShard(reason));
        if seq_len == 0 {
            return invalid("seq_len is 0".into());
        }
        if !tokens.len().is_multiple_of(seq_len as usize) {
            return invalid(format!(
                "{} tokens are not whole sequences of {seq_len}",
                tokens.len()
            ));
        }
        if u32::try_from(tokens.len() / seq_len as usize).is_err() {
            return invalid("more than u32::MAX sequences".into());
        }
        if loss_mask.len() != tokens.len() {
            return invalid(format!(
                "{} mask bytes for {} tokens",
                loss_mask.len(),
                tokens.len()
            ));
        }
        if let Some(position) = loss_mask.iter().position(|&m| m > 1) {
            return invalid(format!(
                "mask byte {position} is {}, not 0 or 1",
                loss_mask[position]
            ));
        }
        Ok(Self {
            seq_len,
            tokens,
            loss_mask,
            tokenizer_hash,
        })
    }

    /// Number of sequences.
    pub fn n_seqs(&self) -> usize {
        self.tokens
            .len()
            .checked_div(self.seq_len as usize)
            .unwrap_or(0)
    }

    /// Tokens and mask of sequence `i`; panics if `i >= n_seqs()`.
    pub fn sequence(&self, i: usize) -> (&[u32], &[u8]) {
        let len = self.seq_len as usize;
        let range = i * len..(i + 1) * len;
        (&self.tokens[range.clone()], &self.loss_mask[range])
    }

    /// Number of tokens that count in the loss.
    pub fn target_tokens(&self) -> u64 {
        self.loss_mask.iter().map(|&m| u64::from(m)).sum()
    }

    /// Checks that every token id is below `vocab_size`.
    pub fn validate_vocab(&self, vocab_size: u32) -> Result<(), DataError> {
        match self.tokens.iter().position(|&id| id >= vocab_size) {
            Some(position) => Err(DataError::TokenOutOfVocab {
                id: self.tokens[position],
                position,
                vocab_size,
            }),
            None => Ok(()),
        }
    }

    /// The shard's bytes in the format described at the top of this module.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.tokens.len() * 5);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.seq_len.to_le_bytes());
        // `new` and `decode` guarantee the count fits; a hand-built oversize shard saturates and
        // then fails to decode rather than silently aliasing a smaller one.
        let n_seqs = u32::try_from(self.n_seqs()).unwrap_or(u32::MAX);
        out.extend_from_slice(&n_seqs.to_le_bytes());
        out.extend_from_slice(&self.tokenizer_hash);
        for id in &self.tokens {
            out.extend_from_slice(&id.to_le_bytes());
        }
        out.extend_from_slice(&self.loss_mask);
        out
    }

    /// Parses shard bytes, checking every header field against `limits` and the exact length
    /// before allocating; malformed input is an error, never a panic.
    pub fn decode(bytes: &[u8], limits: &ShardLimits) -> Result<Self, DataError> {
        let invalid = DataError::InvalidShard;
        if bytes.len() as u64 > limits.max_bytes {
            return Err(invalid(format!(
                "{} bytes exceed the limit of {}",
                bytes.len(),
                limits.max_bytes
            )));
        }
        let truncated = || invalid(format!("{} bytes are too short for a header", bytes.len()));
        let (magic, rest) = bytes.split_first_chunk::<8>().ok_or_else(truncated)?;
        if magic != MAGIC {
            return Err(invalid("not a swarmtune shard (bad magic)".into()));
        }
        let (version, rest) = rest.split_first_chunk::<2>().ok_or_else(truncated)?;
        let version = u16::from_le_bytes(*version);
        if version != FORMAT_VERSION {
            return Err(DataError::UnsupportedShardVersion(version));
        }
        let (flags, rest) = rest.split_first_chunk::<2>().ok_or_else(truncated)?;
        let (seq_len, rest) = rest.split_first_chunk::<4>().ok_or_else(truncated)?;
        let (n_seqs, rest) = rest.split_first_chunk::<4>().ok_or_else(truncated)?;
        let (hash, body) = rest.split_first_chunk::<32>().ok_or_else(truncated)?;
        let flags = u16::from_le_bytes(*flags);
        if flags != 0 {
            return Err(invalid(format!("unknown flags {flags:#06x}")));
        }
        let seq_len = u32::from_le_bytes(*seq_len);
        if seq_len == 0 || seq_len > limits.max_seq_len {
            return Err(invalid(format!(
                "seq_len {seq_len} is outside 1..={}",
                limits.max_seq_len
            )));
        }
        let n_seqs = u32::from_le_bytes(*n_seqs);
        // u32 * u32 always fits in u64.
        let n_tokens = u64::from(seq_len) * u64::from(n_seqs);
        if n_tokens > limits.max_tokens {
            return Err(invalid(format!(
                "{n_seqs} sequences of {seq_len} tokens exceed the limit of {} tokens",
                limits.max_tokens
            )));
        }
        let expected = n_tokens.checked_mul(BYTES_PER_TOKEN);
        if expected != Some(body.len() as u64) {
            return Err(invalid(format!(
                "the header implies {} bytes of tokens and mask, found {}",
                n_tokens.saturating_mul(BYTES_PER_TOKEN),
                body.len()
            )));
        }
        // The exact length check above makes this split land on the token/mask boundary.
        let (ids, mask) = body.split_at(body.len() / 5 * 4);
        let tokens = ids
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Self::new(seq_len, tokens, mask.to_vec(), *hash)
    }
}

/// How a dataset is cut into shards.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardPlan {
    /// Tokens per packed sequence.
    pub seq_len: u32,
    /// Sequences per training shard (the last shard may hold fewer).
    pub seqs_per_shard: u32,
    /// Fraction of examples held out for evaluation, in `[0, 1)`; 0 holds out none.
    pub eval_fraction: f32,
    /// Seed of the eval split and of the order in which training examples are packed.
    pub seed: u64,
}

impl Default for ShardPlan {
    fn default() -> Self {
        Self {
            seq_len: 512,
            seqs_per_shard: 64,
            eval_fraction: 0.05,
            seed: 0,
        }
    }
}

impl ShardPlan {
    fn validate(&self) -> Result<(), DataError> {
        let limits = ShardLimits::default();
        let invalid = |reason: String| Err(DataError::InvalidPlan(reason));
        if self.seq_len < 2 || self.seq_len > limits.max_seq_len {
            return invalid(format!(
                "seq_len {} is outside 2..={}",
                self.seq_len, limits.max_seq_len
            ));
        }
        if self.seqs_per_shard == 0 {
            return invalid("seqs_per_shard is 0".into());
        }
        if u64::from(self.seq_len) * u64::from(self.seqs_per_shard) > limits.max_tokens {
            return invalid(format!(
                "{} sequences of {} tokens exceed the shard limit of {} tokens",
                self.seqs_per_shard, self.seq_len, limits.max_tokens
            ));
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return invalid(format!(
                "eval_fraction {} is outside [0, 1)",
                self.eval_fraction
            ));
        }
        Ok(())
    }
}

/// Counts that describe a built dataset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatasetStats {
    /// Examples packed into the training shards.
    pub train_examples: usize,
    /// Examples held out for evaluation.
    pub eval_examples: usize,
    /// Packed training sequences across all shards.
    pub train_sequences: usize,
    /// Training tokens that count in the loss.
    pub train_target_tokens: u64,
    /// Eval tokens that count in the loss.
    pub eval_target_tokens: u64,
    /// Examples longer than `seq_len`, hence split across sequences.
    pub split_examples: usize,
}

/// A dataset cut into training shards plus a held-out eval split.
#[derive(Clone, Debug)]
pub struct ShardedDataset {
    /// Training shards of `seqs_per_shard` sequences each (the last may be shorter).
    pub train: Vec<Shard>,
    /// The held-out examples, packed like the training data (no sequences when none are held out).
    pub eval: Shard,
    /// The held-out examples as read, in dataset order, for exact-match evaluation.
    pub eval_examples: Vec<Example>,
    /// Counts describing the result.
    pub stats: DatasetStats,
}

/// Tokenizes `examples`, holds out an eval split chosen by example (so nothing held out is
/// trained on), packs both into `plan.seq_len`-token sequences and cuts the training sequences
/// into shards. `eos` ends every example when given; `pad` fills the tail of a sequence. The
/// result depends only on the inputs: the same inputs give the same shard bytes.
pub fn build_shards(
    examples: &[Example],
    tokenizer: &Tokenizer,
    tokenizer_hash: [u8; 32],
    eos: Option<u32>,
    pad: u32,
    plan: &ShardPlan,
) -> Result<ShardedDataset, DataError> {
    plan.validate()?;
    if examples.is_empty() {
        return Err(DataError::NoExamples);
    }
    let tokenizer = without_truncation_or_padding(tokenizer)?;
    let (train_indices, mut eval_indices) = split_eval(examples.len(), plan);
    eval_indices.sort_unstable();
    let pick = |indices: &[usize]| indices.iter().map(|&i| &examples[i]).collect::<Vec<_>>();
    let train_examples = pick(&train_indices);
    let eval_examples = pick(&eval_indices);
    let train_tokenized = tokenize(&tokenizer, &train_examples, eos)?;
    let eval_tokenized = tokenize(&tokenizer, &eval_examples, eos)?;

    let seq_len = plan.seq_len as usize;
    let (train_tokens, train_mask) = pack(&train_tokenized, seq_len, pad);
    let per_shard = seq_len * plan.seqs_per_shard as usize;
    let train = train_tokens
        .chunks(per_shard)
        .zip(train_mask.chunks(per_shard))
        .map(|(tokens, mask)| {
            Shard::new(plan.seq_len, tokens.to_vec(), mask.to_vec(), tokenizer_hash)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (eval_tokens, eval_mask) = pack(&eval_tokenized, seq_len, pad);
    if eval_tokens.len() as u64 > ShardLimits::default().max_tokens {
        return Err(DataError::InvalidPlan(format!(
            "the eval split packs to {} tokens, more than one shard holds; lower eval_fraction",
            eval_tokens.len()
        )));
    }
    let eval = Shard::new(plan.seq_len, eval_tokens, eval_mask, tokenizer_hash)?;

    let stats = DatasetStats {
        train_examples: train_examples.len(),
        eval_examples: eval_examples.len(),
        train_sequences: train.iter().map(Shard::n_seqs).sum(),
        train_target_tokens: train.iter().map(Shard::target_tokens).sum(),
        eval_target_tokens: eval.target_tokens(),
        split_examples: train_tokenized
            .iter()
            .chain(&eval_tokenized)
            .filter(|t| t.ids.len() > seq_len)
            .count(),
    };
    Ok(ShardedDataset {
        train,
        eval,
        eval_examples: eval_examples.into_iter().cloned().collect(),
        stats,
    })
}

/// The tokenizer with any truncation or padding from its `tokenizer.json` switched off: both
/// would silently cut or pad examples before packing.
fn without_truncation_or_padding(tokenizer: &Tokenizer) -> Result<Cow<'_, Tokenizer>, DataError> {
    if tokenizer.get_truncation().is_none() && tokenizer.get_padding().is_none() {
        return Ok(Cow::Borrowed(tokenizer));
    }
    let mut plain = tokenizer.clone();
    plain
        .with_truncation(None)
        .map_err(|e| DataError::Tokenize(e.to_string()))?;
    plain.with_padding(None);
    Ok(Cow::Owned(plain))
}

/// Splits example indices into (train, eval). Each index gets a score from blake3 of the seed
/// and the index (stable across platforms and crate versions, unlike a seeded RNG); the lowest
/// scores are held out and the rest are trained on in score order, which shuffles the file so
/// that each shard mixes all of it.
fn split_eval(n: usize, plan: &ShardPlan) -> (Vec<usize>, Vec<usize>) {
    let score = |index: usize| {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"swarmtune/data/split");
        hasher.update(&plan.seed.to_le_bytes());
        hasher.update(&(index as u64).to_le_bytes());
        let hash = hasher.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash.as_bytes()[..8]);
        u64::from_le_bytes(first)
    };
    let mut order: Vec<(u64, usize)> = (0..n).map(|i| (score(i), i)).collect();
    order.sort_unstable();
    let n_eval = if plan.eval_fraction > 0.0 && n >= 2 {
        ((n as f64 * f64::from(plan.eval_fraction)).round() as usize).clamp(1, n - 1)
    } else {
        0
    };
    let mut indices = order.into_iter().map(|(_, i)| i);
    let eval = indices.by_ref().take(n_eval).collect();
    (indices.collect(), eval)
}

/// An example's token ids with, per token, whether predicting it counts in the loss.
#[derive(Debug)]
struct TokenizedExample {
    ids: Vec<u32>,
    targets: Vec<bool>,
    /// Prompt/completion pairs are not split across sequences when they fit in one.
    keep_whole: bool,
}

/// Tokenizes examples without special tokens, appending `eos` to each. A prompt and its
/// completion are tokenized separately so the boundary between context and targets is exact.
fn tokenize(
    tokenizer: &Tokenizer,
    examples: &[&Example],
    eos: Option<u32>,
) -> Result<Vec<TokenizedExample>, DataError> {
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(ENCODE_CHUNK) {
        let mut texts = Vec::with_capacity(chunk.len() * 2);
        for example in chunk {
            match example {
                Example::Text(text) => texts.push(text.as_str()),
                Example::PromptCompletion { prompt, completion } => {
                    texts.extend([prompt.as_str(), completion.as_str()]);
                }
            }
        }
        let encodings = tokenizer
            .encode_batch_fast(texts, false)
            .map_err(|e| DataError::Tokenize(e.to_string()))?;
        let mut encodings = encodings.iter();
        let mut next_ids = || {
            encodings.next().map(|e| e.get_ids()).ok_or_else(|| {
                DataError::Tokenize("the tokenizer returned fewer encodings than texts".into())
            })
        };
        for example in chunk {
            let keep_whole = matches!(example, Example::PromptCompletion { .. });
            let mut ids = Vec::new();
            if keep_whole {
                ids.extend_from_slice(next_ids()?);
            }
            let context = ids.len();
            ids.extend_from_slice(next_ids()?);
            ids.extend(eos);
            let mut targets = vec![false; context];
            targets.resize(ids.len(), true);
            out.push(TokenizedExample {
                ids,
                targets,
                keep_whole,
            });
        }
    }
    Ok(out)
}

/// Concatenates examples into `seq_len`-token sequences; returns their tokens and mask bytes.
/// The first token of every sequence is never a target (there is nothing to predict it from).
fn pack(examples: &[TokenizedExample], seq_len: usize, pad: u32) -> (Vec<u32>, Vec<u8>) {
    let mut tokens = Vec::new();
    let mut mask = Vec::new();
    for example in examples {
        let used = tokens.len() % seq_len;
        let fits_alone = example.ids.len() <= seq_len;
        if example.keep_whole && fits_alone && used + example.ids.len() > seq_len {
            pad_to_boundary(&mut tokens, &mut mask, seq_len, pad);
        }
        for (&id, &target) in example.ids.iter().zip(&example.targets) {
            let first = tokens.len().is_multiple_of(seq_len);
            tokens.push(id);
            mask.push(u8::from(target && !first));
        }
    }
    pad_to_boundary(&mut tokens, &mut mask, seq_len, pad);
    (tokens, mask)
}

fn pad_to_boundary(tokens: &mut Vec<u32>, mask: &mut Vec<u8>, seq_len: usize, pad: u32) {
    let used = tokens.len() % seq_len;
    if used != 0 {
        tokens.resize(tokens.len() + seq_len - used, pad);
        mask.resize(tokens.len(), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKENIZER: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/llama/model/tokenizer.json"
    );

    /// Found by fuzzing: tokenizers 0.22 panics on a syntax error inside "decoder"; the
    /// loader turns that into a refusal.
    #[test]
    fn a_tokenizer_file_that_makes_the_library_panic_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, b"{\"decoder\": {\"type\": \"Fuse\x01\"}}").unwrap();
        let err = load_tokenizer_with_hash(&path).unwrap_err();
        assert!(matches!(err, DataError::Tokenizer { .. }), "{err}");
    }

    fn tokenizer() -> (Tokenizer, [u8; 32]) {
        load_tokenizer_with_hash(TOKENIZER).expect("fixture tokenizer loads")
    }

    fn write(dir: &tempfile::TempDir, name: &str, contents: &[u8]) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).expect("write fixture");
        path
    }

    /// Reads `contents` as a `.jsonl` file and returns the (line, reason) of the error.
    fn jsonl_error(contents: &str) -> (usize, String, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "train.jsonl", contents.as_bytes());
        match read_dataset(&path) {
            Err(error @ DataError::Parse { .. }) => {
                let message = error.to_string();
                assert!(message.contains(&path.display().to_string()), "{message}");
                let DataError::Parse { line, reason, .. } = error else {
                    unreachable!()
                };
                (line, reason, message)
            }
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    fn pc(prompt: &str, completion: &str) -> Example {
        Example::PromptCompletion {
            prompt: prompt.into(),
            completion: completion.into(),
        }
    }

    #[test]
    fn jsonl_errors_name_file_line_and_reason() {
        let good = r#"{"text": "hello"}"#;
        let (line, reason, message) = jsonl_error(&format!("{good}\n{good}\n{{\"text\": \n"));
        assert_eq!(line, 3);
        assert!(reason.contains("invalid JSON"), "{reason}");
        assert!(message.contains("line 3"), "{message}");

        let (line, reason, _) = jsonl_error("\n\n{\"prompt\": \"2+2=\"}\n");
        assert_eq!(line, 3, "blank lines still count");
        assert!(reason.contains("missing `completion`"), "{reason}");

        let (_, reason, _) = jsonl_error(r#"{"text": 5}"#);
        assert!(
            reason.contains("`text` must be a string, found a number"),
            "{reason}"
        );
        let (_, reason, _) = jsonl_error(r#"{"prompt": "a", "completion": ["b"]}"#);
        assert!(
            reason.contains("`completion` must be a string, found an array"),
            "{reason}"
        );
        let (_, reason, _) = jsonl_error(r#"{"text": "a", "prompt": "b", "completion": "c"}"#);
        assert!(reason.contains("both"), "{reason}");
        let (_, reason, _) = jsonl_error(r#"{"id": 7}"#);
        assert!(reason.contains("expected a `text` field"), "{reason}");
        let (_, reason, _) = jsonl_error(r#"["text"]"#);
        assert!(reason.contains("expected a JSON object"), "{reason}");
    }

    #[test]
    fn jsonl_reads_both_forms_and_ignores_extra_fields() {
        let dir = tempfile::tempdir().expect("tempdir");
        let contents = "\u{feff}{\"text\": \"a b\", \"id\": 1}\r\n\n{\"prompt\": \"q\", \"completion\": \"a\"}\n";
        let path = write(&dir, "data.JSON", contents.as_bytes());
        let examples = read_dataset(&path).expect("valid dataset");
        assert_eq!(examples, vec![Example::Text("a b".into()), pc("q", "a")]);
    }

    #[test]
    fn non_utf8_and_empty_files_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "notes.txt", b"fine\n\xff\xfe broken\n");
        match read_dataset(&path) {
            Err(DataError::Parse { file, line, reason }) => {
                assert_eq!((file, line), (path.clone(), 2));
                assert!(reason.contains("UTF-8"), "{reason}");
            }
            other => panic!("expected a UTF-8 error, got {other:?}"),
        }
        for (name, contents) in [("empty.jsonl", "\n  \n"), ("empty.txt", "\n\n \t\n")] {
            let path = write(&dir, name, contents.as_bytes());
            let error = read_dataset(&path).expect_err("empty dataset");
            assert!(matches!(error, DataError::EmptyFile { .. }), "{error:?}");
            assert!(error.to_string().contains(name), "{error}");
        }
        let missing = dir.path().join("missing.jsonl");
        let error = read_dataset(&missing).expect_err("missing file");
        assert!(error.to_string().contains("missing.jsonl"), "{error}");
    }

    #[test]
    fn text_documents_are_separated_by_blank_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            &dir,
            "corpus.txt",
            b"first line\r\nsecond line\n\n  \n\n third\n",
        );
        let examples = read_dataset(&path).expect("valid text");
        assert_eq!(
            examples,
            vec![
                Example::Text("first line\nsecond line".into()),
                Example::Text(" third".into())
            ]
        );
    }

    #[test]
    fn tokenizer_loading_names_the_file_and_finds_eos() {
        let (tokenizer, hash) = tokenizer();
        let bytes = std::fs::read(TOKENIZER).expect("fixture");
        assert_eq!(hash, *blake3::hash(&bytes).as_bytes());
        assert_eq!(
            find_eos_token(&tokenizer),
            tokenizer.token_to_id("<|endoftext|>")
        );
        assert!(find_eos_token(&tokenizer).is_some());

        let dir = tempfile::tempdir().expect("tempdir");
        let bad = write(&dir, "tokenizer.json", b"{\"not\": \"a tokenizer\"}");
        let error = load_tokenizer(&bad).expect_err("not a tokenizer");
        assert!(matches!(error, DataError::Tokenizer { .. }), "{error:?}");
        assert!(
            error.to_string().contains(&bad.display().to_string()),
            "{error}"
        );
    }

    #[test]
    fn prompt_tokens_are_context_and_completion_tokens_are_targets() {
        let (tokenizer, _) = tokenizer();
        let ids = |text: &str| {
            tokenizer
                .encode(text, false)
                .expect("encode")
                .get_ids()
                .to_vec()
        };
        let (prompt, completion) = ("Translate: hello world =>", " bonjour le monde");
        let example = pc(prompt, completion);
        let tokenized = tokenize(&tokenizer, &[&example], Some(0)).expect("tokenize");
        let [tokenized] = tokenized.as_slice() else {
            panic!("one example")
        };
        let (p, c) = (ids(prompt), ids(completion));
        assert!(!p.is_empty() && !c.is_empty());
        assert_eq!(tokenized.ids, [p.clone(), c.clone(), vec![0]].concat());
        let expected: Vec<bool> = (0..p.len())
            .map(|_| false)
            .chain((0..=c.len()).map(|_| true))
            .collect();
        assert_eq!(tokenized.targets, expected);

        let text = tokenize(&tokenizer, &[&Example::Text(prompt.into())], None).expect("tokenize");
        assert_eq!(text[0].ids, p);
        assert!(text[0].targets.iter().all(|&t| t));
    }

    fn tokenized(len: usize, first_id: u32, context: usize, keep_whole: bool) -> TokenizedExample {
        TokenizedExample {
            ids: (first_id..first_id + len as u32).collect(),
            targets: (0..len).map(|i| i >= context).collect(),
            keep_whole,
        }
    }

    #[test]
    fn packing_fills_fixed_sequences_pads_the_tail_and_keeps_prompts_with_completions() {
        let seq_len = 8;
        let examples = [
            tokenized(5, 100, 0, false),  // text: fills 5 of sequence 0
            tokenized(6, 200, 2, true),   // pair of 6 fits in one sequence: moves to sequence 1
            tokenized(11, 300, 0, false), // text longer than seq_len: split over 1..=3
        ];
        let (tokens, mask) = pack(&examples, seq_len, 9);
        assert_eq!(tokens.len(), 4 * seq_len);
        assert_eq!(mask.len(), tokens.len());
        assert_eq!(&tokens[..8], &[100, 101, 102, 103, 104, 9, 9, 9]);
        assert_eq!(&mask[..8], &[0, 1, 1, 1, 1, 0, 0, 0]);
        assert_eq!(&tokens[8..16], &[200, 201, 202, 203, 204, 205, 300, 301]);
        assert_eq!(&mask[8..16], &[0, 0, 1, 1, 1, 1, 1, 1]);
        assert_eq!(&tokens[16..24], &(302..310).collect::<Vec<_>>()[..]);
        assert_eq!(&mask[16..24], &[0, 1, 1, 1, 1, 1, 1, 1]);
        assert_eq!(&tokens[24..], &[310, 9, 9, 9, 9, 9, 9, 9]);
        assert_eq!(&mask[24..], &[0; 8]);
        for sequence in mask.chunks(seq_len) {
            assert_eq!(sequence[0], 0);
        }
    }

    fn sample_shard() -> Shard {
        Shard::new(
            3,
            vec![1, 2, 3, 4, 5, 70_000],
            vec![0, 1, 1, 0, 0, 1],
            [7; 32],
        )
        .expect("valid")
    }

    #[test]
    fn shard_round_trips_and_reports_its_contents() {
        let shard = sample_shard();
        let bytes = shard.encode();
        assert_eq!(bytes.len(), HEADER_LEN + 6 * 5);
        assert_eq!(&bytes[..8], MAGIC);
        let decoded = Shard::decode(&bytes, &ShardLimits::default()).expect("round trip");
        assert_eq!(decoded, shard);
        assert_eq!(decoded.n_seqs(), 2);
        assert_eq!(decoded.sequence(1), (&[4, 5, 70_000][..], &[0, 0, 1][..]));
        assert_eq!(decoded.target_tokens(), 3);
        assert!(decoded.validate_vocab(70_001).is_ok());
        assert!(matches!(
            decoded.validate_vocab(70_000),
            Err(DataError::TokenOutOfVocab {
                id: 70_000,
                position: 5,
                vocab_size: 70_000
            })
        ));
        let empty = Shard::new(3, vec![], vec![], [0; 32]).expect("empty");
        let decoded = Shard::decode(&empty.encode(), &ShardLimits::default()).expect("empty");
        assert_eq!(decoded, empty);
    }

    #[test]
    fn malformed_shards_are_errors_not_panics() {
        let limits = ShardLimits::default();
        let bytes = sample_shard().encode();
        for len in 0..bytes.len() {
            assert!(
                Shard::decode(&bytes[..len], &limits).is_err(),
                "truncated to {len}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Shard::decode(&longer, &limits).is_err());

        let patched = |at: usize, value: &[u8]| {
            let mut b = bytes.clone();
            b[at..at + value.len()].copy_from_slice(value);
            Shard::decode(&b, &limits)
        };
        assert!(matches!(
            patched(0, b"NOTSHARD"),
            Err(DataError::InvalidShard(_))
        ));
        assert!(matches!(
            patched(8, &2u16.to_le_bytes()),
            Err(DataError::UnsupportedShardVersion(2))
        ));
        assert!(patched(10, &1u16.to_le_bytes()).is_err(), "unknown flags");
        assert!(patched(12, &0u32.to_le_bytes()).is_err(), "seq_len 0");
        assert!(
            patched(12, &u32::MAX.to_le_bytes()).is_err(),
            "seq_len over the limit"
        );
        assert!(
            patched(16, &u32::MAX.to_le_bytes()).is_err(),
            "n_seqs over the token limit"
        );
        assert!(
            patched(16, &3u32.to_le_bytes()).is_err(),
            "n_seqs disagrees with the length"
        );
        assert!(patched(bytes.len() - 1, &[2]).is_err(), "mask byte 2");
        let tight = ShardLimits {
            max_bytes: bytes.len() as u64 - 1,
            ..limits
        };
        assert!(Shard::decode(&bytes, &tight).is_err(), "over max_bytes");
        let tight = ShardLimits {
            max_tokens: 5,
            ..limits
        };
        assert!(Shard::decode(&bytes, &tight).is_err(), "over max_tokens");
        let tight = ShardLimits {
            max_seq_len: 2,
            ..limits
        };
        assert!(Shard::decode(&bytes, &tight).is_err(), "over max_seq_len");
    }

    /// Prompt/completion pairs whose completions carry unique markers.
    fn qa_examples(n: usize) -> Vec<Example> {
        (0..n)
            .map(|i| pc(&format!("question {i}:"), &format!(" [answer-{i}]")))
            .collect()
    }

    #[test]
    fn build_is_deterministic_and_holds_out_a_disjoint_eval_split() {
        let (tokenizer, hash) = tokenizer();
        let examples = qa_examples(40);
        let plan = ShardPlan {
            seq_len: 32,
            seqs_per_shard: 4,
            eval_fraction: 0.1,
            seed: 42,
        };
        let eos = find_eos_token(&tokenizer);
        let build = |plan: &ShardPlan| {
            build_shards(&examples, &tokenizer, hash, eos, 0, plan).expect("build")
        };
        let bytes = |d: &ShardedDataset| {
            d.train
                .iter()
                .chain([&d.eval])
                .map(Shard::encode)
                .collect::<Vec<_>>()
        };
        let dataset = build(&plan);
        assert_eq!(bytes(&dataset), bytes(&build(&plan)));
        assert_ne!(
            bytes(&dataset),
            bytes(&build(&ShardPlan {
                seed: 43,
                ..plan.clone()
            }))
        );

        assert_eq!(dataset.eval_examples.len(), 4);
        assert_eq!(dataset.stats.eval_examples, 4);
        assert_eq!(dataset.stats.train_examples, 36);
        assert!(dataset.eval.n_seqs() > 0 && dataset.eval.target_tokens() > 0);
        let (last, full) = dataset.train.split_last().expect("train shards");
        assert!(full.iter().all(|s| s.n_seqs() == 4) && (1..=4).contains(&last.n_seqs()));
        assert!(
            dataset
                .train
                .iter()
                .all(|s| s.tokenizer_hash == hash && s.seq_len == 32)
        );
        assert_eq!(
            dataset.stats.train_sequences,
            dataset.train.iter().map(Shard::n_seqs).sum::<usize>()
        );

        let text = |shard: &Shard| tokenizer.decode(&shard.tokens, true).expect("decode");
        let train_text: String = dataset.train.iter().map(text).collect();
        let eval_text = text(&dataset.eval);
        for (i, example) in examples.iter().enumerate() {
            let marker = format!("[answer-{i}]");
            let held_out = dataset.eval_examples.contains(example);
            assert_eq!(eval_text.contains(&marker), held_out, "{marker} in eval");
            assert_eq!(train_text.contains(&marker), !held_out, "{marker} in train");
        }
    }

    #[test]
    fn small_datasets_and_bad_plans() {
        let (tokenizer, hash) = tokenizer();
        let plan = ShardPlan {
            seq_len: 16,
            seqs_per_shard: 2,
            eval_fraction: 0.01,
            seed: 1,
        };
        let two = build_shards(&qa_examples(2), &tokenizer, hash, None, 0, &plan).expect("build");
        assert_eq!((two.stats.train_examples, two.stats.eval_examples), (1, 1));
        let one = build_shards(&qa_examples(1), &tokenizer, hash, None, 0, &plan).expect("build");
        assert_eq!((one.stats.train_examples, one.eval.n_seqs()), (1, 0));
        assert!(matches!(
            build_shards(&[], &tokenizer, hash, None, 0, &plan),
            Err(DataError::NoExamples)
        ));
        for bad in [
            ShardPlan {
                seq_len: 1,
                ..plan.clone()
            },
            ShardPlan {
                seqs_per_shard: 0,
                ..plan.clone()
            },
            ShardPlan {
                eval_fraction: 1.0,
                ..plan.clone()
            },
            ShardPlan {
                eval_fraction: f32::NAN,
                ..plan.clone()
            },
        ] {
            let result = build_shards(&qa_examples(3), &tokenizer, hash, None, 0, &bad);
            assert!(matches!(result, Err(DataError::InvalidPlan(_))), "{bad:?}");
        }
    }
}
