//! Verification of delivered deltas (DESIGN.md, "One round of a job", step 5): the rules the
//! coordinator's engine applies to a volunteer's `DeltaEnvelope`, its delta blob and its
//! answers to segment challenges, and how each verdict moves the volunteer's reputation.
//!
//! The engine owns state, network and storage; this module owns the rules, as plain functions
//! it calls in order, cheapest first:
//!
//! 1. [`check_envelope`] and [`check_start_commitment`]: the envelope against its lease, in
//!    microseconds.
//! 2. [`decode_delta`] and [`check_norm`]: the delta blob, linear in its size
//!    ([`open_delta`] and [`check_packed_norm`] keep it packed, for a merge).
//! 3. [`check_probe_loss`]: two forward passes on a small probe batch.
//! 4. [`plan_challenge`] and [`check_segment`]: replay of randomly chosen segments of the
//!    commitment chain, `k / H` of a lease's training each ([`replay_cost_fraction`]).
//!
//! Every failed check is a [`Rejection`] whose reason is the wire's `RejectReason` and whose
//! message says what was found and what was expected. [`Reputation::apply`] turns a verdict
//! into trust, using the one table of what each reason means ([`severity`]).
//!
//! Nothing here panics on peer input: every envelope, blob and answer is untrusted.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt::Write as _;

use rand::Rng;
use serde::{Deserialize, Serialize};
use swarmtune_protocol::v1::{self, RejectReason};
use swarmtune_trainer::delta::{self, DecodeLimits, DeltaEncoding, DeltaError, PackedDelta};
use swarmtune_trainer::error::TrainerError;
use swarmtune_trainer::model::TokenBatch;
use swarmtune_trainer::tensors::{self, NamedTensors};
use swarmtune_trainer::train::{LeaseData, LocalTrainer, LoraState, Provenance, TrainSpec};

/// Most commitments an envelope may carry (delta.proto, `DeltaEnvelope.commitments`).
pub const MAX_COMMITMENTS: usize = 4096;

/// Largest LoRA state blob a challenge answer may name (blob.proto: 1 GiB).
pub const MAX_STATE_BLOB_BYTES: usize = 1 << 30;

/// Most segments one challenge may ask for (delta.proto, `SegmentChallenge.segments`).
pub const MAX_SEGMENTS_PER_CHALLENGE: usize = 64;

/// Longest verdict message, in bytes (verify.proto, `VerificationVerdict.message`).
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// A rejected delta: the wire's reason and, for people, what was found.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{}: {message}", reason.as_str_name())]
pub struct Rejection {
    /// Why, as the verdict carries it.
    pub reason: RejectReason,
    /// What was found and what was expected; at most [`MAX_MESSAGE_BYTES`] of UTF-8.
    pub message: String,
}

impl Rejection {
    /// A rejection, its message cut at a character boundary to fit a verdict.
    pub fn new(reason: RejectReason, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_MESSAGE_BYTES {
            let mut end = MAX_MESSAGE_BYTES - '…'.len_utf8();
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push('…');
        }
        Self { reason, message }
    }
}

fn reject<T>(reason: RejectReason, message: impl Into<String>) -> Result<T, Rejection> {
    Err(Rejection::new(reason, message))
}

/// The first four bytes of a hash in hex, enough to tell two apart in a message.
fn short(hash: &[u8]) -> String {
    let mut out = String::with_capacity(9);
    for b in hash.iter().take(4) {
        let _ = write!(out, "{b:02x}");
    }
    if hash.len() > 4 {
        out.push('…');
    }
    out
}

fn content_id(id: Option<&v1::ContentId>) -> String {
    match id {
        Some(id) => short(&id.blake3),
        None => "none".into(),
    }
}

fn encoding_name(value: i32) -> String {
    v1::DeltaEncoding::try_from(value)
        .map(|e| e.as_str_name().to_owned())
        .unwrap_or_else(|_| format!("unknown encoding {value}"))
}

// ---------------------------------------------------------------------------------------------
// The lease, as the trainer sees it.
// ---------------------------------------------------------------------------------------------

/// The lease's inner-loop settings, checked. A lease is the coordinator's own record, so a bad
/// one is the verifier's fault (REJECT_REASON_INTERNAL), never the volunteer's.
fn lease_settings(lease: &v1::Lease) -> Result<&v1::TrainSettings, Rejection> {
    let internal = |m: String| reject(RejectReason::Internal, m);
    let Some(inner) = lease.inner.as_ref() else {
        return internal(format!("lease {} has no training settings", lease.lease_id));
    };
    if inner.inner_steps == 0 || inner.commit_every == 0 || inner.batch_size == 0 {
        return internal(format!(
            "lease {} has inner_steps {}, commit_every {}, batch_size {}; all must be at least 1",
            lease.lease_id, inner.inner_steps, inner.commit_every, inner.batch_size
        ));
    }
    let commitments = u64::from(inner.inner_steps).div_ceil(u64::from(inner.commit_every)) + 1;
    if commitments > MAX_COMMITMENTS as u64 {
        return internal(format!(
            "lease {} asks for {commitments} commitments ({} steps, one every {}), more than {MAX_COMMITMENTS}",
            lease.lease_id, inner.inner_steps, inner.commit_every
        ));
    }
    Ok(inner)
}

/// The trainer's settings for a lease: its `TrainSettings` and seed. A lease whose settings
/// the trainer refuses is rejected with REJECT_REASON_INTERNAL (the coordinator made it).
pub fn train_spec(lease: &v1::Lease) -> Result<TrainSpec, Rejection> {
    let inner = lease_settings(lease)?;
    let spec = TrainSpec {
        inner_steps: inner.inner_steps as usize,
        batch_size: inner.batch_size as usize,
        micro_batch: inner.micro_batch as usize,
        learning_rate: inner.learning_rate,
        beta1: inner.beta1,
        beta2: inner.beta2,
        eps: inner.eps,
        weight_decay: inner.weight_decay,
        // 0 means no clipping (job.proto, `TrainSettings.max_grad_norm`).
        max_grad_norm: (inner.max_grad_norm != 0.0).then_some(inner.max_grad_norm),
        seed: lease.seed,
        commit_every: inner.commit_every as usize,
    };
    spec.validate().map_err(|e| {
        Rejection::new(
            RejectReason::Internal,
            format!(
                "lease {} has training settings the trainer refuses: {e}",
                lease.lease_id
            ),
        )
    })?;
    Ok(spec)
}

/// The delta encoding a lease asks for, as the trainer's codec names it.
pub fn lease_encoding(lease: &v1::Lease) -> Result<DeltaEncoding, Rejection> {
    match v1::DeltaEncoding::try_from(lease.delta_encoding) {
        Ok(v1::DeltaEncoding::F32) => Ok(DeltaEncoding::F32),
        Ok(v1::DeltaEncoding::F16) => Ok(DeltaEncoding::F16),
        Ok(v1::DeltaEncoding::Int8Rowwise) => Ok(DeltaEncoding::Int8RowWise),
        Ok(v1::DeltaEncoding::Topk) => Ok(DeltaEncoding::TopK {
            fraction: lease.topk_fraction,
        }),
        _ => reject(
            RejectReason::Internal,
            format!(
                "lease {} has delta encoding {}",
                lease.lease_id,
                encoding_name(lease.delta_encoding)
            ),
        ),
    }
}

/// The trainer's form of a wire provenance.
pub fn provenance_from_wire(p: &v1::Provenance) -> Provenance {
    Provenance {
        backend: p.backend.clone(),
        threads: p.threads as usize,
        kernel_family: p.kernel_family.clone(),
    }
}

/// True when the envelope's provenance is the verifier's, so a replay must reach the committed
/// hashes bit for bit. An envelope without one is compared within tolerances.
pub fn same_provenance(env: &v1::DeltaEnvelope, verifier: &Provenance) -> bool {
    env.provenance
        .as_ref()
        .is_some_and(|p| provenance_from_wire(p) == *verifier)
}

// ---------------------------------------------------------------------------------------------
// 1. The envelope.
// ---------------------------------------------------------------------------------------------

/// Checks an envelope against its lease, cheapest facts first: job, round, lease, start
/// version, base, encoding and top-k fraction (REJECT_REASON_LEASE_MISMATCH); steps, tokens
/// (`steps · batch_size · seq_len`), target tokens and losses (REJECT_REASON_BAD_STATS); the
/// announced blob size (REJECT_REASON_TOO_LARGE); the shape of the commitment chain
/// (REJECT_REASON_BAD_COMMITMENTS). `seq_len` is the length of the job's shard sequences.
pub fn check_envelope(
    env: &v1::DeltaEnvelope,
    lease: &v1::Lease,
    seq_len: u32,
) -> Result<(), Rejection> {
    let inner = lease_settings(lease)?;
    let mismatch = |what: &str, found: String, expected: String| {
        reject(
            RejectReason::LeaseMismatch,
            format!(
                "{what} is {found}, lease {} says {expected}",
                lease.lease_id
            ),
        )
    };
    if env.job_id != lease.job_id {
        return mismatch("job", short(&env.job_id), short(&lease.job_id));
    }
    if env.round != lease.round {
        return mismatch("round", env.round.to_string(), lease.round.to_string());
    }
    if env.lease_id != lease.lease_id {
        return mismatch(
            "lease id",
            env.lease_id.to_string(),
            lease.lease_id.to_string(),
        );
    }
    if env.start_version != lease.start_version {
        return mismatch(
            "start version",
            env.start_version.to_string(),
            lease.start_version.to_string(),
        );
    }
    if env.base != lease.base {
        return mismatch(
            "base",
            content_id(env.base.as_ref()),
            content_id(lease.base.as_ref()),
        );
    }
    if env.encoding != lease.delta_encoding {
        return mismatch(
            "encoding",
            encoding_name(env.encoding),
            encoding_name(lease.delta_encoding),
        );
    }
    // Equal by value: the volunteer copies the lease's number, so any difference (NaN too) is
    // a different fraction. Both are 0 for every encoding but top-k.
    if env.topk_fraction != lease.topk_fraction {
        return mismatch(
            "top-k fraction",
            env.topk_fraction.to_string(),
            lease.topk_fraction.to_string(),
        );
    }

    let stats = |m: String| reject(RejectReason::BadStats, m);
    if env.steps != u64::from(inner.inner_steps) {
        return stats(format!(
            "{} steps reported, the lease has {} inner steps",
            env.steps, inner.inner_steps
        ));
    }
    let tokens = env
        .steps
        .checked_mul(u64::from(inner.batch_size))
        .and_then(|t| t.checked_mul(u64::from(seq_len)));
    if tokens != Some(env.tokens) {
        return stats(format!(
            "{} tokens reported, {} steps of {} sequences of {seq_len} tokens make {}",
            env.tokens,
            env.steps,
            inner.batch_size,
            tokens.map_or("more than 2^64".into(), |t| t.to_string())
        ));
    }
    if env.target_tokens == 0 || env.target_tokens > env.tokens {
        return stats(format!(
            "{} target tokens reported, expected 1 to {} (the tokens fed)",
            env.target_tokens, env.tokens
        ));
    }
    for (what, loss) in [
        ("loss_before", env.loss_before),
        ("loss_after", env.loss_after),
    ] {
        // A cross-entropy in nats is finite and never negative.
        if !(loss.is_finite() && loss >= 0.0) {
            return stats(format!(
                "{what} is {loss}, expected a finite non-negative loss"
            ));
        }
    }

    if env.delta_bytes > lease.max_delta_bytes {
        return reject(
            RejectReason::TooLarge,
            format!(
                "the delta blob is announced as {} bytes, the lease allows at most {}",
                env.delta_bytes, lease.max_delta_bytes
            ),
        );
    }

    check_commitment_chain(&env.commitments, env.steps, u64::from(inner.commit_every))
}

/// The commitment chain delta.proto prescribes for `steps` steps committed every `every`:
/// steps 0, k, 2k, … and the last step, each hash 32 bytes, at most [`MAX_COMMITMENTS`].
fn check_commitment_chain(
    commitments: &[v1::Commitment],
    steps: u64,
    every: u64,
) -> Result<(), Rejection> {
    let bad = |m: String| reject(RejectReason::BadCommitments, m);
    if commitments.len() > MAX_COMMITMENTS {
        return bad(format!(
            "{} commitments, at most {MAX_COMMITMENTS} are allowed",
            commitments.len()
        ));
    }
    let expected_len = steps.div_ceil(every) + 1;
    let rule = format!(
        "one at step 0, every {every} steps and at the last step {steps}: {expected_len} in all"
    );
    for (i, c) in commitments.iter().enumerate() {
        let expected_step = (i as u64).saturating_mul(every).min(steps);
        if i as u64 >= expected_len {
            return bad(format!(
                "commitment {i} at step {} comes after the last step; expected {rule}",
                c.step
            ));
        }
        if c.step != expected_step {
            return bad(format!(
                "commitment {i} is at step {}, expected step {expected_step} ({rule})",
                c.step
            ));
        }
        if c.state_hash.len() != 32 {
            return bad(format!(
                "commitment {i} (step {}) has a {}-byte hash, expected 32 bytes",
                c.step,
                c.state_hash.len()
            ));
        }
    }
    if commitments.len() as u64 != expected_len {
        return bad(format!(
            "{} commitments, expected {rule}",
            commitments.len()
        ));
    }
    Ok(())
}

/// Checks that the chain starts from the lease's start state (the module version's adapter
/// with zero moments, [`LoraState::start`]), which the coordinator hashes itself.
pub fn check_start_commitment(env: &v1::DeltaEnvelope, start: &LoraState) -> Result<(), Rejection> {
    if start.step() != 0 {
        return reject(
            RejectReason::Internal,
            format!(
                "the start state given to the verifier is at step {}, not 0",
                start.step()
            ),
        );
    }
    let Some(first) = env.commitments.first() else {
        return reject(
            RejectReason::BadCommitments,
            "the envelope has no commitments",
        );
    };
    let expected = start.hash();
    if first.step != 0 || first.state_hash != expected.as_bytes() {
        return reject(
            RejectReason::BadCommitments,
            format!(
                "the first commitment is {} at step {}, the start state of the lease hashes to {} at step 0",
                short(&first.state_hash),
                first.step,
                short(expected.as_bytes())
            ),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. The delta blob.
// ---------------------------------------------------------------------------------------------

/// Decodes a delta blob and checks it is the delta the envelope and lease promise: its size
/// (REJECT_REASON_TOO_LARGE), a valid container in the lease's encoding with exactly the
/// adapter's tensor names and shapes (`layout`; REJECT_REASON_MALFORMED_DELTA), and finite
/// values (REJECT_REASON_NON_FINITE). `bytes` must be the blob the envelope names (the blob
/// fetch checks its hash; a mismatch here is the engine's bug, REJECT_REASON_INTERNAL).
pub fn decode_delta(
    bytes: &[u8],
    env: &v1::DeltaEnvelope,
    lease: &v1::Lease,
    layout: &NamedTensors,
) -> Result<NamedTensors, Rejection> {
    open_delta(bytes, env, lease, layout).map(PackedDelta::into_tensors)
}

/// The checks of [`decode_delta`], keeping the delta packed (int8 values stay in `bytes`):
/// what a merge holds of each of its deltas.
pub fn open_delta<B: AsRef<[u8]>>(
    bytes: B,
    env: &v1::DeltaEnvelope,
    lease: &v1::Lease,
    layout: &NamedTensors,
) -> Result<PackedDelta<B>, Rejection> {
    let too_large = |m: String| reject(RejectReason::TooLarge, m);
    let len = bytes.as_ref().len();
    if len as u64 > lease.max_delta_bytes {
        return too_large(format!(
            "the delta blob is {len} bytes, the lease allows at most {}",
            lease.max_delta_bytes
        ));
    }
    if len as u64 != env.delta_bytes {
        return too_large(format!(
            "the delta blob is {len} bytes, the envelope says {}",
            env.delta_bytes
        ));
    }
    let Some(named) = env.delta.as_ref().filter(|id| id.blake3.len() == 32) else {
        return reject(
            RejectReason::MalformedDelta,
            "the envelope names no delta blob (its content id is not 32 bytes)",
        );
    };
    let actual = blake3::hash(bytes.as_ref());
    if named.blake3 != actual.as_bytes() {
        return reject(
            RejectReason::Internal,
            format!(
                "the verifier was given bytes hashing to {}, the envelope names the delta {}",
                short(actual.as_bytes()),
                short(&named.blake3)
            ),
        );
    }

    let encoding = lease_encoding(lease)?;
    let elements: usize = layout.values().map(|t| t.len()).sum();
    let limits = DecodeLimits {
        max_bytes: usize::try_from(lease.max_delta_bytes).unwrap_or(usize::MAX),
        max_tensors: layout.len(),
        max_elements: elements,
    };
    let delta = delta::decode_packed(bytes, &limits).map_err(decode_rejection)?;

    // The codec accepts any encoding; the lease names one.
    if delta.encoding() != encoding.name() {
        return reject(
            RejectReason::MalformedDelta,
            format!(
                "the delta blob is encoded as {}, the lease says {}",
                delta.encoding(),
                encoding.name()
            ),
        );
    }
    check_layout(&delta, layout)?;
    if let DeltaEncoding::TopK { fraction } = encoding {
        check_topk_counts(&delta, fraction)?;
    }
    // int8 values are `q · scale`, which can overflow to infinity from finite parts.
    if let Some((name, i, value)) = delta.first_non_finite() {
        return reject(
            RejectReason::NonFinite,
            format!("delta tensor {name} holds {value} at index {i}"),
        );
    }
    Ok(delta)
}

/// The reason for a codec error: most are a malformed container, but a non-finite value is
/// its own reason. The codec reports those as tensor errors, told apart by their wording
/// (`non-finite value …`, `invalid row scale NaN`); the tests below pin that wording.
fn decode_rejection(e: DeltaError) -> Rejection {
    let non_finite = match &e {
        DeltaError::Tensor { problem, .. } => {
            problem.starts_with("non-finite")
                || problem
                    .strip_prefix("invalid row scale ")
                    .and_then(|v| v.parse::<f32>().ok())
                    .is_some_and(|v| !v.is_finite())
        }
        _ => false,
    };
    let reason = match e {
        DeltaError::TooLarge { .. } => RejectReason::TooLarge,
        _ if non_finite => RejectReason::NonFinite,
        _ => RejectReason::MalformedDelta,
    };
    Rejection::new(reason, format!("the delta blob does not decode: {e}"))
}

/// Exactly the adapter's tensor names, each with its shape.
fn check_layout<B: AsRef<[u8]>>(
    delta: &PackedDelta<B>,
    layout: &NamedTensors,
) -> Result<(), Rejection> {
    let malformed = |m: String| reject(RejectReason::MalformedDelta, m);
    let found: BTreeMap<&str, &[usize]> = delta.tensors().collect();
    if let Some(name) = layout.keys().find(|n| !found.contains_key(n.as_str())) {
        return malformed(format!(
            "the delta has no tensor {name} ({} tensors, the adapter has {})",
            found.len(),
            layout.len()
        ));
    }
    if let Some(name) = found.keys().find(|n| !layout.contains_key(**n)) {
        return malformed(format!(
            "the delta has a tensor {name} the adapter does not have"
        ));
    }
    for (name, expected) in layout {
        if let Some(&shape) = found.get(name.as_str())
            && shape != expected.shape
        {
            return malformed(format!(
                "delta tensor {name} has shape {shape:?}, the adapter's is {:?}",
                expected.shape
            ));
        }
    }
    Ok(())
}

/// A top-k delta holds at most `ceil(fraction · n)` non-zero values per tensor; a dense delta
/// labelled top-k is not the lease's encoding.
fn check_topk_counts<B: AsRef<[u8]>>(
    delta: &PackedDelta<B>,
    fraction: f32,
) -> Result<(), Rejection> {
    let mut start = 0;
    let mut values = Vec::new();
    for (name, shape) in delta.tensors() {
        let n: usize = shape.iter().product();
        values.resize(n, 0.0);
        delta.read(start, &mut values);
        start += n;
        // The codec's k rounds a hair below this product, so this bound never refuses it.
        let allowed = (f64::from(fraction) * n as f64).ceil() as usize;
        let kept = values.iter().filter(|v| **v != 0.0).count();
        if kept > allowed {
            return reject(
                RejectReason::MalformedDelta,
                format!(
                    "delta tensor {name} has {kept} non-zero values, top-k with fraction {fraction} keeps at most {allowed} of {n}"
                ),
            );
        }
    }
    Ok(())
}

/// `value ≤ limit`, false when either is NaN (so that a NaN never passes a check).
fn at_most(value: f64, limit: f64) -> bool {
    matches!(
        value.partial_cmp(&limit),
        Some(Ordering::Less | Ordering::Equal)
    )
}

/// The delta's Euclidean norm over all tensors, refused above `policy.max_delta_norm`
/// (REJECT_REASON_NORM_TOO_LARGE); a bound of 0 means none.
pub fn check_norm(delta: &NamedTensors, policy: &v1::VerificationPolicy) -> Result<f64, Rejection> {
    norm_within(tensors::norm(delta), policy)
}

/// [`check_norm`] for a delta kept packed, on its exact int8 norm
/// ([`PackedDelta::squared_norm`]: within a relative 1e-7 of the decoded values' norm, read
/// from the integers instead of `f32` products).
pub fn check_packed_norm<B: AsRef<[u8]>>(
    delta: &PackedDelta<B>,
    policy: &v1::VerificationPolicy,
) -> Result<f64, Rejection> {
    norm_within(delta.squared_norm().sqrt(), policy)
}

fn norm_within(norm: f64, policy: &v1::VerificationPolicy) -> Result<f64, Rejection> {
    let bound = policy.max_delta_norm;
    if bound > 0.0 && !at_most(norm, bound) {
        return reject(
            RejectReason::NormTooLarge,
            format!("the delta's norm is {norm:.6}, the job allows at most {bound}"),
        );
    }
    Ok(norm)
}

// ---------------------------------------------------------------------------------------------
// 3. The probe loss.
// ---------------------------------------------------------------------------------------------

/// The loss on a probe batch (tokens and loss mask) with the start weights and with
/// `start − delta`, returned as `(before, after)`; REJECT_REASON_PROBE_LOSS_REGRESSION when
/// `after` is worse than `before` by more than `tolerance` nats (or not finite). A probe the
/// verifier cannot evaluate is REJECT_REASON_INTERNAL.
pub fn check_probe_loss(
    trainer: &LocalTrainer<'_>,
    start: &NamedTensors,
    delta: &NamedTensors,
    probe: (&TokenBatch, &[u8]),
    tolerance: f64,
) -> Result<(f32, f32), Rejection> {
    if !tensors::same_layout(start, delta) {
        return reject(
            RejectReason::MalformedDelta,
            "the delta's tensors are not the start adapter's",
        );
    }
    let (batch, mask) = probe;
    let loss = |params: &NamedTensors, which: &str| {
        trainer.loss(params, batch, Some(mask)).map_err(|e| {
            Rejection::new(
                RejectReason::Internal,
                format!("the probe loss with the {which} weights failed: {e}"),
            )
        })
    };
    let before = loss(start, "start")?;
    if !before.is_finite() {
        return reject(
            RejectReason::Internal,
            format!("the probe loss with the start weights is {before}"),
        );
    }
    let after = loss(&swarmtune_trainer::train::subtract(start, delta), "updated")?;
    let increase = f64::from(after) - f64::from(before);
    if !at_most(increase, tolerance) {
        return reject(
            RejectReason::ProbeLossRegression,
            format!(
                "the probe loss goes from {before:.6} to {after:.6} with the delta applied, \
                 an increase of {increase:.6} nats; the job tolerates {tolerance}"
            ),
        );
    }
    Ok((before, after))
}

// ---------------------------------------------------------------------------------------------
// 4. Segment challenges.
// ---------------------------------------------------------------------------------------------

/// Reputation below which a peer is challenged on every delta (job.proto,
/// `VerificationPolicy.probation_leases`).
pub const TRUSTED_SCORE: f64 = 0.5;

/// A challenge: the segments asked for, in chain order, and which of them are replayed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChallengePlan {
    /// The segments asked for; the chain's last segment is always among them, last.
    pub segments: Vec<v1::Segment>,
    /// For each segment, whether it is replayed. A segment that is not replayed has its
    /// start and end states checked against their commitments only: that is how the last
    /// segment's end state, the lease's final state, is obtained to tie the delta to the
    /// chain ([`check_delta_tie`]) without the compute of a replay.
    pub replayed: Vec<bool>,
}

impl ChallengePlan {
    /// No challenge.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// The segments that are replayed.
    pub fn replayed_segments(&self) -> Vec<v1::Segment> {
        self.segments
            .iter()
            .zip(&self.replayed)
            .filter(|(_, r)| **r)
            .map(|(s, _)| *s)
            .collect()
    }
}

/// The segments to challenge a delta with, or none. Peers on probation (fewer accepted deltas
/// than `probation_leases`) or with reputation below [`TRUSTED_SCORE`] are always challenged,
/// others with `challenge_probability`. A challenge replays `segments_per_challenge` (at
/// least 1, at most 64) distinct segments between consecutive commitments, fewer when the
/// chain has fewer, drawn by [`stratified_draw`]: one at random from each of that many equal
/// stretches of the chain, so a cheater who invents a whole stretch of its lease (the second
/// half, say) is caught for sure, where a uniform draw of the same cost would miss it often.
/// It also always asks for the chain's last segment, whose end state is the one the delta
/// must be `start −` of: replayed when it was drawn, only checked against its commitments
/// otherwise, so the replay cost stays what the policy says.
pub fn plan_challenge(
    commitments: &[v1::Commitment],
    policy: &v1::VerificationPolicy,
    peer: &Reputation,
    rng: &mut impl Rng,
) -> ChallengePlan {
    let challenged = peer.always_challenged(policy) || {
        let p = policy.challenge_probability;
        // NaN or ≤ 0 never, ≥ 1 always; `random_bool` wants [0, 1].
        p >= 1.0 || (p > 0.0 && rng.random_bool(p))
    };
    if !challenged {
        return ChallengePlan::default();
    }
    let wanted = (policy.segments_per_challenge as usize).clamp(1, MAX_SEGMENTS_PER_CHALLENGE);
    let available = commitments.len().saturating_sub(1);
    plan_of(commitments, stratified_draw(available, wanted, rng))
}

/// `wanted` distinct indices out of `0..available` (all of them when `wanted ≥ available`):
/// the range cut into `wanted` stretches as equal as can be, one index drawn uniformly from
/// each. Every index is about as likely as under a uniform draw of `wanted` (exactly
/// `wanted / available` when `wanted` divides `available`), but a run of indices that covers
/// a whole stretch is always hit.
pub fn stratified_draw(available: usize, wanted: usize, rng: &mut impl Rng) -> Vec<usize> {
    let n = wanted.min(available);
    (0..n)
        .map(|j| rng.random_range(j * available / n..(j + 1) * available / n))
        .collect()
}

/// The challenge that replays segments `drawn` (indices of their start commitments) and asks
/// for the last segment too.
fn plan_of(commitments: &[v1::Commitment], mut drawn: Vec<usize>) -> ChallengePlan {
    let available = commitments.len().saturating_sub(1);
    drawn.retain(|&i| i < available);
    drawn.sort_unstable();
    drawn.dedup();
    let mut plan = ChallengePlan::default();
    if available == 0 {
        return plan;
    }
    let segment = |i: usize| v1::Segment {
        start_step: commitments[i].step,
        end_step: commitments[i + 1].step,
    };
    let last = available - 1;
    for &i in &drawn {
        plan.segments.push(segment(i));
        plan.replayed.push(true);
    }
    if drawn.last() != Some(&last) {
        // A challenge has at most 64 segments: the earliest drawn one makes room if needed.
        if plan.segments.len() == MAX_SEGMENTS_PER_CHALLENGE {
            plan.segments.remove(0);
            plan.replayed.remove(0);
        }
        plan.segments.push(segment(last));
        plan.replayed.push(false);
    }
    plan
}

/// How the deltas of two redundant leases of the same work (same shards, seed and start
/// version) compare.
#[derive(Clone, Debug, PartialEq)]
pub enum TwinComparison {
    /// They agree: exactly where both ran on the same provenance, within the policy's
    /// tolerances otherwise.
    Agree,
    /// They disagree, so at least one of them is wrong.
    Disagree {
        /// On equal provenances, the index of the first commitment where the chains part:
        /// the segment that ends there decides which one is wrong.
        divergence: Option<usize>,
        /// What differs, for the log and the verdicts.
        why: String,
    },
}

/// Compares two redundant deltas (`a` and `b`: envelopes and decoded deltas, both past their
/// own checks). On equal provenances (backend, threads, kernels) the same work gives the same
/// states bit for bit, so their commitment chains must be equal; their deltas then encode the
/// same end state and must be the same blob, or agree within the tolerances (top-k error
/// feedback makes two honest top-k deltas differ). On different provenances the decoded
/// deltas must agree within the tolerances ([`compare_within_tolerance`]).
pub fn compare_twins(
    a: (&v1::DeltaEnvelope, &NamedTensors),
    b: (&v1::DeltaEnvelope, &NamedTensors),
    policy: &v1::VerificationPolicy,
) -> TwinComparison {
    let ((a_env, a_delta), (b_env, b_delta)) = (a, b);
    let exact = a_env.provenance.is_some() && a_env.provenance == b_env.provenance;
    if exact {
        let parted = a_env
            .commitments
            .iter()
            .zip(&b_env.commitments)
            .position(|(x, y)| x != y)
            .or((a_env.commitments.len() != b_env.commitments.len())
                .then(|| a_env.commitments.len().min(b_env.commitments.len())));
        if let Some(i) = parted {
            return TwinComparison::Disagree {
                divergence: Some(i),
                why: format!(
                    "on the same provenance the commitment chains part at commitment {i} (step {})",
                    a_env.commitments.get(i).map_or(0, |c| c.step)
                ),
            };
        }
        if a_env.delta == b_env.delta {
            return TwinComparison::Agree;
        }
    }
    match compare_within_tolerance(a_delta, b_delta, policy) {
        Ok(_) => TwinComparison::Agree,
        Err(r) => TwinComparison::Disagree {
            divergence: None,
            why: format!("the deltas differ: {}", r.message),
        },
    }
}

/// The tie-break challenge for a delta whose redundant twin disagreed with it: the segment
/// where equal-provenance chains part (`divergence`; replaying it from their common state
/// tells which chain is right), or else the policy's number of segments drawn at random;
/// always with the last segment, which ties each delta to its chain.
pub fn plan_tie_break(
    commitments: &[v1::Commitment],
    divergence: Option<usize>,
    policy: &v1::VerificationPolicy,
    rng: &mut impl Rng,
) -> ChallengePlan {
    let available = commitments.len().saturating_sub(1);
    let drawn = match divergence {
        Some(i) if i >= 1 && i <= available => vec![i - 1],
        _ => {
            let wanted =
                (policy.segments_per_challenge as usize).clamp(1, MAX_SEGMENTS_PER_CHALLENGE);
            stratified_draw(available, wanted, rng)
        }
    };
    plan_of(commitments, drawn)
}

/// Share of a lease's training compute that replaying `segments` costs: their steps over the
/// lease's `inner_steps` (the goal is at most about 0.1 on average).
pub fn replay_cost_fraction(segments: &[v1::Segment], inner_steps: u64) -> f64 {
    if inner_steps == 0 {
        return 0.0;
    }
    let steps: u64 = segments
        .iter()
        .map(|s| s.end_step.saturating_sub(s.start_step))
        .fold(0, u64::saturating_add);
    steps as f64 / inner_steps as f64
}

/// What the verifier replays with: the lease's trainer, data and settings on this machine,
/// and the delivered delta that the chain's final state must explain.
pub struct Replay<'a> {
    /// A trainer on the job's base (autodiff device) with the lease's LoRA config.
    pub trainer: &'a LocalTrainer<'a>,
    /// The lease's shards.
    pub data: &'a LeaseData<'a>,
    /// The lease's settings ([`train_spec`]).
    pub spec: &'a TrainSpec,
    /// The adapter's tensor names and shapes; state blobs must have exactly these.
    pub layout: &'a NamedTensors,
    /// What this verifier computes with; decides between exact and tolerant comparison.
    pub provenance: &'a Provenance,
    /// The delta delivered for the lease, checked against the end state of the chain's last
    /// segment whenever that segment is answered.
    pub delivered: Delivered<'a>,
}

/// A delivered delta, decoded, and the lease's start adapter it is relative to.
#[derive(Clone, Copy)]
pub struct Delivered<'a> {
    /// The lease's start adapter (the module version's tensors).
    pub start: &'a NamedTensors,
    /// The decoded delta ([`decode_delta`]).
    pub delta: &'a NamedTensors,
    /// The lease's encoding, which decides how far the decoded values may be from exact.
    pub encoding: DeltaEncoding,
}

/// The volunteer's answer for one segment, with the blobs the engine fetched for it.
pub struct SegmentAnswer<'a> {
    /// The answer as it came over the wire.
    pub state: &'a v1::SegmentState,
    /// The bytes of `state.start_state`.
    pub start_state: &'a [u8],
    /// The bytes of `state.end_state`; needed when the provenances differ (see
    /// [`same_provenance`]) and for a segment that is not replayed.
    pub end_state: Option<&'a [u8]>,
}

/// How a segment passed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SegmentVerdict {
    /// Equal provenance: the replay reached the committed hash bit for bit.
    Exact,
    /// Different provenance: the replayed update agrees with the volunteer's within the job's
    /// tolerances.
    WithinTolerance(Agreement),
    /// Not replayed: its start and end states are the committed ones.
    StatesMatch,
}

/// The largest LoRA state blob of `layout`: three F32 copies of every tensor plus a generous
/// header, and never more than blob.proto's 1 GiB. A challenge's state blobs are parsed with
/// this limit.
pub fn state_byte_cap(layout: &NamedTensors) -> usize {
    layout
        .iter()
        .map(|(name, t)| 3 * (4 * t.len() + name.len() + 256))
        .fold(4096usize, usize::saturating_add)
        .min(MAX_STATE_BLOB_BYTES)
}

fn commitment_at(env: &v1::DeltaEnvelope, step: u64) -> Option<&v1::Commitment> {
    env.commitments.iter().find(|c| c.step == step)
}

/// Checks one answered segment of a challenge (`asked`), by replaying it when `replayed`.
///
/// The start state must parse with the adapter's layout and hash to the commitment at
/// `start_step`, and the claimed end hash must be the commitment at `end_step`
/// (REJECT_REASON_CHALLENGE_START_MISMATCH / _END_MISMATCH: cheating). The verifier then
/// replays the segment on the lease's data and settings. On the volunteer's provenance the
/// replayed state must hash to the commitment exactly (REJECT_REASON_CHALLENGE_END_MISMATCH).
/// On another provenance the volunteer's end state must hash to the commitment (else
/// _END_MISMATCH: that is a lie on any backend), and the segment's update `start − end` of
/// the weights must agree with the replayed one within the policy's tolerances
/// (REJECT_REASON_REPLAY_OUT_OF_TOLERANCE). The updates are compared rather than the end
/// weights themselves: both end states share the start weights, so a comparison of whole
/// weights grows more lenient the less a segment moves them (late in training, with a small
/// learning rate), up to passing a volunteer that skipped the segment's work.
///
/// A segment that is not replayed needs the volunteer's end state, which must hash to the
/// commitment. When `asked` is the chain's last segment, its end state (the volunteer's, or
/// the replayed one that hashes to the same commitment) is the lease's final state, and the
/// delivered delta must be the start adapter minus it ([`check_delta_tie`]).
///
/// An answer for another segment, or without a blob it needs, is
/// REJECT_REASON_CHALLENGE_UNANSWERED.
pub fn check_segment(
    replay: &Replay<'_>,
    env: &v1::DeltaEnvelope,
    policy: &v1::VerificationPolicy,
    asked: &v1::Segment,
    replayed: bool,
    answer: &SegmentAnswer<'_>,
) -> Result<SegmentVerdict, Rejection> {
    let span = format!("segment {}..{}", asked.start_step, asked.end_step);
    let unanswered = |m: String| reject(RejectReason::ChallengeUnanswered, format!("{span}: {m}"));
    let start_mismatch =
        |m: String| reject(RejectReason::ChallengeStartMismatch, format!("{span}: {m}"));
    let end_mismatch =
        |m: String| reject(RejectReason::ChallengeEndMismatch, format!("{span}: {m}"));

    match answer.state.segment.as_ref() {
        Some(s) if s == asked => {}
        Some(s) => {
            return unanswered(format!(
                "the answer is for segment {}..{}",
                s.start_step, s.end_step
            ));
        }
        None => return unanswered("the answer names no segment".into()),
    }
    let (Some(start_commitment), Some(end_commitment)) = (
        commitment_at(env, asked.start_step),
        commitment_at(env, asked.end_step),
    ) else {
        return reject(
            RejectReason::Internal,
            format!("{span}: the challenge asked for steps without commitments"),
        );
    };
    if asked.end_step <= asked.start_step {
        return reject(
            RejectReason::Internal,
            format!("{span}: the challenge asked for an empty segment"),
        );
    }
    let is_last = env.commitments.last().map(|c| c.step) == Some(asked.end_step);
    check_blob_id(
        &span,
        "start",
        answer.state.start_state.as_ref(),
        answer.start_state,
    )?;

    let cap = state_byte_cap(replay.layout);
    let start = LoraState::from_bytes(answer.start_state, replay.layout, cap).map_err(|e| {
        Rejection::new(RejectReason::ChallengeStartMismatch, format!("{span}: {e}"))
    })?;
    if start.step() != asked.start_step {
        return start_mismatch(format!(
            "the start state is at step {}, expected step {}",
            start.step(),
            asked.start_step
        ));
    }
    let start_hash = start.hash();
    if start_commitment.state_hash != start_hash.as_bytes() {
        return start_mismatch(format!(
            "the start state hashes to {}, the commitment at step {} says {}",
            short(start_hash.as_bytes()),
            asked.start_step,
            short(&start_commitment.state_hash)
        ));
    }
    if answer.state.claimed_end_hash != end_commitment.state_hash {
        return end_mismatch(format!(
            "the claimed end hash is {}, the commitment at step {} says {}",
            short(&answer.state.claimed_end_hash),
            asked.end_step,
            short(&end_commitment.state_hash)
        ));
    }

    let exact = same_provenance(env, replay.provenance);
    // The volunteer's end state: needed to compare across provenances, and when the segment
    // is not replayed (an exact replay reaches it itself). Checked before spending the replay.
    let end_blob = if replayed && exact {
        None
    } else {
        answer.end_state
    };
    let volunteer_end = match end_blob {
        None if !replayed => {
            return unanswered(
                "the segment is not replayed, so its end state is needed, and it was not provided"
                    .into(),
            );
        }
        None if !exact => {
            return unanswered(
                "the provenances differ, so the end state is needed, and it was not provided"
                    .into(),
            );
        }
        None => None,
        Some(bytes) => {
            check_blob_id(&span, "end", answer.state.end_state.as_ref(), bytes)?;
            let end = LoraState::from_bytes(bytes, replay.layout, cap).map_err(|e| {
                Rejection::new(RejectReason::ChallengeEndMismatch, format!("{span}: {e}"))
            })?;
            let end_hash = end.hash();
            if end_commitment.state_hash != end_hash.as_bytes() {
                return end_mismatch(format!(
                    "the end state hashes to {}, the commitment at step {} says {}",
                    short(end_hash.as_bytes()),
                    asked.end_step,
                    short(&end_commitment.state_hash)
                ));
            }
            Some(end)
        }
    };
    let tie = |end: &NamedTensors| {
        if is_last {
            check_delta_tie(&replay.delivered, end)
                .map_err(|r| Rejection::new(r.reason, format!("{span}: {}", r.message)))
        } else {
            Ok(())
        }
    };

    if !replayed {
        // Both states are the committed ones (a missing end state was refused above).
        if let Some(end) = &volunteer_end {
            tie(&end.params)?;
            return Ok(SegmentVerdict::StatesMatch);
        }
    }

    let start_params = start.params.clone();
    let replayed_state =
        match replay
            .trainer
            .replay_segment(start, replay.data, replay.spec, asked.end_step)
        {
            Ok(state) => state,
            // The committed start state cannot be trained from: the volunteer's own run could not
            // have continued from it either.
            Err(TrainerError::InvalidInput(m)) if m.contains("non-finite") => {
                let reason = if exact {
                    RejectReason::ChallengeEndMismatch
                } else {
                    RejectReason::ReplayOutOfTolerance
                };
                return reject(reason, format!("{span}: the replay failed: {m}"));
            }
            Err(e) => {
                return reject(
                    RejectReason::Internal,
                    format!("{span}: the replay failed: {e}"),
                );
            }
        };

    if exact {
        let reached = replayed_state.hash();
        if end_commitment.state_hash != reached.as_bytes() {
            return end_mismatch(format!(
                "replay reached {}, the commitment says {}",
                short(reached.as_bytes()),
                short(&end_commitment.state_hash)
            ));
        }
        // The replayed state is the committed one, whether or not the volunteer sent it.
        tie(&replayed_state.params)?;
        return Ok(SegmentVerdict::Exact);
    }
    let Some(end) = volunteer_end else {
        return reject(
            RejectReason::Internal,
            format!("{span}: no end state to compare with"),
        );
    };
    let claimed = swarmtune_trainer::train::subtract(&start_params, &end.params);
    let reached = swarmtune_trainer::train::subtract(&start_params, &replayed_state.params);
    let agreement = compare_within_tolerance(&claimed, &reached, policy)
        .map_err(|r| Rejection::new(r.reason, format!("{span}: {}", r.message)))?;
    tie(&end.params)?;
    Ok(SegmentVerdict::WithinTolerance(agreement))
}

/// How much of the smallest magnitude top-k keeps the volunteer's error-feedback residual
/// may be at any coordinate ([`check_delta_tie`]).
pub const TOPK_RESIDUAL_FACTOR: f64 = 2.0;

/// Checks that `delivered.delta` is the lease's start adapter minus `end`, the final state of
/// the volunteer's committed chain, up to what its encoding loses
/// (REJECT_REASON_CHALLENGE_END_MISMATCH otherwise: the delta claims an end state other than
/// the committed one, which is a lie on any backend, so it is cheating). `e = start − end` is
/// computed as the trainer computes a delta; each decoded value `d` must satisfy:
///
/// - `f32`: `|d − e| ≤ 2^-23 · |e|` (the codec is lossless; one rounding of slack);
/// - `f16`: `|d − e| ≤ 2^-11 · |e| + 2^-25` (half an f16 step, normal or subnormal);
/// - `int8-rowwise`: `|d − e| ≤ s / 2 + 2^-22 · (|e| + s)` with `s = max|row of e| / 127`,
///   the scale the honest encoder picks; the scale in the blob is not trusted;
/// - `top-k`: the volunteer sends the `k` largest values of `e + r`, where `r` is its local
///   error-feedback residual, which the verifier does not know. A residual coordinate is what
///   an earlier encoding left out, so it is at most about that encoding's smallest kept
///   magnitude, which for leases of one job is about this one's. With `τ_d` the smallest
///   non-zero magnitude of the delta in a tensor, `τ_e` the `k`-th largest magnitude of `e`
///   there (`k` the values kept), the residual may be `ρ = 2 · min(τ_d, τ_e)`
///   ([`TOPK_RESIDUAL_FACTOR`]): a kept value within `ρ` of `e`, a coordinate not kept with
///   `|e| ≤ τ_d + ρ` (it was not among the largest of `e + r`), and the kept values pointing
///   the way of `e` (a positive dot product). Without feedback the kept values are exactly
///   `e`. A scaled delta misses by its excess at its largest values, a flipped one by twice
///   them, a delta of another end state by what the two states differ.
///
/// Tensors outside the adapter's layout are the verifier's bug (REJECT_REASON_INTERNAL).
pub fn check_delta_tie(delivered: &Delivered<'_>, end: &NamedTensors) -> Result<(), Rejection> {
    let expected = swarmtune_trainer::train::subtract(delivered.start, end);
    if !tensors::same_layout(&expected, delivered.delta) || expected.len() != end.len() {
        return reject(
            RejectReason::Internal,
            "the delta, the start adapter and the end state have different tensors",
        );
    }
    // Rounding slack, in units of the values compared.
    const ROUNDING: f64 = 1.0 / (1u64 << 22) as f64;
    for ((name, e), d) in expected.iter().zip(delivered.delta.values()) {
        let (rows, cols) = e.rows_cols();
        // Top-k: the residual a kept coordinate may carry, and the largest |e| left out.
        let (rho, unkept_bound) = match delivered.encoding {
            DeltaEncoding::TopK { .. } => {
                let kept: Vec<f64> = d
                    .data
                    .iter()
                    .filter(|v| **v != 0.0)
                    .map(|v| f64::from(v.abs()))
                    .collect();
                let tau_d = kept.iter().copied().reduce(f64::min).unwrap_or(0.0);
                let tau_e = if kept.is_empty() {
                    0.0
                } else {
                    let mut magnitudes: Vec<f64> =
                        e.data.iter().map(|v| f64::from(v.abs())).collect();
                    let k = kept.len().min(magnitudes.len());
                    let (_, kth, _) =
                        magnitudes.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
                    *kth
                };
                let rho = TOPK_RESIDUAL_FACTOR * tau_d.min(tau_e);
                let dot: f64 = e
                    .data
                    .iter()
                    .zip(&d.data)
                    .map(|(&ev, &dv)| f64::from(ev) * f64::from(dv))
                    .sum();
                let points_along = dot > 0.0;
                if !kept.is_empty() && !points_along {
                    return reject(
                        RejectReason::ChallengeEndMismatch,
                        format!(
                            "the delta is not the start adapter minus the committed final state: \
                             the values {name} keeps point away from start − end (dot product \
                             {dot:e}); topk allows only a residual of at most {rho:e} per value"
                        ),
                    );
                }
                (rho, tau_d + rho)
            }
            _ => (0.0, 0.0),
        };
        for row in 0..rows.max(1) {
            let range = row * cols..((row + 1) * cols).min(e.data.len());
            let (e_row, d_row) = (&e.data[range.clone()], &d.data[range.clone()]);
            // The encoder's scale, in f32 as the encoder computes it.
            let scale = f64::from(e_row.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0);
            for (j, (&ev, &dv)) in e_row.iter().zip(d_row).enumerate() {
                let (ev, dv) = (f64::from(ev), f64::from(dv));
                let allowed = match delivered.encoding {
                    DeltaEncoding::F32 => ev.abs() * f64::from(f32::EPSILON),
                    DeltaEncoding::F16 => ev.abs() / 2048.0 + 1.0 / (1u64 << 25) as f64,
                    DeltaEncoding::Int8RowWise => scale / 2.0 + ROUNDING * (ev.abs() + scale),
                    DeltaEncoding::TopK { .. } => {
                        let slack = ROUNDING * (ev.abs() + dv.abs());
                        // Not kept: d is 0, so the check below is on |e|.
                        (if dv != 0.0 { rho } else { unkept_bound }) + slack
                    }
                };
                let error = (dv - ev).abs();
                // NaN never passes.
                if !at_most(error, allowed) {
                    let index = row * cols + j;
                    return reject(
                        RejectReason::ChallengeEndMismatch,
                        format!(
                            "the delta is not the start adapter minus the committed final state: \
                             {name}[{index}] is {dv:e}, start − end is {ev:e}, and {} allows an \
                             error of at most {allowed:e}",
                            delivered.encoding.name()
                        ),
                    );
                }
            }
        }
    }
    Ok(())
}

/// A fetched blob must be the one the answer names (the blob fetch guarantees it, so a
/// mismatch is the engine's bug); an answer that names none did not answer.
fn check_blob_id(
    span: &str,
    which: &str,
    named: Option<&v1::ContentId>,
    bytes: &[u8],
) -> Result<(), Rejection> {
    let Some(named) = named.filter(|id| id.blake3.len() == 32) else {
        return reject(
            RejectReason::ChallengeUnanswered,
            format!("{span}: the answer names no {which} state blob"),
        );
    };
    let actual = blake3::hash(bytes);
    if named.blake3 != actual.as_bytes() {
        return reject(
            RejectReason::Internal,
            format!(
                "{span}: the verifier was given {which} state bytes hashing to {}, the answer names {}",
                short(actual.as_bytes()),
                short(&named.blake3)
            ),
        );
    }
    Ok(())
}

/// How closely two results agree.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Agreement {
    /// Cosine similarity of the two, in [-1, 1] (1 when both are zero).
    pub cosine: f64,
    /// `‖a − b‖ / ‖b‖` (0 when both are zero).
    pub relative_error: f64,
}

/// Compares two results of the same work computed on different provenances — `a` the
/// volunteer's, `b` the verifier's or the other peer's — with the policy's tolerances: cosine
/// similarity at least `min_cosine_similarity` and `‖a − b‖ / ‖b‖` at most
/// `max_relative_error`. Fails with REJECT_REASON_REPLAY_OUT_OF_TOLERANCE; for a redundant
/// lease a disagreement is not yet a verdict (a tie-break decides which delta is wrong, which
/// is then rejected with REJECT_REASON_REDUNDANCY_MISMATCH).
pub fn compare_within_tolerance(
    a: &NamedTensors,
    b: &NamedTensors,
    policy: &v1::VerificationPolicy,
) -> Result<Agreement, Rejection> {
    let out = |m: String| reject(RejectReason::ReplayOutOfTolerance, m);
    if !tensors::same_layout(a, b) {
        return out(format!(
            "the two results have different tensors ({} and {}) or shapes",
            a.len(),
            b.len()
        ));
    }
    let (mut dot, mut diff) = (0f64, 0f64);
    for (ta, tb) in a.values().zip(b.values()) {
        for (&x, &y) in ta.data.iter().zip(&tb.data) {
            let (x, y) = (f64::from(x), f64::from(y));
            dot += x * y;
            diff += (x - y) * (x - y);
        }
    }
    let (norm_a, norm_b) = (tensors::norm(a), tensors::norm(b));
    let agreement = if norm_a == 0.0 && norm_b == 0.0 {
        Agreement {
            cosine: 1.0,
            relative_error: 0.0,
        }
    } else {
        Agreement {
            cosine: if norm_a > 0.0 && norm_b > 0.0 {
                dot / (norm_a * norm_b)
            } else {
                0.0
            },
            relative_error: diff.sqrt() / norm_b,
        }
    };
    if !(at_most(policy.min_cosine_similarity, agreement.cosine)
        && at_most(agreement.relative_error, policy.max_relative_error))
    {
        return out(format!(
            "cosine similarity {:.6} (at least {} required), relative error {:.6} (at most {} allowed)",
            agreement.cosine,
            policy.min_cosine_similarity,
            agreement.relative_error,
            policy.max_relative_error
        ));
    }
    Ok(agreement)
}

// ---------------------------------------------------------------------------------------------
// 5. Reputation.
// ---------------------------------------------------------------------------------------------

/// What a rejection reason means for the volunteer (verify.proto, `RejectReason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// Not held against the peer (late, round closed, the verifier's own failure, ...).
    NotPenalized,
    /// Lowers the peer's reputation.
    Penalized,
    /// Proof of cheating: the peer is banned and its deltas of the round are dropped.
    Cheating,
}

/// The one table of what each reason means, as verify.proto's comments say. A redundancy
/// mismatch is cheating only between equal provenances; `equal_provenance` matters for no
/// other reason.
pub fn severity(reason: RejectReason, equal_provenance: bool) -> Severity {
    use RejectReason as R;
    match reason {
        R::Unspecified | R::Late | R::RoundClosed | R::PeerBanned | R::Internal => {
            Severity::NotPenalized
        }
        R::LeaseMismatch
        | R::BlobUnavailable
        | R::TooLarge
        | R::MalformedDelta
        | R::NonFinite
        | R::NormTooLarge
        | R::ProbeLossRegression
        | R::BadStats
        | R::BadCommitments
        | R::ChallengeUnanswered
        | R::ReplayOutOfTolerance => Severity::Penalized,
        R::ChallengeStartMismatch | R::ChallengeEndMismatch => Severity::Cheating,
        R::RedundancyMismatch if equal_provenance => Severity::Cheating,
        R::RedundancyMismatch => Severity::Penalized,
    }
}

/// True when the reason counts against the peer (penalized, or cheating, which is worse).
pub fn is_penalized(reason: RejectReason) -> bool {
    severity(reason, false) != Severity::NotPenalized
}

/// True when the reason proves cheating (for a redundancy mismatch: on equal provenance).
pub fn is_cheating(reason: RejectReason, equal_provenance: bool) -> bool {
    severity(reason, equal_provenance) == Severity::Cheating
}

/// A verdict, as far as reputation is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The delta passed every check.
    Accepted,
    /// The delta was rejected.
    Rejected {
        /// Why.
        reason: RejectReason,
        /// Whether the work was compared on the volunteer's own provenance (matters only for
        /// REJECT_REASON_REDUNDANCY_MISMATCH).
        equal_provenance: bool,
    },
}

/// Reputation of a peer that has not been judged yet.
pub const START_SCORE: f64 = 0.5;
/// Share of the distance to 1 an accepted delta gains.
pub const ACCEPT_GAIN: f64 = 0.1;
/// Factor a penalized rejection multiplies the score by.
pub const PENALTY_FACTOR: f64 = 0.5;
/// A peer whose score falls below this is banned (from 0.5: the third penalty in a row).
pub const BAN_BELOW: f64 = 0.1;

/// A volunteer's standing at this coordinator: trust in [0, 1] and the counts behind it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Reputation {
    /// Trust in [0, 1]; [`START_SCORE`] for a peer not judged yet.
    pub score: f64,
    /// Deltas accepted.
    pub accepted: u64,
    /// Deltas rejected for a penalized or cheating reason.
    pub penalized: u64,
    /// Banned: its deltas are refused with REJECT_REASON_PEER_BANNED.
    pub banned: bool,
}

impl Default for Reputation {
    fn default() -> Self {
        Self {
            score: START_SCORE,
            accepted: 0,
            penalized: 0,
            banned: false,
        }
    }
}

impl Reputation {
    /// True when the peer's every delta is challenged: on probation (fewer accepted deltas
    /// than `probation_leases`) or trusted less than [`TRUSTED_SCORE`].
    pub fn always_challenged(&self, policy: &v1::VerificationPolicy) -> bool {
        self.accepted < u64::from(policy.probation_leases) || self.score < TRUSTED_SCORE
    }

    /// Updates the standing with one verdict: an accepted delta moves the score a tenth of the
    /// way to 1, a penalized rejection halves it, cheating or a score below [`BAN_BELOW`] bans,
    /// and reasons that are not the peer's fault change nothing. A banned peer stays banned.
    /// Returns true when this verdict banned the peer (its round's deltas must be dropped).
    pub fn apply(&mut self, verdict: Verdict) -> bool {
        if self.banned {
            return false;
        }
        match verdict {
            Verdict::Accepted => {
                self.accepted += 1;
                self.score += (1.0 - self.score) * ACCEPT_GAIN;
            }
            Verdict::Rejected {
                reason,
                equal_provenance,
            } => match severity(reason, equal_provenance) {
                Severity::NotPenalized => {}
                Severity::Penalized => {
                    self.penalized += 1;
                    self.score *= PENALTY_FACTOR;
                    self.banned = self.score < BAN_BELOW;
                }
                Severity::Cheating => {
                    self.penalized += 1;
                    self.score = 0.0;
                    self.banned = true;
                }
            },
        }
        self.score = self.score.clamp(0.0, 1.0);
        self.banned
    }
}

/// The wire form of a provenance.
pub fn provenance_to_wire(p: &Provenance) -> v1::Provenance {
    v1::Provenance {
        backend: p.backend.clone(),
        threads: p.threads as u32,
        kernel_family: p.kernel_family.clone(),
    }
}

/// The envelope an honest volunteer sends for a lease it trained (`outcome`), whose delta
/// blob is `delta`, `delta_bytes` long: every field the checks above compare with the lease.
pub fn delta_envelope(
    lease: &v1::Lease,
    outcome: &swarmtune_trainer::train::TrainOutcome,
    delta: swarmtune_protocol::ContentId,
    delta_bytes: u64,
) -> v1::DeltaEnvelope {
    v1::DeltaEnvelope {
        protocol_version: swarmtune_protocol::PROTOCOL_VERSION,
        job_id: lease.job_id.clone(),
        round: lease.round,
        lease_id: lease.lease_id,
        start_version: lease.start_version,
        base: lease.base.clone(),
        delta: Some(delta.to_proto()),
        delta_bytes,
        encoding: lease.delta_encoding,
        topk_fraction: lease.topk_fraction,
        steps: outcome.stats.steps as u64,
        tokens: outcome.stats.tokens,
        target_tokens: outcome.stats.target_tokens,
        loss_before: outcome.stats.loss_before,
        loss_after: outcome.stats.loss_after,
        commitments: outcome
            .commitments
            .iter()
            .map(|c| v1::Commitment {
                step: c.step,
                state_hash: c.state_hash.to_vec(),
            })
            .collect(),
        provenance: Some(provenance_to_wire(&outcome.provenance)),
        train_seconds: outcome.stats.seconds,
    }
}

#[cfg(test)]
mod tests {
    //! Real training on the tiny Llama fixture of the trainer's tests: an honest lease, then
    //! the ways a volunteer can get it wrong or lie about it.

    use std::path::{Path, PathBuf};
    use std::sync::atomic::AtomicBool;

    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use swarmtune_protocol::ContentId;
    use swarmtune_trainer::data::{
        Example, Shard, ShardPlan, build_shards, load_tokenizer_with_hash,
    };
    use swarmtune_trainer::device::{DeviceKind, ThreadPool};
    use swarmtune_trainer::lora::{Adapter, LoraConfig};
    use swarmtune_trainer::model::CausalLm;
    use swarmtune_trainer::tensors::HostTensor;
    use swarmtune_trainer::train::TrainOutcome;

    use super::*;

    const SEQ_LEN: u32 = 24;
    const VOCAB: usize = 384;

    fn model_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../trainer/tests/fixtures/llama/model")
    }

    /// The trainer tests' arithmetic dataset in the fixture's tokenizer.
    fn shards() -> Vec<Shard> {
        let (tokenizer, hash) =
            load_tokenizer_with_hash(model_dir().join("tokenizer.json")).unwrap();
        let examples: Vec<Example> = (0..64)
            .map(|i| Example::PromptCompletion {
                prompt: format!("{} plus {} is", i % 8, i / 8),
                completion: format!(" {}", i % 8 + i / 8),
            })
            .collect();
        let plan = ShardPlan {
            seq_len: SEQ_LEN,
            seqs_per_shard: 16,
            eval_fraction: 0.0,
            seed: 1,
        };
        build_shards(&examples, &tokenizer, hash, Some(2), 0, &plan)
            .unwrap()
            .train
    }

    fn lora() -> LoraConfig {
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.1,
            target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        }
    }

    fn cid(bytes: &[u8]) -> v1::ContentId {
        ContentId::of(bytes).to_proto()
    }

    /// A lease of 8 steps committed every 2: commitments at 0, 2, 4, 6, 8.
    fn lease(shards: &[Shard]) -> v1::Lease {
        let lora = lora();
        v1::Lease {
            lease_id: 11,
            job_id: vec![7; 32],
            round: 3,
            holder_peer_id: vec![1; 38],
            module: "sums".into(),
            start_version: 2,
            start_adapter: Some(cid(b"adapter")),
            base: Some(cid(b"base")),
            lora: Some(v1::LoraConfig {
                rank: lora.rank as u32,
                alpha: lora.alpha,
                dropout: lora.dropout,
                target_modules: lora.target_modules,
            }),
            shards: shards.iter().map(|s| cid(&s.encode())).collect(),
            seed: 7,
            inner: Some(v1::TrainSettings {
                inner_steps: 8,
                batch_size: 4,
                micro_batch: 4,
                // Small enough that the loss is close to linear in the delta, so that a flipped
                // delta raises the probe loss about as much as the honest one lowers it.
                learning_rate: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
                max_grad_norm: 1.0,
                commit_every: 2,
            }),
            delta_encoding: v1::DeltaEncoding::F32 as i32,
            topk_fraction: 0.0,
            max_delta_bytes: 1 << 20,
            ..Default::default()
        }
    }

    fn policy() -> v1::VerificationPolicy {
        v1::VerificationPolicy {
            challenge_probability: 0.3,
            segments_per_challenge: 2,
            probation_leases: 3,
            redundancy_fraction: 0.0,
            max_delta_norm: 0.0,
            probe_loss_tolerance: 0.05,
            min_cosine_similarity: 0.99,
            max_relative_error: 0.05,
        }
    }

    /// The envelope an honest volunteer sends for `outcome`, naming `delta_bytes`.
    fn envelope(
        lease: &v1::Lease,
        outcome: &TrainOutcome,
        delta_bytes: &[u8],
    ) -> v1::DeltaEnvelope {
        delta_envelope(
            lease,
            outcome,
            ContentId::of(delta_bytes),
            delta_bytes.len() as u64,
        )
    }

    /// The same envelope naming other delta bytes.
    fn naming(env: &v1::DeltaEnvelope, bytes: &[u8]) -> v1::DeltaEnvelope {
        v1::DeltaEnvelope {
            delta: Some(cid(bytes)),
            delta_bytes: bytes.len() as u64,
            ..env.clone()
        }
    }

    /// One honestly trained lease and everything a verifier holds for it.
    struct Setup<'a> {
        trainer: &'a LocalTrainer<'a>,
        data: &'a LeaseData<'a>,
        provenance: Provenance,
        lease: v1::Lease,
        spec: TrainSpec,
        start: Adapter,
        outcome: TrainOutcome,
        delta_bytes: Vec<u8>,
        env: v1::DeltaEnvelope,
    }

    impl Setup<'_> {
        fn layout(&self) -> &NamedTensors {
            &self.start.tensors
        }

        fn replay<'s>(&'s self, provenance: &'s Provenance) -> Replay<'s> {
            Replay {
                trainer: self.trainer,
                data: self.data,
                spec: &self.spec,
                layout: self.layout(),
                provenance,
                delivered: self.delivered(),
            }
        }

        /// The honest f32 delta, as the engine hands it to the checks.
        fn delivered(&self) -> Delivered<'_> {
            Delivered {
                start: self.layout(),
                delta: &self.outcome.delta,
                encoding: DeltaEncoding::F32,
            }
        }

        /// The segment between commitments `i` and `i + 1`.
        fn segment(&self, i: usize) -> v1::Segment {
            v1::Segment {
                start_step: self.outcome.commitments[i].step,
                end_step: self.outcome.commitments[i + 1].step,
            }
        }

        /// Challenges `env`'s segment `asked` with an answer made of these states.
        fn challenge(
            &self,
            env: &v1::DeltaEnvelope,
            verifier: &Provenance,
            asked: &v1::Segment,
            start: &[u8],
            claimed_end_hash: &[u8],
            end: Option<&[u8]>,
        ) -> Result<SegmentVerdict, Rejection> {
            let state = v1::SegmentState {
                segment: Some(*asked),
                start_state: Some(cid(start)),
                claimed_end_hash: claimed_end_hash.to_vec(),
                end_state: end.map(cid),
            };
            let answer = SegmentAnswer {
                state: &state,
                start_state: start,
                end_state: end,
            };
            check_segment(&self.replay(verifier), env, &policy(), asked, true, &answer)
        }

        /// Challenges segment `i` of `env` with the honest volunteer's answer.
        fn honest_answer(
            &self,
            env: &v1::DeltaEnvelope,
            verifier: &Provenance,
            i: usize,
        ) -> Result<SegmentVerdict, Rejection> {
            let start = self.outcome.snapshots[i].to_bytes().unwrap();
            let end = self.outcome.snapshots[i + 1].to_bytes().unwrap();
            let claimed = env.commitments[i + 1].state_hash.clone();
            self.challenge(
                env,
                verifier,
                &self.segment(i),
                &start,
                &claimed,
                Some(&end),
            )
        }

        fn probe(&self) -> (TokenBatch, Vec<u8>) {
            self.data.batch(self.spec.seed, 0, self.spec.batch_size)
        }
    }

    /// Trains the lease on the fixture model (burn-flex, one math thread) and hands the result
    /// to `f`.
    fn with_setup<R: Send>(f: impl FnOnce(&Setup<'_>) -> R + Send) -> R {
        ThreadPool::new(1).unwrap().install(|| {
            let model = CausalLm::load(&model_dir(), &DeviceKind::Cpu.device().unwrap())
                .unwrap()
                .to_autodiff();
            let provenance = Provenance::here(DeviceKind::Cpu.backend_name(), 1);
            let trainer = LocalTrainer::new(&model, lora(), provenance.clone()).unwrap();
            let start = Adapter::init(lora(), trainer.sites(), 42);
            let shards = shards();
            let data = LeaseData::new(&shards, VOCAB).unwrap();
            let lease = lease(&shards);
            let spec = train_spec(&lease).unwrap();
            let outcome = trainer
                .train(&start, &data, &spec, &mut |_| {}, &AtomicBool::new(false))
                .unwrap();
            let delta_bytes = delta::encode(&outcome.delta, DeltaEncoding::F32).unwrap();
            let env = envelope(&lease, &outcome, &delta_bytes);
            f(&Setup {
                trainer: &trainer,
                data: &data,
                provenance,
                lease,
                spec,
                start,
                outcome,
                delta_bytes,
                env,
            })
        })
    }

    #[track_caller]
    fn assert_rejected<T: std::fmt::Debug>(
        result: Result<T, Rejection>,
        reason: RejectReason,
        needle: &str,
    ) -> Rejection {
        match result {
            Err(r) => {
                assert_eq!(r.reason, reason, "{r}");
                assert!(
                    r.message.contains(needle),
                    "message {:?} does not mention {needle:?}",
                    r.message
                );
                r
            }
            Ok(v) => panic!("accepted ({v:?}), expected {}", reason.as_str_name()),
        }
    }

    fn scaled(delta: &NamedTensors, factor: f32) -> NamedTensors {
        let mut out = delta.clone();
        for t in out.values_mut() {
            t.data.iter_mut().for_each(|v| *v *= factor);
        }
        out
    }

    /// Rewrites the stored bytes of tensor `name` in a safetensors container, as a peer
    /// tampering with a blob would.
    fn patch(bytes: &[u8], name: &str, edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
        let offsets = &header[name]["data_offsets"];
        let (from, to) = (
            offsets[0].as_u64().unwrap() as usize,
            offsets[1].as_u64().unwrap() as usize,
        );
        let mut out = bytes.to_vec();
        edit(&mut out[8 + len + from..8 + len + to]);
        out
    }

    #[test]
    fn an_honest_lease_passes_every_check_and_every_challenge_exactly() {
        with_setup(|s| {
            check_envelope(&s.env, &s.lease, SEQ_LEN).unwrap();
            check_start_commitment(&s.env, &LoraState::start(&s.start)).unwrap();

            let delta = decode_delta(&s.delta_bytes, &s.env, &s.lease, s.layout()).unwrap();
            assert_eq!(delta, s.outcome.delta, "f32 is lossless");
            let bounded = v1::VerificationPolicy {
                max_delta_norm: 2.0 * tensors::norm(&delta),
                ..policy()
            };
            let norm = check_norm(&delta, &bounded).unwrap();
            assert!(norm > 0.0 && norm == tensors::norm(&s.outcome.delta));
            // Kept packed, for a merge: the same values, and the same norm.
            let packed = open_delta(s.delta_bytes.as_slice(), &s.env, &s.lease, s.layout());
            let packed = packed.unwrap();
            assert_eq!(check_packed_norm(&packed, &bounded).unwrap(), norm);
            assert_eq!(packed.into_tensors(), delta);
            // int8: its exact norm, within 1e-7 of the decoded values' norm.
            let int8 = delta::encode(&delta, DeltaEncoding::Int8RowWise).unwrap();
            let int8 = delta::decode_packed(int8, &DecodeLimits::default()).unwrap();
            let int8_norm = check_packed_norm(&int8, &bounded).unwrap();
            let decoded_norm = tensors::norm(&int8.into_tensors());
            assert!((int8_norm - decoded_norm).abs() <= 1e-7 * decoded_norm);

            // The probe applies `start − delta`: on step 0's batch that is the volunteer's end
            // state, whose loss it reported as loss_after (up to the rounding of the two
            // subtractions).
            let (batch, mask) = s.probe();
            let (before, after) =
                check_probe_loss(s.trainer, s.layout(), &delta, (&batch, &mask), 0.0).unwrap();
            assert!(after < before, "probe loss {before} -> {after}");
            assert!(
                (after - s.env.loss_after).abs() < 1e-4,
                "probe loss after {after}, volunteer reported {}",
                s.env.loss_after
            );

            // Every segment of the chain replays to its committed hash, bit for bit.
            assert_eq!(s.env.commitments.len(), 5);
            for i in 0..4 {
                assert_eq!(
                    s.honest_answer(&s.env, &s.provenance, i).unwrap(),
                    SegmentVerdict::Exact,
                    "segment {i}"
                );
            }
            assert_eq!(replay_cost_fraction(&[s.segment(1)], 8), 0.25);

            // The other encodings of the same delta pass the blob checks too (top-k's bound on
            // kept values does not refuse the codec's own k).
            for (encoding, wire, fraction) in [
                (DeltaEncoding::F16, v1::DeltaEncoding::F16, 0.0),
                (
                    DeltaEncoding::Int8RowWise,
                    v1::DeltaEncoding::Int8Rowwise,
                    0.0,
                ),
                (
                    DeltaEncoding::TopK { fraction: 0.1 },
                    v1::DeltaEncoding::Topk,
                    0.1,
                ),
            ] {
                let lease = v1::Lease {
                    delta_encoding: wire as i32,
                    topk_fraction: fraction,
                    ..s.lease.clone()
                };
                let bytes = delta::encode(&s.outcome.delta, encoding).unwrap();
                let env = v1::DeltaEnvelope {
                    encoding: wire as i32,
                    topk_fraction: fraction,
                    ..naming(&s.env, &bytes)
                };
                check_envelope(&env, &lease, SEQ_LEN).unwrap();
                let decoded = decode_delta(&bytes, &env, &lease, s.layout()).unwrap();
                let cos = compare_within_tolerance(&decoded, &delta, &policy());
                if fraction == 0.0 {
                    assert!(cos.unwrap().cosine > 0.999, "{encoding:?}");
                }
            }
        });
    }

    #[test]
    fn a_tampered_delta_is_rejected_with_the_right_reason() {
        with_setup(|s| {
            let honest = &s.outcome.delta;
            let decode =
                |bytes: &[u8]| decode_delta(bytes, &naming(&s.env, bytes), &s.lease, s.layout());
            let (batch, mask) = s.probe();
            let probe = |delta: &NamedTensors, tolerance| {
                check_probe_loss(s.trainer, s.layout(), delta, (&batch, &mask), tolerance)
            };
            let bounded = v1::VerificationPolicy {
                max_delta_norm: 10.0 * tensors::norm(honest),
                ..policy()
            };
            check_norm(honest, &bounded).unwrap();
            probe(honest, 0.0).unwrap();

            // Scaled ×100: a valid blob whose norm is out of bounds. (The probe alone would not
            // catch it: on the barely trained fixture a step 100 times longer in the same
            // direction still lowers the probe batch's loss. That is what the norm bound is for.)
            let big = decode(&delta::encode(&scaled(honest, 100.0), DeltaEncoding::F32).unwrap())
                .unwrap();
            assert_rejected(
                check_norm(&big, &bounded),
                RejectReason::NormTooLarge,
                "norm is",
            );

            // Sign flipped: same norm, but it climbs the loss instead of descending it (by
            // about 0.11 nats here, where the honest delta lowers it by 0.25).
            let flipped =
                decode(&delta::encode(&scaled(honest, -1.0), DeltaEncoding::F32).unwrap()).unwrap();
            check_norm(&flipped, &bounded).unwrap();
            assert_rejected(
                probe(&flipped, policy().probe_loss_tolerance),
                RejectReason::ProbeLossRegression,
                "nats",
            );

            // Non-finite values: written into the blob, or made by an int8 scale that
            // overflows when multiplied out.
            let name = honest.keys().next().unwrap().clone();
            let nan = patch(&s.delta_bytes, &name, |d| {
                d[..4].copy_from_slice(&f32::NAN.to_le_bytes())
            });
            assert_rejected(decode(&nan), RejectReason::NonFinite, "non-finite");
            let inf = patch(&s.delta_bytes, &name, |d| {
                d[8..12].copy_from_slice(&f32::INFINITY.to_le_bytes())
            });
            assert_rejected(decode(&inf), RejectReason::NonFinite, "inf");
            let int8_lease = v1::Lease {
                delta_encoding: v1::DeltaEncoding::Int8Rowwise as i32,
                ..s.lease.clone()
            };
            let int8 = delta::encode(honest, DeltaEncoding::Int8RowWise).unwrap();
            let decode_int8 = |bytes: &[u8]| {
                let env = v1::DeltaEnvelope {
                    encoding: int8_lease.delta_encoding,
                    ..naming(&s.env, bytes)
                };
                decode_delta(bytes, &env, &int8_lease, s.layout())
            };
            decode_int8(&int8).unwrap();
            let scale = format!("{name}.scale");
            let nan_scale = patch(&int8, &scale, |d| {
                d[..4].copy_from_slice(&f32::NAN.to_le_bytes())
            });
            assert_rejected(decode_int8(&nan_scale), RejectReason::NonFinite, "NaN");
            let huge_scale = patch(&int8, &scale, |d| {
                for row in d.chunks_exact_mut(4) {
                    row.copy_from_slice(&f32::MAX.to_le_bytes());
                }
            });
            assert_rejected(
                decode_int8(&huge_scale),
                RejectReason::NonFinite,
                "inf at index 0",
            );
            let negative_scale = patch(&int8, &scale, |d| {
                d[..4].copy_from_slice(&(-1f32).to_le_bytes())
            });
            assert_rejected(
                decode_int8(&negative_scale),
                RejectReason::MalformedDelta,
                "scale",
            );

            // Wrong shape, an extra tensor, a missing tensor.
            let mut reshaped = honest.clone();
            let t = reshaped.get_mut(&name).unwrap();
            t.shape.reverse();
            let bytes = delta::encode(&reshaped, DeltaEncoding::F32).unwrap();
            assert_rejected(decode(&bytes), RejectReason::MalformedDelta, "has shape");
            let mut extra = honest.clone();
            let mut smaller = honest.clone();
            let first = smaller.pop_first().unwrap().1;
            extra.insert("base_model.model.lm_head.lora_A.weight".into(), first);
            let bytes = delta::encode(&extra, DeltaEncoding::F32).unwrap();
            assert_rejected(decode(&bytes), RejectReason::MalformedDelta, "tensors");
            let bytes = delta::encode(&smaller, DeltaEncoding::F32).unwrap();
            assert_rejected(
                decode(&bytes),
                RejectReason::MalformedDelta,
                "has no tensor",
            );
            let mut renamed = smaller.clone();
            renamed.insert(
                "base_model.model.lm_head.lora_A.weight".into(),
                HostTensor::zeros(vec![4, 64]),
            );
            let bytes = delta::encode(&renamed, DeltaEncoding::F32).unwrap();
            assert_rejected(
                decode(&bytes),
                RejectReason::MalformedDelta,
                "has no tensor",
            );

            // Garbage and truncation.
            let mut rng = StdRng::seed_from_u64(5);
            let garbage: Vec<u8> = (0..4096).map(|_| rng.random()).collect();
            assert_rejected(
                decode(&garbage),
                RejectReason::MalformedDelta,
                "does not decode",
            );
            let cut = &s.delta_bytes[..s.delta_bytes.len() - 3];
            assert_rejected(decode(cut), RejectReason::MalformedDelta, "does not decode");

            // Not the lease's encoding: f16 where f32 was leased; a dense delta labelled top-k.
            let bytes = delta::encode(honest, DeltaEncoding::F16).unwrap();
            assert_rejected(
                decode(&bytes),
                RejectReason::MalformedDelta,
                "encoded as f16, the lease says f32",
            );
            let topk_lease = v1::Lease {
                delta_encoding: v1::DeltaEncoding::Topk as i32,
                topk_fraction: 0.1,
                ..s.lease.clone()
            };
            let dense = delta::encode(honest, DeltaEncoding::TopK { fraction: 1.0 }).unwrap();
            assert_rejected(
                decode_delta(&dense, &naming(&s.env, &dense), &topk_lease, s.layout()),
                RejectReason::MalformedDelta,
                "keeps at most",
            );

            // Sizes: not what the envelope announced, or more than the lease allows.
            let bytes = &s.delta_bytes;
            let env = v1::DeltaEnvelope {
                delta_bytes: bytes.len() as u64 + 1,
                ..s.env.clone()
            };
            assert_rejected(
                decode_delta(bytes, &env, &s.lease, s.layout()),
                RejectReason::TooLarge,
                "the envelope says",
            );
            let small = v1::Lease {
                max_delta_bytes: bytes.len() as u64 - 1,
                ..s.lease.clone()
            };
            assert_rejected(
                decode_delta(bytes, &s.env, &small, s.layout()),
                RejectReason::TooLarge,
                "allows at most",
            );
            // Bytes that are not the blob the envelope names are the engine's mistake.
            assert_rejected(
                decode_delta(&nan, &s.env, &s.lease, s.layout()),
                RejectReason::Internal,
                "the envelope names",
            );
        });
    }

    /// A well-formed envelope for [`lease`] without training: commitments with made-up hashes.
    fn synthetic_envelope(lease: &v1::Lease) -> v1::DeltaEnvelope {
        v1::DeltaEnvelope {
            protocol_version: 1,
            job_id: lease.job_id.clone(),
            round: lease.round,
            lease_id: lease.lease_id,
            start_version: lease.start_version,
            base: lease.base.clone(),
            delta: Some(cid(b"delta")),
            delta_bytes: 20_000,
            encoding: lease.delta_encoding,
            topk_fraction: lease.topk_fraction,
            steps: 8,
            tokens: 8 * 4 * u64::from(SEQ_LEN),
            target_tokens: 50,
            loss_before: 3.0,
            loss_after: 2.5,
            commitments: (0..5)
                .map(|i| v1::Commitment {
                    step: 2 * i,
                    state_hash: vec![i as u8; 32],
                })
                .collect(),
            provenance: None,
            train_seconds: 1.0,
        }
    }

    #[test]
    fn a_bad_envelope_is_rejected_with_the_right_reason() {
        let lease = lease(&[]);
        let good = synthetic_envelope(&lease);
        check_envelope(&good, &lease, SEQ_LEN).unwrap();
        type Edit = fn(&mut v1::DeltaEnvelope);
        let cases: &[(&str, Edit, RejectReason, &str)] = &[
            (
                "job",
                |e| e.job_id = vec![8; 32],
                RejectReason::LeaseMismatch,
                "job is 08080808…, lease 11 says 07070707…",
            ),
            (
                "round",
                |e| e.round = 4,
                RejectReason::LeaseMismatch,
                "round is 4, lease 11 says 3",
            ),
            (
                "lease",
                |e| e.lease_id = 12,
                RejectReason::LeaseMismatch,
                "lease id is 12",
            ),
            (
                "version",
                |e| e.start_version = 1,
                RejectReason::LeaseMismatch,
                "start version is 1",
            ),
            (
                "base",
                |e| e.base = Some(cid(b"other")),
                RejectReason::LeaseMismatch,
                "base",
            ),
            (
                "no base",
                |e| e.base = None,
                RejectReason::LeaseMismatch,
                "base is none",
            ),
            (
                "encoding",
                |e| e.encoding = v1::DeltaEncoding::F16 as i32,
                RejectReason::LeaseMismatch,
                "DELTA_ENCODING_F16",
            ),
            (
                "unknown encoding",
                |e| e.encoding = 99,
                RejectReason::LeaseMismatch,
                "unknown encoding 99",
            ),
            (
                "fraction",
                |e| e.topk_fraction = 0.5,
                RejectReason::LeaseMismatch,
                "top-k fraction is 0.5",
            ),
            (
                "steps",
                |e| e.steps = 7,
                RejectReason::BadStats,
                "7 steps reported, the lease has 8",
            ),
            (
                "tokens",
                |e| e.tokens += 1,
                RejectReason::BadStats,
                "make 768",
            ),
            (
                "no targets",
                |e| e.target_tokens = 0,
                RejectReason::BadStats,
                "target tokens",
            ),
            (
                "too many targets",
                |e| e.target_tokens = e.tokens + 1,
                RejectReason::BadStats,
                "target tokens",
            ),
            (
                "NaN loss",
                |e| e.loss_before = f32::NAN,
                RejectReason::BadStats,
                "loss_before is NaN",
            ),
            (
                "infinite loss",
                |e| e.loss_after = f32::INFINITY,
                RejectReason::BadStats,
                "loss_after is inf",
            ),
            (
                "negative loss",
                |e| e.loss_after = -0.5,
                RejectReason::BadStats,
                "loss_after is -0.5",
            ),
            (
                "size",
                |e| e.delta_bytes = (1 << 20) + 1,
                RejectReason::TooLarge,
                "at most 1048576",
            ),
            (
                "no commitments",
                |e| e.commitments.clear(),
                RejectReason::BadCommitments,
                "0 commitments, expected",
            ),
            (
                "last missing",
                |e| {
                    e.commitments.pop();
                },
                RejectReason::BadCommitments,
                "4 commitments",
            ),
            (
                "middle missing",
                |e| {
                    e.commitments.remove(2);
                },
                RejectReason::BadCommitments,
                "commitment 2 is at step 6, expected step 4",
            ),
            (
                "not from 0",
                |e| e.commitments[0].step = 1,
                RejectReason::BadCommitments,
                "commitment 0 is at step 1",
            ),
            (
                "repeated",
                |e| e.commitments[2].step = 2,
                RejectReason::BadCommitments,
                "commitment 2 is at step 2",
            ),
            (
                "decreasing",
                |e| e.commitments.swap(1, 2),
                RejectReason::BadCommitments,
                "commitment 1 is at step 4",
            ),
            (
                "past the end",
                |e| {
                    e.commitments.push(v1::Commitment {
                        step: 9,
                        state_hash: vec![0; 32],
                    })
                },
                RejectReason::BadCommitments,
                "after the last step",
            ),
            (
                "repeated last",
                |e| e.commitments.push(e.commitments[4].clone()),
                RejectReason::BadCommitments,
                "after the last step",
            ),
            (
                "short hash",
                |e| {
                    e.commitments[3].state_hash.pop();
                },
                RejectReason::BadCommitments,
                "31-byte hash",
            ),
            (
                "long hash",
                |e| e.commitments[0].state_hash.push(0),
                RejectReason::BadCommitments,
                "33-byte hash",
            ),
            (
                "too many",
                |e| e.commitments = vec![v1::Commitment::default(); MAX_COMMITMENTS + 1],
                RejectReason::BadCommitments,
                "at most 4096",
            ),
        ];
        for (what, edit, reason, needle) in cases {
            let mut env = good.clone();
            edit(&mut env);
            let r = check_envelope(&env, &lease, SEQ_LEN);
            assert!(
                matches!(&r, Err(e) if e.reason == *reason && e.message.contains(needle)),
                "{what}: {r:?}, expected {} mentioning {needle:?}",
                reason.as_str_name()
            );
        }
        // The job's sequence length is part of the token count.
        assert_rejected(
            check_envelope(&good, &lease, SEQ_LEN + 1),
            RejectReason::BadStats,
            "tokens",
        );

        // Chains whose last step is not a multiple of k, or with k beyond the lease.
        let chain = |steps: u32, every: u32, at: &[u64]| {
            let lease = v1::Lease {
                inner: Some(v1::TrainSettings {
                    inner_steps: steps,
                    commit_every: every,
                    ..lease.inner.unwrap()
                }),
                ..lease.clone()
            };
            let env = v1::DeltaEnvelope {
                steps: u64::from(steps),
                tokens: u64::from(steps) * 4 * u64::from(SEQ_LEN),
                commitments: at
                    .iter()
                    .map(|&step| v1::Commitment {
                        step,
                        state_hash: vec![1; 32],
                    })
                    .collect(),
                ..good.clone()
            };
            check_envelope(&env, &lease, SEQ_LEN).map_err(|r| r.reason)
        };
        assert_eq!(chain(7, 3, &[0, 3, 6, 7]), Ok(()));
        assert_eq!(chain(7, 3, &[0, 3, 6]), Err(RejectReason::BadCommitments));
        assert_eq!(chain(7, 3, &[0, 3, 7]), Err(RejectReason::BadCommitments));
        assert_eq!(
            chain(7, 3, &[0, 3, 6, 7, 7]),
            Err(RejectReason::BadCommitments)
        );
        assert_eq!(chain(6, 3, &[0, 3, 6]), Ok(()));
        assert_eq!(
            chain(6, 3, &[0, 3, 6, 6]),
            Err(RejectReason::BadCommitments)
        );
        assert_eq!(chain(3, 5, &[0, 3]), Ok(()));
        assert_eq!(chain(1, 1, &[0, 1]), Ok(()));
        // A lease the coordinator should never have made is its own fault, not the peer's.
        assert_eq!(chain(8, 0, &[0, 8]), Err(RejectReason::Internal));
        assert_eq!(chain(65_536, 1, &[0, 1]), Err(RejectReason::Internal));
        let no_settings = v1::Lease {
            inner: None,
            ..lease.clone()
        };
        assert_rejected(
            check_envelope(&good, &no_settings, SEQ_LEN),
            RejectReason::Internal,
            "no training settings",
        );

        // The first commitment must be the start state's hash, which the coordinator computes.
        let adapter = Adapter {
            config: lora(),
            tensors: [(
                "base_model.model.x.lora_A.weight".to_owned(),
                HostTensor::new(vec![2, 2], vec![0.5, -1.0, 2.0, 0.25]).unwrap(),
            )]
            .into(),
        };
        let start = LoraState::start(&adapter);
        let mut env = good.clone();
        env.commitments[0].state_hash = start.hash().as_bytes().to_vec();
        check_start_commitment(&env, &start).unwrap();
        let other = LoraState::start(&Adapter {
            tensors: scaled(&adapter.tensors, 2.0),
            ..adapter.clone()
        });
        assert_rejected(
            check_start_commitment(&env, &other),
            RejectReason::BadCommitments,
            "start state of the lease hashes to",
        );
        assert_rejected(
            check_start_commitment(&good, &start),
            RejectReason::BadCommitments,
            "the first commitment is 00000000…",
        );
        env.commitments.clear();
        assert_rejected(
            check_start_commitment(&env, &start),
            RejectReason::BadCommitments,
            "no commitments",
        );
    }

    #[test]
    fn a_volunteer_that_invented_the_second_half_is_caught_only_there() {
        with_setup(|s| {
            // Honest up to step 4, then made-up hashes for steps 6 and 8.
            let mut env = s.env.clone();
            let mut rng = StdRng::seed_from_u64(9);
            for c in &mut env.commitments[3..] {
                c.state_hash = (0..32).map(|_| rng.random()).collect();
            }
            // The cheap checks cannot see it.
            check_envelope(&env, &s.lease, SEQ_LEN).unwrap();
            check_start_commitment(&env, &LoraState::start(&s.start)).unwrap();

            // Segments in the honest half pass.
            for i in 0..2 {
                assert_eq!(
                    s.honest_answer(&env, &s.provenance, i).unwrap(),
                    SegmentVerdict::Exact
                );
            }
            // 4..6 starts from a real state but cannot reach the invented hash.
            let made_up = short(&env.commitments[3].state_hash);
            let r = assert_rejected(
                s.honest_answer(&env, &s.provenance, 2),
                RejectReason::ChallengeEndMismatch,
                &format!("the commitment says {made_up}"),
            );
            assert!(
                r.message.starts_with("segment 4..6: replay reached "),
                "{}",
                r.message
            );
            // 6..8 needs a state that hashes to an invented hash: none exists. Its real state at
            // step 6, or a state of another step, are both refused.
            let claimed = env.commitments[4].state_hash.clone();
            let real = s.outcome.snapshots[3].to_bytes().unwrap();
            assert_rejected(
                s.challenge(&env, &s.provenance, &s.segment(3), &real, &claimed, None),
                RejectReason::ChallengeStartMismatch,
                &format!("the commitment at step 6 says {made_up}"),
            );
            let earlier = s.outcome.snapshots[2].to_bytes().unwrap();
            assert_rejected(
                s.challenge(&env, &s.provenance, &s.segment(3), &earlier, &claimed, None),
                RejectReason::ChallengeStartMismatch,
                "at step 4, expected step 6",
            );

            // Being caught bans the volunteer at once.
            let mut peer = Reputation {
                score: 0.9,
                accepted: 20,
                ..Reputation::default()
            };
            assert!(peer.apply(Verdict::Rejected {
                reason: RejectReason::ChallengeEndMismatch,
                equal_provenance: true,
            }));
            assert!(peer.banned);
        });
    }

    #[test]
    fn a_start_state_that_does_not_match_its_commitment_is_caught() {
        with_setup(|s| {
            let asked = s.segment(1);
            let claimed = s.env.commitments[2].state_hash.clone();
            let challenge =
                |start: &[u8]| s.challenge(&s.env, &s.provenance, &asked, start, &claimed, None);
            let honest = s.outcome.snapshots[1].to_bytes().unwrap();
            assert_eq!(challenge(&honest).unwrap(), SegmentVerdict::Exact);

            // One weight nudged, or one optimizer moment: the hash no longer matches.
            let mut forged = s.outcome.snapshots[1].clone();
            forged.params.values_mut().next().unwrap().data[0] += 1e-3;
            assert_rejected(
                challenge(&forged.to_bytes().unwrap()),
                RejectReason::ChallengeStartMismatch,
                "the start state hashes to",
            );
            let mut forged = s.outcome.snapshots[1].clone();
            forged.moments.exp_avg_sq.values_mut().last().unwrap().data[3] *= 2.0;
            assert_rejected(
                challenge(&forged.to_bytes().unwrap()),
                RejectReason::ChallengeStartMismatch,
                "the commitment at step 2 says",
            );
            // Not a state at all, or a state of another adapter.
            assert_rejected(
                challenge(b"not a state"),
                RejectReason::ChallengeStartMismatch,
                "LoRA state",
            );
            let mut other = s.outcome.snapshots[1].clone();
            other.params.pop_first();
            assert_rejected(
                challenge(&other.to_bytes().unwrap()),
                RejectReason::ChallengeStartMismatch,
                "tensors, expected",
            );
            // The right start but a claimed end that is not the committed one.
            let wrong_end = s.env.commitments[3].state_hash.clone();
            assert_rejected(
                s.challenge(&s.env, &s.provenance, &asked, &honest, &wrong_end, None),
                RejectReason::ChallengeEndMismatch,
                "the claimed end hash is",
            );
            // An answer for another segment, or naming no start blob, does not answer.
            let state = v1::SegmentState {
                segment: Some(s.segment(2)),
                start_state: Some(cid(&honest)),
                claimed_end_hash: claimed.clone(),
                end_state: None,
            };
            let answer = SegmentAnswer {
                state: &state,
                start_state: &honest,
                end_state: None,
            };
            let replay = s.replay(&s.provenance);
            assert_rejected(
                check_segment(&replay, &s.env, &policy(), &asked, true, &answer),
                RejectReason::ChallengeUnanswered,
                "the answer is for segment 4..6",
            );
            let state = v1::SegmentState {
                segment: Some(asked),
                start_state: None,
                ..state.clone()
            };
            let answer = SegmentAnswer {
                state: &state,
                ..answer
            };
            assert_rejected(
                check_segment(&replay, &s.env, &policy(), &asked, true, &answer),
                RejectReason::ChallengeUnanswered,
                "no start state blob",
            );
        });
    }

    #[test]
    fn a_different_provenance_falls_back_to_tolerance() {
        with_setup(|s| {
            let elsewhere = Provenance {
                threads: 3,
                ..s.provenance.clone()
            };
            assert!(same_provenance(&s.env, &s.provenance));
            assert!(!same_provenance(&s.env, &elsewhere));

            // The honest answer passes, compared by tensors instead of hashes.
            for i in 0..4 {
                match s.honest_answer(&s.env, &elsewhere, i).unwrap() {
                    SegmentVerdict::WithinTolerance(a) => {
                        assert!(a.cosine > 0.999_999 && a.relative_error < 1e-6, "{a:?}")
                    }
                    v => panic!("segment {i}: {v:?}"),
                }
            }

            // Without the end state there is nothing to compare with.
            let asked = s.segment(1);
            let start = s.outcome.snapshots[1].to_bytes().unwrap();
            let claimed = s.env.commitments[2].state_hash.clone();
            assert_rejected(
                s.challenge(&s.env, &elsewhere, &asked, &start, &claimed, None),
                RejectReason::ChallengeUnanswered,
                "end state is needed",
            );
            // An end state that is not the committed one is a lie on any backend.
            let wrong = s.outcome.snapshots[3].to_bytes().unwrap();
            assert_rejected(
                s.challenge(&s.env, &elsewhere, &asked, &start, &claimed, Some(&wrong)),
                RejectReason::ChallengeEndMismatch,
                "the end state hashes to",
            );

            // A volunteer that skipped steps 2..4: it committed to its step-2 weights with the
            // step count moved on. Exact replay catches it as cheating; across provenances
            // its zero update is out of tolerance.
            let mut lazy = s.outcome.snapshots[2].clone();
            lazy.params = s.outcome.snapshots[1].params.clone();
            let mut env = s.env.clone();
            env.commitments[2].state_hash = lazy.hash().as_bytes().to_vec();
            let lazy_bytes = lazy.to_bytes().unwrap();
            let lazy_hash = env.commitments[2].state_hash.clone();
            assert_rejected(
                s.challenge(&env, &s.provenance, &asked, &start, &lazy_hash, None),
                RejectReason::ChallengeEndMismatch,
                "replay reached",
            );
            assert_rejected(
                s.challenge(
                    &env,
                    &elsewhere,
                    &asked,
                    &start,
                    &lazy_hash,
                    Some(&lazy_bytes),
                ),
                RejectReason::ReplayOutOfTolerance,
                "segment 2..4: cosine similarity 0.000000",
            );
        });
    }

    #[test]
    fn a_replay_on_another_backend_agrees_within_tolerance() {
        with_setup(|s| {
            let model = CausalLm::load(&model_dir(), &DeviceKind::Ndarray.device().unwrap())
                .unwrap()
                .to_autodiff();
            let provenance = Provenance::here(DeviceKind::Ndarray.backend_name(), 1);
            let trainer = LocalTrainer::new(&model, lora(), provenance.clone()).unwrap();
            let replay = Replay {
                trainer: &trainer,
                ..s.replay(&provenance)
            };
            let asked = s.segment(2);
            let start = s.outcome.snapshots[2].to_bytes().unwrap();
            let end = s.outcome.snapshots[3].to_bytes().unwrap();
            let state = v1::SegmentState {
                segment: Some(asked),
                start_state: Some(cid(&start)),
                claimed_end_hash: s.env.commitments[3].state_hash.clone(),
                end_state: Some(cid(&end)),
            };
            let answer = SegmentAnswer {
                state: &state,
                start_state: &start,
                end_state: Some(&end),
            };
            let verdict = check_segment(&replay, &s.env, &policy(), &asked, true, &answer).unwrap();
            assert!(
                matches!(verdict, SegmentVerdict::WithinTolerance(a) if a.cosine > 0.999 && a.relative_error < 0.01),
                "{verdict:?}"
            );
        });
    }

    /// Decodes what the volunteer's encoder makes of `delta`, and ties it to `end`.
    fn tie(
        start: &NamedTensors,
        end: &NamedTensors,
        encoding: DeltaEncoding,
        bytes: &[u8],
    ) -> Result<(), Rejection> {
        let delta = delta::decode(bytes, &DecodeLimits::default()).unwrap();
        check_delta_tie(
            &Delivered {
                start,
                delta: &delta,
                encoding,
            },
            end,
        )
    }

    #[test]
    fn a_delta_must_be_the_start_minus_the_committed_final_state() {
        with_setup(|s| {
            let start = s.layout();
            let end = &s.outcome.end_state.params;
            assert_eq!(end, &s.outcome.snapshots[4].params);
            let honest = &s.outcome.delta;
            let subtract = swarmtune_trainer::train::subtract;
            // Halfway through the lease: a real state of the chain, but not its end.
            let halfway = subtract(start, &s.outcome.snapshots[2].params);
            let dense = [
                DeltaEncoding::F32,
                DeltaEncoding::F16,
                DeltaEncoding::Int8RowWise,
            ];
            for encoding in dense {
                let check = |delta: &NamedTensors| {
                    tie(
                        start,
                        end,
                        encoding,
                        &delta::encode(delta, encoding).unwrap(),
                    )
                };
                check(honest).unwrap_or_else(|r| panic!("{encoding:?}: {r}"));
                for (what, wrong) in [
                    ("sign-flipped", scaled(honest, -1.0)),
                    ("scaled by 1.01", scaled(honest, 1.01)),
                    ("from step 4", halfway.clone()),
                ] {
                    let r = assert_rejected(
                        check(&wrong),
                        RejectReason::ChallengeEndMismatch,
                        "not the start adapter minus the committed final state",
                    );
                    assert!(r.message.contains(encoding.name()), "{what}: {r}");
                }
            }
            // The bound is that of the encoding, not looser: f32 is exact, and 1.01 is far
            // beyond f16's 2^-11 and int8's half step of the largest value of a row.
            let nudged = {
                let mut d = honest.clone();
                let t = d.values_mut().next().unwrap();
                let i = t.data.iter().position(|v| *v != 0.0).unwrap();
                t.data[i] = f32::from_bits(t.data[i].to_bits() + 4);
                d
            };
            assert_rejected(
                tie(
                    start,
                    end,
                    DeltaEncoding::F32,
                    &delta::encode(&nudged, DeltaEncoding::F32).unwrap(),
                ),
                RejectReason::ChallengeEndMismatch,
                "f32 allows",
            );
            // An int8 blob whose scales are made up cannot buy itself a looser bound: the
            // allowed error comes from start − end, not from the blob.
            let zeros = scaled(honest, 0.0);
            assert_rejected(
                tie(
                    start,
                    end,
                    DeltaEncoding::Int8RowWise,
                    &delta::encode(&zeros, DeltaEncoding::Int8RowWise).unwrap(),
                ),
                RejectReason::ChallengeEndMismatch,
                "int8-rowwise allows",
            );

            // Top-k keeps the largest values of e + r, r the volunteer's error-feedback
            // residual. Without a residual the kept values are exact; with one left by an
            // earlier lease of the same size, they are off by at most about its smallest kept
            // value, which the check allows.
            let topk = DeltaEncoding::TopK { fraction: 0.1 };
            tie(start, end, topk, &delta::encode(honest, topk).unwrap()).unwrap();
            let mut residual = NamedTensors::new();
            let plain = delta::encode_topk_with_feedback(honest, &mut residual, 0.1).unwrap();
            assert!(tensors::norm(&residual) > 0.0);
            let fed = delta::encode_topk_with_feedback(honest, &mut residual, 0.1).unwrap();
            assert_ne!(fed, plain, "the residual changed what is sent");
            tie(start, end, topk, &fed).unwrap();
            for (what, wrong) in [
                ("sign-flipped", scaled(honest, -1.0)),
                ("scaled by 10", scaled(honest, 10.0)),
                (
                    "a quarter of the way",
                    subtract(start, &s.outcome.snapshots[1].params),
                ),
            ] {
                let r = tie(start, end, topk, &delta::encode(&wrong, topk).unwrap());
                assert!(
                    matches!(&r, Err(e) if e.reason == RejectReason::ChallengeEndMismatch
                        && e.message.contains("topk allows")),
                    "{what}: {r:?}"
                );
            }
            // Keeping the wrong coordinates: the largest ones left out.
            let mut smallest = honest.clone();
            for t in smallest.values_mut() {
                let mut order: Vec<usize> = (0..t.data.len()).collect();
                order.sort_by(|&a, &b| t.data[a].abs().total_cmp(&t.data[b].abs()));
                let keep: std::collections::HashSet<usize> =
                    order.into_iter().take(t.data.len() / 10).collect();
                for (i, v) in t.data.iter_mut().enumerate() {
                    if !keep.contains(&i) {
                        *v = 0.0;
                    }
                }
            }
            assert_rejected(
                tie(start, end, topk, &delta::encode(&smallest, topk).unwrap()),
                RejectReason::ChallengeEndMismatch,
                "topk allows",
            );
        });
    }

    #[test]
    fn the_last_segment_ties_the_delta_to_the_chain_replayed_or_not() {
        with_setup(|s| {
            let last = s.segment(3);
            let end = s.outcome.snapshots[4].to_bytes().unwrap();
            let flipped = scaled(&s.outcome.delta, -1.0);
            let elsewhere = Provenance {
                threads: 3,
                ..s.provenance.clone()
            };
            let check = |delta: &NamedTensors,
                         verifier: &Provenance,
                         asked: &v1::Segment,
                         replayed: bool,
                         end: Option<&[u8]>| {
                let i = (asked.start_step / 2) as usize;
                let start = s.outcome.snapshots[i].to_bytes().unwrap();
                let state = v1::SegmentState {
                    segment: Some(*asked),
                    start_state: Some(cid(&start)),
                    claimed_end_hash: s.env.commitments[i + 1].state_hash.clone(),
                    end_state: end.map(cid),
                };
                let answer = SegmentAnswer {
                    state: &state,
                    start_state: &start,
                    end_state: end,
                };
                let replay = Replay {
                    delivered: Delivered {
                        delta,
                        ..s.delivered()
                    },
                    ..s.replay(verifier)
                };
                check_segment(&replay, &s.env, &policy(), asked, replayed, &answer)
            };
            let honest = &s.outcome.delta;
            // Not replayed: the states are checked against their commitments, and the end
            // state against the delta.
            assert_eq!(
                check(honest, &s.provenance, &last, false, Some(&end)).unwrap(),
                SegmentVerdict::StatesMatch
            );
            assert_rejected(
                check(honest, &s.provenance, &last, false, None),
                RejectReason::ChallengeUnanswered,
                "not replayed, so its end state is needed",
            );
            let wrong_end = s.outcome.snapshots[3].to_bytes().unwrap();
            assert_rejected(
                check(honest, &s.provenance, &last, false, Some(&wrong_end)),
                RejectReason::ChallengeEndMismatch,
                "the end state hashes to",
            );
            // The honest volunteer that flipped its delta: caught whichever way the last
            // segment is checked, exactly or across provenances.
            for (verifier, replayed, end) in [
                (&s.provenance, false, Some(end.as_slice())),
                (&s.provenance, true, None),
                (&s.provenance, true, Some(end.as_slice())),
                (&elsewhere, true, Some(end.as_slice())),
            ] {
                assert_rejected(
                    check(&flipped, verifier, &last, replayed, end),
                    RejectReason::ChallengeEndMismatch,
                    "segment 6..8: the delta is not the start adapter minus the committed final state",
                );
            }
            check(honest, &elsewhere, &last, true, Some(&end)).unwrap();
            // Segments before the last say nothing about the delta.
            let second = s.segment(1);
            let second_end = s.outcome.snapshots[2].to_bytes().unwrap();
            assert_eq!(
                check(&flipped, &s.provenance, &second, true, None).unwrap(),
                SegmentVerdict::Exact
            );
            assert_eq!(
                check(&flipped, &s.provenance, &second, false, Some(&second_end)).unwrap(),
                SegmentVerdict::StatesMatch
            );
        });
    }

    fn commitments(n: u64) -> Vec<v1::Commitment> {
        (0..n)
            .map(|i| v1::Commitment {
                step: 5 * i,
                state_hash: vec![0; 32],
            })
            .collect()
    }

    #[test]
    fn challenges_follow_the_policy() {
        let chain = commitments(5); // four segments: 0..5, 5..10, 10..15, 15..20
        let policy = policy(); // p = 0.3, two segments, probation 3
        let mut rng = StdRng::seed_from_u64(2024);
        let newcomer = Reputation::default();
        let distrusted = Reputation {
            score: 0.4,
            accepted: 50,
            ..Reputation::default()
        };
        let established = Reputation {
            score: 0.8,
            accepted: 50,
            ..Reputation::default()
        };

        // Probation and low reputation: every delta, with two distinct consecutive segments
        // replayed, and the last segment always asked for, replayed only when it was drawn.
        let last = v1::Segment {
            start_step: 15,
            end_step: 20,
        };
        let mut last_drawn = 0;
        for peer in [&newcomer, &distrusted] {
            for _ in 0..1000 {
                let plan = plan_challenge(&chain, &policy, peer, &mut rng);
                let replayed = plan.replayed_segments();
                assert_eq!(replayed.len(), 2, "{plan:?}");
                assert!(replayed[0].start_step < replayed[1].start_step);
                assert_eq!(plan.segments.last(), Some(&last), "{plan:?}");
                assert!(
                    plan.segments
                        .windows(2)
                        .all(|w| w[0].start_step < w[1].start_step)
                );
                if plan.segments.len() == 2 {
                    assert_eq!(plan.replayed, [true, true]);
                    last_drawn += 1;
                } else {
                    assert_eq!(plan.replayed, [true, true, false], "{plan:?}");
                }
                for s in &plan.segments {
                    assert_eq!(s.end_step, s.start_step + 5);
                    assert!(s.start_step % 5 == 0 && s.end_step <= 20);
                }
            }
        }
        // Two of four segments drawn: the last among them half the time.
        let sd = (2000.0f64 * 0.5 * 0.5).sqrt();
        assert!(
            (f64::from(last_drawn) - 1000.0).abs() < 5.0 * sd,
            "{last_drawn}"
        );
        // Probation ends with the third accepted delta.
        let graduated = Reputation {
            accepted: 3,
            ..Reputation::default()
        };
        assert!(
            Reputation {
                accepted: 2,
                ..graduated.clone()
            }
            .always_challenged(&policy)
        );
        assert!(!graduated.always_challenged(&policy));

        // An established peer: with probability p (binomial, within 5 standard deviations).
        let draws = 20_000;
        let challenged = (0..draws)
            .filter(|_| !plan_challenge(&chain, &policy, &established, &mut rng).is_empty())
            .count() as f64;
        let (n, p) = (f64::from(draws), policy.challenge_probability);
        let sd = (n * p * (1.0 - p)).sqrt();
        assert!((challenged - n * p).abs() < 5.0 * sd, "{challenged} of {n}");
        for (p, expected) in [(0.0, 0), (1.0, 1000)] {
            let policy = v1::VerificationPolicy {
                challenge_probability: p,
                ..policy
            };
            let count = (0..1000)
                .filter(|_| !plan_challenge(&chain, &policy, &established, &mut rng).is_empty())
                .count();
            assert_eq!(count, expected, "p = {p}");
        }

        // Each segment equally likely.
        let one = v1::VerificationPolicy {
            segments_per_challenge: 1,
            ..policy
        };
        let mut hits = [0u32; 4];
        for _ in 0..8000 {
            let plan = plan_challenge(&chain, &one, &newcomer, &mut rng);
            let replayed = plan.replayed_segments();
            assert_eq!(replayed.len(), 1);
            assert_eq!(plan.segments.len(), if replayed[0] == last { 1 } else { 2 });
            hits[(replayed[0].start_step / 5) as usize] += 1;
        }
        let sd = (8000.0f64 * 0.25 * 0.75).sqrt();
        for h in hits {
            assert!((f64::from(h) - 2000.0).abs() < 5.0 * sd, "{hits:?}");
        }

        // Stratified: two of twenty segments are one from each half, every one of them drawn
        // about equally often; so a cheater who invents either half of its lease is caught.
        let twenty = commitments(21);
        let two = v1::VerificationPolicy {
            segments_per_challenge: 2,
            ..policy
        };
        let mut hits = [0u32; 20];
        for _ in 0..4000 {
            let replayed = plan_challenge(&twenty, &two, &newcomer, &mut rng).replayed_segments();
            let at: Vec<usize> = replayed
                .iter()
                .map(|s| (s.start_step / 5) as usize)
                .collect();
            assert!(at.len() == 2 && at[0] < 10 && at[1] >= 10, "{at:?}");
            at.iter().for_each(|&i| hits[i] += 1);
        }
        let sd = (4000.0f64 * 0.1 * 0.9).sqrt();
        for h in hits {
            assert!((f64::from(h) - 400.0).abs() < 5.0 * sd, "{hits:?}");
        }
        assert_eq!(stratified_draw(3, 5, &mut rng), [0, 1, 2]);
        assert!(stratified_draw(0, 5, &mut rng).is_empty());

        // More segments asked than the chain has: all of them, each once.
        let many = v1::VerificationPolicy {
            segments_per_challenge: 10,
            ..policy
        };
        let all = plan_challenge(&chain, &many, &newcomer, &mut rng);
        let starts: Vec<u64> = all.segments.iter().map(|s| s.start_step).collect();
        assert_eq!(starts, vec![0, 5, 10, 15]);
        assert_eq!(all.replayed, [true; 4]);
        assert_eq!(replay_cost_fraction(&all.replayed_segments(), 20), 1.0);
        // At most 64 segments, the last one included.
        let long = commitments(101);
        let most = v1::VerificationPolicy {
            segments_per_challenge: 64,
            ..policy
        };
        for _ in 0..20 {
            let plan = plan_challenge(&long, &most, &newcomer, &mut rng);
            assert!(plan.segments.len() == 64 && plan.segments[63].end_step == 500);
            assert!(plan.replayed_segments().len() >= 63);
        }
        assert!(plan_challenge(&commitments(1), &policy, &newcomer, &mut rng).is_empty());

        // The compute this costs: one 5-step segment of a 100-step lease is 5 %.
        let one_segment = [v1::Segment {
            start_step: 40,
            end_step: 45,
        }];
        assert_eq!(replay_cost_fraction(&one_segment, 100), 0.05);
        assert_eq!(replay_cost_fraction(&one_segment, 0), 0.0);
        assert_eq!(replay_cost_fraction(&[], 100), 0.0);
    }

    #[test]
    fn tolerances_measure_what_they_say() {
        let b: NamedTensors = [
            (
                "a".to_owned(),
                HostTensor::new(vec![2], vec![3.0, 0.0]).unwrap(),
            ),
            ("b".to_owned(), HostTensor::new(vec![1], vec![4.0]).unwrap()),
        ]
        .into();
        let policy = policy(); // cosine ≥ 0.99, relative error ≤ 0.05
        let same = compare_within_tolerance(&b, &b, &policy).unwrap();
        assert_eq!((same.cosine, same.relative_error), (1.0, 0.0));
        let close = compare_within_tolerance(&scaled(&b, 1.04), &b, &policy).unwrap();
        assert!((close.relative_error - 0.04).abs() < 1e-6, "{close:?}");
        // Same direction, twice as long: ‖a − b‖ / ‖b‖ = 1.
        assert_rejected(
            compare_within_tolerance(&scaled(&b, 2.0), &b, &policy),
            RejectReason::ReplayOutOfTolerance,
            "relative error 1.000000",
        );
        let mut turned = b.clone();
        turned.get_mut("a").unwrap().data = vec![0.0, 3.0];
        turned.get_mut("b").unwrap().data = vec![0.0];
        assert_rejected(
            compare_within_tolerance(&turned, &b, &policy),
            RejectReason::ReplayOutOfTolerance,
            "cosine similarity 0.000000",
        );
        assert_rejected(
            compare_within_tolerance(&scaled(&b, -1.0), &b, &policy),
            RejectReason::ReplayOutOfTolerance,
            "cosine similarity -1.000000",
        );
        let zero = scaled(&b, 0.0);
        assert!(compare_within_tolerance(&zero, &zero, &policy).is_ok());
        assert!(compare_within_tolerance(&b, &zero, &policy).is_err());
        assert!(compare_within_tolerance(&zero, &b, &policy).is_err());
        let mut nan = b.clone();
        nan.get_mut("b").unwrap().data[0] = f32::NAN;
        assert!(compare_within_tolerance(&nan, &b, &policy).is_err());
        let mut fewer = b.clone();
        fewer.pop_last();
        assert_rejected(
            compare_within_tolerance(&fewer, &b, &policy),
            RejectReason::ReplayOutOfTolerance,
            "different tensors",
        );

        // The norm bound: 0 is none.
        assert_eq!(check_norm(&b, &policy).unwrap(), 5.0);
        let tight = v1::VerificationPolicy {
            max_delta_norm: 4.9,
            ..policy
        };
        assert_rejected(
            check_norm(&b, &tight),
            RejectReason::NormTooLarge,
            "norm is 5.000000, the job allows at most 4.9",
        );
        assert_eq!(
            check_norm(
                &b,
                &v1::VerificationPolicy {
                    max_delta_norm: 5.0,
                    ..policy
                }
            )
            .unwrap(),
            5.0
        );
    }

    #[test]
    fn reputation_moves_with_verdicts() {
        let rejected = |reason| Verdict::Rejected {
            reason,
            equal_provenance: false,
        };
        let mut peer = Reputation::default();
        assert_eq!(
            (peer.score, peer.accepted, peer.penalized, peer.banned),
            (0.5, 0, 0, false)
        );
        assert!(!peer.apply(Verdict::Accepted));
        assert!((peer.score - 0.55).abs() < 1e-12);
        assert_eq!(peer.accepted, 1);
        assert!(!peer.apply(rejected(RejectReason::NormTooLarge)));
        assert!((peer.score - 0.275).abs() < 1e-12);
        assert_eq!(peer.penalized, 1);

        // What is not the peer's fault changes nothing.
        for reason in [
            RejectReason::Late,
            RejectReason::RoundClosed,
            RejectReason::Internal,
            RejectReason::PeerBanned,
            RejectReason::Unspecified,
        ] {
            let before = peer.clone();
            assert!(!peer.apply(rejected(reason)));
            assert_eq!(peer, before, "{reason:?}");
        }

        // Penalties in a row ban once the score falls below 0.1: the third from the start.
        let mut peer = Reputation::default();
        assert!(!peer.apply(rejected(RejectReason::ChallengeUnanswered)));
        assert!(!peer.apply(rejected(RejectReason::BlobUnavailable)));
        assert!((peer.score - 0.125).abs() < 1e-12 && !peer.banned);
        assert!(peer.apply(rejected(RejectReason::ProbeLossRegression)));
        assert!(peer.banned);
        // Banned stays banned; later verdicts change nothing and do not ban again.
        let before = peer.clone();
        assert!(!peer.apply(Verdict::Accepted));
        assert_eq!(peer, before);

        // Many accepted deltas approach 1 without passing it.
        let mut trusted = Reputation::default();
        for _ in 0..200 {
            trusted.apply(Verdict::Accepted);
        }
        assert!(trusted.score > 0.99 && trusted.score <= 1.0);

        // Cheating bans at once, however trusted.
        for reason in [
            RejectReason::ChallengeStartMismatch,
            RejectReason::ChallengeEndMismatch,
        ] {
            let mut peer = trusted.clone();
            assert!(peer.apply(rejected(reason)));
            assert!(peer.banned && peer.score == 0.0);
        }
        let mut peer = trusted.clone();
        assert!(peer.apply(Verdict::Rejected {
            reason: RejectReason::RedundancyMismatch,
            equal_provenance: true,
        }));
        let mut peer = trusted.clone();
        assert!(!peer.apply(rejected(RejectReason::RedundancyMismatch)));
        assert!(!peer.banned && peer.score < trusted.score);

        // It is a stored record.
        let bytes = crate::codec::encode(&trusted).unwrap();
        assert_eq!(crate::codec::decode::<Reputation>(&bytes).unwrap(), trusted);
    }

    /// The severity table against the words of verify.proto's comments.
    #[test]
    fn the_severity_table_is_verify_proto() {
        let proto = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/swarmtune/v1/verify.proto"),
        )
        .unwrap();
        let mut comment = String::new();
        let mut checked = 0;
        for line in proto.lines().map(str::trim) {
            if let Some(text) = line.strip_prefix("//") {
                comment.push_str(text.trim());
                comment.push(' ');
                continue;
            }
            let name = line.split_whitespace().next().unwrap_or("");
            if let Some(reason) = RejectReason::from_str_name(name) {
                let said = if comment.contains("Not penalized") {
                    Some(Severity::NotPenalized)
                } else if comment.contains("Cheating") {
                    Some(Severity::Cheating)
                } else if comment.contains("Penalized") {
                    Some(Severity::Penalized)
                } else {
                    None
                };
                match (reason, said) {
                    (RejectReason::RedundancyMismatch, _) => {
                        assert!(
                            comment.contains("cheating on equal provenance, penalized otherwise")
                        );
                        assert_eq!(severity(reason, true), Severity::Cheating);
                        assert_eq!(severity(reason, false), Severity::Penalized);
                        checked += 1;
                    }
                    (_, Some(said)) => {
                        assert_eq!(severity(reason, false), said, "{name}: {comment}");
                        assert_eq!(severity(reason, true), said, "{name}");
                        checked += 1;
                    }
                    // Neither says: not rejected, or banned before any check ran.
                    (RejectReason::Unspecified | RejectReason::PeerBanned, None) => {
                        assert_eq!(severity(reason, false), Severity::NotPenalized);
                    }
                    (_, None) => panic!("{name} has no classification: {comment}"),
                }
            }
            comment.clear();
        }
        assert_eq!(
            checked, 17,
            "every reason but UNSPECIFIED and PEER_BANNED is classified"
        );
        assert!(is_penalized(RejectReason::ChallengeEndMismatch));
        assert!(is_penalized(RejectReason::RedundancyMismatch));
        assert!(!is_penalized(RejectReason::Late));
        assert!(is_cheating(RejectReason::ChallengeStartMismatch, false));
        assert!(!is_cheating(RejectReason::ReplayOutOfTolerance, true));
        assert!(!is_cheating(RejectReason::RedundancyMismatch, false));
    }

    #[test]
    fn lease_settings_become_the_trainers() {
        let lease = lease(&[]);
        let spec = train_spec(&lease).unwrap();
        assert_eq!(
            spec,
            TrainSpec {
                inner_steps: 8,
                batch_size: 4,
                micro_batch: 4,
                learning_rate: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
                max_grad_norm: Some(1.0),
                seed: 7,
                commit_every: 2,
            }
        );
        let mut unclipped = lease.clone();
        unclipped.inner.as_mut().unwrap().max_grad_norm = 0.0;
        assert_eq!(train_spec(&unclipped).unwrap().max_grad_norm, None);
        let mut bad = lease.clone();
        bad.inner.as_mut().unwrap().micro_batch = 5;
        assert_rejected(train_spec(&bad), RejectReason::Internal, "micro_batch");
        assert_eq!(lease_encoding(&lease).unwrap(), DeltaEncoding::F32);
        let topk = v1::Lease {
            delta_encoding: v1::DeltaEncoding::Topk as i32,
            topk_fraction: 0.25,
            ..lease.clone()
        };
        assert_eq!(
            lease_encoding(&topk).unwrap(),
            DeltaEncoding::TopK { fraction: 0.25 }
        );
        let unset = v1::Lease {
            delta_encoding: 0,
            ..lease
        };
        assert_rejected(
            lease_encoding(&unset),
            RejectReason::Internal,
            "DELTA_ENCODING_UNSPECIFIED",
        );
    }

    #[test]
    fn messages_fit_a_verdict() {
        let r = Rejection::new(RejectReason::Internal, "é".repeat(2000));
        assert!(r.message.len() <= MAX_MESSAGE_BYTES, "{}", r.message.len());
        assert!(r.message.ends_with('…') && r.message.starts_with("éé"));
        let r = Rejection::new(RejectReason::Late, "short");
        assert_eq!(r.message, "short");
        assert_eq!(r.to_string(), "REJECT_REASON_LATE: short");
        assert_eq!(short(&[0x3f, 0xa2, 0, 1, 9]), "3fa20001…");
    }
}
