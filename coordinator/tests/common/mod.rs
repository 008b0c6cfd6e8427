//! What the engine tests share: a coordinator running the example job (`examples/job.toml`)
//! on the built-in base and the shout skill, and volunteers in this process that train real
//! leases with the trainer, deliver signed int8 deltas and answer segment challenges from the
//! states they kept, exactly as a node would over the network.

// Each test binary uses its own part of the harness.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use libp2p_identity::{Keypair, PeerId};
use swarmtune_coordinator::engine::{Config, Coordinator, Next};
use swarmtune_coordinator::leases::LeaseAnswer;
use swarmtune_coordinator::spec::{JobFile, parse_job_file};
use swarmtune_protocol::signed::sign;
use swarmtune_protocol::{ContentId, v1};
use swarmtune_trainer::checkpoint::safetensors_from_bytes;
use swarmtune_trainer::data::{Shard, ShardLimits};
use swarmtune_trainer::delta::{DeltaEncoding, encode};
use swarmtune_trainer::device::DeviceKind;
use swarmtune_trainer::lora::{Adapter, LoraConfig};
use swarmtune_trainer::model::CausalLm;
use swarmtune_trainer::tensors::NamedTensors;
use swarmtune_trainer::train::{LeaseData, LocalTrainer, LoraState, Provenance, TrainOutcome};

/// Threads of the math pool; part of the provenance, so volunteers and coordinator agree.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// The CPU device every test computes on.
pub fn device() -> burn::tensor::Device {
    DeviceKind::Cpu.device().unwrap()
}

/// A coordinator signing as `key` with its state in `dir/coordinator`.
pub fn open_coordinator(dir: &Path, key: Keypair) -> Coordinator {
    Coordinator::open(
        Config::new(dir.join("coordinator")),
        key,
        device(),
        "flex",
        threads(),
    )
    .unwrap()
}

/// `examples/job.toml` with shorter leases than the demo's, so the tests stay quick.
pub fn job_file() -> JobFile {
    let mut file = parse_job_file(include_str!("../../../examples/job.toml")).unwrap();
    file.inner.inner_steps = 10;
    file.inner.batch_size = 8;
    file.inner.micro_batch = Some(8);
    file
}

/// A key made from one repeated byte: the same identity on every run.
pub fn fixed_key(byte: u8) -> Keypair {
    Keypair::ed25519_from_bytes([byte; 32]).unwrap()
}

/// The shout skill's train split as a JSON-lines dataset blob in the coordinator's store.
pub fn shout_dataset(coordinator: &Coordinator) -> ContentId {
    let (train, _) = swarmtune_trainer::builtin::skill::splits(7, 400, 10);
    let jsonl: String = train
        .iter()
        .map(|e| match e {
            swarmtune_trainer::data::Example::PromptCompletion { prompt, completion } => {
                format!(
                    "{}\n",
                    serde_json::json!({"prompt": prompt, "completion": completion})
                )
            }
            _ => unreachable!(),
        })
        .collect();
    coordinator.blobs().put_bytes(jsonl.as_bytes()).unwrap()
}

/// `owner` signs `file` (on the shout dataset) at `now` and submits it; returns the job id
/// and the signed spec. The job is left preparing.
pub fn submit_job(
    coordinator: &Coordinator,
    owner: &Keypair,
    file: &JobFile,
    now: u64,
) -> ([u8; 32], v1::Signed) {
    let dataset = shout_dataset(coordinator);
    let spec = file.to_spec(&coordinator.peer_id(), dataset).unwrap();
    let signed_spec = sign(owner, &spec, now).unwrap();
    let submitted = coordinator.submit(&signed_spec, now).unwrap();
    let job_id: [u8; 32] = submitted.job_id.clone().try_into().unwrap();
    (job_id, signed_spec)
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
    let coordinator = open_coordinator(dir, key);
    let (job_id, signed_spec) = submit_job(&coordinator, owner, file, 1_000);
    assert_eq!(
        coordinator.job(&job_id).unwrap().state.to_proto(),
        v1::JobState::Preparing
    );
    assert!(coordinator.needed_blobs(&job_id).unwrap().is_empty());
    coordinator.prepare(&job_id, 1_000).unwrap();
    (coordinator, job_id, signed_spec)
}

/// [`running_job_with`] the example job with shorter leases ([`job_file`]).
pub fn running_job(dir: &Path) -> (Coordinator, [u8; 32], v1::Signed) {
    running_job_with(dir, &job_file())
}

/// The built-in base written to `dir/volunteer-base`, where volunteers load it from.
pub fn volunteer_base(dir: &Path) -> PathBuf {
    let base_dir = dir.join("volunteer-base");
    std::fs::create_dir_all(&base_dir).unwrap();
    swarmtune_trainer::builtin::base::write_to(&base_dir).unwrap();
    base_dir
}

/// Asks for work with a job-agnostic request, as a node does.
pub fn ask(
    coordinator: &Coordinator,
    peer: &PeerId,
    now: u64,
) -> Result<LeaseAnswer, v1::ErrorReply> {
    let request = v1::RequestLease {
        job_id: Vec::new(),
        capabilities: Some(v1::PeerCapabilities {
            tokens_per_second: 2_000.0,
            ..Default::default()
        }),
    };
    coordinator.request_lease(peer, &request, now)
}

/// The lease of a granted answer.
pub fn granted(answer: LeaseAnswer) -> v1::Lease {
    match answer {
        LeaseAnswer::Granted(lease) => *lease,
        LeaseAnswer::NoWork(n) => panic!("no work: {n:?}"),
    }
}

/// `t` times `factor`.
pub fn scaled(t: &NamedTensors, factor: f32) -> NamedTensors {
    let mut out = t.clone();
    for v in out.values_mut() {
        v.data.iter_mut().for_each(|x| *x *= factor);
    }
    out
}

/// A blob the coordinator's store holds, by its wire id.
pub fn blob(coordinator: &Coordinator, id: &Option<v1::ContentId>) -> Vec<u8> {
    let id = ContentId::try_from(id.as_ref().unwrap()).unwrap();
    coordinator.blobs().read(&id).unwrap()
}

/// The tensors of a safetensors blob in the coordinator's store.
pub fn tensors(coordinator: &Coordinator, id: &Option<v1::ContentId>) -> NamedTensors {
    safetensors_from_bytes(&blob(coordinator, id), Path::new("blob"))
        .unwrap()
        .0
}

/// A lease's LoRA config, as the trainer takes it.
pub fn lease_lora(lease: &v1::Lease) -> LoraConfig {
    let l = lease.lora.clone().unwrap();
    LoraConfig {
        rank: l.rank as usize,
        alpha: l.alpha,
        dropout: l.dropout,
        target_modules: l.target_modules,
    }
}

/// The state a lease starts from: its start adapter with zero moments.
pub fn lease_start_state(coordinator: &Coordinator, lease: &v1::Lease) -> LoraState {
    LoraState::start(&Adapter {
        config: lease_lora(lease),
        tensors: tensors(coordinator, &lease.start_adapter),
    })
}

/// Delivers `envelope` for `lease_id` and takes it to a verdict: the receipt, the cheap
/// checks and, when the engine asks, challenges answered by `answer`.
pub fn judge(
    coordinator: &Coordinator,
    peer: &PeerId,
    envelope: &v1::Signed,
    lease_id: u64,
    now: u64,
    answer: impl FnMut(&v1::SegmentChallenge) -> v1::SegmentStates,
) -> v1::VerificationVerdict {
    match coordinator.submit_delta(peer, envelope, now).unwrap() {
        v1::delta_response::Body::Verdict(verdict) => verdict,
        v1::delta_response::Body::DeltaReceipt(_) => {
            let next = coordinator.verify(lease_id, true, now).unwrap();
            match follow(coordinator, lease_id, next, now, answer) {
                Some(verdict) => verdict,
                None => panic!("lease {lease_id} waits for its redundant twin"),
            }
        }
        other => panic!("{other:?}"),
    }
}

/// Takes what the engine decided about the delta of `lease_id` on: challenges answered by
/// `answer` until a verdict, or `None` when the delta waits for its redundant twin.
pub fn follow(
    coordinator: &Coordinator,
    lease_id: u64,
    mut next: Next,
    now: u64,
    mut answer: impl FnMut(&v1::SegmentChallenge) -> v1::SegmentStates,
) -> Option<v1::VerificationVerdict> {
    loop {
        next = match next {
            Next::Verdict(verdict) => return Some(*verdict),
            Next::AwaitingTwin => return None,
            Next::Challenge(challenge) => coordinator
                .answer_challenge(lease_id, &answer(&challenge), now)
                .unwrap(),
        };
    }
}

/// A volunteer in this process: its key and the built-in base, ready to train.
pub struct Volunteer {
    /// Its identity; signs its envelopes.
    pub key: Keypair,
    /// The base, on the autodiff device.
    pub model: CausalLm,
}

impl Volunteer {
    /// A volunteer signing as `key`, with the base in `base_dir` ([`volunteer_base`]).
    pub fn new(key: Keypair, base_dir: &Path) -> Self {
        Self {
            key,
            model: CausalLm::load(base_dir, &device()).unwrap().to_autodiff(),
        }
    }

    /// Its PeerId.
    pub fn peer(&self) -> PeerId {
        self.key.public().to_peer_id()
    }

    /// Trains `lease` on blobs read from the coordinator's store (what a real volunteer
    /// fetches over the network).
    pub fn train(&self, coordinator: &Coordinator, lease: &v1::Lease) -> TrainOutcome {
        let start = tensors(coordinator, &lease.start_adapter);
        self.train_from(coordinator, lease, start)
    }

    /// Trains `lease`'s shards, seed and settings, but from `start` instead of the lease's
    /// start adapter.
    pub fn train_from(
        &self,
        coordinator: &Coordinator,
        lease: &v1::Lease,
        start: NamedTensors,
    ) -> TrainOutcome {
        let shards: Vec<Shard> = lease
            .shards
            .iter()
            .map(|c| {
                let bytes = coordinator
                    .blobs()
                    .read(&ContentId::try_from(c).unwrap())
                    .unwrap();
                Shard::decode(&bytes, &ShardLimits::default()).unwrap()
            })
            .collect();
        let lora = lease_lora(lease);
        let trainer = LocalTrainer::new(
            &self.model,
            lora.clone(),
            Provenance::here("flex", threads()),
        )
        .unwrap();
        let data = LeaseData::new(&shards, self.model.config().vocab_size()).unwrap();
        let spec = swarmtune_coordinator::verify::train_spec(lease).unwrap();
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
            .unwrap()
    }

    /// The signed envelope for `outcome`, its delta blob put where the coordinator reads it.
    pub fn deliver(
        &self,
        coordinator: &Coordinator,
        lease: &v1::Lease,
        outcome: &TrainOutcome,
        now: u64,
    ) -> v1::Signed {
        self.deliver_delta(coordinator, lease, outcome, &outcome.delta, now)
    }

    /// The signed envelope for `outcome` with `delta` as its delta blob instead of the
    /// outcome's own.
    pub fn deliver_delta(
        &self,
        coordinator: &Coordinator,
        lease: &v1::Lease,
        outcome: &TrainOutcome,
        delta: &NamedTensors,
        now: u64,
    ) -> v1::Signed {
        let bytes = encode(delta, DeltaEncoding::Int8RowWise).unwrap();
        self.deliver_bytes(coordinator, lease, outcome, &bytes, now)
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
        let delta = coordinator.blobs().put_bytes(bytes).unwrap();
        let envelope = swarmtune_coordinator::verify::delta_envelope(
            lease,
            outcome,
            delta,
            bytes.len() as u64,
        );
        sign(&self.key, &envelope, now).unwrap()
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

/// A challenge's answer from `states` (one per commitment step): each segment's start and
/// end state as blobs in the coordinator's store, and the end state's hash as the claim.
pub fn answer_from(
    coordinator: &Coordinator,
    states: &[LoraState],
    challenge: &v1::SegmentChallenge,
) -> v1::SegmentStates {
    let state_at = |step: u64| states.iter().find(|s| s.step() == step).unwrap();
    let put = |state: &LoraState| {
        coordinator
            .blobs()
            .put_bytes(&state.to_bytes().unwrap())
            .unwrap()
            .to_proto()
    };
    v1::SegmentStates {
        lease_id: challenge.lease_id,
        states: challenge
            .segments
            .iter()
            .map(|s| v1::SegmentState {
                segment: Some(*s),
                start_state: Some(put(state_at(s.start_step))),
                claimed_end_hash: state_at(s.end_step).hash().as_bytes().to_vec(),
                end_state: Some(put(state_at(s.end_step))),
            })
            .collect(),
    }
}
