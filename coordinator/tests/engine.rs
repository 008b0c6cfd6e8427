//! The coordinator's engine run through whole rounds without a network: a job owner submits
//! `examples/job.toml` on the built-in base, three volunteers (real training with the
//! trainer, in this process) take leases, deliver signed deltas and answer challenges, and
//! every merged round publishes a better version. The network service carries exactly these
//! calls between processes.

mod common;

use common::{
    Volunteer, ask, granted, judge, running_job, running_job_as, running_job_with, volunteer_base,
};
use libp2p_identity::{Keypair, PeerId};
use swarmtune_coordinator::engine::{Next, hex};
use swarmtune_coordinator::leases::LeaseAnswer;
use swarmtune_coordinator::records::{JobRecord, JobState, LeaseRecord, LeaseState};
use swarmtune_coordinator::registry;
use swarmtune_coordinator::store::{JOBS, LEASES, REPUTATIONS, u64_key};
use swarmtune_coordinator::verify::Reputation;
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
                    // The last segment is always asked for, replayed or not.
                    let last = challenge.segments.last().unwrap();
                    assert_eq!(last.end_step, outcome.commitments.last().unwrap().step);
                    let states = v.answer(&coordinator, &outcome, &challenge);
                    match coordinator
                        .answer_challenge(lease.lease_id, &states, now)
                        .unwrap()
                    {
                        Next::Verdict(v) => *v,
                        other => panic!("{other:?}"),
                    }
                }
                Next::AwaitingTwin => panic!("no redundancy in this job"),
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
    // probability 0.5; a challenge replays one 5-step segment of a 10-step lease (it also asks
    // for the last segment, to tie the delta to the chain, but replays it only when it is the
    // one drawn). So of the 9 deltas' 90 steps, between 15 (probation only) and 45 (all) were
    // replayed.
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

/// One job at a time trains a module: a second job on a module whose job is preparing or
/// running is refused as a conflict that names the job in the way; once that job has
/// finished, the module can be trained again.
#[test]
fn a_second_job_on_a_running_module_is_refused_until_the_first_has_finished() {
    let dir = tempfile::tempdir().unwrap();
    let owner = Keypair::generate_ed25519();
    let (coordinator, job_id, _) = running_job_as(
        dir.path(),
        &common::job_file(),
        Keypair::generate_ed25519(),
        &owner,
    );
    let mut second = common::job_file();
    second.description = "another go at the same module".into();
    let dataset = common::shout_dataset(&coordinator);
    let spec = second.to_spec(&coordinator.peer_id(), dataset).unwrap();
    let signed = sign(&owner, &spec, 2_000).unwrap();
    let refused = coordinator.submit(&signed, 2_000).unwrap_err();
    assert_eq!(refused.code(), v1::ErrorCode::Conflict, "{refused:?}");
    assert!(
        refused.message.contains(&hex(&job_id)) && refused.message.contains("RUNNING"),
        "{}",
        refused.message
    );
    // Another module is no conflict.
    let mut other = second.clone();
    other.module = Some("whisper".into());
    let spec = other.to_spec(&coordinator.peer_id(), dataset).unwrap();
    let accepted = coordinator
        .submit(&sign(&owner, &spec, 2_000).unwrap(), 2_000)
        .unwrap();
    assert_eq!(accepted.state(), v1::JobState::Preparing);
    // A preparing job blocks its module too.
    let mut third = other.clone();
    third.description = "a third".into();
    let spec = third.to_spec(&coordinator.peer_id(), dataset).unwrap();
    let refused = coordinator
        .submit(&sign(&owner, &spec, 2_000).unwrap(), 2_000)
        .unwrap_err();
    assert_eq!(refused.code(), v1::ErrorCode::Conflict);
    assert!(refused.message.contains("PREPARING"), "{}", refused.message);

    // The first job finishes (here: its record says so): the same spec is accepted now.
    coordinator
        .store()
        .write(|w| {
            let mut job: JobRecord = w.get(JOBS, &job_id)?.unwrap();
            job.state = JobState::Completed;
            w.put(JOBS, &job_id, &job)
        })
        .unwrap();
    let again = coordinator.submit(&signed, 3_000).unwrap();
    assert_eq!(again.state(), v1::JobState::Preparing);
    assert_ne!(again.job_id, job_id.to_vec());
}

/// A job whose tick fails (here: its stored spec is damaged) is logged and skipped; the
/// other jobs' rounds still close.
#[test]
fn a_failing_job_does_not_stop_the_tick_for_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, job_id, _) = running_job(dir.path());
    let good = coordinator.job(&job_id).unwrap();
    // Sorted first, so the tick meets it before the good job.
    let broken = JobRecord {
        id: [0; 32],
        signed_spec: b"not a signed spec".to_vec(),
        module: "broken".into(),
        round_deadline_ms: 0,
        ..good.clone()
    };
    coordinator
        .store()
        .write(|w| w.put(JOBS, &broken.id, &broken))
        .unwrap();
    // Past the good job's deadline: its round (without deltas) is abandoned and the next
    // one opens.
    let later = good.round_deadline_ms + 1;
    assert_eq!(coordinator.tick(later).unwrap(), vec![job_id]);
    let job = coordinator.job(&job_id).unwrap();
    assert_eq!((job.state, job.round), (JobState::Running, 2));
    assert_eq!(coordinator.job(&[0; 32]).unwrap().state, JobState::Running);
}

/// A delta refused when it is delivered (an envelope that does not fit its lease) uses its
/// lease up: the lease is no longer active, cannot be renewed, and its unit goes to the next
/// volunteer. A delivery refused before it is judged (signed by another key) leaves the lease
/// as it was.
#[test]
fn a_delta_refused_at_delivery_gives_its_unit_back_and_a_forged_one_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, _, _) = running_job(dir.path());
    let (holder, other) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let peer = holder.public().to_peer_id();
    let lease = granted(ask(&coordinator, &peer, 2_000).unwrap());
    let envelope = v1::DeltaEnvelope {
        protocol_version: swarmtune_protocol::PROTOCOL_VERSION,
        job_id: lease.job_id.clone(),
        round: lease.round,
        lease_id: lease.lease_id,
        start_version: lease.start_version,
        base: lease.base.clone(),
        delta: Some(ContentId::of(b"delta").to_proto()),
        encoding: lease.delta_encoding,
        // Every count wrong: a bad envelope, the volunteer's fault.
        steps: 1,
        ..Default::default()
    };
    let lease_state = |id: u64| {
        coordinator
            .store()
            .read(|r| r.get::<LeaseRecord>(LEASES, &u64_key(id)))
            .unwrap()
            .unwrap()
            .state
    };
    let renew = v1::RenewLease {
        lease_id: lease.lease_id,
        steps_done: 1,
        last_loss: 2.0,
    };

    // Signed by someone else: refused before any verdict, the lease untouched, but the sender
    // (whom the transport authenticated) is held to account for a forgery.
    let forged = sign(&other, &envelope, 2_500).unwrap();
    let refused = coordinator.submit_delta(&peer, &forged, 2_500).unwrap_err();
    assert_eq!(refused.code(), v1::ErrorCode::BadSignature, "{refused:?}");
    assert_eq!(lease_state(lease.lease_id), LeaseState::Active);
    let standing: swarmtune_coordinator::verify::Reputation = coordinator
        .store()
        .read(|r| r.get(swarmtune_coordinator::store::REPUTATIONS, &peer.to_bytes()))
        .unwrap()
        .unwrap();
    assert_eq!(
        (standing.penalized, standing.banned),
        (1, false),
        "{standing:?}"
    );
    coordinator.renew_lease(&peer, &renew, 2_600).unwrap();

    // Signed by the holder: judged at once, and the lease is used up.
    let signed = sign(&holder, &envelope, 3_000).unwrap();
    match coordinator.submit_delta(&peer, &signed, 3_000).unwrap() {
        v1::delta_response::Body::Verdict(v) => {
            assert_eq!(v.outcome(), v1::VerdictOutcome::Rejected);
            assert_eq!(v.reason(), v1::RejectReason::BadStats, "{v:?}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(lease_state(lease.lease_id), LeaseState::Delivered);
    let refused = coordinator.renew_lease(&peer, &renew, 3_100).unwrap_err();
    assert_eq!(refused.code(), v1::ErrorCode::Conflict, "{refused:?}");
    // Its unit is free: three fresh volunteers take the round's three units, the refused one
    // among them, and the holder may ask again (it holds no live lease).
    let mut seeds: Vec<u64> = (0..3)
        .map(|_| granted(ask(&coordinator, &PeerId::random(), 3_200).unwrap()).seed)
        .collect();
    seeds.sort_unstable();
    assert!(seeds.contains(&lease.seed), "the unit was handed out again");
    match ask(&coordinator, &peer, 3_300).unwrap() {
        LeaseAnswer::NoWork(n) => assert_eq!(n.reason(), v1::NoWorkReason::RoundFull, "{n:?}"),
        LeaseAnswer::Granted(l) => panic!("{l:?}"),
    }
}

/// A volunteer banned while it is answering a challenge of another delta gets that delta's
/// verdict, PEER_BANNED, when its answer comes: the ban already dropped it.
#[test]
fn an_answer_after_the_volunteers_ban_gets_the_peer_banned_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, _, _) = running_job(dir.path());
    let volunteer = Volunteer::new(Keypair::generate_ed25519(), &volunteer_base(dir.path()));
    let peer = volunteer.peer();
    // An honest delta, challenged (the volunteer is on probation), not answered yet.
    let first = granted(ask(&coordinator, &peer, 2_000).unwrap());
    let honest = volunteer.train(&coordinator, &first);
    let envelope = volunteer.deliver(&coordinator, &first, &honest, 2_000);
    coordinator.submit_delta(&peer, &envelope, 2_000).unwrap();
    let Next::Challenge(pending) = coordinator.verify(first.lease_id, true, 2_000).unwrap() else {
        panic!("a volunteer on probation is challenged");
    };
    // Its next delta is its own honest work inflated by half: caught as cheating, banned.
    let second = granted(ask(&coordinator, &peer, 3_000).unwrap());
    let trained = volunteer.train(&coordinator, &second);
    let inflated = common::scaled(&trained.delta, 1.5);
    let envelope = volunteer.deliver_delta(&coordinator, &second, &trained, &inflated, 3_000);
    let verdict = judge(
        &coordinator,
        &peer,
        &envelope,
        second.lease_id,
        3_000,
        |c| volunteer.answer(&coordinator, &trained, c),
    );
    assert!(verdict.banned, "{verdict:?}");
    // Now the answer to the first challenge comes: a verdict, not an error.
    let states = volunteer.answer(&coordinator, &honest, &pending);
    match coordinator
        .answer_challenge(first.lease_id, &states, 4_000)
        .unwrap()
    {
        Next::Verdict(v) => {
            assert_eq!(
                (v.outcome(), v.reason()),
                (v1::VerdictOutcome::Rejected, v1::RejectReason::PeerBanned),
                "{v:?}"
            );
            assert!(v.banned && v.message.contains("banned"), "{v:?}");
        }
        other => panic!("{other:?}"),
    }
    // And the same again for the same envelope delivered twice.
    assert!(matches!(
        coordinator.verify(first.lease_id, true, 4_000).unwrap(),
        Next::Verdict(v) if v.reason() == v1::RejectReason::PeerBanned
    ));
}

/// The example job with every lease given to two volunteers (quorum 1: a unit and its
/// copy), and no challenges of their own: redundancy is the only check past the cheap ones.
fn redundant_job() -> swarmtune_coordinator::spec::JobFile {
    let mut file = common::job_file();
    file.rounds.quorum = 1;
    file.rounds.count = Some(1);
    file.verification.redundancy_fraction = 1.0;
    file.verification.challenge_probability = 0.0;
    file.verification.probation_leases = 0;
    file
}

/// Two honest volunteers on the same work, on the same provenance: the first waits for the
/// second, their chains and deltas are equal, both are accepted, and the round merges.
#[test]
fn two_honest_volunteers_on_a_redundant_pair_are_both_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, job_id, _) = running_job_with(dir.path(), &redundant_job());
    let base = volunteer_base(dir.path());
    let (a, b) = (
        Volunteer::new(Keypair::generate_ed25519(), &base),
        Volunteer::new(Keypair::generate_ed25519(), &base),
    );
    let la = granted(ask(&coordinator, &a.peer(), 2_000).unwrap());
    let lb = granted(ask(&coordinator, &b.peer(), 2_000).unwrap());
    assert_eq!(
        (la.seed, &la.shards),
        (lb.seed, &lb.shards),
        "the same work"
    );
    let (oa, ob) = (a.train(&coordinator, &la), b.train(&coordinator, &lb));

    let ea = a.deliver(&coordinator, &la, &oa, 3_000);
    coordinator.submit_delta(&a.peer(), &ea, 3_000).unwrap();
    let next = coordinator.verify(la.lease_id, true, 3_000).unwrap();
    assert!(matches!(next, Next::AwaitingTwin), "{next:?}");
    assert_eq!(
        coordinator.awaiting_twin().unwrap(),
        vec![(la.lease_id, a.peer())]
    );
    assert!(coordinator.verdict(la.lease_id).unwrap().is_none());
    // Its delta waiting counts toward the quorum, but the twin's delta is on its way.
    coordinator
        .submit_delta(&b.peer(), &b.deliver(&coordinator, &lb, &ob, 3_000), 3_000)
        .unwrap();
    assert!(coordinator.tick(3_100).unwrap().is_empty());

    let next = coordinator.verify(lb.lease_id, true, 3_200).unwrap();
    let Next::Verdict(vb) = next else {
        panic!("{next:?}")
    };
    let va = coordinator.verdict(la.lease_id).unwrap().unwrap();
    for (v, twin) in [(&*vb, la.lease_id), (&va, lb.lease_id)] {
        assert_eq!(v.outcome(), v1::VerdictOutcome::Accepted, "{v:?}");
        assert!(
            v.message
                .contains(&format!("agrees with its redundant twin (lease {twin})")),
            "{v:?}"
        );
    }
    assert!(coordinator.awaiting_twin().unwrap().is_empty());
    assert_eq!(coordinator.tick(3_300).unwrap(), vec![job_id]);
    let job = coordinator.job(&job_id).unwrap();
    assert_eq!((job.state, job.rounds_merged), (JobState::Completed, 1));
}

/// An honest volunteer and a cheater on the same work: the cheater trains honestly but sends
/// its delta times 1.5, which passes the cheap checks. The deltas disagree, so both are
/// challenged as a tie-break; the honest one passes, the cheater's delta is not the start
/// minus its chain's final state: it is rejected and banned, and the honest one accepted.
#[test]
fn an_honest_and_a_cheating_twin_the_cheater_is_rejected_and_banned() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, _, _) = running_job_with(dir.path(), &redundant_job());
    let base = volunteer_base(dir.path());
    let (honest, cheater) = (
        Volunteer::new(Keypair::generate_ed25519(), &base),
        Volunteer::new(Keypair::generate_ed25519(), &base),
    );
    let lh = granted(ask(&coordinator, &honest.peer(), 2_000).unwrap());
    let lc = granted(ask(&coordinator, &cheater.peer(), 2_000).unwrap());
    let (oh, oc) = (
        honest.train(&coordinator, &lh),
        cheater.train(&coordinator, &lc),
    );

    let eh = honest.deliver(&coordinator, &lh, &oh, 3_000);
    coordinator
        .submit_delta(&honest.peer(), &eh, 3_000)
        .unwrap();
    assert!(matches!(
        coordinator.verify(lh.lease_id, true, 3_000).unwrap(),
        Next::AwaitingTwin
    ));
    let inflated = common::scaled(&oc.delta, 1.5);
    let ec = cheater.deliver_delta(&coordinator, &lc, &oc, &inflated, 3_000);
    coordinator
        .submit_delta(&cheater.peer(), &ec, 3_000)
        .unwrap();
    // Its cheap checks pass; the comparison with its twin does not: a tie-break for both.
    let Next::Challenge(for_cheater) = coordinator.verify(lc.lease_id, true, 3_100).unwrap() else {
        panic!("the disagreement is settled by a tie-break");
    };
    let open = coordinator
        .store()
        .read(swarmtune_coordinator::status::open_challenges)
        .unwrap();
    let for_honest = open
        .iter()
        .find(|(lease, _, _)| *lease == lh.lease_id)
        .map(|(_, peer, challenge)| {
            assert_eq!(peer, &honest.peer().to_bytes());
            challenge.clone()
        })
        .expect("the honest twin is challenged too");
    for challenge in [&for_cheater, &for_honest] {
        let last = challenge.segments.last().unwrap();
        assert_eq!(last.end_step, oh.commitments.last().unwrap().step);
    }
    let cheater_verdict = common::follow(
        &coordinator,
        lc.lease_id,
        coordinator
            .answer_challenge(
                lc.lease_id,
                &cheater.answer(&coordinator, &oc, &for_cheater),
                3_200,
            )
            .unwrap(),
        3_200,
        |c| cheater.answer(&coordinator, &oc, c),
    )
    .unwrap();
    assert_eq!(
        (cheater_verdict.outcome(), cheater_verdict.reason()),
        (
            v1::VerdictOutcome::Rejected,
            v1::RejectReason::ChallengeEndMismatch
        ),
        "{cheater_verdict:?}"
    );
    assert!(cheater_verdict.banned, "{cheater_verdict:?}");
    let honest_verdict = common::follow(
        &coordinator,
        lh.lease_id,
        coordinator
            .answer_challenge(
                lh.lease_id,
                &honest.answer(&coordinator, &oh, &for_honest),
                3_300,
            )
            .unwrap(),
        3_300,
        |c| honest.answer(&coordinator, &oh, c),
    )
    .unwrap();
    assert_eq!(
        honest_verdict.outcome(),
        v1::VerdictOutcome::Accepted,
        "{honest_verdict:?}"
    );
    assert!(
        honest_verdict.message.contains("failed the tie-break"),
        "{honest_verdict:?}"
    );
    let standing = |peer: &PeerId| {
        coordinator
            .store()
            .read(|r| r.get::<Reputation>(REPUTATIONS, &peer.to_bytes()))
            .unwrap()
            .unwrap()
    };
    assert!(standing(&cheater.peer()).banned);
    let h = standing(&honest.peer());
    assert!(!h.banned && h.penalized == 0 && h.accepted == 1, "{h:?}");
    let refused = ask(&coordinator, &cheater.peer(), 3_400).unwrap_err();
    assert_eq!(refused.code(), v1::ErrorCode::Banned);
}
