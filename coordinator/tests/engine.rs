//! The coordinator's engine run through whole rounds without a network: a job owner submits
//! `examples/job.toml` on the built-in base, three volunteers (real training with the
//! trainer, in this process) take leases, deliver signed deltas and answer challenges, and
//! every merged round publishes a better version. The network service carries exactly these
//! calls between processes.

use std::sync::atomic::AtomicBool;

use libp2p_identity::{Keypair, PeerId};
use swarmtune_coordinator::engine::{Config, Coordinator, Next};
use swarmtune_coordinator::leases::LeaseAnswer;
use swarmtune_coordinator::records::JobState;
use swarmtune_coordinator::registry;
use swarmtune_coordinator::spec::parse_job_file;
use swarmtune_protocol::signed::sign;
use swarmtune_protocol::{ContentId, v1};
use swarmtune_trainer::checkpoint::safetensors_from_bytes;
use swarmtune_trainer::data::{Shard, ShardLimits};
use swarmtune_trainer::delta::{DeltaEncoding, encode};
use swarmtune_trainer::device::DeviceKind;
use swarmtune_trainer::lora::{Adapter, LoraConfig};
use swarmtune_trainer::model::CausalLm;
use swarmtune_trainer::train::{LeaseData, LocalTrainer, Provenance, TrainOutcome};

/// A volunteer in this process: its key and the built-in base, ready to train.
struct Volunteer {
    key: Keypair,
    model: CausalLm,
}

impl Volunteer {
    fn peer(&self) -> PeerId {
        self.key.public().to_peer_id()
    }

    /// Trains `lease` on blobs read from the coordinator's store (what a real volunteer
    /// fetches over the network).
    fn train(&self, coordinator: &Coordinator, lease: &v1::Lease) -> TrainOutcome {
        let blobs = coordinator.blobs();
        let id = |c: &Option<v1::ContentId>| ContentId::try_from(c.as_ref().unwrap()).unwrap();
        let start = safetensors_from_bytes(
            &blobs.read(&id(&lease.start_adapter)).unwrap(),
            std::path::Path::new("start"),
        )
        .unwrap()
        .0;
        let shards: Vec<Shard> = lease
            .shards
            .iter()
            .map(|c| {
                let bytes = blobs.read(&ContentId::try_from(c).unwrap()).unwrap();
                Shard::decode(&bytes, &ShardLimits::default()).unwrap()
            })
            .collect();
        let l = lease.lora.clone().unwrap();
        let lora = LoraConfig {
            rank: l.rank as usize,
            alpha: l.alpha,
            dropout: l.dropout,
            target_modules: l.target_modules,
        };
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
    fn deliver(
        &self,
        coordinator: &Coordinator,
        lease: &v1::Lease,
        outcome: &TrainOutcome,
        now: u64,
    ) -> v1::Signed {
        let bytes = encode(&outcome.delta, DeltaEncoding::Int8RowWise).unwrap();
        let delta = coordinator.blobs().put_bytes(&bytes).unwrap();
        let envelope = swarmtune_coordinator::verify::delta_envelope(
            lease,
            outcome,
            delta,
            bytes.len() as u64,
        );
        sign(&self.key, &envelope, now).unwrap()
    }

    /// Answers a challenge from the states kept while training.
    fn answer(
        &self,
        coordinator: &Coordinator,
        outcome: &TrainOutcome,
        challenge: &v1::SegmentChallenge,
    ) -> v1::SegmentStates {
        let state_at = |step: u64| {
            let state = outcome.snapshots.iter().find(|s| s.step() == step).unwrap();
            coordinator
                .blobs()
                .put_bytes(&state.to_bytes().unwrap())
                .unwrap()
        };
        let hash_at = |step: u64| {
            outcome
                .commitments
                .iter()
                .find(|c| c.step == step)
                .unwrap()
                .state_hash
                .to_vec()
        };
        v1::SegmentStates {
            lease_id: challenge.lease_id,
            states: challenge
                .segments
                .iter()
                .map(|s| v1::SegmentState {
                    segment: Some(*s),
                    start_state: Some(state_at(s.start_step).to_proto()),
                    claimed_end_hash: hash_at(s.end_step),
                    end_state: Some(state_at(s.end_step).to_proto()),
                })
                .collect(),
        }
    }
}

fn threads() -> usize {
    rayon::current_num_threads()
}

/// A coordinator in `dir` running the example job (shorter leases) on the shout skill's train
/// split, prepared at time 1000; returns it, the job id and the signed spec.
fn running_job(dir: &std::path::Path) -> (Coordinator, [u8; 32], v1::Signed) {
    let coordinator = Coordinator::open(
        Config::new(dir.join("coordinator")),
        Keypair::generate_ed25519(),
        DeviceKind::Cpu.device().unwrap(),
        "flex",
        threads(),
    )
    .unwrap();
    let owner = Keypair::generate_ed25519();
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
    let dataset = coordinator.blobs().put_bytes(jsonl.as_bytes()).unwrap();
    let mut file = parse_job_file(include_str!("../../examples/job.toml")).unwrap();
    // Shorter leases than the demo's, so the tests stay quick.
    file.inner.inner_steps = 10;
    file.inner.batch_size = 8;
    file.inner.micro_batch = Some(8);
    let spec = file.to_spec(&coordinator.peer_id(), dataset).unwrap();
    let signed_spec = sign(&owner, &spec, 1_000).unwrap();
    let submitted = coordinator.submit(&signed_spec, 1_000).unwrap();
    assert_eq!(submitted.state(), v1::JobState::Preparing);
    let job_id: [u8; 32] = submitted.job_id.clone().try_into().unwrap();
    assert!(coordinator.needed_blobs(&job_id).unwrap().is_empty());
    coordinator.prepare(&job_id, 1_000).unwrap();
    (coordinator, job_id, signed_spec)
}

fn ask(coordinator: &Coordinator, peer: &PeerId, now: u64) -> LeaseAnswer {
    let request = v1::RequestLease {
        job_id: Vec::new(),
        capabilities: Some(v1::PeerCapabilities {
            tokens_per_second: 2_000.0,
            ..Default::default()
        }),
    };
    coordinator.request_lease(peer, &request, now).unwrap()
}

fn granted(answer: LeaseAnswer) -> v1::Lease {
    match answer {
        LeaseAnswer::Granted(lease) => *lease,
        LeaseAnswer::NoWork(n) => panic!("no work: {n:?}"),
    }
}

#[test]
fn three_volunteers_run_three_rounds_and_every_version_is_better_than_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let device = DeviceKind::Cpu.device().unwrap();
    let (coordinator, job_id, signed_spec) = running_job(dir.path());
    let mut now = 1_000;
    // A retry of the same envelope is the same job.
    assert_eq!(
        coordinator.submit(&signed_spec, now).unwrap().job_id,
        job_id.to_vec()
    );
    let job = coordinator.job(&job_id).unwrap();
    assert_eq!(
        (job.state, job.round, job.latest_version),
        (JobState::Running, 1, 1)
    );

    let base_dir = dir.path().join("volunteer-base");
    std::fs::create_dir_all(&base_dir).unwrap();
    swarmtune_trainer::builtin::base::write_to(&base_dir).unwrap();
    let volunteers: Vec<Volunteer> = (0..3)
        .map(|_| Volunteer {
            key: Keypair::generate_ed25519(),
            model: CausalLm::load(&base_dir, &device).unwrap().to_autodiff(),
        })
        .collect();
    for round in 1..=3u64 {
        let start_version = coordinator.job(&job_id).unwrap().latest_version;
        for v in &volunteers {
            now += 1_000;
            let lease = granted(ask(&coordinator, &v.peer(), now));
            assert_eq!((lease.round, lease.start_version), (round, start_version));
            let outcome = v.train(&coordinator, &lease);
            let envelope = v.deliver(&coordinator, &lease, &outcome, now);
            let answer = coordinator.submit_delta(&v.peer(), &envelope, now).unwrap();
            assert!(
                matches!(answer, v1::delta_response::Body::DeltaReceipt(_)),
                "{answer:?}"
            );
            let verdict = match coordinator.verify(lease.lease_id, true, now).unwrap() {
                Next::Verdict(v) => *v,
                Next::Challenge(challenge) => {
                    let states = v.answer(&coordinator, &outcome, &challenge);
                    coordinator
                        .answer_challenge(lease.lease_id, &states, now)
                        .unwrap()
                }
            };
            assert_eq!(
                verdict.outcome(),
                v1::VerdictOutcome::Accepted,
                "{verdict:?}"
            );
            // The same envelope again gets the same verdict.
            match coordinator.submit_delta(&v.peer(), &envelope, now).unwrap() {
                v1::delta_response::Body::Verdict(again) => assert_eq!(again, verdict),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(coordinator.tick(now).unwrap(), vec![job_id]);
    }

    let job = coordinator.job(&job_id).unwrap();
    assert_eq!((job.state, job.rounds_merged), (JobState::Completed, 3));
    let history = coordinator
        .store()
        .read(|r| registry::history(r, "shout", 0, 10))
        .unwrap();
    let losses: Vec<(u64, f64)> = history
        .versions
        .iter()
        .rev()
        .map(|s| (s.version, s.metrics.unwrap().eval_loss))
        .collect();
    // The first version is the base; a merge the gate refused publishes nothing.
    assert_eq!(losses.len() as u64, job.latest_version, "{losses:?}");
    assert!(
        losses.len() >= 3,
        "at most one of three merges may be gated out: {losses:?}"
    );
    for pair in losses.windows(2) {
        assert!(
            pair[1].1 < pair[0].1,
            "version {} is not better than its parent: {losses:?}",
            pair[1].0
        );
    }
    // Every contributor of the last version is one of the volunteers.
    let last = &history.versions[0];
    assert_eq!(last.contributors, 3);
    let overhead = coordinator.verification_overhead(&job_id).unwrap();
    assert!(
        overhead > 0.0 && overhead < 0.5,
        "replayed share {overhead}"
    );
}

#[test]
fn a_lapsed_lease_goes_to_another_volunteer_and_its_late_delta_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, _job_id, _) = running_job(dir.path());
    let (slow, quick) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let lease = granted(ask(&coordinator, &slow.public().to_peer_id(), 2_000));
    // Renewing works while the lease lives, and only for its holder.
    let renew = v1::RenewLease {
        lease_id: lease.lease_id,
        steps_done: 1,
        last_loss: 2.0,
    };
    coordinator
        .renew_lease(&slow.public().to_peer_id(), &renew, 3_000)
        .unwrap();
    let stranger = coordinator
        .renew_lease(&quick.public().to_peer_id(), &renew, 3_000)
        .unwrap_err();
    assert_eq!(stranger.code(), v1::ErrorCode::Unauthorized);

    // Nobody renews until long after the lease's lifetime: the next tick frees its unit.
    let renewed_until = coordinator
        .renew_lease(&slow.public().to_peer_id(), &renew, 4_000)
        .unwrap()
        .expires_at_unix_ms;
    let later = renewed_until + 1;
    coordinator.tick(later).unwrap();
    let late_renew = coordinator
        .renew_lease(&slow.public().to_peer_id(), &renew, later)
        .unwrap_err();
    assert_eq!(late_renew.code(), v1::ErrorCode::LeaseExpired);
    // Three units, so the quick volunteer may get the freed one or another; all three can be
    // taken again by fresh volunteers.
    let mut seeds: Vec<u64> = (0..3)
        .map(|_| granted(ask(&coordinator, &PeerId::random(), later)).seed)
        .collect();
    seeds.sort_unstable();
    assert!(
        seeds.contains(&lease.seed),
        "the lapsed unit was handed out again"
    );

    // The slow volunteer's delta, when it finally comes, is refused with the reason.
    let envelope = v1::DeltaEnvelope {
        protocol_version: swarmtune_protocol::PROTOCOL_VERSION,
        job_id: lease.job_id.clone(),
        round: lease.round,
        lease_id: lease.lease_id,
        delta: Some(ContentId::of(b"delta").to_proto()),
        ..Default::default()
    };
    let signed = sign(&slow, &envelope, later).unwrap();
    match coordinator
        .submit_delta(&slow.public().to_peer_id(), &signed, later)
        .unwrap()
    {
        v1::delta_response::Body::Verdict(v) => {
            assert_eq!(v.outcome(), v1::VerdictOutcome::Rejected);
            assert_eq!(v.reason(), v1::RejectReason::Late, "{v:?}");
        }
        other => panic!("{other:?}"),
    }
    // Another envelope for the same lease is a conflict, and nobody else may deliver it.
    let other = sign(
        &slow,
        &v1::DeltaEnvelope {
            steps: 9,
            ..envelope.clone()
        },
        later,
    )
    .unwrap();
    let conflict = coordinator
        .submit_delta(&slow.public().to_peer_id(), &other, later)
        .unwrap_err();
    assert_eq!(conflict.code(), v1::ErrorCode::Conflict);
    let forged = sign(&quick, &envelope, later).unwrap();
    let not_theirs = coordinator
        .submit_delta(&quick.public().to_peer_id(), &forged, later)
        .unwrap_err();
    assert_eq!(not_theirs.code(), v1::ErrorCode::Unauthorized);
    // An envelope signed by one peer and sent by another is refused before anything else.
    let relayed = coordinator
        .submit_delta(&quick.public().to_peer_id(), &signed, later)
        .unwrap_err();
    assert_ne!(relayed.code(), v1::ErrorCode::Internal);
}
