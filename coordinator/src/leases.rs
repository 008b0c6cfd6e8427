//! Rounds and leases (issue 6, point 2): a round is a set of work units (shards and a seed
//! each); a volunteer asking for work gets a lease on a free unit, sized to its measured
//! speed; heartbeats extend a lease up to the round's deadline; a lease that lapses or is
//! given back frees its unit for the next volunteer. Every function here is one step of a
//! write transaction: the caller commits the job record and the lease records together.

use libp2p_identity::PeerId;
use prost::Message;
use swarmtune_protocol::net::codec::error_reply;
use swarmtune_protocol::{ContentId, v1};

use crate::records::{JobRecord, JobState, LeaseRecord, LeaseState, Unit};
use crate::store::{LEASES, StoreError, Write, u64_key};

/// How leases are sized.
#[derive(Clone, Debug, PartialEq)]
pub struct LeasePolicy {
    /// Shortest lease lifetime (before a renewal is due).
    pub min_ttl_ms: u64,
    /// Longest lease lifetime.
    pub max_ttl_ms: u64,
    /// A lease lives this many times the volunteer's expected training time.
    pub slack: f64,
    /// Largest delta blob a lease allows.
    pub max_delta_bytes: u64,
}

impl Default for LeasePolicy {
    fn default() -> Self {
        Self {
            min_ttl_ms: 60_000,
            max_ttl_ms: 30 * 60_000,
            slack: 3.0,
            max_delta_bytes: 256 << 20,
        }
    }
}

/// The answer to a request for work.
#[derive(Clone, Debug, PartialEq)]
pub enum LeaseAnswer {
    /// A lease.
    Granted(Box<v1::Lease>),
    /// No work now, and why.
    NoWork(v1::NoWork),
}

/// Why a lease operation failed, as the wire reports it.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The request was refused.
    #[error("{}", .0.message)]
    Refused(v1::ErrorReply),
}

fn refuse(code: v1::ErrorCode, message: impl Into<String>) -> LeaseError {
    LeaseError::Refused(error_reply(code, message))
}

/// The units of a new round: `quorum` units of one shard each, taking the shards in turn
/// from where the previous round stopped, plus `ceil(quorum · redundancy)` units that repeat
/// the first units' work (same shards, same seed) for a second volunteer.
pub fn plan_units(
    job: &[u8; 32],
    round: u64,
    shards: usize,
    quorum: u32,
    redundancy: f64,
) -> Vec<Unit> {
    let quorum = quorum.max(1) as u64;
    let shards = shards.max(1) as u64;
    let mut units: Vec<Unit> = (0..quorum)
        .map(|u| {
            let index = ((round.saturating_sub(1)) * quorum + u) % shards;
            Unit {
                shards: vec![index as u32],
                seed: unit_seed(job, round, u),
                lease: None,
                delivered: false,
                redundant_of: None,
            }
        })
        .collect();
    let extra = ((quorum as f64) * redundancy.clamp(0.0, 1.0)).ceil() as usize;
    for i in 0..extra.min(units.len()) {
        let copy = Unit {
            redundant_of: Some(i as u32),
            ..units[i].clone()
        };
        units.push(copy);
    }
    units
}

fn unit_seed(job: &[u8; 32], round: u64, unit: u64) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"swarmtune-unit-seed");
    h.update(job);
    h.update(&round.to_le_bytes());
    h.update(&unit.to_le_bytes());
    let bytes = h.finalize();
    u64::from_le_bytes(bytes.as_bytes()[..8].try_into().unwrap_or([0; 8]))
}

/// Opens the job's next round at `now`.
pub fn open_round(job: &mut JobRecord, spec: &v1::JobSpec, now: u64) {
    let shards = job.prepared.as_ref().map_or(1, |p| p.train_shards.len());
    let redundancy = spec
        .verification
        .as_ref()
        .map_or(0.0, |v| v.redundancy_fraction);
    job.rounds_opened += 1;
    job.round = job.rounds_opened;
    job.round_deadline_ms = now.saturating_add(spec.round_timeout_ms);
    job.units = plan_units(&job.id, job.round, shards, spec.quorum, redundancy);
}

/// What the coordinator tells a lease about where training starts.
#[derive(Clone, Debug, PartialEq)]
pub struct StartPoint {
    /// The module version.
    pub version: u64,
    /// Its adapter blob.
    pub adapter: ContentId,
}

/// Grants `peer` a lease on a free unit of `job`'s open round, or says why there is none.
/// `job` is updated in place; the caller stores it in the same transaction.
#[allow(clippy::too_many_arguments)]
pub fn grant(
    w: &Write<'_>,
    job: &mut JobRecord,
    spec: &v1::JobSpec,
    start: &StartPoint,
    peer: &PeerId,
    capabilities: &v1::PeerCapabilities,
    policy: &LeasePolicy,
    now: u64,
) -> Result<LeaseAnswer, LeaseError> {
    let no_work = |reason: v1::NoWorkReason, retry_after_ms: u64, message: String| {
        Ok(LeaseAnswer::NoWork(v1::NoWork {
            reason: reason as i32,
            retry_after_ms,
            message,
        }))
    };
    match job.state {
        JobState::Preparing => {
            return no_work(
                v1::NoWorkReason::Preparing,
                5_000,
                "the job is being prepared".into(),
            );
        }
        JobState::Running => {}
        _ => {
            return no_work(
                v1::NoWorkReason::JobNotRunning,
                0,
                "the job is not running".into(),
            );
        }
    }
    let Some(prepared) = job.prepared.clone() else {
        return no_work(v1::NoWorkReason::Preparing, 5_000, "no shards yet".into());
    };
    if job.round == 0 || now >= job.round_deadline_ms {
        return no_work(
            v1::NoWorkReason::BetweenRounds,
            2_000,
            "the round is closing".into(),
        );
    }
    let holder = peer.to_bytes();
    // One lease at a time per volunteer and job. A volunteer that asks while it holds one has
    // lost it (it restarted, say): it gets the same lease again, as it stands, rather than
    // its unit waiting for the lease to lapse.
    for unit in &job.units {
        if let Some(id) = unit.lease
            && !unit.delivered
            && let Some(record) = w.get::<LeaseRecord>(LEASES, &u64_key(id))?
            && record.holder == holder
            && record.state == LeaseState::Active
        {
            // The record is the coordinator's own encoding; should it not decode, the unit
            // waits for the lease to lapse.
            let Ok(mut lease) = v1::Lease::decode(record.lease.as_slice()) else {
                return no_work(
                    v1::NoWorkReason::TooManyLeases,
                    record.expires_at_ms.saturating_sub(now).min(60_000),
                    format!("you already hold lease {id} of round {}", job.round),
                );
            };
            lease.expires_at_unix_ms = record.expires_at_ms;
            return Ok(LeaseAnswer::Granted(Box::new(lease)));
        }
    }
    let inner = spec.inner.unwrap_or_default();
    let tokens =
        u64::from(inner.inner_steps) * u64::from(inner.batch_size) * u64::from(prepared.seq_len);
    let expected_ms = if capabilities.tokens_per_second > 0.0 {
        Some((tokens as f64 / capabilities.tokens_per_second * 1000.0) as u64)
    } else {
        None
    };
    if let Some(expected) = expected_ms
        && now.saturating_add(expected) > job.round_deadline_ms
    {
        return no_work(
            v1::NoWorkReason::InsufficientCapabilities,
            0,
            format!(
                "a lease takes about {} s at your {:.0} tokens/s; the round closes in {} s",
                expected / 1000,
                capabilities.tokens_per_second,
                job.round_deadline_ms.saturating_sub(now) / 1000
            ),
        );
    }
    let mut free = None;
    for (i, unit) in job.units.iter().enumerate() {
        if unit.lease.is_some() || unit.delivered {
            continue;
        }
        // Two copies of the same work go to two different volunteers.
        let mut twin_is_theirs = false;
        for twin in twins(&job.units, i) {
            twin_is_theirs |= unit_holder(w, &job.units[twin])?.as_ref() == Some(&holder);
        }
        if twin_is_theirs {
            continue;
        }
        free = Some(i);
        break;
    }
    let Some(index) = free else {
        return no_work(
            v1::NoWorkReason::RoundFull,
            job.round_deadline_ms
                .saturating_sub(now)
                .clamp(1_000, 30_000),
            format!("every lease of round {} is taken", job.round),
        );
    };
    let ttl = expected_ms
        .map_or(policy.max_ttl_ms, |e| (e as f64 * policy.slack) as u64)
        .clamp(policy.min_ttl_ms, policy.max_ttl_ms);
    let expires = now.saturating_add(ttl).min(job.round_deadline_ms);
    let lease_id = w.next_id("lease")?;
    let unit = &job.units[index];
    let shards = unit
        .shards
        .iter()
        .filter_map(|&s| prepared.train_shards.get(s as usize))
        .map(|id| ContentId::from_bytes(*id).to_proto())
        .collect();
    let lease = v1::Lease {
        lease_id,
        job_id: job.id.to_vec(),
        round: job.round,
        holder_peer_id: holder.clone(),
        module: spec.module.clone(),
        start_version: start.version,
        start_adapter: Some(start.adapter.to_proto()),
        base: Some(ContentId::from_bytes(prepared.base).to_proto()),
        lora: spec.lora.clone(),
        shards,
        seed: unit.seed,
        inner: spec.inner,
        delta_encoding: spec.delta_encoding,
        topk_fraction: spec.topk_fraction,
        max_delta_bytes: policy.max_delta_bytes,
        granted_at_unix_ms: now,
        expires_at_unix_ms: expires,
        renew_interval_ms: (expires.saturating_sub(now) / 3).max(1_000),
        round_deadline_unix_ms: job.round_deadline_ms,
    };
    w.put(
        LEASES,
        &u64_key(lease_id),
        &LeaseRecord {
            lease: lease.encode_to_vec(),
            job: job.id,
            round: job.round,
            unit: index as u32,
            holder,
            state: LeaseState::Active,
            expires_at_ms: expires,
            steps_done: 0,
            last_loss: 0.0,
            capabilities: capabilities.encode_to_vec(),
        },
    )?;
    job.units[index].lease = Some(lease_id);
    Ok(LeaseAnswer::Granted(Box::new(lease)))
}

/// The other units that do the same work as unit `index` (a redundant copy and its original).
fn twins(units: &[Unit], index: usize) -> Vec<usize> {
    (0..units.len())
        .filter(|&j| {
            j != index
                && (units[j].redundant_of == Some(index as u32)
                    || units[index].redundant_of == Some(j as u32))
        })
        .collect()
}

/// The unit that does the same work as unit `index`, if it has one: its redundant copy, or
/// the original it copies (a round has at most one copy of a unit).
pub fn twin_of(units: &[Unit], index: usize) -> Option<usize> {
    twins(units, index).into_iter().next()
}

/// The holder of the lease that has (or delivered) `unit`'s work, if known.
fn unit_holder(w: &Write<'_>, unit: &Unit) -> Result<Option<Vec<u8>>, StoreError> {
    match unit.lease {
        Some(id) => Ok(w
            .get::<LeaseRecord>(LEASES, &u64_key(id))?
            .map(|r| r.holder)),
        None => Ok(None),
    }
}

/// Loads lease `lease_id` for an operation by `peer`, refusing a lease that is not theirs.
fn held_lease(w: &Write<'_>, lease_id: u64, peer: &PeerId) -> Result<LeaseRecord, LeaseError> {
    let record = w
        .get::<LeaseRecord>(LEASES, &u64_key(lease_id))?
        .ok_or_else(|| refuse(v1::ErrorCode::NotFound, format!("no lease {lease_id}")))?;
    if record.holder != peer.to_bytes() {
        return Err(refuse(
            v1::ErrorCode::Unauthorized,
            format!("lease {lease_id} is held by another peer"),
        ));
    }
    Ok(record)
}

/// A heartbeat: extends `peer`'s lease, never past the round's deadline.
pub fn renew(
    w: &Write<'_>,
    job: &JobRecord,
    spec: &v1::JobSpec,
    renew: &v1::RenewLease,
    peer: &PeerId,
    policy: &LeasePolicy,
    now: u64,
) -> Result<v1::LeaseRenewed, LeaseError> {
    let mut record = held_lease(w, renew.lease_id, peer)?;
    check_usable(&record, job, now)?;
    let inner = spec.inner.unwrap_or_default();
    if renew.steps_done > u64::from(inner.inner_steps) || !renew.last_loss.is_finite() {
        return Err(refuse(
            v1::ErrorCode::InvalidArgument,
            format!(
                "steps_done {} and last_loss {} do not fit a {}-step lease",
                renew.steps_done, renew.last_loss, inner.inner_steps
            ),
        ));
    }
    let lease = v1::Lease::decode(record.lease.as_slice()).map_err(|e| {
        refuse(
            v1::ErrorCode::Internal,
            format!("lease {} is damaged: {e}", renew.lease_id),
        )
    })?;
    let lifetime = lease
        .expires_at_unix_ms
        .saturating_sub(lease.granted_at_unix_ms)
        .clamp(policy.min_ttl_ms, policy.max_ttl_ms);
    record.expires_at_ms = now.saturating_add(lifetime).min(job.round_deadline_ms);
    record.steps_done = renew.steps_done;
    record.last_loss = renew.last_loss;
    w.put(LEASES, &u64_key(renew.lease_id), &record)?;
    Ok(v1::LeaseRenewed {
        lease_id: renew.lease_id,
        expires_at_unix_ms: record.expires_at_ms,
    })
}

/// Refuses a lease that is no longer active, lapsed, or whose round closed.
pub fn check_usable(record: &LeaseRecord, job: &JobRecord, now: u64) -> Result<(), LeaseError> {
    if job.state != JobState::Running {
        return Err(refuse(
            v1::ErrorCode::JobNotRunning,
            "the job is not running",
        ));
    }
    if record.round != job.round || now >= job.round_deadline_ms {
        return Err(refuse(
            v1::ErrorCode::RoundClosed,
            format!("round {} is closed", record.round),
        ));
    }
    match record.state {
        LeaseState::Active if now < record.expires_at_ms => Ok(()),
        LeaseState::Active | LeaseState::Expired => Err(refuse(
            v1::ErrorCode::LeaseExpired,
            "the lease lapsed; ask for a new one",
        )),
        LeaseState::Released => Err(refuse(
            v1::ErrorCode::LeaseExpired,
            "the lease was released",
        )),
        LeaseState::Delivered => Err(refuse(
            v1::ErrorCode::Conflict,
            "the lease's delta was already delivered",
        )),
    }
}

/// The holder gives its lease back; its unit is free again at once.
pub fn release(
    w: &Write<'_>,
    job: &mut JobRecord,
    lease_id: u64,
    peer: &PeerId,
) -> Result<v1::LeaseReleased, LeaseError> {
    let mut record = held_lease(w, lease_id, peer)?;
    if record.state == LeaseState::Active {
        record.state = LeaseState::Released;
        free_unit(job, &record, lease_id);
        w.put(LEASES, &u64_key(lease_id), &record)?;
    }
    Ok(v1::LeaseReleased { lease_id })
}

fn free_unit(job: &mut JobRecord, record: &LeaseRecord, lease_id: u64) {
    if record.round == job.round
        && let Some(unit) = job.units.get_mut(record.unit as usize)
        && unit.lease == Some(lease_id)
    {
        unit.lease = None;
    }
}

/// Marks lapsed leases of `job`'s open round expired and frees their units; returns them.
pub fn expire(w: &Write<'_>, job: &mut JobRecord, now: u64) -> Result<Vec<u64>, StoreError> {
    let mut expired = Vec::new();
    let held: Vec<u64> = job.units.iter().filter_map(|u| u.lease).collect();
    for lease_id in held {
        let Some(mut record) = w.get::<LeaseRecord>(LEASES, &u64_key(lease_id))? else {
            continue;
        };
        if record.state == LeaseState::Active && now >= record.expires_at_ms {
            record.state = LeaseState::Expired;
            free_unit(job, &record, lease_id);
            w.put(LEASES, &u64_key(lease_id), &record)?;
            expired.push(lease_id);
        }
    }
    Ok(expired)
}

/// Leases of the open round now held.
pub fn active_leases(job: &JobRecord) -> usize {
    job.units
        .iter()
        .filter(|u| u.lease.is_some() && !u.delivered)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::Prepared;
    use crate::store::Store;

    fn spec(quorum: u32, redundancy: f64) -> v1::JobSpec {
        v1::JobSpec {
            module: "shout".into(),
            quorum,
            round_timeout_ms: 600_000,
            inner: Some(v1::TrainSettings {
                inner_steps: 10,
                batch_size: 4,
                ..Default::default()
            }),
            verification: Some(v1::VerificationPolicy {
                redundancy_fraction: redundancy,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn job(spec: &v1::JobSpec, shards: usize, now: u64) -> JobRecord {
        let mut job = JobRecord {
            id: [7; 32],
            signed_spec: Vec::new(),
            owner: Vec::new(),
            module: spec.module.clone(),
            created_at_ms: now,
            state: JobState::Running,
            message: String::new(),
            prepared: Some(Prepared {
                base: [1; 32],
                base_name: "builtin".into(),
                train_shards: (0..shards).map(|i| [10 + i as u8; 32]).collect(),
                eval_shards: vec![[99; 32]],
                seq_len: 64,
            }),
            round: 0,
            rounds_opened: 0,
            round_deadline_ms: 0,
            units: Vec::new(),
            rounds_merged: 0,
            tokens_trained: 0,
            latest_version: 1,
            momentum: None,
            replayed_steps: 0,
            judged_steps: 0,
        };
        open_round(&mut job, spec, now);
        job
    }

    fn start() -> StartPoint {
        StartPoint {
            version: 1,
            adapter: ContentId::from_bytes([5; 32]),
        }
    }

    fn fast() -> v1::PeerCapabilities {
        v1::PeerCapabilities {
            tokens_per_second: 1_000.0,
            ..Default::default()
        }
    }

    fn ask(
        store: &Store,
        job: &mut JobRecord,
        spec: &v1::JobSpec,
        peer: &PeerId,
        caps: &v1::PeerCapabilities,
        now: u64,
    ) -> LeaseAnswer {
        store
            .write(|w| {
                grant(
                    w,
                    job,
                    spec,
                    &start(),
                    peer,
                    caps,
                    &LeasePolicy::default(),
                    now,
                )
            })
            .unwrap()
    }

    fn granted(answer: LeaseAnswer) -> v1::Lease {
        match answer {
            LeaseAnswer::Granted(lease) => *lease,
            LeaseAnswer::NoWork(n) => panic!("no work: {n:?}"),
        }
    }

    fn no_work(answer: LeaseAnswer) -> v1::NoWorkReason {
        match answer {
            LeaseAnswer::NoWork(n) => n.reason(),
            LeaseAnswer::Granted(l) => panic!("granted {l:?}"),
        }
    }

    #[test]
    fn rounds_take_the_shards_in_turn_and_redundant_units_repeat_work() {
        let units = plan_units(&[1; 32], 1, 5, 3, 0.34);
        assert_eq!(units.len(), 5, "3 units and ceil(3 x 0.34) = 2 copies");
        let shards: Vec<u32> = units.iter().map(|u| u.shards[0]).collect();
        assert_eq!(shards, [0, 1, 2, 0, 1]);
        assert_eq!(units[3].seed, units[0].seed);
        assert_ne!(units[1].seed, units[0].seed);
        let next = plan_units(&[1; 32], 2, 5, 3, 0.0);
        assert_eq!(
            next.iter().map(|u| u.shards[0]).collect::<Vec<_>>(),
            [3, 4, 0]
        );
        assert_ne!(next[0].seed, units[0].seed, "every round has new seeds");
    }

    #[test]
    fn leases_fill_a_round_one_at_a_time_per_peer_and_lapse_back_into_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("c.redb")).unwrap();
        let spec = spec(2, 0.0);
        let now = 1_000_000;
        let mut job = job(&spec, 4, now);
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());

        let la = granted(ask(&store, &mut job, &spec, &a, &fast(), now));
        assert_eq!(la.holder_peer_id, a.to_bytes());
        assert_eq!((la.round, la.start_version, la.shards.len()), (1, 1, 1));
        assert!(la.expires_at_unix_ms <= la.round_deadline_unix_ms);
        // a asks again while it holds a lease (it restarted): the same lease, not a second.
        assert_eq!(
            granted(ask(&store, &mut job, &spec, &a, &fast(), now + 5)),
            la
        );
        let lb = granted(ask(&store, &mut job, &spec, &b, &fast(), now));
        assert_ne!(lb.lease_id, la.lease_id);
        assert_ne!(lb.seed, la.seed);
        assert_eq!(
            no_work(ask(&store, &mut job, &spec, &c, &fast(), now)),
            v1::NoWorkReason::RoundFull
        );

        // b renews; a does not and lapses; c gets a's unit.
        let later = la.expires_at_unix_ms;
        let renewed = store
            .write(|w| {
                renew(
                    w,
                    &job,
                    &spec,
                    &v1::RenewLease {
                        lease_id: lb.lease_id,
                        steps_done: 3,
                        last_loss: 2.5,
                    },
                    &b,
                    &LeasePolicy::default(),
                    later - 1,
                )
            })
            .unwrap();
        assert!(renewed.expires_at_unix_ms > lb.expires_at_unix_ms);
        let expired = store.write(|w| expire(w, &mut job, later)).unwrap();
        assert_eq!(expired, [la.lease_id]);
        let lc = granted(ask(&store, &mut job, &spec, &c, &fast(), later));
        assert_eq!(
            (lc.seed, &lc.shards),
            (la.seed, &la.shards),
            "the same work again"
        );

        // The lapsed lease cannot be renewed, and only the holder may touch a lease.
        let renew_a = |w: &Write<'_>| {
            renew(
                w,
                &job,
                &spec,
                &v1::RenewLease {
                    lease_id: la.lease_id,
                    steps_done: 1,
                    last_loss: 1.0,
                },
                &a,
                &LeasePolicy::default(),
                later,
            )
        };
        match store.write(renew_a) {
            Err(LeaseError::Refused(e)) => assert_eq!(e.code(), v1::ErrorCode::LeaseExpired),
            other => panic!("{other:?}"),
        }
        match store.write(|w| release(w, &mut job, lc.lease_id, &a)) {
            Err(LeaseError::Refused(e)) => assert_eq!(e.code(), v1::ErrorCode::Unauthorized),
            other => panic!("{other:?}"),
        }
        // c releases: the unit is free at once.
        store
            .write(|w| release(w, &mut job, lc.lease_id, &c))
            .unwrap();
        let again = granted(ask(&store, &mut job, &spec, &a, &fast(), later));
        assert_eq!(again.seed, la.seed);
        assert!(again.lease_id > lc.lease_id, "lease ids are never reused");
    }

    #[test]
    fn a_redundant_copy_goes_to_another_peer_and_slow_peers_are_told_why() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("c.redb")).unwrap();
        let spec = spec(1, 1.0);
        let now = 5_000;
        let mut job = job(&spec, 2, now);
        let (a, b) = (PeerId::random(), PeerId::random());
        let first = granted(ask(&store, &mut job, &spec, &a, &fast(), now));
        // Pretend a delivered: it may ask again, but not for the copy of its own work.
        job.units[0].delivered = true;
        store
            .write(|w| {
                let mut r: LeaseRecord = w.get(LEASES, &u64_key(first.lease_id))?.unwrap();
                r.state = LeaseState::Delivered;
                w.put(LEASES, &u64_key(first.lease_id), &r)
            })
            .unwrap();
        assert_eq!(
            no_work(ask(&store, &mut job, &spec, &a, &fast(), now)),
            v1::NoWorkReason::RoundFull
        );
        let copy = granted(ask(&store, &mut job, &spec, &b, &fast(), now));
        assert_eq!((copy.seed, &copy.shards), (first.seed, &first.shards));

        let mut slow_job = self::job(&spec, 2, now);
        let slow = v1::PeerCapabilities {
            tokens_per_second: 0.1,
            ..Default::default()
        };
        assert_eq!(
            no_work(ask(&store, &mut slow_job, &spec, &a, &slow, now)),
            v1::NoWorkReason::InsufficientCapabilities
        );
        slow_job.state = JobState::Completed;
        assert_eq!(
            no_work(ask(&store, &mut slow_job, &spec, &a, &fast(), now)),
            v1::NoWorkReason::JobNotRunning
        );
    }
}
