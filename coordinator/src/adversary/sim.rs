//! Volunteers simulated in this process, for the engine's tests and the adversary scenarios:
//! each trains real leases with the trainer on the built-in base, delivers signed int8 deltas
//! through [`Coordinator::submit_delta`] and answers segment challenges from the states it
//! kept, exactly as a node does over the network; only the transport is left out (blobs go
//! straight into the coordinator's store, where a fetch would have put them).

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use libp2p_identity::{Keypair, PeerId};
use swarmtune_protocol::signed::sign;
use swarmtune_protocol::{ContentId, v1};
use swarmtune_trainer::checkpoint::safetensors_from_bytes;
use swarmtune_trainer::data::{Example, Shard, ShardLimits};
use swarmtune_trainer::delta::{DeltaEncoding, encode};
use swarmtune_trainer::device::DeviceKind;
use swarmtune_trainer::lora::{Adapter, LoraConfig};
use swarmtune_trainer::model::CausalLm;
use swarmtune_trainer::optim::Moments;
use swarmtune_trainer::tensors::NamedTensors;
use swarmtune_trainer::train::{
    Commitment, LeaseData, LocalTrainer, LoraState, Provenance, TrainOutcome, TrainStats,
};

use crate::engine::{Config, Coordinator, Next};
use crate::leases::LeaseAnswer;
use crate::spec::JobFile;

/// What went wrong in a simulation: a step the engine or the trainer refused that an honest
/// participant should not see refused (the scenarios count the refusals they provoke).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SimError(pub String);

/// A result of the simulation.
pub type Result<T> = std::result::Result<T, SimError>;

/// `Err(SimError)` saying `what` failed and why.
pub fn fail<T>(what: &str, why: impl Display) -> Result<T> {
    Err(SimError(format!("{what}: {why}")))
}

trait Context<T> {
    fn context(self, what: &str) -> Result<T>;
}

impl<T, E: Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: &str) -> Result<T> {
        self.or_else(|e| fail(what, e))
    }
}

/// Threads of the math pool; part of the provenance, so volunteers and coordinator agree.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// The CPU device every simulation computes on.
pub fn device() -> Result<burn::tensor::Device> {
    DeviceKind::Cpu.device().context("the CPU device")
}

/// A key made from one repeated byte: the same identity on every run.
pub fn fixed_key(byte: u8) -> Keypair {
    Keypair::ed25519_from_bytes([byte; 32]).expect("any 32 bytes are an ed25519 secret")
}

/// A coordinator signing as `key` with its state in `dir/coordinator`.
pub fn open_coordinator(dir: &Path, key: Keypair) -> Result<Coordinator> {
    Coordinator::open(
        Config::new(dir.join("coordinator")),
        key,
        device()?,
        "flex",
        threads(),
    )
    .context("opening the coordinator")
}

/// The shout skill's train split as a JSON-lines dataset blob in the coordinator's store.
pub fn shout_dataset(coordinator: &Coordinator) -> Result<ContentId> {
    let (train, _) = swarmtune_trainer::builtin::skill::splits(7, 400, 10);
    let mut jsonl = String::new();
    for example in &train {
        if let Example::PromptCompletion { prompt, completion } = example {
            jsonl.push_str(
                &serde_json::json!({"prompt": prompt, "completion": completion}).to_string(),
            );
            jsonl.push('\n');
        }
    }
    coordinator
        .blobs()
        .put_bytes(jsonl.as_bytes())
        .context("storing the dataset")
}

/// `owner` signs `file` (on the shout dataset) at `now` and submits it; returns the job id
/// and the signed spec. The job is left preparing. The same owner, file and time give the
/// same job id.
pub fn submit_job(
    coordinator: &Coordinator,
    owner: &Keypair,
    file: &JobFile,
    now: u64,
) -> Result<([u8; 32], v1::Signed)> {
    let dataset = shout_dataset(coordinator)?;
    let spec = file
        .to_spec(&coordinator.peer_id(), dataset)
        .context("the job file")?;
    // A fixed nonce: with fixed keys, the job id (the hash of the signed spec), and so every
    // seed of the job, is the same on every run, so that scenarios compare like with like.
    let signed_spec = swarmtune_protocol::signed::sign_with_nonce(owner, &spec, now, 1)
        .context("signing the job")?;
    let submitted = coordinator
        .submit(&signed_spec, now)
        .map_err(|e| SimError(format!("submitting the job: {}", e.message)))?;
    let job_id: [u8; 32] = submitted
        .job_id
        .clone()
        .try_into()
        .or_else(|_| fail("submitting the job", "the job id is not 32 bytes"))?;
    Ok((job_id, signed_spec))
}

/// A coordinator in `dir` signing as `key`, running `file` (signed by `owner`) on the shout
/// skill's train split, prepared at time 1000. With fixed keys the job id, and so every seed
/// of the job, is the same on every run.
pub fn running_job(
    dir: &Path,
    file: &JobFile,
    key: Keypair,
    owner: &Keypair,
) -> Result<(Coordinator, [u8; 32], v1::Signed)> {
    let coordinator = open_coordinator(dir, key)?;
    let (job_id, signed_spec) = submit_job(&coordinator, owner, file, 1_000)?;
    let needed = coordinator
        .needed_blobs(&job_id)
        .context("the job's blobs")?;
    if !needed.is_empty() {
        return fail(
            "preparing the job",
            format!("{} blobs missing", needed.len()),
        );
    }
    coordinator
        .prepare(&job_id, 1_000)
        .context("preparing the job")?;
    Ok((coordinator, job_id, signed_spec))
}

/// The built-in base written to `dir/volunteer-base`, where volunteers load it from.
pub fn volunteer_base(dir: &Path) -> Result<PathBuf> {
    let base_dir = dir.join("volunteer-base");
    std::fs::create_dir_all(&base_dir).context("creating the base dir")?;
    swarmtune_trainer::builtin::base::write_to(&base_dir).context("writing the base")?;
    Ok(base_dir)
}

/// Asks for work with a job-agnostic request, as a node does.
pub fn ask(
    coordinator: &Coordinator,
    peer: &PeerId,
    now: u64,
) -> std::result::Result<LeaseAnswer, v1::ErrorReply> {
    let request = v1::RequestLease {
        job_id: Vec::new(),
        capabilities: Some(v1::PeerCapabilities {
            tokens_per_second: 2_000.0,
            ..Default::default()
        }),
    };
    coordinator.request_lease(peer, &request, now)
}

/// `t` times `factor`.
pub fn scaled(t: &NamedTensors, factor: f32) -> NamedTensors {
    let mut out = t.clone();
    for v in out.values_mut() {
        v.data.iter_mut().for_each(|x| *x *= factor);
    }
    out
}

/// `a + b`, tensor by tensor (the tensors of `a` that `b` has).
pub fn added(a: &NamedTensors, b: &NamedTensors) -> NamedTensors {
    let mut out = a.clone();
    for (name, t) in out.iter_mut() {
        if let Some(u) = b.get(name) {
            t.data.iter_mut().zip(&u.data).for_each(|(x, y)| *x += *y);
        }
    }
    out
}

/// A blob the coordinator's store holds, by its wire id.
pub fn blob(coordinator: &Coordinator, id: &Option<v1::ContentId>) -> Result<Vec<u8>> {
    let Some(id) = id.as_ref().and_then(|c| ContentId::try_from(c).ok()) else {
        return fail("reading a blob", "no content id");
    };
    coordinator.blobs().read(&id).context("reading a blob")
}

/// The tensors of a safetensors blob in the coordinator's store.
pub fn tensors(coordinator: &Coordinator, id: &Option<v1::ContentId>) -> Result<NamedTensors> {
    let bytes = blob(coordinator, id)?;
    Ok(safetensors_from_bytes(&bytes, Path::new("blob"))
        .context("decoding an adapter")?
        .0)
}

/// A lease's LoRA config, as the trainer takes it.
pub fn lease_lora(lease: &v1::Lease) -> LoraConfig {
    crate::engine::lora_config(&lease.lora.clone().unwrap_or_default())
}

/// The state a lease starts from: its start adapter with zero moments.
pub fn lease_start_state(coordinator: &Coordinator, lease: &v1::Lease) -> Result<LoraState> {
    Ok(LoraState::start(&Adapter {
        config: lease_lora(lease),
        tensors: tensors(coordinator, &lease.start_adapter)?,
    }))
}

/// Delivers `envelope` for `lease_id` and takes it to a verdict: the receipt, the cheap
/// checks and, when the engine asks, challenges answered by `answer`. `Ok(None)` when the
/// delta waits for its redundant twin; `Err` with the reply when the delivery was refused
/// before any verdict (a bad signature, a lease that is not the sender's).
pub fn judge(
    coordinator: &Coordinator,
    peer: &PeerId,
    envelope: &v1::Signed,
    lease_id: u64,
    now: u64,
    answer: impl FnMut(&v1::SegmentChallenge) -> Result<v1::SegmentStates>,
) -> Result<std::result::Result<Option<v1::VerificationVerdict>, v1::ErrorReply>> {
    let body = match coordinator.submit_delta(peer, envelope, now) {
        Ok(body) => body,
        Err(reply) => return Ok(Err(reply)),
    };
    match body {
        v1::delta_response::Body::Verdict(verdict) => Ok(Ok(Some(verdict))),
        v1::delta_response::Body::DeltaReceipt(_) => {
            let next = coordinator
                .verify(lease_id, true, now)
                .context("verifying a delta")?;
            follow(coordinator, lease_id, next, now, answer).map(Ok)
        }
        other => fail("delivering a delta", format!("unexpected answer {other:?}")),
    }
}

/// Takes what the engine decided about the delta of `lease_id` on: challenges answered by
/// `answer` until a verdict, or `None` when the delta waits for its redundant twin.
pub fn follow(
    coordinator: &Coordinator,
    lease_id: u64,
    mut next: Next,
    now: u64,
    mut answer: impl FnMut(&v1::SegmentChallenge) -> Result<v1::SegmentStates>,
) -> Result<Option<v1::VerificationVerdict>> {
    loop {
        next = match next {
            Next::Verdict(verdict) => return Ok(Some(*verdict)),
            Next::AwaitingTwin => return Ok(None),
            Next::Challenge(challenge) => coordinator
                .answer_challenge(lease_id, &answer(&challenge)?, now)
                .context("answering a challenge")?,
        };
    }
}

/// A volunteer in this process: its key and the built-in base, ready to train.
pub struct SimVolunteer {
    /// Its identity; signs its envelopes.
    pub key: Keypair,
    /// The base, on the autodiff device (volunteers of one process may share it).
    pub model: Arc<CausalLm>,
}

impl SimVolunteer {
    /// A volunteer signing as `key`, with the base in `base_dir` ([`volunteer_base`]).
    pub fn new(key: Keypair, base_dir: &Path) -> Result<Self> {
        let model = CausalLm::load(base_dir, &device()?).context("loading the base")?;
        Ok(Self {
            key,
            model: Arc::new(model.to_autodiff()),
        })
    }

    /// Its PeerId.
    pub fn peer(&self) -> PeerId {
        self.key.public().to_peer_id()
    }

    /// Trains `lease` on blobs read from the coordinator's store (what a real volunteer
    /// fetches over the network).
    pub fn train(&self, coordinator: &Coordinator, lease: &v1::Lease) -> Result<TrainOutcome> {
        let start = tensors(coordinator, &lease.start_adapter)?;
        self.train_from(coordinator, lease, start)
    }

    /// Trains `lease`'s shards, seed and settings, but from `start` instead of the lease's
    /// start adapter.
    pub fn train_from(
        &self,
        coordinator: &Coordinator,
        lease: &v1::Lease,
        start: NamedTensors,
    ) -> Result<TrainOutcome> {
        let mut shards = Vec::with_capacity(lease.shards.len());
        for id in &lease.shards {
            let Ok(id) = ContentId::try_from(id) else {
                return fail("a lease's shard", "not a content id");
            };
            let bytes = coordinator.blobs().read(&id).context("reading a shard")?;
            shards.push(Shard::decode(&bytes, &ShardLimits::default()).context("a shard")?);
        }
        train_lease(&self.model, lease, &shards, start)
    }

    /// The envelope for `outcome` with `bytes` as its delta blob, put where the coordinator
    /// reads it.
    pub fn envelope(
        &self,
        coordinator: &Coordinator,
        lease: &v1::Lease,
        outcome: &TrainOutcome,
        bytes: &[u8],
    ) -> Result<v1::DeltaEnvelope> {
        let delta = coordinator
            .blobs()
            .put_bytes(bytes)
            .context("storing a delta")?;
        Ok(crate::verify::delta_envelope(
            lease,
            outcome,
            delta,
            bytes.len() as u64,
        ))
    }

    /// `envelope` signed with this volunteer's key at `now`.
    pub fn sign(&self, envelope: &v1::DeltaEnvelope, now: u64) -> Result<v1::Signed> {
        sign(&self.key, envelope, now).context("signing an envelope")
    }

    /// The signed envelope for `outcome` with `delta` as its (int8) delta blob.
    pub fn deliver_delta(
        &self,
        coordinator: &Coordinator,
        lease: &v1::Lease,
        outcome: &TrainOutcome,
        delta: &NamedTensors,
        now: u64,
    ) -> Result<v1::Signed> {
        let bytes = encode(delta, DeltaEncoding::Int8RowWise).context("encoding a delta")?;
        self.deliver_bytes(coordinator, lease, outcome, &bytes, now)
    }

    /// The signed envelope for `outcome`, its own delta as the blob.
    pub fn deliver(
        &self,
        coordinator: &Coordinator,
        lease: &v1::Lease,
        outcome: &TrainOutcome,
        now: u64,
    ) -> Result<v1::Signed> {
        self.deliver_delta(coordinator, lease, outcome, &outcome.delta, now)
    }

    /// The signed envelope for `outcome` with `bytes` as its delta blob.
    pub fn deliver_bytes(
        &self,
        coordinator: &Coordinator,
        lease: &v1::Lease,
        outcome: &TrainOutcome,
        bytes: &[u8],
        now: u64,
    ) -> Result<v1::Signed> {
        let envelope = self.envelope(coordinator, lease, outcome, bytes)?;
        self.sign(&envelope, now)
    }
}

/// What a volunteer does with a lease: trains `shards` with the lease's seed and settings,
/// from `start`, on `model` (the CPU backend, [`threads`] threads).
pub fn train_lease(
    model: &CausalLm,
    lease: &v1::Lease,
    shards: &[Shard],
    start: NamedTensors,
) -> Result<TrainOutcome> {
    let lora = lease_lora(lease);
    let trainer = LocalTrainer::new(model, lora.clone(), Provenance::here("flex", threads()))
        .context("the trainer")?;
    let data = LeaseData::new(shards, model.config().vocab_size()).context("lease data")?;
    let spec = crate::verify::train_spec(lease).context("the lease's settings")?;
    trainer
        .train(
            &Adapter {
                config: lora,
                tensors: start,
            },
            &data,
            &spec,
            &mut |_| {},
            &AtomicBool::new(false),
        )
        .context("training")
}

/// A challenge's answer from `states` (one per commitment step): each segment's start and
/// end state as blobs in the coordinator's store, and the end state's hash as the claim.
pub fn answer_from(
    coordinator: &Coordinator,
    states: &[LoraState],
    challenge: &v1::SegmentChallenge,
) -> Result<v1::SegmentStates> {
    let state_at = |step: u64| {
        states
            .iter()
            .find(|s| s.step() == step)
            .ok_or_else(|| SimError(format!("no state kept at step {step}")))
    };
    let put = |state: &LoraState| -> Result<v1::ContentId> {
        let bytes = state.to_bytes().context("encoding a state")?;
        let id = coordinator
            .blobs()
            .put_bytes(&bytes)
            .context("storing a state")?;
        Ok(id.to_proto())
    };
    let mut answered = Vec::with_capacity(challenge.segments.len());
    for s in &challenge.segments {
        let end = state_at(s.end_step)?;
        answered.push(v1::SegmentState {
            segment: Some(*s),
            start_state: Some(put(state_at(s.start_step)?)?),
            claimed_end_hash: end.hash().as_bytes().to_vec(),
            end_state: Some(put(end)?),
        });
    }
    Ok(v1::SegmentStates {
        lease_id: challenge.lease_id,
        states: answered,
    })
}

/// A lease's outcome made up without training: states moving in a straight line from `start`
/// to `start − delta` with zero moments, one at every step of `steps` (the commitment steps,
/// 0 first), hashed into a chain consistent with them; statistics copied from `stats`.
pub fn made_up_outcome(
    start: &LoraState,
    delta: &NamedTensors,
    steps: &[u64],
    stats: &TrainStats,
) -> TrainOutcome {
    let last = steps.last().copied().unwrap_or(0).max(1) as f32;
    let snapshots: Vec<LoraState> = steps
        .iter()
        .map(|&step| {
            let share = step as f32 / last;
            let params = swarmtune_trainer::train::subtract(&start.params, &scaled(delta, share));
            let mut moments = Moments::zeros_like(&params);
            moments.step = step;
            LoraState { params, moments }
        })
        .collect();
    outcome_of(delta.clone(), snapshots, stats)
}

/// The outcome whose kept states are `snapshots` (one per commitment step) and whose delta is
/// `delta`, with commitments hashed from the states.
pub fn outcome_of(
    delta: NamedTensors,
    snapshots: Vec<LoraState>,
    stats: &TrainStats,
) -> TrainOutcome {
    let commitments = snapshots
        .iter()
        .map(|s| Commitment {
            step: s.step(),
            state_hash: *s.hash().as_bytes(),
        })
        .collect();
    TrainOutcome {
        delta,
        end_state: snapshots.last().cloned().unwrap_or_else(|| LoraState {
            params: NamedTensors::new(),
            moments: Moments::zeros_like(&NamedTensors::new()),
        }),
        commitments,
        snapshots,
        stats: TrainStats {
            seconds: 0.0,
            ..*stats
        },
        provenance: Provenance::here("flex", threads()),
    }
}
