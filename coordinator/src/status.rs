//! What the coordinator tells the world (issue 6, point 5, and issue 7's `swarmtune status`):
//! answers to `/swarmtune/status/1` queries, the job announcements it gossips, and the list
//! of blobs it must keep providing. Everything here reads the store; nothing changes it.

use prost::Message;
use swarmtune_protocol::net::codec::error_reply;
use swarmtune_protocol::{ContentId, PROTOCOL_VERSION, v1};

use crate::engine::{EngineError, decode_spec, decode_verdict};
use crate::leases;
use crate::records::{DeltaRecord, DeltaStatus, JobRecord, JobState, LeaseRecord, LeaseState};
use crate::registry::{self, VersionRecord};
use crate::spec::truncate_utf8;
use crate::store::{DELTAS, JOBS, LEASES, MODULES, REPUTATIONS, Read, VERSIONS, module_prefix};
use crate::verify::Reputation;

/// Most jobs in a `JobList`, versions in a `JobStatus`, and so on (status.proto).
const MAX_JOBS: usize = 256;
const MAX_VERSIONS: usize = 256;
const MAX_ACTIVE_PEERS: usize = 1024;
const MAX_VERDICTS: usize = 256;
const MAX_MESSAGE_BYTES: usize = 1024;

fn response(body: v1::status_response::Body) -> v1::StatusResponse {
    v1::StatusResponse {
        protocol_version: PROTOCOL_VERSION,
        body: Some(body),
    }
}

fn error(code: v1::ErrorCode, message: impl Into<String>) -> v1::StatusResponse {
    response(v1::status_response::Body::Error(error_reply(code, message)))
}

/// The answer to a status query.
pub fn answer(
    r: &Read<'_>,
    request: &v1::StatusRequest,
) -> Result<v1::StatusResponse, EngineError> {
    use v1::status_request::Body;
    Ok(match &request.body {
        Some(Body::GetLatestVersion(get)) => registry::get_version(r, &get.module, 0)?,
        Some(Body::GetVersion(get)) if get.version == 0 => error(
            v1::ErrorCode::InvalidArgument,
            "version must be at least 1 (ask GetLatestVersion for the newest)",
        ),
        Some(Body::GetVersion(get)) => registry::get_version(r, &get.module, get.version)?,
        Some(Body::GetHistory(get)) => response(v1::status_response::Body::ModuleHistory(
            registry::history(r, &get.module, get.before_version, get.limit)?,
        )),
        Some(Body::GetJobStatus(get)) => match job_status(r, &get.job_id)? {
            Some(status) => response(v1::status_response::Body::JobStatus(status)),
            None => error(v1::ErrorCode::NotFound, "no such job at this coordinator"),
        },
        Some(Body::ListJobs(list)) => response(v1::status_response::Body::JobList(jobs(
            r,
            list.include_finished,
        )?)),
        None => error(
            v1::ErrorCode::UnsupportedRequest,
            "the status request has no query",
        ),
    })
}

/// The jobs, newest first, at most 256.
pub fn jobs(r: &Read<'_>, include_finished: bool) -> Result<v1::JobList, EngineError> {
    let mut all: Vec<JobRecord> = r
        .scan::<JobRecord>(JOBS, &[])?
        .into_iter()
        .map(|(_, j)| j)
        .filter(|j| include_finished || matches!(j.state, JobState::Preparing | JobState::Running))
        .collect();
    all.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then(a.id.cmp(&b.id)));
    let jobs = all
        .iter()
        .take(MAX_JOBS)
        .map(|job| summary(r, job))
        .collect::<Result<_, _>>()?;
    Ok(v1::JobList { jobs })
}

/// One job's state, or `None` when there is no such job.
pub fn job_status(r: &Read<'_>, job_id: &[u8]) -> Result<Option<v1::JobStatus>, EngineError> {
    let Some(job) = r.get::<JobRecord>(JOBS, job_id)? else {
        return Ok(None);
    };
    let mut versions = Vec::new();
    let all: Vec<(Vec<u8>, VersionRecord)> = r.scan(VERSIONS, &module_prefix(&job.module))?;
    for (_, record) in all.iter().rev() {
        if versions.len() == MAX_VERSIONS {
            break;
        }
        if manifest_of(record).is_some_and(|m| m.job_id == job.id) {
            versions.extend(registry::summary(record));
        }
    }
    let mut active_peers = Vec::new();
    for (_, lease) in r.scan::<LeaseRecord>(LEASES, &[])? {
        if lease.job != job.id || lease.state != LeaseState::Active || lease.round != job.round {
            continue;
        }
        if active_peers.len() == MAX_ACTIVE_PEERS {
            break;
        }
        let granted = v1::Lease::decode(lease.lease.as_slice()).unwrap_or_default();
        let reputation: Reputation = r.get(REPUTATIONS, &lease.holder)?.unwrap_or_default();
        active_peers.push(v1::ActivePeer {
            peer_id: lease.holder.clone(),
            lease_id: granted.lease_id,
            round: lease.round,
            steps_done: lease.steps_done,
            inner_steps: granted.inner.as_ref().map_or(0, |t| t.inner_steps),
            last_loss: lease.last_loss,
            expires_at_unix_ms: lease.expires_at_ms,
            capabilities: v1::PeerCapabilities::decode(lease.capabilities.as_slice()).ok(),
            reputation: reputation.score,
        });
    }
    let mut judged: Vec<DeltaRecord> = r
        .scan::<DeltaRecord>(DELTAS, &[])?
        .into_iter()
        .map(|(_, d)| d)
        .filter(|d| d.job == job.id && d.verdict.is_some())
        .collect();
    judged.sort_by_key(|d| std::cmp::Reverse(d.lease_id));
    let recent_verdicts = judged
        .iter()
        .take(MAX_VERDICTS)
        .filter_map(|d| d.verdict.as_deref().map(decode_verdict))
        .collect::<Result<_, _>>()?;
    Ok(Some(v1::JobStatus {
        summary: Some(summary(r, &job)?),
        spec: v1::Signed::decode(job.signed_spec.as_slice()).ok(),
        versions,
        active_peers,
        recent_verdicts,
    }))
}

/// A job's headline numbers.
pub fn summary(r: &Read<'_>, job: &JobRecord) -> Result<v1::JobSummary, EngineError> {
    let spec = decode_spec(job)?;
    let (rounds_budget, token_budget) = match spec.budget {
        Some(v1::job_spec::Budget::Rounds(n)) => (n, 0),
        Some(v1::job_spec::Budget::TokenBudget(n)) => (0, n),
        None => (0, 0),
    };
    let latest_metrics = registry::version_record(r, &job.module, job.latest_version)?
        .as_ref()
        .and_then(manifest_of)
        .and_then(|m| m.metrics);
    let round_accepted_deltas = if job.state == JobState::Running {
        r.scan::<DeltaRecord>(DELTAS, &[])?
            .into_iter()
            .filter(|(_, d)| {
                d.job == job.id && d.round == job.round && d.status == DeltaStatus::Accepted
            })
            .count() as u32
    } else {
        0
    };
    Ok(v1::JobSummary {
        job_id: job.id.to_vec(),
        module: job.module.clone(),
        owner_peer_id: job.owner.clone(),
        state: job.state.to_proto() as i32,
        message: truncate_utf8(&job.message, MAX_MESSAGE_BYTES).to_owned(),
        created_at_unix_ms: job.created_at_ms,
        round: job.round,
        rounds_merged: job.rounds_merged,
        rounds_budget,
        token_budget,
        tokens_trained: job.tokens_trained,
        latest_version: job.latest_version,
        latest_metrics,
        round_deadline_unix_ms: if job.state == JobState::Running {
            job.round_deadline_ms
        } else {
            0
        },
        round_accepted_deltas,
        quorum: spec.quorum,
        active_leases: leases::active_leases(job) as u32,
    })
}

/// The announcement of a job for `swarmtune/jobs/1` (unsigned; the service signs it).
pub fn announcement(
    job: &JobRecord,
    coordinator: &libp2p_identity::PeerId,
) -> Result<v1::JobAnnouncement, EngineError> {
    let prepared = job.prepared.as_ref();
    let running = job.state == JobState::Running;
    Ok(v1::JobAnnouncement {
        protocol_version: PROTOCOL_VERSION,
        job_id: job.id.to_vec(),
        coordinator_peer_id: coordinator.to_bytes(),
        spec: Some(
            v1::Signed::decode(job.signed_spec.as_slice())
                .map_err(|e| EngineError::Internal(format!("stored spec: {e}")))?,
        ),
        base: prepared.map(|p| ContentId::from_bytes(p.base).to_proto()),
        train_shards: prepared
            .map(|p| {
                p.train_shards
                    .iter()
                    .take(512)
                    .map(|s| ContentId::from_bytes(*s).to_proto())
                    .collect()
            })
            .unwrap_or_default(),
        state: job.state.to_proto() as i32,
        round: if running { job.round } else { 0 },
        latest_version: job.latest_version,
        round_deadline_unix_ms: if running { job.round_deadline_ms } else { 0 },
        open_leases: if running {
            job.units
                .iter()
                .filter(|u| u.lease.is_none() && !u.delivered)
                .count() as u32
        } else {
            0
        },
        tokens_trained: job.tokens_trained,
    })
}

/// The blobs the coordinator keeps providing on the DHT: every job's base and shards and every
/// published adapter (the deltas and training states it fetched are its own business).
pub fn provided_blobs(r: &Read<'_>) -> Result<Vec<ContentId>, EngineError> {
    let mut out = Vec::new();
    for (_, job) in r.scan::<JobRecord>(JOBS, &[])? {
        if let Some(p) = &job.prepared {
            out.push(ContentId::from_bytes(p.base));
            out.extend(p.train_shards.iter().map(|s| ContentId::from_bytes(*s)));
        }
    }
    for (_, version) in r.scan::<VersionRecord>(VERSIONS, &[])? {
        out.push(ContentId::from_bytes(version.adapter));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Deltas whose volunteer was challenged and has not answered: (lease, volunteer, the
/// challenge to send again). After a restart the service asks again.
pub fn open_challenges(
    r: &Read<'_>,
) -> Result<Vec<(u64, Vec<u8>, v1::SegmentChallenge)>, EngineError> {
    Ok(r.scan::<DeltaRecord>(DELTAS, &[])?
        .into_iter()
        .filter_map(|(_, d)| match d.status {
            DeltaStatus::Challenged {
                segments,
                respond_by_ms,
                ..
            } => Some((
                d.lease_id,
                d.peer,
                v1::SegmentChallenge {
                    lease_id: d.lease_id,
                    segments: segments
                        .iter()
                        .filter_map(|s| v1::Segment::decode(s.as_slice()).ok())
                        .collect(),
                    respond_by_unix_ms: respond_by_ms,
                },
            )),
            _ => None,
        })
        .collect())
}

fn manifest_of(record: &VersionRecord) -> Option<v1::ModuleManifest> {
    let envelope = v1::Signed::decode(record.signed.as_slice()).ok()?;
    v1::ModuleManifest::decode(envelope.payload.as_slice()).ok()
}

/// Every module's latest version: (module, version, the signed manifest).
pub fn latest_manifests(r: &Read<'_>) -> Result<Vec<(String, u64, v1::Signed)>, EngineError> {
    let mut out = Vec::new();
    for (key, module) in r.scan::<registry::ModuleRecord>(MODULES, &[])? {
        let Ok(name) = String::from_utf8(key) else {
            continue;
        };
        if let Some(record) = registry::version_record(r, &name, module.latest)?
            && let Ok(signed) = v1::Signed::decode(record.signed.as_slice())
        {
            out.push((name, module.latest, signed));
        }
    }
    Ok(out)
}
