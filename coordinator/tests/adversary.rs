//! Adversarial volunteers (issue 6): honest volunteers and one attacker of each kind work on
//! the same job through the engine's real paths — leases, envelopes signed by the attacker's
//! own key, delta blobs in the store, the cheap checks, and segment challenges answered as
//! well as a cheater can. No attacker's delta is merged, every attacker ends up banned, no
//! honest volunteer is rejected, and the job still publishes better versions.
//!
//! Every key is fixed, so the job id and with it every seed and every number of the run are
//! the same each time; beyond that, the outcomes hold by construction where the engine allows:
//!
//! - A lease is 4 steps with a commitment every 2, and a challenge asks for 2 segments: a
//!   volunteer on probation (no delta accepted yet, which is every attacker) has its whole
//!   lease replayed, so a made-up or borrowed commitment chain is always caught.
//! - `max_delta_norm` sits between the honest norms and 100 times them (an AdamW step moves
//!   each weight by about the learning rate, so honest norms hardly vary; the test checks the
//!   margin).
//! - A delta is tied to its commitment chain: every challenge asks for the last segment, and
//!   the delta must be the lease's start minus that segment's (committed) end state. The
//!   sign-flipped attacker trains honestly and answers every challenge with its genuine
//!   states; from a version whose LoRA `B` is not zero, minus an honest delta raises its
//!   lease's probe loss far beyond the tolerance (by about 1 nat here), so the probe rejects
//!   it in round 2. From the fresh adapter (`B = 0`) the flip keeps the second-order term
//!   `ΔB·ΔA` of the update and even lowers the probe loss, and only the tie to the chain
//!   catches it: the test at the end.

mod common;

use common::{
    Volunteer, answer_from, ask, fixed_key, granted, judge, lease_start_state, running_job_as,
    scaled, tensors, volunteer_base,
};
use libp2p_identity::PeerId;
use prost::Message;
use rand::{Rng, SeedableRng};
use swarmtune_coordinator::adversary;
use swarmtune_coordinator::records::{DeltaRecord, DeltaStatus, JobState};
use swarmtune_coordinator::registry;
use swarmtune_coordinator::spec::JobFile;
use swarmtune_coordinator::store::{DELTAS, REPUTATIONS};
use swarmtune_coordinator::verify::{Reputation, delta_envelope};
use swarmtune_protocol::signed::sign;
use swarmtune_protocol::v1::{self, RejectReason};
use swarmtune_trainer::tensors::{self, NamedTensors};
use swarmtune_trainer::train::{LoraState, TrainOutcome, TrainStats};

/// Steps per lease, and the commitment interval: two segments, both replayed on probation.
const INNER_STEPS: u32 = 4;
const COMMIT_EVERY: u32 = 2;
/// The job's delta norm bound: honest deltas of this job measure about a tenth of it (the
/// test checks a margin of 3 both ways), so the scaled attacker's are about 10 times over.
const MAX_DELTA_NORM: f64 = 30.0;

/// The example job, shortened and checked harder, as the module comment explains.
fn job_file() -> JobFile {
    let mut file = common::job_file();
    file.inner.inner_steps = INNER_STEPS;
    file.inner.commit_every = COMMIT_EVERY;
    file.rounds.count = Some(2);
    file.rounds.quorum = 3;
    let v = &mut file.verification;
    v.segments_per_challenge = INNER_STEPS / COMMIT_EVERY;
    v.probation_leases = 1;
    v.challenge_probability = 0.0;
    v.max_delta_norm = MAX_DELTA_NORM;
    file
}

/// The kinds of attackers.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Attack {
    /// Trains honestly, sends its delta times 100, and answers challenges with its genuine
    /// states.
    Scaled,
    /// Trains honestly, sends minus its delta, and answers challenges with its genuine states.
    SignFlipped,
    /// Does not train: gaussian noise of an honest norm, with a commitment chain of made-up
    /// states leading to it (so it can answer any challenge with states that match it).
    Random,
    /// Does not train: another volunteer's delta blob and envelope, re-signed for its lease,
    /// answering challenges with that volunteer's own states.
    Copied,
    /// Trains from the previous module version: first sent as is, then claiming the version
    /// it started from, then with its first commitment forged to the lease's start state.
    Stale,
    /// Sends bytes that are no delta.
    Garbage,
}

impl Attack {
    /// The reasons a rejection of attempt `attempt` may give.
    fn sensible(self, attempt: usize) -> &'static [RejectReason] {
        use RejectReason as R;
        match (self, attempt) {
            (Self::Scaled, _) => &[R::NormTooLarge],
            // From a trained version the flip fails the probe; from the fresh adapter it may
            // not, and the last segment's end state shows the delta is not its chain's.
            (Self::SignFlipped, _) => &[R::ProbeLossRegression, R::ChallengeEndMismatch],
            // Noise may already fail the probe; if not, replaying any segment of the made-up
            // chain misses its next hash.
            (Self::Random, _) => &[R::ProbeLossRegression, R::ChallengeEndMismatch],
            // The copy may fail the probe on this lease's batch; if not, the other peer's states
            // replayed on this lease's data miss the other peer's hashes.
            (Self::Copied, _) => &[R::ProbeLossRegression, R::ChallengeEndMismatch],
            (Self::Stale, 0) => &[R::BadCommitments],
            (Self::Stale, 1) => &[R::LeaseMismatch],
            (Self::Stale, _) => &[R::ProbeLossRegression, R::ChallengeEndMismatch],
            (Self::Garbage, _) => &[R::MalformedDelta],
        }
    }
}

/// What the attackers of a round may use: an honest volunteer's accepted work.
struct Victim {
    outcome: TrainOutcome,
    envelope: v1::DeltaEnvelope,
}

/// The test's world: the coordinator and its clock.
struct World {
    coordinator: swarmtune_coordinator::engine::Coordinator,
    now: u64,
}

impl World {
    fn tick(&mut self) -> u64 {
        self.now += 1_000;
        self.now
    }

    /// `v` takes a lease, trains it honestly and gets it accepted.
    fn honest_lease(&mut self, v: &Volunteer) -> (v1::Lease, Victim) {
        let now = self.tick();
        let c = &self.coordinator;
        let lease = granted(ask(c, &v.peer(), now).unwrap());
        let outcome = v.train(c, &lease);
        let signed = v.deliver(c, &lease, &outcome, now);
        let verdict = judge(c, &v.peer(), &signed, lease.lease_id, now, |ch| {
            v.answer(c, &outcome, ch)
        });
        assert_eq!(
            verdict.outcome(),
            v1::VerdictOutcome::Accepted,
            "honest volunteer rejected: {verdict:?}"
        );
        let envelope = v1::DeltaEnvelope::decode(signed.payload.as_slice()).unwrap();
        (lease, Victim { outcome, envelope })
    }

    /// `attacker` attacks with a new lease each time until it is banned; returns its verdicts.
    fn attack_until_banned(
        &mut self,
        attacker: &Volunteer,
        attack: Attack,
        ctx: &Context,
    ) -> Vec<v1::VerificationVerdict> {
        let mut verdicts = Vec::new();
        // Three penalized rejections in a row ban a new peer (0.5 halved below 0.1).
        for attempt in 0..3 {
            let now = self.tick();
            let c = &self.coordinator;
            let lease = granted(ask(c, &attacker.peer(), now).unwrap());
            let verdict = attack_once(c, attacker, attack, attempt, &lease, ctx, now);
            assert_eq!(
                verdict.outcome(),
                v1::VerdictOutcome::Rejected,
                "{attack:?} attempt {attempt} was not rejected: {verdict:?}"
            );
            assert!(
                attack.sensible(attempt).contains(&verdict.reason()),
                "{attack:?} attempt {attempt} rejected for {:?}: {verdict:?}",
                verdict.reason()
            );
            let banned = verdict.banned;
            verdicts.push(verdict);
            if banned {
                return verdicts;
            }
        }
        panic!("{attack:?} is not banned after three rejections: {verdicts:#?}");
    }
}

/// What attackers need besides their lease.
struct Context {
    /// An honest volunteer's accepted work of this round.
    victim: Victim,
    /// The adapter of the module version before this round's, for the stale attacker.
    previous_adapter: Option<NamedTensors>,
}

/// One attack on `lease`, taken to its verdict.
fn attack_once(
    c: &swarmtune_coordinator::engine::Coordinator,
    a: &Volunteer,
    attack: Attack,
    attempt: usize,
    lease: &v1::Lease,
    ctx: &Context,
    now: u64,
) -> v1::VerificationVerdict {
    let peer = a.peer();
    let id = lease.lease_id;
    match attack {
        Attack::Scaled | Attack::SignFlipped => {
            let outcome = a.train(c, lease);
            let factor = if attack == Attack::Scaled {
                100.0
            } else {
                -1.0
            };
            let signed = a.deliver_delta(c, lease, &outcome, &scaled(&outcome.delta, factor), now);
            judge(c, &peer, &signed, id, now, |ch| a.answer(c, &outcome, ch))
        }
        Attack::Random => {
            let start = lease_start_state(c, lease);
            let norm = tensors::norm(&ctx.victim.outcome.delta);
            let noise = gaussian_like(&start.params, norm, id);
            let fake = made_up_outcome(&start, &noise, &ctx.victim.outcome.stats);
            let signed = a.deliver(c, lease, &fake, now);
            judge(c, &peer, &signed, id, now, |ch| {
                answer_from(c, &fake.snapshots, ch)
            })
        }
        Attack::Copied => {
            let envelope = v1::DeltaEnvelope {
                round: lease.round,
                lease_id: id,
                ..ctx.victim.envelope.clone()
            };
            let signed = sign(&a.key, &envelope, now).unwrap();
            judge(c, &peer, &signed, id, now, |ch| {
                answer_from(c, &ctx.victim.outcome.snapshots, ch)
            })
        }
        Attack::Stale => {
            let previous = ctx.previous_adapter.clone().expect("a previous version");
            let outcome = a.train_from(c, lease, previous);
            let bytes = swarmtune_trainer::delta::encode(
                &outcome.delta,
                swarmtune_trainer::delta::DeltaEncoding::Int8RowWise,
            )
            .unwrap();
            let blob = c.blobs().put_bytes(&bytes).unwrap();
            let mut envelope = delta_envelope(lease, &outcome, blob, bytes.len() as u64);
            let start = lease_start_state(c, lease);
            let mut states = outcome.snapshots.clone();
            match attempt {
                // As trained: its chain starts from the old version.
                0 => {}
                // Honest about where it started.
                1 => envelope.start_version = lease.start_version - 1,
                // The chain's first hash forged to the lease's start, answered with the lease's
                // start state there and the genuine (stale) states after it.
                _ => {
                    envelope.commitments[0].state_hash = start.hash().as_bytes().to_vec();
                    states[0] = start;
                }
            }
            let signed = sign(&a.key, &envelope, now).unwrap();
            judge(c, &peer, &signed, id, now, |ch| answer_from(c, &states, ch))
        }
        Attack::Garbage => {
            let start = lease_start_state(c, lease);
            let fake = made_up_outcome(
                &start,
                &scaled(&start.params, 0.0),
                &ctx.victim.outcome.stats,
            );
            let len = ctx.victim.envelope.delta_bytes as usize;
            let mut rng = rand::rngs::StdRng::seed_from_u64(id);
            let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let signed = a.deliver_bytes(c, lease, &fake, &bytes, now);
            judge(c, &peer, &signed, id, now, |ch| {
                answer_from(c, &fake.snapshots, ch)
            })
        }
    }
}

/// Gaussian noise shaped like `layout`, scaled to norm `norm`.
fn gaussian_like(layout: &NamedTensors, norm: f64, seed: u64) -> NamedTensors {
    adversary::gaussian_like(layout, norm, &mut rand::rngs::StdRng::seed_from_u64(seed))
}

/// A lease's outcome made up without training: states moving in a straight line from `start`
/// to `start − delta`, one at every commitment step; statistics copied from an honest lease.
fn made_up_outcome(start: &LoraState, delta: &NamedTensors, stats: &TrainStats) -> TrainOutcome {
    let steps: Vec<u64> = (0..=u64::from(INNER_STEPS))
        .step_by(COMMIT_EVERY as usize)
        .collect();
    adversary::sim::made_up_outcome(start, delta, &steps, stats)
}

fn reputation(c: &swarmtune_coordinator::engine::Coordinator, peer: &PeerId) -> Reputation {
    c.store()
        .read(|r| r.get::<Reputation>(REPUTATIONS, &peer.to_bytes()))
        .unwrap()
        .unwrap_or_default()
}

/// A running job with fixed keys, its coordinator's clock, and `honest` plus one volunteer
/// per attack, all with fixed keys.
fn setup(
    dir: &std::path::Path,
    honest: u8,
    attacks: &[Attack],
) -> (World, [u8; 32], Vec<Volunteer>, Vec<Volunteer>) {
    let (coordinator, job_id, _) = running_job_as(dir, &job_file(), fixed_key(1), &fixed_key(2));
    let base_dir = volunteer_base(dir);
    let honest = (0..honest)
        .map(|i| Volunteer::new(fixed_key(10 + i), &base_dir))
        .collect();
    let attackers = (0..attacks.len() as u8)
        .map(|i| Volunteer::new(fixed_key(20 + i), &base_dir))
        .collect();
    let world = World {
        coordinator,
        now: 1_000,
    };
    (world, job_id, honest, attackers)
}

#[test]
fn attackers_are_rejected_and_banned_and_the_honest_job_still_improves() {
    let clock = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    // Round 1 (from the fresh adapter): these, round 2: the stale attacker (there is an older
    // version only then) and the sign-flipped one (see the module comment).
    let round1_attacks = [
        Attack::Scaled,
        Attack::Random,
        Attack::Copied,
        Attack::Garbage,
    ];
    let round2_attacks = [Attack::Stale, Attack::SignFlipped];
    let attacks: Vec<Attack> = round1_attacks
        .iter()
        .chain(&round2_attacks)
        .copied()
        .collect();
    let (mut world, job_id, honest, attackers) = setup(dir.path(), 3, &attacks);
    let attacker = |attack: Attack| &attackers[attacks.iter().position(|a| *a == attack).unwrap()];
    let mut verdicts: Vec<(Attack, Vec<v1::VerificationVerdict>)> = Vec::new();
    let mut honest_norms = Vec::new();

    // Round 1: the first honest delta (the copier's victim), the attackers, then the other
    // honest volunteers.
    let (first_lease, victim) = world.honest_lease(&honest[0]);
    honest_norms.push(tensors::norm(&victim.outcome.delta));
    let round1 = Context {
        victim,
        previous_adapter: None,
    };
    let mut sleeper = None;
    for attack in round1_attacks {
        let a = attacker(attack);
        if attack == Attack::Copied {
            // Before it copies, it delivers an honest delta and leaves it waiting for its
            // verdict: once banned, it loses that one too.
            let now = world.tick();
            let c = &world.coordinator;
            let lease = granted(ask(c, &a.peer(), now).unwrap());
            let outcome = a.train(c, &lease);
            let signed = a.deliver(c, &lease, &outcome, now);
            let receipt = c.submit_delta(&a.peer(), &signed, now).unwrap();
            assert!(matches!(receipt, v1::delta_response::Body::DeltaReceipt(_)));
            sleeper = Some((lease, outcome, signed));
        }
        let v = world.attack_until_banned(a, attack, &round1);
        verdicts.push((attack, v));
    }
    // The honest volunteers get the units the rejected deltas freed, the dropped one's too.
    for v in &honest[1..] {
        let (_, work) = world.honest_lease(v);
        honest_norms.push(tensors::norm(&work.outcome.delta));
    }
    // The banned copier's honest delta, verified late, is rejected all the same.
    let (lease, outcome, signed) = sleeper.unwrap();
    let copier = attacker(Attack::Copied);
    let now = world.tick();
    let c = &world.coordinator;
    let late = judge(c, &copier.peer(), &signed, lease.lease_id, now, |ch| {
        copier.answer(c, &outcome, ch)
    });
    assert_eq!(
        (late.outcome(), late.reason()),
        (v1::VerdictOutcome::Rejected, RejectReason::PeerBanned),
        "{late:?}"
    );
    let now = world.tick();
    assert_eq!(world.coordinator.tick(now).unwrap(), vec![job_id]);
    let job = world.coordinator.job(&job_id).unwrap();
    assert_eq!(
        (job.round, job.latest_version),
        (2, 2),
        "round 1 must publish version 2 for the stale attacker to be stale"
    );

    // Round 2.
    let (_, victim) = world.honest_lease(&honest[0]);
    honest_norms.push(tensors::norm(&victim.outcome.delta));
    let round2 = Context {
        victim,
        previous_adapter: Some(tensors(&world.coordinator, &first_lease.start_adapter)),
    };
    for attack in round2_attacks {
        let v = world.attack_until_banned(attacker(attack), attack, &round2);
        verdicts.push((attack, v));
    }
    for v in &honest[1..] {
        let (_, work) = world.honest_lease(v);
        honest_norms.push(tensors::norm(&work.outcome.delta));
    }
    let now = world.tick();
    assert_eq!(world.coordinator.tick(now).unwrap(), vec![job_id]);

    for (attack, v) in &verdicts {
        let reasons: Vec<_> = v.iter().map(|v| v.reason()).collect();
        eprintln!("{attack:?}: {reasons:?}");
    }
    // The norm bound separates honest deltas from scaled ones with a factor 3 each way.
    for norm in &honest_norms {
        assert!(
            *norm * 3.0 <= MAX_DELTA_NORM && *norm * 100.0 >= MAX_DELTA_NORM * 3.0,
            "honest norms {honest_norms:?} do not fit the bound {MAX_DELTA_NORM}"
        );
    }

    let now = world.tick();
    let c = &world.coordinator;
    // Every attacker is banned: its reputation says so and it gets no more work.
    for (attack, a) in attacks.iter().zip(&attackers) {
        let standing = reputation(c, &a.peer());
        assert!(standing.banned, "{attack:?} is not banned: {standing:?}");
        assert_eq!(standing.accepted, 0, "{attack:?}: {standing:?}");
        let refused = ask(c, &a.peer(), now).unwrap_err();
        assert_eq!(
            refused.code(),
            v1::ErrorCode::Banned,
            "{attack:?}: {refused:?}"
        );
    }
    // No honest volunteer was rejected or banned: two deltas accepted each, nothing held
    // against them.
    for v in &honest {
        let standing = reputation(c, &v.peer());
        assert!(
            !standing.banned && standing.penalized == 0 && standing.accepted == 2,
            "{standing:?}"
        );
    }
    // Every delta of an attacker is rejected; every honest one accepted.
    let deltas: Vec<(Vec<u8>, DeltaRecord)> = c.store().read(|r| r.scan(DELTAS, &[])).unwrap();
    let attacker_ids: Vec<Vec<u8>> = attackers.iter().map(|a| a.peer().to_bytes()).collect();
    let honest_ids: Vec<Vec<u8>> = honest.iter().map(|v| v.peer().to_bytes()).collect();
    for (_, d) in &deltas {
        if attacker_ids.contains(&d.peer) {
            assert_eq!(d.status, DeltaStatus::Rejected, "lease {}", d.lease_id);
        } else {
            assert!(honest_ids.contains(&d.peer));
            assert_eq!(d.status, DeltaStatus::Accepted, "lease {}", d.lease_id);
        }
    }

    // The job completed; every version after the first was merged from the three honest
    // volunteers' deltas only, and the last is better than the base.
    let job = c.job(&job_id).unwrap();
    assert_eq!((job.state, job.rounds_merged), (JobState::Completed, 2));
    let mut losses = Vec::new();
    for version in 1..=job.latest_version {
        let record = c
            .store()
            .read(|r| registry::version_record(r, "shout", version))
            .unwrap()
            .unwrap();
        let signed = v1::Signed::decode(record.signed.as_slice()).unwrap();
        let manifest = v1::ModuleManifest::decode(signed.payload.as_slice()).unwrap();
        for contributor in &manifest.contributors {
            assert!(
                honest_ids.contains(&contributor.peer_id),
                "version {version} has a contributor that is not an honest volunteer"
            );
        }
        if version > 1 {
            assert_eq!(manifest.contributors.len(), 3, "version {version}");
        }
        losses.push(record.eval_loss);
    }
    eprintln!(
        "honest delta norms {honest_norms:?}; eval losses by version {losses:?}; {:.1} s",
        clock.elapsed().as_secs_f64()
    );
    assert!(
        losses.last().unwrap() < &losses[0],
        "the last version is not better than the base: {losses:?}"
    );
}

/// A volunteer that trains honestly from the fresh adapter, keeps its genuine commitment chain
/// and sends minus its delta passes the cheap checks (its probe loss even goes down), but its
/// challenge always asks for the last segment, whose end state the delta must be the start
/// minus: it is caught at once, as a cheater, and banned.
#[test]
fn a_sign_flipped_delta_from_the_fresh_adapter_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (mut world, _, honest, attackers) = setup(dir.path(), 1, &[Attack::SignFlipped]);
    let (_, victim) = world.honest_lease(&honest[0]);
    let ctx = Context {
        victim,
        previous_adapter: None,
    };
    let verdicts = world.attack_until_banned(&attackers[0], Attack::SignFlipped, &ctx);
    assert_eq!(
        verdicts.len(),
        1,
        "banned at the first flipped delta: {verdicts:#?}"
    );
    let verdict = &verdicts[0];
    assert_eq!(
        verdict.reason(),
        RejectReason::ChallengeEndMismatch,
        "{verdict:?}"
    );
    assert!(
        verdict
            .message
            .contains("the delta is not the start adapter minus the committed final state"),
        "{verdict:?}"
    );
}

/// Verification economics (issue 8, point 2) on the real engine: an established volunteer
/// that trains the first half of a lease honestly and invents the rest (states that go on in
/// the same direction, a delta twice its half's) is caught, and banned at once as a cheater,
/// when every delta is challenged with two of four segments: the stratified draw always
/// replays one from the second half (`verify::stratified_draw`; a uniform draw of two would
/// miss the fake one time in six, so three such cheaters would all be caught only 58% of
/// the time). This is the assumption `adversary::economics` builds on: a replayed segment
/// that ends in an invented state is always caught.
#[test]
fn a_volunteer_that_invents_the_second_half_of_its_lease_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let mut file = job_file();
    file.inner.inner_steps = 8;
    file.inner.commit_every = 2;
    file.verification.segments_per_challenge = 2;
    file.verification.challenge_probability = 1.0;
    file.verification.probation_leases = 1;
    let (coordinator, _, _) = running_job_as(dir.path(), &file, fixed_key(1), &fixed_key(2));
    let mut world = World {
        coordinator,
        now: 1_000,
    };
    let base_dir = volunteer_base(dir.path());
    for n in 0..3 {
        let cheater = Volunteer::new(fixed_key(30 + n), &base_dir);
        // Out of probation with one honest lease.
        world.honest_lease(&cheater);
        let peer = cheater.peer();
        assert!(!reputation(&world.coordinator, &peer).always_challenged(
            &v1::VerificationPolicy {
                probation_leases: 1,
                ..Default::default()
            }
        ));
        let now = world.tick();
        let c = &world.coordinator;
        let lease = granted(ask(c, &peer, now).unwrap());
        let honest = cheater.train(c, &lease);
        let start = &honest.snapshots[0].params;
        let half = &honest.snapshots[2];
        assert_eq!(half.step(), 4);
        // Steps 6 and 8 invented on the line from the start through step 4.
        let walked = swarmtune_trainer::train::subtract(start, &half.params);
        assert!(tensors::norm(&walked) > 0.0);
        let mut states: Vec<LoraState> = honest.snapshots[..3].to_vec();
        for step in [6u64, 8] {
            let mut state = half.clone();
            let ahead = scaled(&walked, (step - 4) as f32 / 4.0);
            state.params = swarmtune_trainer::train::subtract(&half.params, &ahead);
            state.moments.step = step;
            states.push(state);
        }
        let delta = swarmtune_trainer::train::subtract(start, &states[4].params);
        let fake = adversary::sim::outcome_of(delta, states, &honest.stats);
        let signed = cheater.deliver(c, &lease, &fake, now);
        let verdict = judge(c, &peer, &signed, lease.lease_id, now, |ch| {
            answer_from(c, &fake.snapshots, ch)
        });
        assert_eq!(
            (verdict.outcome(), verdict.reason(), verdict.banned),
            (
                v1::VerdictOutcome::Rejected,
                RejectReason::ChallengeEndMismatch,
                true
            ),
            "cheater {n}: {verdict:?}"
        );
        assert!(reputation(&world.coordinator, &peer).banned);
    }
}
