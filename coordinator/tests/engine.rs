//! The coordinator's engine run through whole rounds without a network: a job owner submits
//! `examples/job.toml` on the built-in base, three volunteers (real training with the
//! trainer, in this process) take leases, deliver signed deltas and answer challenges, and
//! every merged round publishes a better version. The network service carries exactly these
//! calls between processes.

mod common;

use common::{Volunteer, ask, granted, running_job, volunteer_base};
use libp2p_identity::{Keypair, PeerId};
use swarmtune_coordinator::engine::Next;
use swarmtune_coordinator::records::JobState;
use swarmtune_coordinator::registry;
use swarmtune_protocol::signed::sign;
use swarmtune_protocol::{ContentId, v1};

#[test]
fn three_volunteers_run_three_rounds_and_every_version_is_better_than_its_parent() {
    let dir = tempfile::tempdir().unwrap();
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

    let base_dir = volunteer_base(dir.path());
    let volunteers: Vec<Volunteer> = (0..3)
        .map(|_| Volunteer::new(Keypair::generate_ed25519(), &base_dir))
        .collect();
    for round in 1..=3u64 {
        let start_version = coordinator.job(&job_id).unwrap().latest_version;
        for v in &volunteers {
            now += 1_000;
            let lease = granted(ask(&coordinator, &v.peer(), now).unwrap());
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
    // Each volunteer's first delta is always challenged (probation), later ones with
    // probability 0.5; a challenge replays one 5-step segment of a 10-step lease. So of the
    // 9 deltas' 90 steps, between 15 (probation only) and 45 (all) were replayed.
    let overhead = coordinator.verification_overhead(&job_id).unwrap();
    assert!(
        (15.0 / 90.0 - 1e-9..=45.0 / 90.0 + 1e-9).contains(&overhead),
        "replayed share {overhead}"
    );
}

#[test]
fn a_lapsed_lease_goes_to_another_volunteer_and_its_late_delta_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, _job_id, _) = running_job(dir.path());
    let (slow, quick) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let lease = granted(ask(&coordinator, &slow.public().to_peer_id(), 2_000).unwrap());
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
        .map(|_| granted(ask(&coordinator, &PeerId::random(), later).unwrap()).seed)
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
