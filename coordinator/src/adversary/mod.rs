//! Byzantine scenarios (issue 8, point 1): honest and malicious volunteers work on one job
//! through the engine's real paths — leases, envelopes signed by each volunteer's own key,
//! delta blobs in the store, the cheap checks, segment challenges answered from kept states,
//! the robust merge and the gate — and the run reports what the network promises: the final
//! eval loss against an all-honest run, the round in which each attacker was banned, and the
//! honest deltas wrongly rejected.
//!
//! Everything is in one process and on a virtual clock ([`sim`]): no transport, so the
//! numbers are the verification's alone, and every key is fixed, so a scenario gives the same
//! numbers on every run on the same machine. Training is real (the built-in base, the shout
//! skill), as are the coordinator's replays.
//!
//! Attackers are patient by default: they train honestly until they are out of probation (the
//! job's `probation_leases` accepted deltas, during which every delta is replayed), then attack
//! every lease they get. An impatient attacker is caught by the probation replay at once.

pub mod economics;
pub mod sim;

use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use libp2p_identity::{Keypair, PeerId};
use rand::{Rng, SeedableRng};
use swarmtune_protocol::{ContentId, v1};
use swarmtune_trainer::delta::{DeltaEncoding, encode};
use swarmtune_trainer::tensors::{self, NamedTensors};
use swarmtune_trainer::train::{LoraState, TrainOutcome};

use crate::engine::Coordinator;
use crate::leases::LeaseAnswer;
use crate::records::JobState;
use crate::registry;
use crate::spec::{JobFile, parse_job_file};
use crate::store::REPUTATIONS;
use crate::verify::Reputation;
use sim::{
    Result, SimError, SimVolunteer, added, answer_from, ask, fail, fixed_key, judge,
    lease_start_state, made_up_outcome, outcome_of, scaled,
};

/// What a volunteer does with a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Behaviour {
    /// Trains and delivers what it trained.
    Honest,
    /// Does not train: gaussian noise of an honest delta's norm, with a made-up commitment
    /// chain leading to it (so it can answer any challenge with states that match it).
    Noise,
    /// Trains, sends minus its delta, answers challenges with its genuine states.
    SignFlip,
    /// Trains, sends its delta times 100, answers challenges with its genuine states.
    Scale,
    /// Does not train: a delta a thousandth of an honest one's norm, with a made-up chain.
    Freeloader,
    /// Sends its own delta of an earlier lease again, relabelled for the new lease, and
    /// answers challenges with that lease's states.
    Replay,
    /// Sends another volunteer's accepted delta of this round (its blob and envelope,
    /// re-signed for its own lease) and answers challenges with that volunteer's states.
    Copy,
    /// Trains, then claims another base (odd attempts) or another start version (even ones).
    WrongBase,
    /// Sends bytes that are no delta.
    Garbage,
    /// Sends envelopes whose signature does not verify: corrupted (odd attempts) or made
    /// with a key that is not its own (even ones).
    ForgedSignature,
    /// Trains, and adds the same fixed direction to every delta, sized so the delta's norm
    /// stays just under the job's bound; commits to the final state that matches the sum, so
    /// only a replay of the last segment can tell.
    SlowDrip,
}

impl Behaviour {
    /// Every malicious behaviour, in the order the scenarios assign them.
    pub const ATTACKS: [Behaviour; 10] = [
        Behaviour::Noise,
        Behaviour::SignFlip,
        Behaviour::Scale,
        Behaviour::Freeloader,
        Behaviour::Replay,
        Behaviour::Copy,
        Behaviour::WrongBase,
        Behaviour::Garbage,
        Behaviour::ForgedSignature,
        Behaviour::SlowDrip,
    ];

    /// A short name for tables.
    pub fn label(self) -> &'static str {
        match self {
            Behaviour::Honest => "honest",
            Behaviour::Noise => "random noise",
            Behaviour::SignFlip => "sign flip",
            Behaviour::Scale => "×100 scale",
            Behaviour::Freeloader => "tiny-norm freeloader",
            Behaviour::Replay => "replay of an old delta",
            Behaviour::Copy => "copy of another's delta",
            Behaviour::WrongBase => "wrong base or version",
            Behaviour::Garbage => "garbage bytes",
            Behaviour::ForgedSignature => "forged signature",
            Behaviour::SlowDrip => "slow drip under the norm bound",
        }
    }
}

/// A scenario: a job, its volunteers and how each behaves.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// The job, as its owner would submit it. Its quorum is the units of work per round.
    pub job: JobFile,
    /// Every volunteer's behaviour; attackers are interleaved with honest volunteers in the
    /// order the volunteers ask for work.
    pub volunteers: Vec<Behaviour>,
    /// Attackers train honestly until out of probation ([`Scenario::job`]'s
    /// `probation_leases` accepted deltas).
    pub patient: bool,
}

/// The job the scenarios run by default: `examples/job.toml` with short leases (10 steps of
/// 8 sequences, a commitment every 5), `rounds` rounds of `quorum` units, a delta norm bound
/// (`max_delta_norm`), a round timeout no scenario reaches, and every delta challenged with
/// both of its segments replayed. The engine draws the segments it replays at random (from
/// the OS, so that no volunteer can predict them); replaying all of them makes each
/// scenario's verdicts the same on every run. What detection costs at lower rates is the
/// verification economics' question, not this one's.
pub fn default_job(rounds: u32, quorum: u32, max_delta_norm: f64) -> Result<JobFile> {
    let mut file = parse_job_file(include_str!("../../../examples/job.toml"))
        .or_else(|e| fail("examples/job.toml", e))?;
    file.inner.inner_steps = 10;
    file.inner.commit_every = 5;
    file.inner.batch_size = 8;
    file.inner.micro_batch = Some(8);
    file.rounds.count = Some(u64::from(rounds));
    file.rounds.quorum = quorum;
    file.rounds.timeout_secs = 24 * 3600;
    file.verification.max_delta_norm = max_delta_norm;
    file.verification.challenge_probability = 1.0;
    file.verification.segments_per_challenge = 2;
    Ok(file)
}

impl Scenario {
    /// `volunteers` volunteers of which `attackers` malicious, their behaviours taken in turn
    /// from [`Behaviour::ATTACKS`] starting at `first_attack`, spread evenly among the honest
    /// ones.
    pub fn mixed(job: JobFile, volunteers: usize, attackers: usize, first_attack: usize) -> Self {
        let attacks: Vec<Behaviour> = (0..attackers.min(volunteers))
            .map(|i| Behaviour::ATTACKS[(first_attack + i) % Behaviour::ATTACKS.len()])
            .collect();
        Self::with_attacks(job, volunteers, &attacks)
    }

    /// `volunteers` volunteers, one attacker per entry of `attacks` (at most `volunteers`),
    /// spread evenly among the honest ones and never first, so that an honest delta exists to
    /// copy when the first attacker asks for work.
    pub fn with_attacks(job: JobFile, volunteers: usize, attacks: &[Behaviour]) -> Self {
        let mut behaviours = vec![Behaviour::Honest; volunteers];
        let n = attacks.len().min(volunteers.saturating_sub(1));
        for (i, attack) in attacks.iter().take(n).enumerate() {
            let mut at = (1 + i * volunteers / n).min(volunteers - 1);
            while behaviours[at] != Behaviour::Honest {
                at = at % (volunteers - 1) + 1;
            }
            behaviours[at] = *attack;
        }
        Self {
            job,
            volunteers: behaviours,
            patient: true,
        }
    }
}

/// What one attacker did and what it cost it.
#[derive(Clone, Debug, PartialEq)]
pub struct AttackerReport {
    /// Its behaviour.
    pub behaviour: Behaviour,
    /// Its identity.
    pub peer: PeerId,
    /// Leases it took.
    pub leases: u64,
    /// Attacks it made (leases it did not train honestly).
    pub attacks: u64,
    /// Attacks that were accepted and merged.
    pub attacks_accepted: u64,
    /// The round in which it was banned, if it was.
    pub banned_in_round: Option<u64>,
    /// The rounds it attacked in before its ban (or until the end).
    pub rounds_attacking: u64,
    /// Why its attacks were refused, in order.
    pub reasons: Vec<String>,
}

/// What a scenario showed.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// The volunteers.
    pub volunteers: usize,
    /// Of them malicious.
    pub attackers: Vec<AttackerReport>,
    /// Rounds merged.
    pub rounds: u64,
    /// The held-out loss of every version, the base's first.
    pub eval_losses: Vec<f64>,
    /// Honest deltas delivered.
    pub honest_deltas: u64,
    /// Honest deltas rejected.
    pub honest_rejected: u64,
    /// Honest volunteers banned.
    pub honest_banned: u64,
    /// The coordinator's replayed steps per trained step.
    pub verification_overhead: f64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

impl Report {
    /// The last version's held-out loss.
    pub fn final_eval_loss(&self) -> f64 {
        self.eval_losses.last().copied().unwrap_or(f64::NAN)
    }
}

/// What the attackers of a round can use: public or stolen knowledge.
#[derive(Default)]
struct Knowledge {
    /// The norm of an honest delta of this job.
    honest_norm: Option<f64>,
    /// The last honest delta accepted: its envelope and what its volunteer kept.
    victim: Option<(v1::DeltaEnvelope, Rc<TrainOutcome>)>,
}

/// A volunteer of a scenario and what it remembers.
struct Member {
    behaviour: Behaviour,
    sim: SimVolunteer,
    accepted: u64,
    banned: bool,
    /// Its own last accepted delta (for [`Behaviour::Replay`]).
    own: Option<(v1::DeltaEnvelope, Rc<TrainOutcome>)>,
    report: AttackerReport,
}

/// How one lease went.
enum Delivered {
    /// A verdict.
    Verdict(v1::VerificationVerdict),
    /// Refused before any verdict (bad signature), with the reply.
    Refused(v1::ErrorReply),
}

/// Runs `scenario` in `dir` (which it fills with the coordinator's state); `log` gets a line
/// per round.
pub fn run(scenario: &Scenario, dir: &Path, log: &mut dyn FnMut(&str)) -> Result<Report> {
    let clock = Instant::now();
    if dir.join("coordinator").exists() {
        return fail(
            "the scenario",
            format!(
                "{} holds an earlier run's coordinator; give each run an empty directory",
                dir.display()
            ),
        );
    }
    let (coordinator, job_id, _) =
        sim::running_job(dir, &scenario.job, fixed_key(1), &fixed_key(2))?;
    let base_dir = sim::volunteer_base(dir)?;
    let model = SimVolunteer::new(fixed_key(3), &base_dir)?.model;
    let mut members = Vec::with_capacity(scenario.volunteers.len());
    for (i, behaviour) in scenario.volunteers.iter().enumerate() {
        let Some(byte) = u8::try_from(i).ok().and_then(|i| i.checked_add(10)) else {
            return fail("the scenario", "at most 245 volunteers");
        };
        let sim = SimVolunteer {
            key: fixed_key(byte),
            model: Arc::clone(&model),
        };
        let peer = sim.peer();
        members.push(Member {
            behaviour: *behaviour,
            sim,
            accepted: 0,
            banned: false,
            own: None,
            report: AttackerReport {
                behaviour: *behaviour,
                peer,
                leases: 0,
                attacks: 0,
                attacks_accepted: 0,
                banned_in_round: None,
                rounds_attacking: 0,
                reasons: Vec::new(),
            },
        });
    }
    let policy = scenario.job.verification.clone();
    let mut knowledge = Knowledge::default();
    let mut now = 2_000u64;
    let (mut honest_deltas, mut honest_rejected) = (0u64, 0u64);
    let mut idle_passes = 0;
    let mut cursor = 0;
    loop {
        let job = coordinator.job(&job_id).or_else(|e| fail("the job", e))?;
        if job.state != JobState::Running {
            break;
        }
        let round = job.round;
        let mut attacked_this_round = vec![false; members.len()];
        // Passes over the volunteers until the round closes, each starting after the last
        // volunteer that got work, so that work goes round the volunteers in turn.
        loop {
            let mut progressed = false;
            let count = members.len();
            let start = cursor;
            for index in (0..count).map(|i| (start + i) % count) {
                let member = &mut members[index];
                if member.banned {
                    continue;
                }
                now += 1_000;
                let lease = match ask(&coordinator, &member.sim.peer(), now) {
                    Ok(LeaseAnswer::Granted(lease)) => *lease,
                    Ok(LeaseAnswer::NoWork(_)) => continue,
                    Err(reply) if reply.code() == v1::ErrorCode::Banned => {
                        member.banned = true;
                        continue;
                    }
                    Err(reply) => return fail("asking for a lease", reply.message),
                };
                if lease.round != round {
                    return fail("a lease", "granted for another round than the open one");
                }
                progressed = true;
                cursor = index + 1;
                member.report.leases += 1;
                let attacking = member.behaviour != Behaviour::Honest
                    && (!scenario.patient || member.accepted >= u64::from(policy.probation_leases));
                let behaviour = if attacking {
                    member.behaviour
                } else {
                    Behaviour::Honest
                };
                let attempt = member.report.attacks;
                let (delivered, outcome, envelope) = act(
                    &coordinator,
                    member,
                    behaviour,
                    attempt,
                    &lease,
                    &knowledge,
                    &scenario.job,
                    now,
                )?;
                if attacking {
                    member.report.attacks += 1;
                    attacked_this_round[index] = true;
                }
                match delivered {
                    Delivered::Verdict(verdict) => {
                        let accepted = verdict.outcome() == v1::VerdictOutcome::Accepted;
                        if behaviour == Behaviour::Honest {
                            honest_deltas += 1;
                            if !accepted && member.behaviour == Behaviour::Honest {
                                honest_rejected += 1;
                                log(&format!(
                                    "honest delta of {} rejected: {:?} {}",
                                    member.report.peer,
                                    verdict.reason(),
                                    verdict.message
                                ));
                            }
                        }
                        if accepted {
                            member.accepted += 1;
                            if attacking {
                                member.report.attacks_accepted += 1;
                            } else if let Some(env) = envelope {
                                knowledge.honest_norm = Some(tensors::norm(&outcome.delta));
                                knowledge.victim = Some((env.clone(), Rc::clone(&outcome)));
                                member.own = Some((env, outcome));
                            }
                        } else if attacking {
                            member
                                .report
                                .reasons
                                .push(format!("{:?}", verdict.reason()));
                        }
                        if verdict.banned {
                            member.banned = true;
                            member.report.banned_in_round = Some(round);
                        }
                    }
                    Delivered::Refused(reply) => {
                        if behaviour == Behaviour::Honest {
                            return fail("an honest delivery", reply.message);
                        }
                        member.report.reasons.push(format!("{:?}", reply.code()));
                        if reply.code() == v1::ErrorCode::Banned {
                            member.banned = true;
                            member.report.banned_in_round.get_or_insert(round);
                        }
                        // A refused delivery leaves the lease held: give it back, as a node
                        // does when it gives up on a lease.
                        let release = v1::ReleaseLease {
                            lease_id: lease.lease_id,
                            ..Default::default()
                        };
                        let _ = coordinator.release_lease(&member.sim.peer(), &release);
                    }
                }
                // The coordinator's record is the truth (a refusal before any verdict may have
                // banned the volunteer without saying so).
                if !member.banned && banned(&coordinator, &member.sim.peer())? {
                    member.banned = true;
                }
                if member.banned && member.report.banned_in_round.is_none() {
                    member.report.banned_in_round = Some(round);
                }
            }
            now += 1_000;
            coordinator.tick(now).or_else(|e| fail("the tick", e))?;
            let job = coordinator.job(&job_id).or_else(|e| fail("the job", e))?;
            if job.state != JobState::Running || job.round != round {
                break;
            }
            if progressed {
                idle_passes = 0;
            } else {
                // Units held by leases nobody will deliver: let them lapse.
                idle_passes += 1;
                if idle_passes > 100 {
                    return fail("the scenario", "no volunteer can get work any more");
                }
                now += 61_000;
            }
        }
        for (member, attacked) in members.iter_mut().zip(&attacked_this_round) {
            if *attacked {
                member.report.rounds_attacking += 1;
            }
        }
        let job = coordinator.job(&job_id).or_else(|e| fail("the job", e))?;
        log(&format!(
            "round {round} closed: version {}, {} of {} volunteers banned",
            job.latest_version,
            members.iter().filter(|m| m.banned).count(),
            members.len()
        ));
        // A banned volunteer's state is final; the others get fresh knowledge next round.
        knowledge.victim = None;
    }

    let job = coordinator.job(&job_id).or_else(|e| fail("the job", e))?;
    if job.state != JobState::Completed {
        return fail("the job", format!("ended {:?}: {}", job.state, job.message));
    }
    let mut eval_losses = Vec::new();
    for version in 1..=job.latest_version {
        let record = coordinator
            .store()
            .read(|r| registry::version_record(r, &job.module, version))
            .or_else(|e| fail("a version", e))?
            .ok_or_else(|| SimError(format!("version {version} is missing")))?;
        eval_losses.push(record.eval_loss);
    }
    let honest_banned = members
        .iter()
        .filter(|m| m.behaviour == Behaviour::Honest && m.banned)
        .count() as u64;
    let verification_overhead = coordinator
        .verification_overhead(&job_id)
        .or_else(|e| fail("the overhead", e))?;
    Ok(Report {
        volunteers: members.len(),
        attackers: members
            .into_iter()
            .filter(|m| m.behaviour != Behaviour::Honest)
            .map(|m| m.report)
            .collect(),
        rounds: job.rounds_merged,
        eval_losses,
        honest_deltas,
        honest_rejected,
        honest_banned,
        verification_overhead,
        seconds: clock.elapsed().as_secs_f64(),
    })
}

/// `member` works on `lease` as `behaviour` says and delivers; returns how it went, the
/// outcome it trained (or made up) and, for an honest delta, its envelope.
#[allow(clippy::too_many_arguments)]
fn act(
    c: &Coordinator,
    member: &Member,
    behaviour: Behaviour,
    attempt: u64,
    lease: &v1::Lease,
    knowledge: &Knowledge,
    job: &JobFile,
    now: u64,
) -> Result<(Delivered, Rc<TrainOutcome>, Option<v1::DeltaEnvelope>)> {
    let v = &member.sim;
    let peer = v.peer();
    let id = lease.lease_id;
    // The seed of everything an attacker makes up for this lease.
    let mut rng = rand::rngs::StdRng::seed_from_u64(id ^ 0x5eed);
    let steps = commitment_steps(job);
    let deliver = |signed: &v1::Signed, states: &[LoraState]| -> Result<Delivered> {
        match judge(c, &peer, signed, id, now, |ch| answer_from(c, states, ch))? {
            Ok(Some(verdict)) => Ok(Delivered::Verdict(verdict)),
            Ok(None) => fail("a delivery", "the delta waits for a redundant twin"),
            Err(reply) => Ok(Delivered::Refused(reply)),
        }
    };
    let honest_norm = || knowledge.honest_norm.unwrap_or(1.0);
    match behaviour {
        Behaviour::Honest => {
            let outcome = v.train(c, lease)?;
            let bytes = encode(&outcome.delta, DeltaEncoding::Int8RowWise)
                .or_else(|e| fail("encoding a delta", e))?;
            let envelope = v.envelope(c, lease, &outcome, &bytes)?;
            let signed = v.sign(&envelope, now)?;
            let delivered = deliver(&signed, &outcome.snapshots)?;
            Ok((delivered, Rc::new(outcome), Some(envelope)))
        }
        Behaviour::SignFlip | Behaviour::Scale => {
            let outcome = v.train(c, lease)?;
            let factor = if behaviour == Behaviour::Scale {
                100.0
            } else {
                -1.0
            };
            let signed =
                v.deliver_delta(c, lease, &outcome, &scaled(&outcome.delta, factor), now)?;
            Ok((
                deliver(&signed, &outcome.snapshots)?,
                Rc::new(outcome),
                None,
            ))
        }
        Behaviour::Noise | Behaviour::Freeloader => {
            let start = lease_start_state(c, lease)?;
            let norm = if behaviour == Behaviour::Noise {
                honest_norm()
            } else {
                honest_norm() * 1e-3
            };
            let noise = gaussian_like(&start.params, norm, &mut rng);
            let fake = made_up_outcome(&start, &noise, &steps, &stats_of(knowledge, job));
            let signed = v.deliver(c, lease, &fake, now)?;
            Ok((deliver(&signed, &fake.snapshots)?, Rc::new(fake), None))
        }
        Behaviour::Replay | Behaviour::Copy => {
            let source = if behaviour == Behaviour::Replay {
                member.own.as_ref()
            } else {
                knowledge.victim.as_ref()
            };
            let Some((old, outcome)) = source else {
                // Nothing to replay or copy yet: work honestly this time.
                return act(
                    c,
                    member,
                    Behaviour::Honest,
                    attempt,
                    lease,
                    knowledge,
                    job,
                    now,
                );
            };
            let envelope = v1::DeltaEnvelope {
                round: lease.round,
                lease_id: id,
                start_version: lease.start_version,
                ..old.clone()
            };
            let signed = v.sign(&envelope, now)?;
            Ok((
                deliver(&signed, &outcome.snapshots)?,
                Rc::clone(outcome),
                None,
            ))
        }
        Behaviour::WrongBase => {
            let outcome = v.train(c, lease)?;
            let bytes = encode(&outcome.delta, DeltaEncoding::Int8RowWise)
                .or_else(|e| fail("encoding a delta", e))?;
            let mut envelope = v.envelope(c, lease, &outcome, &bytes)?;
            if attempt.is_multiple_of(2) {
                let other: [u8; 32] = rng.random();
                envelope.base = Some(ContentId::from(blake3::hash(&other)).to_proto());
            } else {
                envelope.start_version = lease.start_version + 1;
            }
            let signed = v.sign(&envelope, now)?;
            Ok((
                deliver(&signed, &outcome.snapshots)?,
                Rc::new(outcome),
                None,
            ))
        }
        Behaviour::Garbage => {
            let start = lease_start_state(c, lease)?;
            let fake = made_up_outcome(
                &start,
                &scaled(&start.params, 0.0),
                &steps,
                &stats_of(knowledge, job),
            );
            let len = encode(&start.params, DeltaEncoding::Int8RowWise)
                .map(|b| b.len())
                .unwrap_or(4096);
            let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let signed = v.deliver_bytes(c, lease, &fake, &bytes, now)?;
            Ok((deliver(&signed, &fake.snapshots)?, Rc::new(fake), None))
        }
        Behaviour::ForgedSignature => {
            let start = lease_start_state(c, lease)?;
            let noise = gaussian_like(&start.params, honest_norm(), &mut rng);
            let fake = made_up_outcome(&start, &noise, &steps, &stats_of(knowledge, job));
            let bytes = encode(&fake.delta, DeltaEncoding::Int8RowWise)
                .or_else(|e| fail("encoding a delta", e))?;
            let envelope = v.envelope(c, lease, &fake, &bytes)?;
            let signed = if attempt.is_multiple_of(2) {
                let stranger = Keypair::generate_ed25519();
                swarmtune_protocol::signed::sign(&stranger, &envelope, now)
                    .or_else(|e| fail("signing", e))?
            } else {
                let mut signed = v.sign(&envelope, now)?;
                if let Some(byte) = signed.signature.first_mut() {
                    *byte ^= 0x55;
                }
                signed
            };
            Ok((deliver(&signed, &fake.snapshots)?, Rc::new(fake), None))
        }
        Behaviour::SlowDrip => {
            let outcome = v.train(c, lease)?;
            // The same direction every time: seeded by the attacker's identity.
            let mut own_rng =
                rand::rngs::StdRng::from_seed(*blake3::hash(&peer.to_bytes()).as_bytes());
            let honest = tensors::norm(&outcome.delta);
            let bound = job.verification.max_delta_norm;
            let drip_norm = if bound > 0.0 {
                // ‖delta + b‖ ≤ ‖delta‖ + ‖b‖ = 0.95 × bound.
                (0.95 * bound - honest).max(0.0)
            } else {
                honest
            };
            let drip = gaussian_like(&outcome.delta, drip_norm, &mut own_rng);
            let delta = added(&outcome.delta, &drip);
            // The final state the sum implies: start − (delta + drip) = end − drip.
            let mut states = outcome.snapshots.clone();
            if let Some(last) = states.last_mut() {
                last.params = swarmtune_trainer::train::subtract(&last.params, &drip);
            }
            let forged = outcome_of(delta, states, &outcome.stats);
            let signed = v.deliver(c, lease, &forged, now)?;
            Ok((deliver(&signed, &forged.snapshots)?, Rc::new(forged), None))
        }
    }
}

/// Whether the coordinator has banned `peer`.
fn banned(c: &Coordinator, peer: &PeerId) -> Result<bool> {
    let standing: Option<Reputation> = c
        .store()
        .read(|r| r.get(REPUTATIONS, &peer.to_bytes()))
        .or_else(|e| fail("a reputation", e))?;
    Ok(standing.is_some_and(|s| s.banned))
}

/// The steps a lease of `job` commits at: 0, every `commit_every`, and the last.
fn commitment_steps(job: &JobFile) -> Vec<u64> {
    let (steps, every) = (
        u64::from(job.inner.inner_steps),
        u64::from(job.inner.commit_every.max(1)),
    );
    let mut out: Vec<u64> = (0..=steps).step_by(every as usize).collect();
    if out.last() != Some(&steps) {
        out.push(steps);
    }
    out
}

/// Training statistics an attacker claims: an honest lease's, or plausible ones.
fn stats_of(knowledge: &Knowledge, job: &JobFile) -> swarmtune_trainer::train::TrainStats {
    match &knowledge.victim {
        Some((_, outcome)) => outcome.stats.clone(),
        None => swarmtune_trainer::train::TrainStats {
            steps: job.inner.inner_steps as usize,
            tokens: 0,
            target_tokens: 0,
            loss_before: 0.0,
            loss_after: 0.0,
            seconds: 0.0,
        },
    }
}

/// Gaussian noise shaped like `layout`, scaled to norm `norm`.
pub fn gaussian_like(layout: &NamedTensors, norm: f64, rng: &mut impl Rng) -> NamedTensors {
    let mut out = layout.clone();
    for t in out.values_mut() {
        for x in t.data.iter_mut() {
            // Box–Muller.
            let (u1, u2): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random());
            *x = ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32;
        }
    }
    let current = tensors::norm(&out);
    if current == 0.0 {
        return out;
    }
    scaled(&out, (norm / current) as f32)
}

/// A sweep over shares of malicious volunteers: the all-honest run first (the baseline), then
/// one scenario per share, each with the same job and volunteers.
#[derive(Clone, Debug)]
pub struct Sweep {
    /// Volunteers in every scenario.
    pub volunteers: usize,
    /// Shares of malicious volunteers, in percent (0 is always run, first).
    pub percents: Vec<u32>,
    /// Rounds of the job.
    pub rounds: u32,
    /// Units per round (the job's quorum).
    pub quorum: u32,
    /// The job's delta norm bound.
    pub max_delta_norm: f64,
    /// Attackers train honestly until out of probation.
    pub patient: bool,
}

impl Default for Sweep {
    fn default() -> Self {
        Self {
            volunteers: 34,
            percents: vec![0, 10, 20, 30],
            rounds: 6,
            quorum: 34,
            max_delta_norm: 20.0,
            patient: true,
        }
    }
}

/// One scenario of a sweep.
#[derive(Clone, Debug)]
pub struct SweepRow {
    /// Malicious share asked for, in percent.
    pub percent: u32,
    /// What it showed.
    pub report: Report,
    /// Its final eval loss relative to the all-honest run's, minus 1 (0.01 is 1% worse).
    pub loss_vs_honest: f64,
}

impl SweepRow {
    /// Whether the goal holds: eval loss within 1% of the all-honest run, every
    /// attacker banned, no honest volunteer banned.
    pub fn goal_met(&self) -> bool {
        self.loss_vs_honest <= 0.01
            && self
                .report
                .attackers
                .iter()
                .all(|a| a.banned_in_round.is_some())
            && self.report.honest_banned == 0
    }
}

/// Runs `sweep`, each scenario in a directory of its own under `dir`.
pub fn run_sweep(sweep: &Sweep, dir: &Path, log: &mut dyn FnMut(&str)) -> Result<Vec<SweepRow>> {
    let mut percents = sweep.percents.clone();
    percents.retain(|p| *p != 0);
    percents.insert(0, 0);
    let job = default_job(sweep.rounds, sweep.quorum, sweep.max_delta_norm)?;
    let mut rows: Vec<SweepRow> = Vec::new();
    for percent in percents {
        let attackers = (sweep.volunteers * percent as usize + 50) / 100;
        let mut scenario = Scenario::mixed(job.clone(), sweep.volunteers, attackers, 0);
        scenario.patient = sweep.patient;
        log(&format!(
            "{percent}% malicious: {attackers} of {} volunteers",
            sweep.volunteers
        ));
        let here = dir.join(format!("malicious-{percent}"));
        let report = run(&scenario, &here, log)?;
        let honest = rows
            .first()
            .map_or(report.final_eval_loss(), |r| r.report.final_eval_loss());
        rows.push(SweepRow {
            percent,
            loss_vs_honest: report.final_eval_loss() / honest - 1.0,
            report,
        });
    }
    Ok(rows)
}

/// The sweep as a Markdown table: a row per malicious share.
pub fn summary_table(rows: &[SweepRow]) -> String {
    let mut out = String::from(
        "| malicious | attackers | final eval loss | vs all-honest | attackers banned | rounds until banned (max) | attacks merged | honest deltas rejected | honest banned | replayed steps per trained step | seconds | goal |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for row in rows {
        let r = &row.report;
        let banned = r
            .attackers
            .iter()
            .filter(|a| a.banned_in_round.is_some())
            .count();
        let slowest = r
            .attackers
            .iter()
            .map(|a| a.rounds_attacking)
            .max()
            .map_or("-".to_string(), |m| m.to_string());
        let merged: u64 = r.attackers.iter().map(|a| a.attacks_accepted).sum();
        out.push_str(&format!(
            "| {}% | {} | {:.4} | {:+.2}% | {}/{} | {} | {} | {}/{} | {} | {:.2} | {:.0} | {} |\n",
            row.percent,
            r.attackers.len(),
            r.final_eval_loss(),
            100.0 * row.loss_vs_honest,
            banned,
            r.attackers.len(),
            slowest,
            merged,
            r.honest_rejected,
            r.honest_deltas,
            r.honest_banned,
            r.verification_overhead,
            r.seconds,
            if row.goal_met() { "met" } else { "not met" },
        ));
    }
    out
}

/// Every attacker of the sweep as a Markdown table: how long it lasted and why it was refused.
pub fn attacker_table(rows: &[SweepRow]) -> String {
    let mut out = String::from(
        "| malicious | behaviour | leases | attacks | attacks merged | rounds attacking | banned in round | refusals |\n|---|---|---:|---:|---:|---:|---:|---|\n",
    );
    for row in rows {
        for a in &row.report.attackers {
            out.push_str(&format!(
                "| {}% | {} | {} | {} | {} | {} | {} | {} |\n",
                row.percent,
                a.behaviour.label(),
                a.leases,
                a.attacks,
                a.attacks_accepted,
                a.rounds_attacking,
                a.banned_in_round
                    .map_or("never".to_string(), |r| r.to_string()),
                a.reasons.join(", ")
            ));
        }
    }
    out
}
