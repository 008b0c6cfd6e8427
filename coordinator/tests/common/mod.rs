//! What the engine tests share: a coordinator running the example job (`examples/job.toml`)
//! on the built-in base and the shout skill, and volunteers in this process that train real
//! leases with the trainer, deliver signed int8 deltas and answer segment challenges from the
//! states they kept, exactly as a node would over the network. The harness is the library's
//! ([`swarmtune_coordinator::adversary::sim`], which the adversary scenarios use too); these
//! are its test-shaped forms, which panic where the library returns an error.

// Each test binary uses its own part of the harness.
#![allow(dead_code, unused_imports)]

use std::ops::Deref;
use std::path::{Path, PathBuf};

use libp2p_identity::{Keypair, PeerId};
use swarmtune_coordinator::adversary::sim::{self, SimVolunteer};
use swarmtune_coordinator::engine::{Coordinator, Next};
use swarmtune_coordinator::leases::LeaseAnswer;
use swarmtune_coordinator::spec::{JobFile, parse_job_file};
use swarmtune_protocol::{ContentId, v1};
use swarmtune_trainer::lora::LoraConfig;
use swarmtune_trainer::tensors::NamedTensors;
use swarmtune_trainer::train::{LoraState, TrainOutcome};

pub use sim::{ask, fixed_key, scaled, threads};

/// The CPU device every test computes on.
pub fn device() -> burn::tensor::Device {
    sim::device().unwrap()
}

/// A coordinator signing as `key` with its state in `dir/coordinator`.
pub fn open_coordinator(dir: &Path, key: Keypair) -> Coordinator {
    sim::open_coordinator(dir, key).unwrap()
}

/// `examples/job.toml` with shorter leases than the demo's, so the tests stay quick.
pub fn job_file() -> JobFile {
    let mut file = parse_job_file(include_str!("../../../examples/job.toml")).unwrap();
    file.inner.inner_steps = 10;
    file.inner.batch_size = 8;
    file.inner.micro_batch = Some(8);
    file
}

/// The shout skill's train split as a JSON-lines dataset blob in the coordinator's store.
pub fn shout_dataset(coordinator: &Coordinator) -> ContentId {
    sim::shout_dataset(coordinator).unwrap()
}

/// `owner` signs `file` (on the shout dataset) at `now` and submits it; returns the job id
/// and the signed spec. The job is left preparing.
pub fn submit_job(
    coordinator: &Coordinator,
    owner: &Keypair,
    file: &JobFile,
    now: u64,
) -> ([u8; 32], v1::Signed) {
    sim::submit_job(coordinator, owner, file, now).unwrap()
}

/// A coordinator in `dir` running `file` on the shout skill's train split, prepared at time
/// 1000; returns it, the job id and the signed spec.
pub fn running_job_with(dir: &Path, file: &JobFile) -> (Coordinator, [u8; 32], v1::Signed) {
    running_job_as(
        dir,
        file,
        Keypair::generate_ed25519(),
        &Keypair::generate_ed25519(),
    )
}

/// [`running_job_with`] a coordinator signing as `key` and a job signed by `owner`: with
/// fixed keys the job id, and so every seed of the job, is the same on every run.
pub fn running_job_as(
    dir: &Path,
    file: &JobFile,
    key: Keypair,
    owner: &Keypair,
) -> (Coordinator, [u8; 32], v1::Signed) {
    let (coordinator, job_id, signed_spec) = sim::running_job(dir, file, key, owner).unwrap();
    assert_eq!(
        coordinator.job(&job_id).unwrap().state.to_proto(),
        v1::JobState::Running
    );
    (coordinator, job_id, signed_spec)
}

/// [`running_job_with`] the example job with shorter leases ([`job_file`]).
pub fn running_job(dir: &Path) -> (Coordinator, [u8; 32], v1::Signed) {
    running_job_with(dir, &job_file())
}

/// The built-in base written to `dir/volunteer-base`, where volunteers load it from.
pub fn volunteer_base(dir: &Path) -> PathBuf {
    sim::volunteer_base(dir).unwrap()
}

/// The lease of a granted answer.
pub fn granted(answer: LeaseAnswer) -> v1::Lease {
    match answer {
        LeaseAnswer::Granted(lease) => *lease,
        LeaseAnswer::NoWork(n) => panic!("no work: {n:?}"),
    }
}

/// A blob the coordinator's store holds, by its wire id.
pub fn blob(coordinator: &Coordinator, id: &Option<v1::ContentId>) -> Vec<u8> {
    sim::blob(coordinator, id).unwrap()
}

/// The tensors of a safetensors blob in the coordinator's store.
pub fn tensors(coordinator: &Coordinator, id: &Option<v1::ContentId>) -> NamedTensors {
    sim::tensors(coordinator, id).unwrap()
}

/// A lease's LoRA config, as the trainer takes it.
pub fn lease_lora(lease: &v1::Lease) -> LoraConfig {
    sim::lease_lora(lease)
}

/// The state a lease starts from: its start adapter with zero moments.
pub fn lease_start_state(coordinator: &Coordinator, lease: &v1::Lease) -> LoraState {
    sim::lease_start_state(coordinator, lease).unwrap()
}

/// Delivers `envelope` for `lease_id` and takes it to a verdict: the receipt, the cheap
/// checks and, when the engine asks, challenges answered by `answer`.
pub fn judge(
    coordinator: &Coordinator,
    peer: &PeerId,
    envelope: &v1::Signed,
    lease_id: u64,
    now: u64,
    mut answer: impl FnMut(&v1::SegmentChallenge) -> v1::SegmentStates,
) -> v1::VerificationVerdict {
    match sim::judge(coordinator, peer, envelope, lease_id, now, |ch| {
        Ok(answer(ch))
    })
    .unwrap()
    {
        Ok(Some(verdict)) => verdict,
        Ok(None) => panic!("lease {lease_id} waits for its redundant twin"),
        Err(reply) => panic!("{reply:?}"),
    }
}

/// Takes what the engine decided about the delta of `lease_id` on: challenges answered by
/// `answer` until a verdict, or `None` when the delta waits for its redundant twin.
pub fn follow(
    coordinator: &Coordinator,
    lease_id: u64,
    next: Next,
    now: u64,
    mut answer: impl FnMut(&v1::SegmentChallenge) -> v1::SegmentStates,
) -> Option<v1::VerificationVerdict> {
    sim::follow(coordinator, lease_id, next, now, |ch| Ok(answer(ch))).unwrap()
}

/// A volunteer in this process: its key and the built-in base, ready to train.
pub struct Volunteer(SimVolunteer);

impl Deref for Volunteer {
    type Target = SimVolunteer;

    fn deref(&self) -> &SimVolunteer {
        &self.0
    }
}

impl Volunteer {
    /// A volunteer signing as `key`, with the base in `base_dir` ([`volunteer_base`]).
    pub fn new(key: Keypair, base_dir: &Path) -> Self {
        Self(SimVolunteer::new(key, base_dir).unwrap())
    }

    /// Trains `lease` on blobs read from the coordinator's store.
    pub fn train(&self, coordinator: &Coordinator, lease: &v1::Lease) -> TrainOutcome {
        self.0.train(coordinator, lease).unwrap()
    }

    /// Trains `lease` from `start` instead of the lease's start adapter.
    pub fn train_from(
        &self,
        coordinator: &Coordinator,
        lease: &v1::Lease,
        start: NamedTensors,
    ) -> TrainOutcome {
        self.0.train_from(coordinator, lease, start).unwrap()
    }

    /// The signed envelope for `outcome`, its delta blob put where the coordinator reads it.
    pub fn deliver(
        &self,
        coordinator: &Coordinator,
        lease: &v1::Lease,
        outcome: &TrainOutcome,
        now: u64,
    ) -> v1::Signed {
        self.0.deliver(coordinator, lease, outcome, now).unwrap()
    }

    /// The signed envelope for `outcome` with `delta` as its delta blob.
    pub fn deliver_delta(
        &self,
        coordinator: &Coordinator,
        lease: &v1::Lease,
        outcome: &TrainOutcome,
        delta: &NamedTensors,
        now: u64,
    ) -> v1::Signed {
        self.0
            .deliver_delta(coordinator, lease, outcome, delta, now)
            .unwrap()
    }

    /// The signed envelope for `outcome` with `bytes` as its delta blob.
    pub fn deliver_bytes(
        &self,
        coordinator: &Coordinator,
        lease: &v1::Lease,
        outcome: &TrainOutcome,
        bytes: &[u8],
        now: u64,
    ) -> v1::Signed {
        self.0
            .deliver_bytes(coordinator, lease, outcome, bytes, now)
            .unwrap()
    }

    /// Answers a challenge from the states kept while training.
    pub fn answer(
        &self,
        coordinator: &Coordinator,
        outcome: &TrainOutcome,
        challenge: &v1::SegmentChallenge,
    ) -> v1::SegmentStates {
        answer_from(coordinator, &outcome.snapshots, challenge)
    }
}

/// A challenge's answer from `states` (one per commitment step).
pub fn answer_from(
    coordinator: &Coordinator,
    states: &[LoraState],
    challenge: &v1::SegmentChallenge,
) -> v1::SegmentStates {
    sim::answer_from(coordinator, states, challenge).unwrap()
}
