//! What the coordinator keeps about jobs, rounds and leases, as stored in its database.
//! Protocol messages inside records are kept as their protobuf bytes, exactly as signed or
//! sent, so nothing is lost or re-encoded differently.

use serde::{Deserialize, Serialize};

/// Where a job is in its life (`v1::JobState` without the unset value).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Accepted; the base and dataset are being fetched and cut.
    Preparing,
    /// Rounds are running.
    Running,
    /// The budget is spent.
    Completed,
    /// The job cannot continue; the record's message says why.
    Failed,
    /// Stopped by the operator.
    Cancelled,
}

impl JobState {
    /// The wire value.
    pub fn to_proto(self) -> swarmtune_protocol::v1::JobState {
        use swarmtune_protocol::v1::JobState as P;
        match self {
            Self::Preparing => P::Preparing,
            Self::Running => P::Running,
            Self::Completed => P::Completed,
            Self::Failed => P::Failed,
            Self::Cancelled => P::Cancelled,
        }
    }
}

/// What preparing a job produced: the blobs its leases name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Prepared {
    /// The base, a bundle blob.
    pub base: [u8; 32],
    /// The base's name for people.
    pub base_name: String,
    /// Training shards, in order.
    pub train_shards: Vec<[u8; 32]>,
    /// Held-out shards.
    pub eval_shards: Vec<[u8; 32]>,
    /// Tokens per sequence of every shard.
    pub seq_len: u32,
}

/// One unit of work of a round: the shards and seed one lease trains on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Unit {
    /// Indices into `Prepared::train_shards`.
    pub shards: Vec<u32>,
    /// The lease's seed (batch order, dropout).
    pub seed: u64,
    /// The lease holding it now, if any.
    pub lease: Option<u64>,
    /// A lease of this unit delivered a delta (waiting for, or past, its verdict).
    pub delivered: bool,
    /// For a redundant unit: the unit whose work it repeats.
    pub redundant_of: Option<u32>,
}

/// A job, as the coordinator keeps it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct JobRecord {
    /// The job id: `envelope_id` of the signed spec.
    pub id: [u8; 32],
    /// The owner's signed spec (`v1::Signed` bytes) as received.
    pub signed_spec: Vec<u8>,
    /// The owner (signer of the spec), PeerId bytes.
    pub owner: Vec<u8>,
    /// The module it trains.
    pub module: String,
    /// When it was accepted.
    pub created_at_ms: u64,
    /// Its state.
    pub state: JobState,
    /// Why it failed or was cancelled.
    pub message: String,
    /// Its blobs, once prepared.
    pub prepared: Option<Prepared>,
    /// The open round (from 1), 0 when none is open.
    pub round: u64,
    /// Rounds numbered so far, abandoned ones included.
    pub rounds_opened: u64,
    /// When the open round's deadline passes.
    pub round_deadline_ms: u64,
    /// The open round's work.
    pub units: Vec<Unit>,
    /// Rounds merged, published or gated out.
    pub rounds_merged: u64,
    /// Tokens of merged deltas.
    pub tokens_trained: u64,
    /// The module's latest version (0 before the first).
    pub latest_version: u64,
    /// The outer optimizer's momentum (a safetensors blob), once a merge has made one.
    pub momentum: Option<[u8; 32]>,
    /// The verification compute spent on this job, in optimizer steps replayed.
    pub replayed_steps: u64,
    /// The training compute of the deltas judged, in optimizer steps.
    pub judged_steps: u64,
}

/// What became of a lease.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// Held and being worked on.
    Active,
    /// Its holder delivered a delta.
    Delivered,
    /// Given back by its holder.
    Released,
    /// Not renewed in time, or its round closed first.
    Expired,
}

/// A lease, as the coordinator keeps it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LeaseRecord {
    /// The granted `v1::Lease`, protobuf bytes.
    pub lease: Vec<u8>,
    /// Its job.
    pub job: [u8; 32],
    /// Its round.
    pub round: u64,
    /// Its unit in the round.
    pub unit: u32,
    /// The holder's PeerId bytes.
    pub holder: Vec<u8>,
    /// Its state.
    pub state: LeaseState,
    /// When it lapses unless renewed.
    pub expires_at_ms: u64,
    /// Steps done, from the last heartbeat.
    pub steps_done: u64,
    /// Loss of the last step, from the last heartbeat.
    pub last_loss: f32,
    /// What the holder advertised (`v1::PeerCapabilities` bytes).
    pub capabilities: Vec<u8>,
}

/// Where a delivered delta is in its verification.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum DeltaStatus {
    /// Waiting for its blob and the cheap checks.
    Pending,
    /// The cheap checks passed; these segments (`v1::Segment` bytes) were asked for.
    Challenged {
        /// The segments asked for.
        segments: Vec<Vec<u8>>,
        /// The answer is due by then.
        respond_by_ms: u64,
        /// For each segment, whether it is replayed (`verify::ChallengePlan`).
        replayed: Vec<bool>,
        /// The challenge is the tie-break of a disagreement with the delta of the redundant
        /// twin unit, not the delta's own challenge.
        tie_break: bool,
    },
    /// Accepted: merged when its round closes.
    Accepted,
    /// Rejected (the verdict says why), or dropped because its volunteer was banned.
    Rejected,
    /// Passed its own checks (with `tie_break`: also the tie-break of a disagreement with its
    /// redundant twin); its verdict waits for the twin unit's delta, or the round's close.
    AwaitingTwin {
        /// It passed a tie-break.
        tie_break: bool,
    },
}

/// A delivered delta.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DeltaRecord {
    /// The signed `DeltaEnvelope` (`v1::Signed` bytes) as received.
    pub envelope: Vec<u8>,
    /// Its lease.
    pub lease_id: u64,
    /// Its job.
    pub job: [u8; 32],
    /// Its round.
    pub round: u64,
    /// The volunteer (PeerId bytes).
    pub peer: Vec<u8>,
    /// The delta blob.
    pub delta: [u8; 32],
    /// `DeltaEnvelope.tokens`.
    pub tokens: u64,
    /// `DeltaEnvelope.target_tokens`.
    pub target_tokens: u64,
    /// Its verification.
    pub status: DeltaStatus,
    /// The verdict (`v1::VerificationVerdict` bytes), once reached.
    pub verdict: Option<Vec<u8>>,
}
