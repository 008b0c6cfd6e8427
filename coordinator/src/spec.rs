//! Job specs: the TOML people write, the protobuf the wire carries, and the checks both pass.
//!
//! A job exists in two forms. People write a [`JobFile`] (`swarmtune submit job.toml`; see
//! `examples/job.toml`), which has defaults for everything but `module`, `base`, `dataset` and
//! the budget. The wire carries a [`v1::JobSpec`], which has no defaults at all (see
//! `common.proto`), so [`JobFile::to_spec`] writes every field. [`validate_spec`] checks every
//! rule `job.proto` states; the coordinator runs it on whatever any client sends, and
//! [`JobFile::to_spec`] runs it too, so a job file that converts is one the coordinator accepts.
//!
//! A [`SpecError`] names the field that broke a rule and says what is allowed. Errors about a
//! job file name its TOML keys (`rounds.count`); errors about a wire spec name proto fields
//! (`rounds`, `round_timeout_ms`), which [`SpecError::to_error_reply`] puts under `spec.` as
//! the `ErrorReply` of a `SubmitJob` wants them.

use std::fmt;
use std::path::{Path, PathBuf};

use libp2p_identity::PeerId;
use serde::Deserialize;
use swarmtune_protocol::net::codec::error_reply;
use swarmtune_protocol::{ContentId, PROTOCOL_VERSION, v1};
use swarmtune_trainer::config::ModelConfig;

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// A job spec or job file broke a rule: which field, and what is allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecError {
    /// The offending field as a dotted path: proto field names for a wire spec
    /// (`inner.commit_every`), TOML keys for a job file (`rounds.count`). Empty when the
    /// problem is not one field's (a job file that cannot be read or is not TOML).
    pub field: String,
    /// What is wrong, for people: what is allowed and what was found.
    pub message: String,
}

/// The proto field of the spec's protocol version, refused with its own error code.
const PROTOCOL_VERSION_FIELD: &str = "protocol_version";
/// Longest `ErrorReply.message` (common.proto).
const ERROR_MESSAGE_MAX_BYTES: usize = 1024;

impl SpecError {
    /// An error about `field` (a dotted path, possibly empty).
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The refusal a coordinator sends for a `SubmitJob` whose spec broke this rule:
    /// ERROR_CODE_INVALID_ARGUMENT with `field` as a path from the request body
    /// (`spec.lora.rank`, as common.proto's example has it), except for a wrong
    /// `protocol_version`, which common.proto refuses with ERROR_CODE_UNSUPPORTED_VERSION and
    /// no field. The message is cut to the 1024 bytes an `ErrorReply` may hold.
    pub fn to_error_reply(&self) -> v1::ErrorReply {
        let message = truncate_utf8(&self.message, ERROR_MESSAGE_MAX_BYTES);
        if self.field == PROTOCOL_VERSION_FIELD {
            return error_reply(v1::ErrorCode::UnsupportedVersion, message);
        }
        let mut reply = error_reply(v1::ErrorCode::InvalidArgument, message);
        reply.field = if self.field.is_empty() {
            "spec".into()
        } else {
            format!("spec.{}", self.field)
        };
        reply
    }

    /// The same error with its proto field path replaced by the job file's key.
    fn into_toml_key(self) -> Self {
        Self {
            field: toml_key(&self.field),
            message: self.message,
        }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for SpecError {}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
pub(crate) fn truncate_utf8(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `text` quoted for a message, cut short so a huge value cannot flood an error reply.
fn quoted(text: &str) -> String {
    const SHOWN_BYTES: usize = 48;
    let shown = truncate_utf8(text, SHOWN_BYTES);
    if shown.len() < text.len() {
        format!("{shown:?}… ({} bytes)", text.len())
    } else {
        format!("{shown:?}")
    }
}

// ---------------------------------------------------------------------------------------------
// The limits of job.proto, one table for the checks and their messages
// ---------------------------------------------------------------------------------------------

/// An inclusive range of whole numbers a field must lie in, with the unit its messages use.
#[derive(Clone, Copy, Debug)]
struct Bounds {
    min: u64,
    max: u64,
    /// `""`, or the unit with a leading space (`" bytes"`).
    unit: &'static str,
}

impl Bounds {
    const fn new(min: u64, max: u64) -> Self {
        Self { min, max, unit: "" }
    }

    const fn unit(self, unit: &'static str) -> Self {
        Self { unit, ..self }
    }

    /// Refuses `value` outside the range: "must be between 1 and 1024, got 0".
    fn check(self, field: &str, value: u64) -> Result<(), SpecError> {
        self.check_with(field, value, None)
    }

    /// As [`Bounds::check`] for a length or count.
    fn check_len(self, field: &str, len: usize) -> Result<(), SpecError> {
        self.check(field, u64::try_from(len).unwrap_or(u64::MAX))
    }

    /// As [`Bounds::check`], naming where the upper bound comes from:
    /// "must be between 1 and inner.batch_size (16), got 32".
    fn check_with(self, field: &str, value: u64, max_from: Option<&str>) -> Result<(), SpecError> {
        if (self.min..=self.max).contains(&value) {
            return Ok(());
        }
        let (min, max, unit) = (self.min, self.max, self.unit);
        let allowed = match max_from {
            Some(name) => format!("between {min} and {name} ({max}{unit})"),
            None if max == u64::MAX => format!("at least {min}{unit}"),
            None if min == 0 => format!("at most {max}{unit}"),
            None => format!("between {min} and {max}{unit}"),
        };
        Err(SpecError::new(
            field,
            format!("must be {allowed}, got {value}{unit}"),
        ))
    }
}

/// `lora.rank`.
const LORA_RANK: Bounds = Bounds::new(1, 1024);
/// How many `lora.target_modules`.
const LORA_TARGETS: Bounds = Bounds::new(1, 64).unit(" names");
/// The length of one target module name.
const LORA_TARGET_NAME: Bounds = Bounds::new(1, 128).unit(" bytes");
/// `inner.inner_steps`.
const INNER_STEPS: Bounds = Bounds::new(1, 65_536);
/// `inner.batch_size`.
const BATCH_SIZE: Bounds = Bounds::new(1, 4096);
/// Most commitments (hashes of the LoRA state) one lease may make.
const MAX_COMMITMENTS: u64 = 4096;
/// `outer.clip_iterations` with centered clipping.
const CLIP_ITERATIONS: Bounds = Bounds::new(1, 10);
/// `dataset.raw.seq_len`.
const SEQ_LEN: Bounds = Bounds::new(2, 65_536);
/// Most tokens in one training shard (`seq_len · seqs_per_shard`): 64 Mi.
const SHARD_MAX_TOKENS: u64 = 64 << 20;
/// How many `dataset.prepared.train_shards`.
const TRAIN_SHARDS: Bounds = Bounds::new(1, 512).unit(" shards");
/// How many `dataset.prepared.eval_shards`.
const EVAL_SHARDS: Bounds = Bounds::new(1, 64).unit(" shards");
/// `verification.segments_per_challenge`.
const SEGMENTS_PER_CHALLENGE: Bounds = Bounds::new(1, 64);
/// `verification.probation_leases`.
const PROBATION_LEASES: Bounds = Bounds::new(0, 1000);
/// The `rounds` budget.
const ROUNDS: Bounds = Bounds::new(1, 1_000_000);
/// The `token_budget` budget.
const TOKEN_BUDGET: Bounds = Bounds::new(1, u64::MAX).unit(" tokens");
/// `quorum`.
const QUORUM: Bounds = Bounds::new(1, 1024);
/// A round's timeout in seconds, as the job file gives it: 1 s to 7 days.
const ROUND_TIMEOUT_SECS: Bounds = Bounds::new(1, 7 * 24 * 60 * 60).unit(" s");
/// `round_timeout_ms`: the same range in milliseconds.
const ROUND_TIMEOUT_MS: Bounds =
    Bounds::new(ROUND_TIMEOUT_SECS.min * 1000, ROUND_TIMEOUT_SECS.max * 1000).unit(" ms");
/// The length of `module`.
const MODULE_NAME: Bounds = Bounds::new(1, 64).unit(" bytes");
/// The length of `base_name`.
const BASE_NAME: Bounds = Bounds::new(1, 256).unit(" bytes");
/// The length of `description`.
const DESCRIPTION: Bounds = Bounds::new(0, 1024).unit(" bytes");

/// A rule for a floating-point field; every rule refuses NaN, and all but the unit intervals
/// refuse infinities explicitly.
#[derive(Clone, Copy, Debug)]
enum Real {
    /// Finite and > 0.
    Positive,
    /// Finite and >= 0.
    NotNegative,
    /// In [0, 1].
    ZeroToOne,
    /// In [0, 1).
    ZeroToBelowOne,
    /// In (0, 1).
    AboveZeroBelowOne,
    /// In (0, 1].
    AboveZeroToOne,
    /// In [0, 0.5).
    ZeroToBelowHalf,
    /// In [-1, 1].
    MinusOneToOne,
}

impl Real {
    fn allows(self, x: f64) -> bool {
        match self {
            Self::Positive => x.is_finite() && x > 0.0,
            Self::NotNegative => x.is_finite() && x >= 0.0,
            Self::ZeroToOne => (0.0..=1.0).contains(&x),
            Self::ZeroToBelowOne => (0.0..1.0).contains(&x),
            Self::AboveZeroBelowOne => x > 0.0 && x < 1.0,
            Self::AboveZeroToOne => x > 0.0 && x <= 1.0,
            Self::ZeroToBelowHalf => (0.0..0.5).contains(&x),
            Self::MinusOneToOne => (-1.0..=1.0).contains(&x),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Positive => "finite and positive",
            Self::NotNegative => "finite and not negative",
            Self::ZeroToOne => "in [0, 1]",
            Self::ZeroToBelowOne => "in [0, 1)",
            Self::AboveZeroBelowOne => "in (0, 1), both ends excluded",
            Self::AboveZeroToOne => "in (0, 1]",
            Self::ZeroToBelowHalf => "in [0, 0.5)",
            Self::MinusOneToOne => "in [-1, 1]",
        }
    }

    /// Refuses `value` outside the rule: "must be in [0, 1), got 1".
    fn check<T: Into<f64> + fmt::Display + Copy>(
        self,
        field: &str,
        value: T,
    ) -> Result<(), SpecError> {
        if self.allows(value.into()) {
            Ok(())
        } else {
            Err(SpecError::new(
                field,
                format!("must be {}, got {value}", self.describe()),
            ))
        }
    }
}

/// Refuses a parameter of an option that is not chosen: it must be 0 (the wire's "none").
fn zero_unless<T: Into<f64> + fmt::Display + Copy>(
    field: &str,
    value: T,
    chosen: &str,
) -> Result<(), SpecError> {
    if value.into() == 0.0 {
        Ok(())
    } else {
        Err(SpecError::new(
            field,
            format!("must be 0 unless {chosen}, got {value}"),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Validation of a wire spec
// ---------------------------------------------------------------------------------------------

/// Checks every rule `job.proto` states for a `JobSpec` and the messages inside it, and that
/// the spec is addressed to `coordinator`. Rules that need the base model (the LoRA targets,
/// see [`check_lora_fits`]) or the dataset's bytes (how many shards result) are checked once
/// those are at hand; the 32 KiB limit on the encoded spec is the envelope's, checked on the
/// bytes received.
pub fn validate_spec(spec: &v1::JobSpec, coordinator: &PeerId) -> Result<(), SpecError> {
    if spec.protocol_version != PROTOCOL_VERSION {
        return Err(SpecError::new(
            PROTOCOL_VERSION_FIELD,
            format!(
                "must be {PROTOCOL_VERSION} (swarmtune.v1), got {}",
                spec.protocol_version
            ),
        ));
    }
    check_addressee(&spec.coordinator_peer_id, coordinator)?;
    check_contents(spec)
}

/// Checks that every LoRA target names at least one adaptable layer of `model`, matched as the
/// trainer (and PEFT) matches them: the last component of a layer's path, or its whole path.
pub fn check_lora_fits(lora: &v1::LoraConfig, model: &ModelConfig) -> Result<(), SpecError> {
    for name in &lora.target_modules {
        let single = swarmtune_trainer::lora::LoraConfig {
            target_modules: vec![name.clone()],
            ..Default::default()
        };
        if model.lora_sites_for(&single).is_empty() {
            return Err(SpecError::new(
                "lora.target_modules",
                format!(
                    "{} matches no layer of the base; its adaptable layers are {}",
                    quoted(name),
                    model.lora_target_names().join(", ")
                ),
            ));
        }
    }
    Ok(())
}

fn check_addressee(peer_id: &[u8], coordinator: &PeerId) -> Result<(), SpecError> {
    if peer_id == coordinator.to_bytes().as_slice() {
        return Ok(());
    }
    let addressee = match PeerId::from_bytes(peer_id) {
        Ok(peer) => peer.to_base58(),
        Err(_) if peer_id.is_empty() => "nobody (the field is empty)".into(),
        Err(_) => format!("{} bytes that are not a peer id", peer_id.len()),
    };
    Err(SpecError::new(
        "coordinator_peer_id",
        format!("must be this coordinator, {coordinator}; the spec is addressed to {addressee}"),
    ))
}

/// Every rule but the protocol version and the addressee: what a job file alone decides.
fn check_contents(spec: &v1::JobSpec) -> Result<(), SpecError> {
    check_module_name(&spec.module)?;
    check_base(spec.base.as_ref())?;
    check_dataset(spec.dataset.as_ref())?;
    check_lora(required("lora", spec.lora.as_ref())?)?;
    let inner = required("inner", spec.inner.as_ref())?;
    check_inner(inner)?;
    check_outer(required("outer", spec.outer.as_ref())?)?;
    check_delta_encoding(spec)?;
    check_budget(spec.budget.as_ref())?;
    QUORUM.check("quorum", spec.quorum.into())?;
    ROUND_TIMEOUT_MS.check("round_timeout_ms", spec.round_timeout_ms)?;
    check_verification(required("verification", spec.verification.as_ref())?, inner)?;
    let gate = required("gate", spec.gate.as_ref())?;
    Real::NotNegative.check(
        "gate.max_eval_loss_regression",
        gate.max_eval_loss_regression,
    )?;
    DESCRIPTION.check_len("description", spec.description.len())
}

/// A nested message the spec must carry: the wire has no defaults.
fn required<'a, T>(field: &str, value: Option<&'a T>) -> Result<&'a T, SpecError> {
    value.ok_or_else(|| {
        SpecError::new(
            field,
            "is missing; the wire has no defaults, so every setting must be sent",
        )
    })
}

/// An enum field that must hold one of its known values other than UNSPECIFIED (0).
fn known_enum<E: TryFrom<i32>>(field: &str, value: i32, allowed: &str) -> Result<E, SpecError> {
    match E::try_from(value) {
        Ok(known) if value != 0 => Ok(known),
        _ => Err(SpecError::new(
            field,
            format!("must be one of {allowed}, got {value}"),
        )),
    }
}

/// A content id field that must be present and hold exactly 32 bytes.
fn check_content_id(field: &str, id: Option<&v1::ContentId>) -> Result<(), SpecError> {
    let id = id.ok_or_else(|| SpecError::new(field, "is missing; a 32-byte BLAKE3 content id"))?;
    ContentId::try_from(id)
        .map(|_| ())
        .map_err(|e| SpecError::new(field, e.to_string()))
}

/// A list of content ids, each of which must hold exactly 32 bytes.
fn check_content_ids(field: &str, ids: &[v1::ContentId], count: Bounds) -> Result<(), SpecError> {
    count.check_len(field, ids.len())?;
    for (index, id) in ids.iter().enumerate() {
        ContentId::try_from(id)
            .map_err(|e| SpecError::new(field, format!("entry {index}: {e}")))?;
    }
    Ok(())
}

fn check_module_name(name: &str) -> Result<(), SpecError> {
    MODULE_NAME.check_len("module", name.len())?;
    let starts_well = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let all_allowed = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'));
    if starts_well && all_allowed {
        Ok(())
    } else {
        Err(SpecError::new(
            "module",
            format!(
                "may hold only lowercase ASCII letters, digits, '.', '_' and '-', and must start \
                 with a letter or digit; got {}",
                quoted(name)
            ),
        ))
    }
}

fn check_base(base: Option<&v1::job_spec::Base>) -> Result<(), SpecError> {
    match base {
        None => Err(SpecError::new(
            "base",
            "is missing; set base_id (a Bundle blob) or base_name (`builtin` or a model the \
             coordinator has)",
        )),
        Some(v1::job_spec::Base::BaseId(id)) => check_content_id("base_id", Some(id)),
        Some(v1::job_spec::Base::BaseName(name)) => BASE_NAME.check_len("base_name", name.len()),
    }
}

fn check_dataset(dataset: Option<&v1::DatasetSource>) -> Result<(), SpecError> {
    let source = dataset.and_then(|d| d.source.as_ref()).ok_or_else(|| {
        SpecError::new(
            "dataset",
            "is missing; set dataset.raw (a dataset the coordinator shards) or \
             dataset.prepared (shards made by the owner)",
        )
    })?;
    match source {
        v1::dataset_source::Source::Raw(raw) => check_raw_dataset(raw),
        v1::dataset_source::Source::Prepared(prepared) => {
            check_content_ids(
                "dataset.prepared.train_shards",
                &prepared.train_shards,
                TRAIN_SHARDS,
            )?;
            check_content_ids(
                "dataset.prepared.eval_shards",
                &prepared.eval_shards,
                EVAL_SHARDS,
            )
        }
    }
}

fn check_raw_dataset(raw: &v1::RawDataset) -> Result<(), SpecError> {
    check_content_id("dataset.raw.blob", raw.blob.as_ref())?;
    known_enum::<v1::DatasetFormat>(
        "dataset.raw.format",
        raw.format,
        "DATASET_FORMAT_TEXT (1) or DATASET_FORMAT_JSONL (2)",
    )?;
    SEQ_LEN.check("dataset.raw.seq_len", raw.seq_len.into())?;
    // seq_len is at least 2 here, so the division is safe.
    let max_seqs = SHARD_MAX_TOKENS / u64::from(raw.seq_len);
    Bounds::new(1, max_seqs).check_with(
        "dataset.raw.seqs_per_shard",
        raw.seqs_per_shard.into(),
        Some(&format!("{SHARD_MAX_TOKENS} tokens / seq_len")),
    )?;
    Real::AboveZeroBelowOne.check("dataset.raw.eval_fraction", raw.eval_fraction)
}

fn check_lora(lora: &v1::LoraConfig) -> Result<(), SpecError> {
    LORA_RANK.check("lora.rank", lora.rank.into())?;
    Real::Positive.check("lora.alpha", lora.alpha)?;
    Real::ZeroToBelowOne.check("lora.dropout", lora.dropout)?;
    LORA_TARGETS.check_len("lora.target_modules", lora.target_modules.len())?;
    for name in &lora.target_modules {
        LORA_TARGET_NAME
            .check_len("lora.target_modules", name.len())
            .map_err(|e| SpecError::new(e.field, format!("every name {}", e.message)))?;
        if !name.is_ascii() {
            return Err(SpecError::new(
                "lora.target_modules",
                format!("every name must be ASCII, got {}", quoted(name)),
            ));
        }
    }
    Ok(())
}

/// How many segments (stretches between two commitments) a lease makes: `ceil(H / k)`.
fn segments_per_lease(inner: &v1::TrainSettings) -> u64 {
    u64::from(inner.inner_steps).div_ceil(u64::from(inner.commit_every.max(1)))
}

fn check_inner(inner: &v1::TrainSettings) -> Result<(), SpecError> {
    INNER_STEPS.check("inner.inner_steps", inner.inner_steps.into())?;
    BATCH_SIZE.check("inner.batch_size", inner.batch_size.into())?;
    Bounds::new(1, inner.batch_size.into()).check_with(
        "inner.micro_batch",
        inner.micro_batch.into(),
        Some("inner.batch_size"),
    )?;
    Real::Positive.check("inner.learning_rate", inner.learning_rate)?;
    Real::ZeroToBelowOne.check("inner.beta1", inner.beta1)?;
    Real::ZeroToBelowOne.check("inner.beta2", inner.beta2)?;
    Real::Positive.check("inner.eps", inner.eps)?;
    Real::NotNegative.check("inner.weight_decay", inner.weight_decay)?;
    Real::NotNegative
        .check("inner.max_grad_norm", inner.max_grad_norm)
        .map_err(|e| SpecError::new(e.field, format!("{} (0 means no clipping)", e.message)))?;
    Bounds::new(1, inner.inner_steps.into()).check_with(
        "inner.commit_every",
        inner.commit_every.into(),
        Some("inner.inner_steps"),
    )?;
    let commitments = segments_per_lease(inner) + 1;
    if commitments > MAX_COMMITMENTS {
        let smallest = u64::from(inner.inner_steps).div_ceil(MAX_COMMITMENTS - 1);
        return Err(SpecError::new(
            "inner.commit_every",
            format!(
                "makes {commitments} commitments (ceil(inner_steps / commit_every) + 1), more \
                 than the {MAX_COMMITMENTS} allowed; with inner_steps {} it must be at least \
                 {smallest}, got {}",
                inner.inner_steps, inner.commit_every
            ),
        ));
    }
    Ok(())
}

fn check_outer(outer: &v1::OuterSettings) -> Result<(), SpecError> {
    use v1::AggregationRule as Rule;
    Real::Positive.check("outer.learning_rate", outer.learning_rate)?;
    Real::ZeroToBelowOne.check("outer.momentum", outer.momentum)?;
    let rule: Rule = known_enum(
        "outer.aggregation",
        outer.aggregation,
        "AGGREGATION_RULE_MEAN (1), AGGREGATION_RULE_TRIMMED_MEAN (2), \
         AGGREGATION_RULE_MEDIAN (3) or AGGREGATION_RULE_CENTERED_CLIPPING (4)",
    )?;
    if rule == Rule::TrimmedMean {
        Real::ZeroToBelowHalf.check("outer.trim_fraction", outer.trim_fraction)?;
    } else {
        zero_unless(
            "outer.trim_fraction",
            outer.trim_fraction,
            "the aggregation is trimmed mean",
        )?;
    }
    if rule == Rule::CenteredClipping {
        Real::Positive.check("outer.clip_tau", outer.clip_tau)?;
        CLIP_ITERATIONS.check("outer.clip_iterations", outer.clip_iterations.into())?;
    } else {
        let chosen = "the aggregation is centered clipping";
        zero_unless("outer.clip_tau", outer.clip_tau, chosen)?;
        zero_unless("outer.clip_iterations", outer.clip_iterations, chosen)?;
    }
    Ok(())
}

fn check_delta_encoding(spec: &v1::JobSpec) -> Result<(), SpecError> {
    let encoding: v1::DeltaEncoding = known_enum(
        "delta_encoding",
        spec.delta_encoding,
        "DELTA_ENCODING_F32 (1), DELTA_ENCODING_F16 (2), DELTA_ENCODING_INT8_ROWWISE (3) or \
         DELTA_ENCODING_TOPK (4)",
    )?;
    if encoding == v1::DeltaEncoding::Topk {
        Real::AboveZeroToOne.check("topk_fraction", spec.topk_fraction)
    } else {
        zero_unless(
            "topk_fraction",
            spec.topk_fraction,
            "the delta encoding is topk",
        )
    }
}

fn check_budget(budget: Option<&v1::job_spec::Budget>) -> Result<(), SpecError> {
    match budget {
        None => Err(SpecError::new(
            "budget",
            "is missing; set rounds (1 to 1000000) or token_budget (at least 1)",
        )),
        Some(v1::job_spec::Budget::Rounds(rounds)) => ROUNDS.check("rounds", *rounds),
        Some(v1::job_spec::Budget::TokenBudget(tokens)) => {
            TOKEN_BUDGET.check("token_budget", *tokens)
        }
    }
}

fn check_verification(
    policy: &v1::VerificationPolicy,
    inner: &v1::TrainSettings,
) -> Result<(), SpecError> {
    Real::ZeroToOne.check(
        "verification.challenge_probability",
        policy.challenge_probability,
    )?;
    let field = "verification.segments_per_challenge";
    SEGMENTS_PER_CHALLENGE.check(field, policy.segments_per_challenge.into())?;
    let segments = segments_per_lease(inner);
    if u64::from(policy.segments_per_challenge) > segments {
        return Err(SpecError::new(
            field,
            format!(
                "must be at most the {segments} segments a lease makes \
                 (ceil(inner.inner_steps / inner.commit_every)), got {}",
                policy.segments_per_challenge
            ),
        ));
    }
    PROBATION_LEASES.check(
        "verification.probation_leases",
        policy.probation_leases.into(),
    )?;
    Real::ZeroToOne.check(
        "verification.redundancy_fraction",
        policy.redundancy_fraction,
    )?;
    Real::NotNegative
        .check("verification.max_delta_norm", policy.max_delta_norm)
        .map_err(|e| SpecError::new(e.field, format!("{} (0 means no bound)", e.message)))?;
    Real::NotNegative.check(
        "verification.probe_loss_tolerance",
        policy.probe_loss_tolerance,
    )?;
    Real::MinusOneToOne.check(
        "verification.min_cosine_similarity",
        policy.min_cosine_similarity,
    )?;
    Real::NotNegative.check("verification.max_relative_error", policy.max_relative_error)
}

// ---------------------------------------------------------------------------------------------
// The job file
// ---------------------------------------------------------------------------------------------

/// Proto field paths whose key in the job file differs, as (proto, TOML); an entry ending in
/// `.` renames every path under it.
const TOML_KEYS: &[(&str, &str)] = &[
    ("base_name", "base"),
    ("base_id", "base"),
    ("dataset.raw.", "dataset."),
    ("delta_encoding", "delta.encoding"),
    ("topk_fraction", "delta.topk_fraction"),
    ("budget", "rounds"),
    ("rounds", "rounds.count"),
    ("token_budget", "rounds.token_budget"),
    ("quorum", "rounds.quorum"),
    ("round_timeout_ms", "rounds.timeout_secs"),
];

/// The job file's key for a proto field path.
fn toml_key(proto_field: &str) -> String {
    for (proto, toml) in TOML_KEYS {
        if proto.ends_with('.') {
            if let Some(rest) = proto_field.strip_prefix(proto) {
                return format!("{toml}{rest}");
            }
        } else if proto_field == *proto {
            return (*toml).to_owned();
        }
    }
    proto_field.to_owned()
}

/// A job as people write it (`swarmtune submit job.toml`): a `JobSpec` with defaults for
/// everything but `module`, `base`, `dataset` and the budget (`rounds.count` or
/// `rounds.token_budget`). Unknown keys are errors, so a misspelt key cannot be ignored.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobFile {
    /// The module to train (`JobSpec.module`); required.
    pub module: Option<String>,
    /// What the job is for, for people; at most 1024 bytes.
    pub description: String,
    /// The frozen base: a name the coordinator knows (`builtin`, or a model in its model
    /// directory), or `blob:` followed by the 64 hex digits of a Bundle blob; required.
    pub base: Option<String>,
    /// The training data; `path` or `blob` is required.
    pub dataset: DatasetTable,
    /// The adapter's shape.
    pub lora: LoraTable,
    /// Each lease's local training.
    pub inner: InnerTable,
    /// Each round's merge.
    pub outer: OuterTable,
    /// How volunteers encode their deltas.
    pub delta: DeltaTable,
    /// The budget, the quorum and the round timeout.
    pub rounds: RoundsTable,
    /// How deltas are checked.
    pub verification: VerificationTable,
    /// When a merge is published.
    pub gate: GateTable,
}

/// `[dataset]`: a raw dataset the coordinator tokenizes and shards (`RawDataset`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatasetTable {
    /// A local file the submit command uploads, relative to the job file's directory. This or
    /// `blob` is required, not both.
    pub path: Option<PathBuf>,
    /// The 64 hex digits of a dataset blob already in the swarm. This or `path` is required,
    /// not both.
    pub blob: Option<String>,
    /// `jsonl` or `text`; by default from `path`'s extension (`.jsonl`, `.json`: jsonl;
    /// `.txt`, `.md`, `.text`: text). Required with `blob`.
    pub format: Option<DatasetFormatName>,
    /// Tokens per packed sequence, 2 to 65536. Default 256.
    pub seq_len: u32,
    /// Sequences per training shard. Default 64.
    pub seqs_per_shard: u32,
    /// Share of the examples held out for evaluation, in (0, 1). Default 0.1.
    pub eval_fraction: f32,
    /// Seed of the eval split and the packing order. Default 0.
    pub shard_seed: u64,
}

impl Default for DatasetTable {
    fn default() -> Self {
        Self {
            path: None,
            blob: None,
            format: None,
            seq_len: 256,
            seqs_per_shard: 64,
            eval_fraction: 0.1,
            shard_seed: 0,
        }
    }
}

/// The formats a raw dataset can have, as the job file names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetFormatName {
    /// JSON lines with `text`, or `prompt` and `completion`.
    Jsonl,
    /// Plain text, documents separated by blank lines.
    Text,
}

impl DatasetFormatName {
    /// The wire value.
    pub fn to_proto(self) -> v1::DatasetFormat {
        match self {
            Self::Jsonl => v1::DatasetFormat::Jsonl,
            Self::Text => v1::DatasetFormat::Text,
        }
    }

    /// The format a file's extension implies, as the trainer reads datasets (`.jsonl` and
    /// `.json` are JSON lines), with `.txt`, `.md` and `.text` as text; `None` for others.
    pub fn from_extension(path: &Path) -> Option<Self> {
        let extension = path.extension()?.to_str()?.to_ascii_lowercase();
        match extension.as_str() {
            "jsonl" | "json" => Some(Self::Jsonl),
            "txt" | "md" | "text" => Some(Self::Text),
            _ => None,
        }
    }
}

/// Where the submit command gets the dataset from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatasetRef {
    /// A local file to upload as a blob (the path resolved against the job file's directory).
    File(PathBuf),
    /// A blob already in the swarm.
    Blob(ContentId),
}

/// `[dataset]`'s source before the job file's directory is known.
enum DatasetOrigin<'a> {
    File(&'a Path),
    Blob(ContentId),
}

impl DatasetTable {
    fn origin(&self) -> Result<DatasetOrigin<'_>, SpecError> {
        match (&self.path, &self.blob) {
            (Some(path), None) => Ok(DatasetOrigin::File(path)),
            (None, Some(hex)) => hex.parse().map(DatasetOrigin::Blob).map_err(|e| {
                SpecError::new(
                    "dataset.blob",
                    format!("must be a content id, got {}: {e}", quoted(hex)),
                )
            }),
            (Some(_), Some(_)) => Err(SpecError::new(
                "dataset",
                "set dataset.path or dataset.blob, not both",
            )),
            (None, None) => Err(SpecError::new(
                "dataset",
                "is required: set dataset.path (a local file to upload) or dataset.blob (the \
                 64 hex digits of a dataset blob already in the swarm)",
            )),
        }
    }

    fn resolved_format(&self) -> Result<DatasetFormatName, SpecError> {
        let origin = self.origin()?;
        if let Some(format) = self.format {
            return Ok(format);
        }
        match origin {
            DatasetOrigin::Blob(_) => Err(SpecError::new(
                "dataset.format",
                "is required with dataset.blob: \"jsonl\" or \"text\"",
            )),
            DatasetOrigin::File(path) => DatasetFormatName::from_extension(path).ok_or_else(|| {
                SpecError::new(
                    "dataset.format",
                    format!(
                        "cannot be told from the name {}; set it to \"jsonl\" or \"text\" (by \
                         default .jsonl and .json are jsonl, .txt, .md and .text are text)",
                        path.display()
                    ),
                )
            }),
        }
    }
}

/// `[lora]`: the adapter's shape (`LoraConfig`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraTable {
    /// Rank r, 1 to 1024. Default 8.
    pub rank: u32,
    /// The update is scaled by `alpha / rank`; finite and positive. Default 16.
    pub alpha: f32,
    /// Dropout on the adapter's input, in [0, 1). Default 0.
    pub dropout: f32,
    /// Layers to adapt, matched by the last component of their path (or the whole path).
    /// Default `["q_proj", "v_proj"]` (Llama family; GPT-2 has `c_attn`, `c_proj`, `c_fc`).
    pub target_modules: Vec<String>,
}

impl Default for LoraTable {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
        }
    }
}

/// `[inner]`: each lease's local training (`TrainSettings`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InnerTable {
    /// Inner AdamW steps H per lease, 1 to 65536. Default 100.
    pub inner_steps: u32,
    /// Sequences per optimizer step, 1 to 4096. Default 8.
    pub batch_size: u32,
    /// Sequences per forward/backward pass, 1 to `batch_size`. Default `batch_size`.
    pub micro_batch: Option<u32>,
    /// AdamW learning rate. Default 1e-3.
    pub learning_rate: f32,
    /// AdamW beta1, in [0, 1). Default 0.9.
    pub beta1: f32,
    /// AdamW beta2, in [0, 1). Default 0.999.
    pub beta2: f32,
    /// AdamW epsilon. Default 1e-8.
    pub eps: f32,
    /// Decoupled weight decay. Default 0.
    pub weight_decay: f32,
    /// Gradient norm clip; 0 means none. Default 1.
    pub max_grad_norm: f32,
    /// Hash the LoRA state every this many steps (k), 1 to `inner_steps`. Default 10.
    pub commit_every: u32,
}

impl Default for InnerTable {
    fn default() -> Self {
        Self {
            inner_steps: 100,
            batch_size: 8,
            micro_batch: None,
            learning_rate: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            commit_every: 10,
        }
    }
}

/// `[outer]`: each round's merge (`OuterSettings`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OuterTable {
    /// Outer (Nesterov) learning rate. Default 0.7.
    pub learning_rate: f32,
    /// Outer Nesterov momentum, in [0, 1). Default 0.9.
    pub momentum: f32,
    /// How the round's deltas are combined. Default `trimmed-mean`.
    pub aggregation: AggregationName,
    /// With `trimmed-mean`: the share trimmed at each end, in [0, 0.5). Default 0.2 with
    /// `trimmed-mean`; not allowed with another rule.
    pub trim_fraction: Option<f32>,
    /// With `centered-clipping`, required: the clipping radius. Not allowed otherwise.
    pub clip_tau: Option<f64>,
    /// With `centered-clipping`, required: iterations, 1 to 10. Not allowed otherwise.
    pub clip_iterations: Option<u32>,
}

/// `outer.trim_fraction` when the aggregation is `trimmed-mean` and the file leaves it out.
const DEFAULT_TRIM_FRACTION: f32 = 0.2;

impl Default for OuterTable {
    fn default() -> Self {
        Self {
            learning_rate: 0.7,
            momentum: 0.9,
            aggregation: AggregationName::TrimmedMean,
            trim_fraction: None,
            clip_tau: None,
            clip_iterations: None,
        }
    }
}

/// The aggregation rules, as the job file names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AggregationName {
    /// Token-weighted mean: efficient, not robust.
    Mean,
    /// Coordinate-wise trimmed mean.
    TrimmedMean,
    /// Coordinate-wise median.
    Median,
    /// Centered clipping around the median.
    CenteredClipping,
}

impl AggregationName {
    /// The wire value.
    pub fn to_proto(self) -> v1::AggregationRule {
        match self {
            Self::Mean => v1::AggregationRule::Mean,
            Self::TrimmedMean => v1::AggregationRule::TrimmedMean,
            Self::Median => v1::AggregationRule::Median,
            Self::CenteredClipping => v1::AggregationRule::CenteredClipping,
        }
    }
}

/// `[delta]`: how volunteers encode their deltas.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeltaTable {
    /// The encoding. Default `int8-rowwise`.
    pub encoding: EncodingName,
    /// With `topk`, required: the share of each tensor's values sent, in (0, 1]. Not allowed
    /// otherwise.
    pub topk_fraction: Option<f32>,
}

impl Default for DeltaTable {
    fn default() -> Self {
        Self {
            encoding: EncodingName::Int8Rowwise,
            topk_fraction: None,
        }
    }
}

/// The delta encodings, as the job file (and a delta blob's metadata) names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EncodingName {
    /// Lossless `f32`.
    F32,
    /// IEEE half precision.
    F16,
    /// int8 with one scale per row.
    Int8Rowwise,
    /// The largest values of each tensor, with error feedback.
    Topk,
}

impl EncodingName {
    /// The wire value.
    pub fn to_proto(self) -> v1::DeltaEncoding {
        match self {
            Self::F32 => v1::DeltaEncoding::F32,
            Self::F16 => v1::DeltaEncoding::F16,
            Self::Int8Rowwise => v1::DeltaEncoding::Int8Rowwise,
            Self::Topk => v1::DeltaEncoding::Topk,
        }
    }
}

/// `[rounds]`: when the job stops and how long a round waits.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoundsTable {
    /// Run until this many rounds have merged, 1 to 1000000. This or `token_budget` is
    /// required, not both.
    pub count: Option<u64>,
    /// Run until the merged deltas have trained on at least this many tokens. This or `count`
    /// is required, not both.
    pub token_budget: Option<u64>,
    /// Verified deltas that close a round early, 1 to 1024. Default 3.
    pub quorum: u32,
    /// Seconds from a round's opening to its deadline, 1 to 604800 (7 days). Default 600.
    pub timeout_secs: u64,
}

impl Default for RoundsTable {
    fn default() -> Self {
        Self {
            count: None,
            token_budget: None,
            quorum: 3,
            timeout_secs: 600,
        }
    }
}

impl RoundsTable {
    fn budget(&self) -> Result<v1::job_spec::Budget, SpecError> {
        match (self.count, self.token_budget) {
            (Some(count), None) => Ok(v1::job_spec::Budget::Rounds(count)),
            (None, Some(tokens)) => Ok(v1::job_spec::Budget::TokenBudget(tokens)),
            (Some(_), Some(_)) => Err(SpecError::new(
                "rounds",
                "set rounds.count or rounds.token_budget, not both",
            )),
            (None, None) => Err(SpecError::new(
                "rounds",
                "needs a budget: set rounds.count (rounds to merge) or rounds.token_budget \
                 (tokens to train on)",
            )),
        }
    }
}

/// `[verification]`: how hard the coordinator checks deltas (`VerificationPolicy`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerificationTable {
    /// Probability in [0, 1] that an established peer's delta is challenged. Default 0.25.
    pub challenge_probability: f64,
    /// Segments replayed per challenge, 1 to 64. Default 1.
    pub segments_per_challenge: u32,
    /// A peer's first this many accepted deltas are always challenged, 0 to 1000. Default 3.
    pub probation_leases: u32,
    /// Share in [0, 1] of leases also given to a second peer. Default 0.
    pub redundancy_fraction: f64,
    /// Largest accepted delta norm; 0 means no bound. Default 0.
    pub max_delta_norm: f64,
    /// Largest accepted probe-loss increase, in nats per target token. Default 0.5.
    pub probe_loss_tolerance: f64,
    /// Least cosine similarity of a replay on different hardware, in [-1, 1]. Default 0.99.
    pub min_cosine_similarity: f64,
    /// Largest relative error of a replay on different hardware. Default 0.1.
    pub max_relative_error: f64,
}

impl Default for VerificationTable {
    fn default() -> Self {
        Self {
            challenge_probability: 0.25,
            segments_per_challenge: 1,
            probation_leases: 3,
            redundancy_fraction: 0.0,
            max_delta_norm: 0.0,
            probe_loss_tolerance: 0.5,
            min_cosine_similarity: 0.99,
            max_relative_error: 0.1,
        }
    }
}

/// `[gate]`: when a merge is published (`BenchmarkGate`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GateTable {
    /// Publish only if the eval loss is at most the current version's plus this. Default 0
    /// ("not worse").
    pub max_eval_loss_regression: f64,
}

/// Reads a job file's text. Syntax and type errors keep toml's message (line, column and
/// key) and name the key in [`SpecError::field`]; every rule that does not depend on the
/// uploaded dataset or the coordinator is checked too, so a file that parses converts.
pub fn parse_job_file(text: &str) -> Result<JobFile, SpecError> {
    let deserializer = toml::Deserializer::parse(text)
        .map_err(|e| SpecError::new("", e.to_string().trim_end()))?;
    let file: JobFile = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let field = e.path().to_string();
        // The path of an error at the top level is ".".
        let field = if field == "." { String::new() } else { field };
        SpecError::new(field, e.into_inner().to_string().trim_end())
    })?;
    // Any dataset id and no coordinator: the checks this runs do not look at them.
    let spec = file.build_spec(Vec::new(), ContentId::from_bytes([0; 32]))?;
    check_contents(&spec).map_err(SpecError::into_toml_key)?;
    Ok(file)
}

/// Reads and parses the job file at `path` (see [`parse_job_file`]); errors name the path.
pub fn load_job_file(path: &Path) -> Result<JobFile, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        SpecError::new(
            "",
            format!("cannot read the job file {}: {e}", path.display()),
        )
    })?;
    parse_job_file(&text)
        .map_err(|e| SpecError::new(e.field, format!("{}: {}", path.display(), e.message)))
}

impl JobFile {
    /// Where the dataset comes from: a file to upload (a relative `dataset.path` is resolved
    /// against `toml_dir`, the job file's directory; it must exist) or a blob id.
    pub fn dataset_source(&self, toml_dir: &Path) -> Result<DatasetRef, SpecError> {
        match self.dataset.origin()? {
            DatasetOrigin::Blob(id) => Ok(DatasetRef::Blob(id)),
            DatasetOrigin::File(path) => {
                let path = toml_dir.join(path);
                match std::fs::metadata(&path) {
                    Ok(meta) if meta.is_file() => Ok(DatasetRef::File(path)),
                    Ok(_) => Err(SpecError::new(
                        "dataset.path",
                        format!("{} is not a file", path.display()),
                    )),
                    Err(e) => Err(SpecError::new(
                        "dataset.path",
                        format!("cannot read {}: {e}", path.display()),
                    )),
                }
            }
        }
    }

    /// The wire spec for `coordinator`, with `dataset` the resolved dataset blob (see
    /// [`JobFile::dataset_source`]). Validated with [`validate_spec`]; errors name TOML keys.
    pub fn to_spec(
        &self,
        coordinator: &PeerId,
        dataset: ContentId,
    ) -> Result<v1::JobSpec, SpecError> {
        let spec = self.build_spec(coordinator.to_bytes(), dataset)?;
        validate_spec(&spec, coordinator).map_err(SpecError::into_toml_key)?;
        Ok(spec)
    }

    /// The spec this file describes. Checks only what the wire cannot express (a missing
    /// key, two sources, a timeout that overflows in milliseconds); the rest is
    /// [`check_contents`]'s.
    fn build_spec(
        &self,
        coordinator_peer_id: Vec<u8>,
        dataset: ContentId,
    ) -> Result<v1::JobSpec, SpecError> {
        let module = self.module.clone().ok_or_else(|| {
            SpecError::new("module", "is required: the module to train, e.g. \"shout\"")
        })?;
        let base = self.base()?;
        let format = self.dataset.resolved_format()?;
        let budget = self.rounds.budget()?;
        ROUND_TIMEOUT_SECS.check("rounds.timeout_secs", self.rounds.timeout_secs)?;
        let (lora, inner, outer) = (&self.lora, &self.inner, &self.outer);
        let (raw, verification) = (&self.dataset, &self.verification);
        let trim_fraction = match (outer.trim_fraction, outer.aggregation) {
            (Some(fraction), _) => fraction,
            (None, AggregationName::TrimmedMean) => DEFAULT_TRIM_FRACTION,
            (None, _) => 0.0,
        };
        Ok(v1::JobSpec {
            protocol_version: PROTOCOL_VERSION,
            coordinator_peer_id,
            module,
            base: Some(base),
            dataset: Some(v1::DatasetSource {
                source: Some(v1::dataset_source::Source::Raw(v1::RawDataset {
                    blob: Some(dataset.to_proto()),
                    format: format.to_proto() as i32,
                    seq_len: raw.seq_len,
                    seqs_per_shard: raw.seqs_per_shard,
                    eval_fraction: raw.eval_fraction,
                    shard_seed: raw.shard_seed,
                })),
            }),
            lora: Some(v1::LoraConfig {
                rank: lora.rank,
                alpha: lora.alpha,
                dropout: lora.dropout,
                target_modules: lora.target_modules.clone(),
            }),
            inner: Some(v1::TrainSettings {
                inner_steps: inner.inner_steps,
                batch_size: inner.batch_size,
                micro_batch: inner.micro_batch.unwrap_or(inner.batch_size),
                learning_rate: inner.learning_rate,
                beta1: inner.beta1,
                beta2: inner.beta2,
                eps: inner.eps,
                weight_decay: inner.weight_decay,
                max_grad_norm: inner.max_grad_norm,
                commit_every: inner.commit_every,
            }),
            outer: Some(v1::OuterSettings {
                learning_rate: outer.learning_rate,
                momentum: outer.momentum,
                aggregation: outer.aggregation.to_proto() as i32,
                trim_fraction,
                clip_tau: outer.clip_tau.unwrap_or(0.0),
                clip_iterations: outer.clip_iterations.unwrap_or(0),
            }),
            delta_encoding: self.delta.encoding.to_proto() as i32,
            topk_fraction: self.delta.topk_fraction.unwrap_or(0.0),
            budget: Some(budget),
            quorum: self.rounds.quorum,
            // Checked against ROUND_TIMEOUT_SECS above, so this cannot overflow.
            round_timeout_ms: self.rounds.timeout_secs * 1000,
            verification: Some(v1::VerificationPolicy {
                challenge_probability: verification.challenge_probability,
                segments_per_challenge: verification.segments_per_challenge,
                probation_leases: verification.probation_leases,
                redundancy_fraction: verification.redundancy_fraction,
                max_delta_norm: verification.max_delta_norm,
                probe_loss_tolerance: verification.probe_loss_tolerance,
                min_cosine_similarity: verification.min_cosine_similarity,
                max_relative_error: verification.max_relative_error,
            }),
            gate: Some(v1::BenchmarkGate {
                max_eval_loss_regression: self.gate.max_eval_loss_regression,
            }),
            description: self.description.clone(),
        })
    }

    /// `base` as the wire's oneof: `blob:<64 hex>` is a base id, anything else a name.
    fn base(&self) -> Result<v1::job_spec::Base, SpecError> {
        let base = self.base.as_deref().ok_or_else(|| {
            SpecError::new(
                "base",
                "is required: \"builtin\", a model the coordinator has (e.g. \
                 \"HuggingFaceTB/SmolLM2-135M\"), or \"blob:\" and the 64 hex digits of a base \
                 bundle",
            )
        })?;
        match base.strip_prefix("blob:") {
            Some(hex) => hex
                .parse::<ContentId>()
                .map(|id| v1::job_spec::Base::BaseId(id.to_proto()))
                .map_err(|e| {
                    SpecError::new(
                        "base",
                        format!(
                            "\"blob:\" must be followed by a content id, got {}: {e}",
                            quoted(hex)
                        ),
                    )
                }),
            None => Ok(v1::job_spec::Base::BaseName(base.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../examples/job.toml");

    /// A dataset id for tests: what the submit command would pass after uploading.
    fn dataset_id() -> ContentId {
        ContentId::of(b"shout.jsonl")
    }

    fn peer() -> PeerId {
        PeerId::random()
    }

    /// The example job as a wire spec for `coordinator`.
    fn example_spec(coordinator: &PeerId) -> v1::JobSpec {
        parse_job_file(EXAMPLE)
            .and_then(|file| file.to_spec(coordinator, dataset_id()))
            .unwrap_or_else(|e| panic!("the example job does not convert: {e}"))
    }

    fn llama() -> ModelConfig {
        ModelConfig::from_json(
            r#"{"model_type":"llama","vocab_size":260,"hidden_size":16,"intermediate_size":32,
            "num_hidden_layers":2,"num_attention_heads":2}"#,
        )
        .unwrap()
    }

    fn gpt2() -> ModelConfig {
        ModelConfig::from_json(
            r#"{"model_type":"gpt2","vocab_size":260,"n_embd":16,"n_layer":2,"n_head":2,
            "n_positions":64}"#,
        )
        .unwrap()
    }

    #[test]
    fn the_example_job_converts_into_a_valid_spec_with_its_values() {
        let coordinator = peer();
        let spec = example_spec(&coordinator);
        validate_spec(&spec, &coordinator).unwrap();
        assert_eq!(spec.protocol_version, PROTOCOL_VERSION);
        assert_eq!(spec.coordinator_peer_id, coordinator.to_bytes());
        assert_eq!(spec.module, "shout");
        assert_eq!(
            spec.base,
            Some(v1::job_spec::Base::BaseName("builtin".into()))
        );
        let Some(v1::dataset_source::Source::Raw(raw)) =
            spec.dataset.as_ref().and_then(|d| d.source.clone())
        else {
            panic!("the example has a raw dataset: {:?}", spec.dataset)
        };
        assert_eq!(raw.blob, Some(dataset_id().to_proto()));
        assert_eq!(raw.format, v1::DatasetFormat::Jsonl as i32);
        assert_eq!((raw.seq_len, raw.eval_fraction), (64, 0.1));
        let lora = spec.lora.as_ref().unwrap();
        assert_eq!((lora.rank, lora.alpha, lora.dropout), (8, 16.0, 0.0));
        assert_eq!(
            lora.target_modules,
            swarmtune_trainer::config::LLAMA_LORA_TARGETS
        );
        let inner = spec.inner.unwrap();
        assert_eq!(
            (inner.inner_steps, inner.batch_size, inner.commit_every),
            (25, 16, 5)
        );
        let outer = spec.outer.unwrap();
        assert_eq!(outer.aggregation, v1::AggregationRule::TrimmedMean as i32);
        assert_eq!(outer.trim_fraction, 0.2);
        assert_eq!(spec.delta_encoding, v1::DeltaEncoding::Int8Rowwise as i32);
        assert_eq!(spec.topk_fraction, 0.0);
        assert_eq!(spec.budget, Some(v1::job_spec::Budget::Rounds(3)));
        assert_eq!((spec.quorum, spec.round_timeout_ms), (3, 300_000));
        // Its targets fit the Llama-style built-in base, not GPT-2.
        check_lora_fits(lora, &llama()).unwrap();
        let err = check_lora_fits(lora, &gpt2()).unwrap_err();
        assert_eq!(err.field, "lora.target_modules");
        // The spec survives the wire.
        let bytes = prost::Message::encode_to_vec(&spec);
        let back = <v1::JobSpec as prost::Message>::decode(bytes.as_slice()).unwrap();
        validate_spec(&back, &coordinator).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn a_minimal_job_file_gets_the_documented_defaults() {
        let file = parse_job_file(&minimal("")).unwrap();
        assert_eq!(file.lora, LoraTable::default());
        let spec = file.to_spec(&peer(), dataset_id()).unwrap();
        let inner = spec.inner.unwrap();
        assert_eq!(inner.micro_batch, inner.batch_size);
        let outer = spec.outer.unwrap();
        assert_eq!(outer.trim_fraction, DEFAULT_TRIM_FRACTION);
        assert_eq!((outer.clip_tau, outer.clip_iterations), (0.0, 0));
        assert_eq!(spec.round_timeout_ms, 600_000);
        // With another rule the trimmed share defaults to the wire's "none".
        let mean = parse_job_file(&minimal("[outer]\naggregation = \"mean\"\n")).unwrap();
        let outer = mean.to_spec(&peer(), dataset_id()).unwrap().outer.unwrap();
        assert_eq!(outer.trim_fraction, 0.0);
    }

    /// A small valid job file with a blob dataset, followed by `extra` (more tables).
    fn minimal(extra: &str) -> String {
        format!(
            "module = \"shout\"\nbase = \"builtin\"\n[dataset]\nblob = \"{}\"\nformat = \
             \"jsonl\"\n[rounds]\ncount = 3\n{extra}",
            dataset_id()
        )
    }

    fn lora(s: &mut v1::JobSpec) -> &mut v1::LoraConfig {
        s.lora.as_mut().unwrap()
    }
    fn inner(s: &mut v1::JobSpec) -> &mut v1::TrainSettings {
        s.inner.as_mut().unwrap()
    }
    fn outer(s: &mut v1::JobSpec) -> &mut v1::OuterSettings {
        s.outer.as_mut().unwrap()
    }
    fn raw(s: &mut v1::JobSpec) -> &mut v1::RawDataset {
        match s.dataset.as_mut().and_then(|d| d.source.as_mut()) {
            Some(v1::dataset_source::Source::Raw(raw)) => raw,
            other => panic!("not a raw dataset: {other:?}"),
        }
    }
    fn verification(s: &mut v1::JobSpec) -> &mut v1::VerificationPolicy {
        s.verification.as_mut().unwrap()
    }
    fn prepared(s: &mut v1::JobSpec, train: usize, eval: usize) {
        let id = dataset_id().to_proto();
        s.dataset = Some(v1::DatasetSource {
            source: Some(v1::dataset_source::Source::Prepared(v1::PreparedShards {
                train_shards: vec![id.clone(); train],
                eval_shards: vec![id; eval],
            })),
        });
    }

    /// A change to a valid spec.
    type Change = fn(&mut v1::JobSpec);

    /// A change that breaks one rule, and the field the error must name.
    type Breakage = (&'static str, Change, &'static str);

    const BROKEN_SPECS: &[Breakage] = &[
        (
            "wrong protocol version",
            |s| s.protocol_version = 2,
            "protocol_version",
        ),
        (
            "absent protocol version",
            |s| s.protocol_version = 0,
            "protocol_version",
        ),
        (
            "another coordinator",
            |s| s.coordinator_peer_id = PeerId::random().to_bytes(),
            "coordinator_peer_id",
        ),
        (
            "no coordinator",
            |s| s.coordinator_peer_id.clear(),
            "coordinator_peer_id",
        ),
        ("empty module", |s| s.module.clear(), "module"),
        ("uppercase module", |s| s.module = "Shout".into(), "module"),
        ("65-byte module", |s| s.module = "a".repeat(65), "module"),
        (
            "module starting with '-'",
            |s| s.module = "-shout".into(),
            "module",
        ),
        (
            "module with a space",
            |s| s.module = "sh out".into(),
            "module",
        ),
        ("no base", |s| s.base = None, "base"),
        (
            "base name of 257 bytes",
            |s| s.base = Some(v1::job_spec::Base::BaseName("b".repeat(257))),
            "base_name",
        ),
        (
            "empty base name",
            |s| s.base = Some(v1::job_spec::Base::BaseName(String::new())),
            "base_name",
        ),
        (
            "base id of 31 bytes",
            |s| {
                s.base = Some(v1::job_spec::Base::BaseId(v1::ContentId {
                    blake3: vec![0; 31],
                }))
            },
            "base_id",
        ),
        ("no dataset", |s| s.dataset = None, "dataset"),
        (
            "dataset without a source",
            |s| s.dataset = Some(v1::DatasetSource { source: None }),
            "dataset",
        ),
        (
            "raw dataset without a blob",
            |s| raw(s).blob = None,
            "dataset.raw.blob",
        ),
        (
            "raw dataset with unspecified format",
            |s| raw(s).format = 0,
            "dataset.raw.format",
        ),
        (
            "raw dataset with unknown format",
            |s| raw(s).format = 7,
            "dataset.raw.format",
        ),
        ("seq_len 1", |s| raw(s).seq_len = 1, "dataset.raw.seq_len"),
        (
            "seq_len 65537",
            |s| raw(s).seq_len = 65_537,
            "dataset.raw.seq_len",
        ),
        (
            "no sequences per shard",
            |s| raw(s).seqs_per_shard = 0,
            "dataset.raw.seqs_per_shard",
        ),
        (
            "shards over 64 Mi tokens",
            |s| {
                raw(s).seq_len = 65_536;
                raw(s).seqs_per_shard = 1025
            },
            "dataset.raw.seqs_per_shard",
        ),
        (
            "eval_fraction 0",
            |s| raw(s).eval_fraction = 0.0,
            "dataset.raw.eval_fraction",
        ),
        (
            "eval_fraction 1",
            |s| raw(s).eval_fraction = 1.0,
            "dataset.raw.eval_fraction",
        ),
        (
            "513 prepared train shards",
            |s| prepared(s, 513, 1),
            "dataset.prepared.train_shards",
        ),
        (
            "no prepared train shards",
            |s| prepared(s, 0, 1),
            "dataset.prepared.train_shards",
        ),
        (
            "65 prepared eval shards",
            |s| prepared(s, 1, 65),
            "dataset.prepared.eval_shards",
        ),
        ("no lora", |s| s.lora = None, "lora"),
        ("zero rank", |s| lora(s).rank = 0, "lora.rank"),
        ("rank 2000", |s| lora(s).rank = 2000, "lora.rank"),
        ("NaN alpha", |s| lora(s).alpha = f32::NAN, "lora.alpha"),
        (
            "infinite alpha",
            |s| lora(s).alpha = f32::INFINITY,
            "lora.alpha",
        ),
        ("dropout 1", |s| lora(s).dropout = 1.0, "lora.dropout"),
        (
            "no targets",
            |s| lora(s).target_modules.clear(),
            "lora.target_modules",
        ),
        (
            "65 targets",
            |s| lora(s).target_modules = vec!["q_proj".into(); 65],
            "lora.target_modules",
        ),
        (
            "empty target name",
            |s| lora(s).target_modules.push(String::new()),
            "lora.target_modules",
        ),
        (
            "129-byte target name",
            |s| lora(s).target_modules.push("q".repeat(129)),
            "lora.target_modules",
        ),
        (
            "non-ASCII target name",
            |s| lora(s).target_modules.push("q_pröj".into()),
            "lora.target_modules",
        ),
        ("no inner settings", |s| s.inner = None, "inner"),
        (
            "zero inner steps",
            |s| inner(s).inner_steps = 0,
            "inner.inner_steps",
        ),
        (
            "65537 inner steps",
            |s| inner(s).inner_steps = 65_537,
            "inner.inner_steps",
        ),
        (
            "batch 4097",
            |s| inner(s).batch_size = 4097,
            "inner.batch_size",
        ),
        (
            "micro batch over batch",
            |s| inner(s).micro_batch = 17,
            "inner.micro_batch",
        ),
        (
            "zero micro batch",
            |s| inner(s).micro_batch = 0,
            "inner.micro_batch",
        ),
        (
            "negative inner lr",
            |s| inner(s).learning_rate = -1e-3,
            "inner.learning_rate",
        ),
        ("beta1 1", |s| inner(s).beta1 = 1.0, "inner.beta1"),
        ("negative beta2", |s| inner(s).beta2 = -0.1, "inner.beta2"),
        ("zero eps", |s| inner(s).eps = 0.0, "inner.eps"),
        (
            "negative weight decay",
            |s| inner(s).weight_decay = -0.01,
            "inner.weight_decay",
        ),
        (
            "NaN grad norm",
            |s| inner(s).max_grad_norm = f32::NAN,
            "inner.max_grad_norm",
        ),
        (
            "commit_every 0",
            |s| inner(s).commit_every = 0,
            "inner.commit_every",
        ),
        (
            "commit_every over inner steps",
            |s| inner(s).commit_every = 26,
            "inner.commit_every",
        ),
        (
            "4097 commitments",
            |s| {
                inner(s).inner_steps = 65_536;
                inner(s).commit_every = 16
            },
            "inner.commit_every",
        ),
        ("no outer settings", |s| s.outer = None, "outer"),
        (
            "negative outer lr",
            |s| outer(s).learning_rate = -0.7,
            "outer.learning_rate",
        ),
        ("momentum 1", |s| outer(s).momentum = 1.0, "outer.momentum"),
        (
            "unspecified aggregation",
            |s| outer(s).aggregation = 0,
            "outer.aggregation",
        ),
        (
            "trim_fraction 0.5",
            |s| outer(s).trim_fraction = 0.5,
            "outer.trim_fraction",
        ),
        (
            "trim_fraction with mean",
            |s| outer(s).aggregation = v1::AggregationRule::Mean as i32,
            "outer.trim_fraction",
        ),
        (
            "trimmed mean with clip_tau",
            |s| outer(s).clip_tau = 1.0,
            "outer.clip_tau",
        ),
        (
            "trimmed mean with clip iterations",
            |s| outer(s).clip_iterations = 2,
            "outer.clip_iterations",
        ),
        (
            "centered clipping without iterations",
            |s| {
                let o = outer(s);
                (o.aggregation, o.trim_fraction, o.clip_tau) =
                    (v1::AggregationRule::CenteredClipping as i32, 0.0, 1.0);
            },
            "outer.clip_iterations",
        ),
        (
            "centered clipping with 11 iterations",
            |s| {
                let o = outer(s);
                (
                    o.aggregation,
                    o.trim_fraction,
                    o.clip_tau,
                    o.clip_iterations,
                ) = (v1::AggregationRule::CenteredClipping as i32, 0.0, 1.0, 11);
            },
            "outer.clip_iterations",
        ),
        (
            "centered clipping without tau",
            |s| {
                let o = outer(s);
                (o.aggregation, o.trim_fraction, o.clip_iterations) =
                    (v1::AggregationRule::CenteredClipping as i32, 0.0, 3);
            },
            "outer.clip_tau",
        ),
        (
            "unspecified encoding",
            |s| s.delta_encoding = 0,
            "delta_encoding",
        ),
        (
            "unknown encoding",
            |s| s.delta_encoding = 9,
            "delta_encoding",
        ),
        (
            "topk without fraction",
            |s| s.delta_encoding = v1::DeltaEncoding::Topk as i32,
            "topk_fraction",
        ),
        (
            "topk fraction over 1",
            |s| {
                s.delta_encoding = v1::DeltaEncoding::Topk as i32;
                s.topk_fraction = 1.5
            },
            "topk_fraction",
        ),
        (
            "f32 with a topk fraction",
            |s| {
                s.delta_encoding = v1::DeltaEncoding::F32 as i32;
                s.topk_fraction = 0.1
            },
            "topk_fraction",
        ),
        ("no budget", |s| s.budget = None, "budget"),
        (
            "zero rounds",
            |s| s.budget = Some(v1::job_spec::Budget::Rounds(0)),
            "rounds",
        ),
        (
            "a million and one rounds",
            |s| s.budget = Some(v1::job_spec::Budget::Rounds(1_000_001)),
            "rounds",
        ),
        (
            "zero token budget",
            |s| s.budget = Some(v1::job_spec::Budget::TokenBudget(0)),
            "token_budget",
        ),
        ("quorum 0", |s| s.quorum = 0, "quorum"),
        ("quorum 2000", |s| s.quorum = 2000, "quorum"),
        (
            "timeout 500 ms",
            |s| s.round_timeout_ms = 500,
            "round_timeout_ms",
        ),
        (
            "timeout 8 days",
            |s| s.round_timeout_ms = 8 * 24 * 3_600_000,
            "round_timeout_ms",
        ),
        (
            "no verification policy",
            |s| s.verification = None,
            "verification",
        ),
        (
            "probability 1.5",
            |s| verification(s).challenge_probability = 1.5,
            "verification.challenge_probability",
        ),
        (
            "segments_per_challenge 0",
            |s| verification(s).segments_per_challenge = 0,
            "verification.segments_per_challenge",
        ),
        (
            "segments_per_challenge 65",
            |s| verification(s).segments_per_challenge = 65,
            "verification.segments_per_challenge",
        ),
        (
            "more segments than a lease makes",
            |s| verification(s).segments_per_challenge = 6,
            "verification.segments_per_challenge",
        ),
        (
            "probation 1001",
            |s| verification(s).probation_leases = 1001,
            "verification.probation_leases",
        ),
        (
            "redundancy 2",
            |s| verification(s).redundancy_fraction = 2.0,
            "verification.redundancy_fraction",
        ),
        (
            "negative delta norm bound",
            |s| verification(s).max_delta_norm = -1.0,
            "verification.max_delta_norm",
        ),
        (
            "negative probe tolerance",
            |s| verification(s).probe_loss_tolerance = -0.1,
            "verification.probe_loss_tolerance",
        ),
        (
            "cosine 1.5",
            |s| verification(s).min_cosine_similarity = 1.5,
            "verification.min_cosine_similarity",
        ),
        (
            "infinite relative error",
            |s| verification(s).max_relative_error = f64::INFINITY,
            "verification.max_relative_error",
        ),
        ("no gate", |s| s.gate = None, "gate"),
        (
            "negative regression",
            |s| {
                s.gate = Some(v1::BenchmarkGate {
                    max_eval_loss_regression: -0.1,
                })
            },
            "gate.max_eval_loss_regression",
        ),
        (
            "description of 1025 bytes",
            |s| s.description = "d".repeat(1025),
            "description",
        ),
    ];

    #[test]
    fn every_broken_field_is_refused_by_name() {
        let coordinator = peer();
        let valid = example_spec(&coordinator);
        for (case, breaks, field) in BROKEN_SPECS {
            let mut spec = valid.clone();
            breaks(&mut spec);
            match validate_spec(&spec, &coordinator) {
                Ok(()) => panic!("{case}: accepted"),
                Err(e) => {
                    assert_eq!(e.field, *field, "{case}: {e}");
                    assert!(e.message.len() <= ERROR_MESSAGE_MAX_BYTES, "{case}: {e}");
                }
            }
        }
    }

    /// Values on the edge of what job.proto allows, each of which must pass.
    const EDGE_SPECS: &[(&str, Change)] = &[
        ("rank 1024", |s| lora(s).rank = 1024),
        ("64 targets of 128 bytes", |s| {
            lora(s).target_modules = vec!["q".repeat(128); 64]
        }),
        ("a whole-path target", |s| {
            lora(s).target_modules = vec!["model.layers.0.self_attn.q_proj".into()]
        }),
        ("commit_every = inner_steps", |s| inner(s).commit_every = 25),
        ("4096 commitments", |s| {
            inner(s).inner_steps = 65_536;
            inner(s).commit_every = 17
        }),
        ("micro batch 1", |s| inner(s).micro_batch = 1),
        ("no gradient clipping", |s| inner(s).max_grad_norm = 0.0),
        ("trim_fraction 0", |s| outer(s).trim_fraction = 0.0),
        ("median", |s| {
            outer(s).aggregation = v1::AggregationRule::Median as i32;
            outer(s).trim_fraction = 0.0
        }),
        ("centered clipping", |s| {
            let o = outer(s);
            (
                o.aggregation,
                o.trim_fraction,
                o.clip_tau,
                o.clip_iterations,
            ) = (v1::AggregationRule::CenteredClipping as i32, 0.0, 0.5, 10);
        }),
        ("topk 1", |s| {
            s.delta_encoding = v1::DeltaEncoding::Topk as i32;
            s.topk_fraction = 1.0
        }),
        ("token budget", |s| {
            s.budget = Some(v1::job_spec::Budget::TokenBudget(1))
        }),
        ("a million rounds", |s| {
            s.budget = Some(v1::job_spec::Budget::Rounds(1_000_000))
        }),
        ("quorum 1024", |s| s.quorum = 1024),
        ("timeout 1 s", |s| s.round_timeout_ms = 1000),
        ("timeout 7 days", |s| {
            s.round_timeout_ms = 7 * 24 * 3_600_000
        }),
        ("module of 64 bytes with every allowed kind of byte", |s| {
            s.module = format!("9a.b_c-{}", "z".repeat(57))
        }),
        ("base name of 256 bytes", |s| {
            s.base = Some(v1::job_spec::Base::BaseName("b".repeat(256)))
        }),
        ("base id", |s| {
            s.base = Some(v1::job_spec::Base::BaseId(dataset_id().to_proto()))
        }),
        ("shards of 64 Mi tokens", |s| {
            raw(s).seq_len = 65_536;
            raw(s).seqs_per_shard = 1024
        }),
        ("512 + 64 prepared shards", |s| prepared(s, 512, 64)),
        ("probability 1, 64 segments of 1 step", |s| {
            inner(s).commit_every = 1;
            inner(s).inner_steps = 64;
            verification(s).challenge_probability = 1.0;
            verification(s).segments_per_challenge = 64;
        }),
        ("cosine -1", |s| {
            verification(s).min_cosine_similarity = -1.0
        }),
        ("description of 1024 bytes", |s| {
            s.description = "d".repeat(1024)
        }),
    ];

    #[test]
    fn values_at_the_limits_are_accepted() {
        let coordinator = peer();
        let valid = example_spec(&coordinator);
        for (case, change) in EDGE_SPECS {
            let mut spec = valid.clone();
            change(&mut spec);
            if let Err(e) = validate_spec(&spec, &coordinator) {
                panic!("{case}: refused: {e}");
            }
        }
    }

    #[test]
    fn messages_say_what_is_allowed_and_what_was_found() {
        let coordinator = peer();
        let valid = example_spec(&coordinator);
        let message = |breaks: Change| {
            let mut spec = valid.clone();
            breaks(&mut spec);
            validate_spec(&spec, &coordinator).unwrap_err().to_string()
        };
        assert_eq!(
            message(|s| inner(s).commit_every = 0),
            "inner.commit_every: must be between 1 and inner.inner_steps (25), got 0"
        );
        assert_eq!(
            message(|s| s.round_timeout_ms = 500),
            "round_timeout_ms: must be between 1000 and 604800000 ms, got 500 ms"
        );
        assert_eq!(
            message(|s| lora(s).alpha = f32::NAN),
            "lora.alpha: must be finite and positive, got NaN"
        );
        assert_eq!(
            message(|s| s.description = "d".repeat(1025)),
            "description: must be at most 1024 bytes, got 1025 bytes"
        );
        let commitments = message(|s| {
            inner(s).inner_steps = 65_536;
            inner(s).commit_every = 16;
        });
        assert!(
            commitments.contains("4097 commitments") && commitments.contains("at least 17"),
            "{commitments}"
        );
        let other = PeerId::random();
        let addressee = message(|s| s.coordinator_peer_id = b"not a peer".to_vec());
        assert!(addressee.contains(&coordinator.to_base58()), "{addressee}");
        let mut spec = valid.clone();
        spec.coordinator_peer_id = other.to_bytes();
        let err = validate_spec(&spec, &coordinator).unwrap_err();
        assert!(err.message.contains(&other.to_base58()), "{err}");
        // A huge value is quoted short.
        let long = message(|s| s.module = format!("A{}", "a".repeat(60)));
        assert!(long.len() < 300 && long.contains("61 bytes"), "{long}");
    }

    #[test]
    fn error_replies_carry_the_field_from_the_request_body() {
        let err = SpecError::new("inner.commit_every", "must be between 1 and 25, got 0");
        let reply = err.to_error_reply();
        assert_eq!(reply.code, v1::ErrorCode::InvalidArgument as i32);
        assert_eq!(reply.field, "spec.inner.commit_every");
        assert_eq!(reply.message, err.message);
        assert_eq!(reply.retry_after_ms, 0);
        // A spec of another protocol version is refused as common.proto says, without a field.
        let coordinator = peer();
        let mut spec = example_spec(&coordinator);
        spec.protocol_version = 2;
        let reply = validate_spec(&spec, &coordinator)
            .unwrap_err()
            .to_error_reply();
        assert_eq!(reply.code, v1::ErrorCode::UnsupportedVersion as i32);
        assert_eq!(reply.field, "");
        assert!(reply.message.contains("got 2"), "{}", reply.message);
        // Messages are cut, on a character boundary, to what an ErrorReply may hold.
        let long = SpecError::new("description", "é".repeat(600)).to_error_reply();
        assert_eq!(long.message.len(), 1024);
        assert!(long.message.chars().all(|c| c == 'é'));
    }

    /// A job file that breaks one rule, and the TOML key the error must name.
    const BROKEN_FILES: &[(&str, &str, &str)] = &[
        ("unknown key in a table", "[lora]\nrnak = 4\n", "lora.rnak"),
        ("misspelt table", "[lroa]\nrank = 4\n", "lroa"),
        ("a negative rank", "[lora]\nrank = -1\n", "lora.rank"),
        (
            "a rank given as text",
            "[lora]\nrank = \"eight\"\n",
            "lora.rank",
        ),
        ("rank 2000", "[lora]\nrank = 2000\n", "lora.rank"),
        ("NaN alpha", "[lora]\nalpha = nan\n", "lora.alpha"),
        (
            "an unknown aggregation",
            "[outer]\naggregation = \"average\"\n",
            "outer.aggregation",
        ),
        (
            "an unknown encoding",
            "[delta]\nencoding = \"int4\"\n",
            "delta.encoding",
        ),
        (
            "topk without fraction",
            "[delta]\nencoding = \"topk\"\n",
            "delta.topk_fraction",
        ),
        (
            "f32 with a fraction",
            "[delta]\nencoding = \"f32\"\ntopk_fraction = 0.1\n",
            "delta.topk_fraction",
        ),
        (
            "centered clipping without tau",
            "[outer]\naggregation = \"centered-clipping\"\nclip_iterations = 3\n",
            "outer.clip_tau",
        ),
        (
            "trim_fraction with the median",
            "[outer]\naggregation = \"median\"\ntrim_fraction = 0.1\n",
            "outer.trim_fraction",
        ),
        (
            "commit_every over inner_steps",
            "[inner]\ninner_steps = 10\ncommit_every = 11\n",
            "inner.commit_every",
        ),
        (
            "micro_batch over batch_size",
            "[inner]\nbatch_size = 4\nmicro_batch = 8\n",
            "inner.micro_batch",
        ),
        (
            "segments over what a lease makes",
            "[inner]\ninner_steps = 10\ncommit_every = 10\n[verification]\nsegments_per_challenge = 2\n",
            "verification.segments_per_challenge",
        ),
        (
            "negative regression",
            "[gate]\nmax_eval_loss_regression = -1.0\n",
            "gate.max_eval_loss_regression",
        ),
    ];

    #[test]
    fn every_broken_job_file_is_refused_by_its_toml_key() {
        for (case, extra, field) in BROKEN_FILES {
            match parse_job_file(&minimal(extra)) {
                Ok(_) => panic!("{case}: accepted"),
                Err(e) => assert_eq!(e.field, *field, "{case}: {e}"),
            }
        }
    }

    /// The parts of a job file around its `[dataset]` and `[rounds]` headers. `BLOB` stands
    /// for a valid dataset id.
    struct Head {
        top: &'static str,
        dataset: &'static str,
        rounds: &'static str,
    }

    /// A valid head.
    const HEAD: Head = Head {
        top: "module = \"m\"\nbase = \"builtin\"",
        dataset: "blob = \"BLOB\"\nformat = \"jsonl\"",
        rounds: "count = 1",
    };

    /// [`HEAD`] with another top part.
    const fn top(top: &'static str) -> Head {
        Head { top, ..HEAD }
    }

    /// [`HEAD`] with another `[dataset]` table.
    const fn dataset(dataset: &'static str) -> Head {
        Head { dataset, ..HEAD }
    }

    /// [`HEAD`] with another `[rounds]` table.
    const fn rounds(rounds: &'static str) -> Head {
        Head { rounds, ..HEAD }
    }

    impl Head {
        fn text(&self) -> String {
            let (top, dataset, rounds) = (self.top, self.dataset, self.rounds);
            format!("{top}\n[dataset]\n{dataset}\n[rounds]\n{rounds}\n")
                .replace("BLOB", &dataset_id().to_string())
        }
    }

    /// Job files whose head breaks one rule, and the key the error must name.
    const BROKEN_HEADS: &[(&str, Head, &str)] = &[
        (
            "unknown top-level key",
            top("modul = \"m\"\nbase = \"b\""),
            "modul",
        ),
        (
            "unknown key in [rounds]",
            rounds("count = 1\ntimeout = 5"),
            "rounds.timeout",
        ),
        ("no module", top("base = \"builtin\""), "module"),
        (
            "uppercase module",
            top("module = \"Shout\"\nbase = \"b\""),
            "module",
        ),
        ("no base", top("module = \"m\""), "base"),
        (
            "bad base blob",
            top("module = \"m\"\nbase = \"blob:123\""),
            "base",
        ),
        ("no dataset", dataset(""), "dataset"),
        (
            "two dataset sources",
            dataset("path = \"d.jsonl\"\nblob = \"BLOB\""),
            "dataset",
        ),
        (
            "bad dataset blob",
            dataset("blob = \"xyz\"\nformat = \"text\""),
            "dataset.blob",
        ),
        (
            "blob without format",
            dataset("blob = \"BLOB\""),
            "dataset.format",
        ),
        (
            "unknown extension",
            dataset("path = \"d.csv\""),
            "dataset.format",
        ),
        (
            "unknown format",
            dataset("path = \"d.txt\"\nformat = \"csv\""),
            "dataset.format",
        ),
        (
            "seq_len 1",
            dataset("path = \"d.txt\"\nseq_len = 1"),
            "dataset.seq_len",
        ),
        (
            "eval_fraction 1",
            dataset("path = \"d.md\"\neval_fraction = 1.0"),
            "dataset.eval_fraction",
        ),
        ("no budget", rounds(""), "rounds"),
        (
            "both budgets",
            rounds("count = 1\ntoken_budget = 100"),
            "rounds",
        ),
        ("zero rounds", rounds("count = 0"), "rounds.count"),
        (
            "zero token budget",
            rounds("token_budget = 0"),
            "rounds.token_budget",
        ),
        ("quorum 0", rounds("count = 1\nquorum = 0"), "rounds.quorum"),
        (
            "quorum 2000",
            rounds("count = 1\nquorum = 2000"),
            "rounds.quorum",
        ),
        (
            "timeout 0 s",
            rounds("count = 1\ntimeout_secs = 0"),
            "rounds.timeout_secs",
        ),
        (
            "timeout 8 days",
            rounds("count = 1\ntimeout_secs = 691200"),
            "rounds.timeout_secs",
        ),
        ("syntax error", top("module = \"m\nbase = \"b\""), ""),
    ];

    #[test]
    fn job_file_heads_are_refused_by_their_toml_key() {
        parse_job_file(&HEAD.text()).unwrap();
        for (case, head, field) in BROKEN_HEADS {
            match parse_job_file(&head.text()) {
                Ok(_) => panic!("{case}: accepted"),
                Err(e) => assert_eq!(e.field, *field, "{case}: {e}"),
            }
        }
        // A base name over 256 bytes is refused by the job file's key.
        let long = HEAD
            .text()
            .replace("\"builtin\"", &format!("\"{}\"", "b".repeat(257)));
        assert_eq!(parse_job_file(&long).unwrap_err().field, "base");
    }

    #[test]
    fn toml_errors_keep_the_line_and_the_key() {
        let err = parse_job_file(&minimal("[lora]\nrnak = 4\n")).unwrap_err();
        assert!(
            err.message.contains("line 9") && err.message.contains("rnak"),
            "{err}"
        );
        let err = parse_job_file(&minimal("[lora]\nrank = \"eight\"\n")).unwrap_err();
        assert!(err.message.contains("line 9"), "{err}");
        let err = parse_job_file(&minimal("[outer]\naggregation = \"average\"\n")).unwrap_err();
        assert!(err.message.contains("trimmed-mean"), "{err}");
    }

    #[test]
    fn a_base_blob_becomes_a_base_id() {
        let id = ContentId::of(b"bundle");
        let text = minimal("").replace("base = \"builtin\"", &format!("base = \"blob:{id}\""));
        let spec = parse_job_file(&text)
            .unwrap()
            .to_spec(&peer(), dataset_id())
            .unwrap();
        assert_eq!(spec.base, Some(v1::job_spec::Base::BaseId(id.to_proto())));
    }

    #[test]
    fn the_dataset_format_follows_the_extension_unless_given() {
        let format_of = |path: &str, format: &str| {
            let text = format!(
                "module = \"m\"\nbase = \"builtin\"\n[dataset]\npath = \"{path}\"\n{format}\
                 [rounds]\ncount = 1\n"
            );
            let spec = parse_job_file(&text)
                .and_then(|f| f.to_spec(&PeerId::random(), dataset_id()))
                .unwrap();
            match spec.dataset.and_then(|d| d.source) {
                Some(v1::dataset_source::Source::Raw(raw)) => raw.format,
                other => panic!("{other:?}"),
            }
        };
        let (jsonl, text) = (
            v1::DatasetFormat::Jsonl as i32,
            v1::DatasetFormat::Text as i32,
        );
        assert_eq!(format_of("a.jsonl", ""), jsonl);
        assert_eq!(format_of("a.JSON", ""), jsonl);
        assert_eq!(format_of("notes/a.txt", ""), text);
        assert_eq!(format_of("a.md", ""), text);
        assert_eq!(format_of("a.csv", "format = \"text\"\n"), text);
        assert_eq!(format_of("a.txt", "format = \"jsonl\"\n"), jsonl);
    }

    #[test]
    fn the_dataset_source_resolves_against_the_job_files_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = parse_job_file(EXAMPLE).unwrap();
        let err = file.dataset_source(dir.path()).unwrap_err();
        assert_eq!(err.field, "dataset.path");
        let expected = dir.path().join("shout.jsonl");
        assert!(
            err.message.contains(&expected.display().to_string()),
            "{err}"
        );
        std::fs::write(&expected, "{\"text\": \"hi\"}\n").unwrap();
        assert_eq!(
            file.dataset_source(dir.path()).unwrap(),
            DatasetRef::File(expected.clone())
        );
        // An absolute path stays as it is.
        let mut absolute = file.clone();
        absolute.dataset.path = Some(expected.clone());
        assert_eq!(
            absolute.dataset_source(Path::new("/elsewhere")).unwrap(),
            DatasetRef::File(expected)
        );
        // A directory is not a dataset.
        let mut directory = file.clone();
        directory.dataset.path = Some(".".into());
        let err = directory.dataset_source(dir.path()).unwrap_err();
        assert_eq!(err.field, "dataset.path");
        // A blob is parsed, not looked for.
        let blob = parse_job_file(&minimal("")).unwrap();
        assert_eq!(
            blob.dataset_source(dir.path()).unwrap(),
            DatasetRef::Blob(dataset_id())
        );
    }

    #[test]
    fn load_job_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("job.toml");
        let err = load_job_file(&missing).unwrap_err();
        assert!(
            err.message.contains(&missing.display().to_string()),
            "{err}"
        );
        std::fs::write(&missing, EXAMPLE).unwrap();
        assert_eq!(
            load_job_file(&missing).unwrap(),
            parse_job_file(EXAMPLE).unwrap()
        );
        std::fs::write(&missing, minimal("[lora]\nrank = 0\n")).unwrap();
        let err = load_job_file(&missing).unwrap_err();
        assert_eq!(err.field, "lora.rank");
        assert!(err.message.contains("job.toml"), "{err}");
    }

    #[test]
    fn lora_targets_must_match_a_layer_of_the_base() {
        let targets = |names: &[&str]| v1::LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: names.iter().map(|n| n.to_string()).collect(),
        };
        check_lora_fits(&targets(&["q_proj", "down_proj"]), &llama()).unwrap();
        check_lora_fits(&targets(&["model.layers.1.mlp.up_proj"]), &llama()).unwrap();
        check_lora_fits(&targets(&["c_attn", "c_proj", "c_fc"]), &gpt2()).unwrap();
        for (names, model) in [
            (&["q_proj", "c_attn"][..], llama()),
            (&["model.layers.2.mlp.up_proj"][..], llama()),
            (&["self_attn"][..], llama()),
            (&["q_proj"][..], gpt2()),
        ] {
            let err = check_lora_fits(&targets(names), &model).unwrap_err();
            assert_eq!(err.field, "lora.target_modules", "{names:?}");
            assert!(err.message.contains(model.lora_target_names()[0]), "{err}");
        }
    }

    #[test]
    fn shard_limits_agree_with_what_the_trainer_decodes() {
        // A shard the coordinator cuts within these limits must be one volunteers accept.
        let decoder = swarmtune_trainer::data::ShardLimits::default();
        assert_eq!(SEQ_LEN.max, u64::from(decoder.max_seq_len));
        assert_eq!(SHARD_MAX_TOKENS, decoder.max_tokens);
    }
}
