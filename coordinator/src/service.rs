//! The coordinator on the network (issue 6): carries what peers send to the [`Coordinator`]
//! engine and carries out what it decides. The engine holds every rule and all state; this
//! module only moves bytes and keeps time.
//!
//! - Job owners submit signed specs on `/swarmtune/job/1`; the job's blobs are fetched from
//!   the submitter (or whoever the DHT names), the job is prepared, its blobs provided and it
//!   is announced on `swarmtune/jobs/1`.
//! - Volunteers ask for, renew and release leases on `/swarmtune/lease/1`, and deliver deltas
//!   on `/swarmtune/delta/1`. A delivered delta's blob is fetched from its volunteer, checked,
//!   maybe challenged (a `SegmentChallenge` request to the volunteer, whose states are fetched
//!   in turn) and judged; the verdict is sent to the volunteer as a request of its own.
//! - Anyone asks `/swarmtune/status/1`; blobs are served on `/swarmtune/blob/2`.
//! - A tick expires leases, closes rounds at quorum or deadline, then provides the new
//!   adapters and gossips the new manifests on `swarmtune/modules/1`.
//!
//! Crash safety comes from the engine: each change is one transaction, and everything in
//! flight here (a fetch, a verification, a challenge) is found again in the store after a
//! restart — pending deltas, open challenges, preparing jobs — and picked up where it was.
//! Heavy computations (preparing, verifying, replaying, merging) take turns on one permit so
//! they do not starve each other of the CPU; answers to leases and status never wait for them.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libp2p_identity::PeerId;
use prost::Message;
use swarmtune_protocol::net::codec::error_reply;
use swarmtune_protocol::net::transfer::{self, FetchConfig};
use swarmtune_protocol::net::{
    Client, InboundRequest, Misbehaviour, NetError, NetEvent, Request, Response, ResponseMessage,
    Topic,
};
use swarmtune_protocol::{ContentId, PROTOCOL_VERSION, v1};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::engine::{Coordinator, EngineError, Next, hex};
use crate::leases::LeaseAnswer;
use crate::records::JobState;
use crate::status;

/// How the service behaves.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// How often leases are expired, rounds closed and stragglers picked up.
    pub tick: Duration,
    /// How blobs are fetched.
    pub fetch: FetchConfig,
    /// How long one blob fetch (a delta, a state, a dataset) may take.
    pub fetch_timeout: Duration,
    /// How long a volunteer has to answer a challenge.
    pub challenge_timeout: Duration,
    /// Deltas fetched and verified at once.
    pub verifications: usize,
    /// Inbound requests served at once (the rest wait in the event queue).
    pub requests: usize,
    /// Blob requests served at once.
    pub blob_server_concurrency: usize,
    /// Attempts at fetching a job's blobs before the job is failed.
    pub prepare_attempts: u32,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            tick: Duration::from_secs(1),
            fetch: FetchConfig::default(),
            fetch_timeout: Duration::from_secs(600),
            challenge_timeout: Duration::from_secs(120),
            verifications: 4,
            requests: 64,
            blob_server_concurrency: 8,
            prepare_attempts: 5,
        }
    }
}

/// Why the service stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The network failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The engine failed in a way that stops the service (the store is unusable).
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Milliseconds since the Unix epoch, the engine's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What is under way, so that the tick does not start it twice.
#[derive(Default)]
struct InFlight {
    /// Leases whose delta is being fetched, verified or challenged.
    deltas: HashSet<u64>,
    /// Deltas that passed their checks and wait for their redundant twin's, by lease: their
    /// volunteer gets the verdict when it comes.
    awaiting: HashMap<u64, PeerId>,
    /// Jobs being prepared, and failed attempts so far.
    preparing: HashSet<[u8; 32]>,
    prepare_failures: HashMap<[u8; 32], u32>,
    /// Peers known to hold a job's blobs (its submitters).
    job_sources: HashMap<[u8; 32], Vec<PeerId>>,
    /// Blobs provided on the DHT.
    provided: HashSet<ContentId>,
    /// The latest version announced, per module.
    announced: HashMap<String, u64>,
}

/// Shared by the service's tasks.
struct Shared {
    engine: Arc<Coordinator>,
    client: Client,
    config: ServiceConfig,
    /// One heavy computation at a time.
    compute: Semaphore,
    in_flight: Mutex<InFlight>,
    /// Every task the service started, so that stopping it stops them all.
    tasks: Mutex<JoinSet<()>>,
    /// Cloned into every engine call on the blocking pool (which an abort does not stop), so
    /// that stopping can wait for the last one.
    engine_calls: Arc<()>,
}

impl Shared {
    fn in_flight(&self) -> std::sync::MutexGuard<'_, InFlight> {
        // A task that panicked while holding the lock left plain bookkeeping behind; it is
        // still usable.
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts `task`; the service aborts it when it stops.
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        // Reap the finished ones so the set stays as small as the work under way.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }

    /// Runs `f` on the blocking pool (the engine does disk and math).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Coordinator) -> T + Send + 'static,
    ) -> Result<T, EngineError> {
        let engine = self.engine.clone();
        let call = self.engine_calls.clone();
        tokio::task::spawn_blocking(move || {
            let _call = call;
            f(&engine)
        })
        .await
        .map_err(|e| EngineError::Internal(format!("an engine task failed: {e}")))
    }

    /// [`Shared::blocking`] for heavy work, one at a time.
    async fn heavy<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Coordinator) -> T + Send + 'static,
    ) -> Result<T, EngineError> {
        let _permit = self
            .compute
            .acquire()
            .await
            .map_err(|_| EngineError::Internal("the service is stopping".into()))?;
        self.blocking(f).await
    }

    async fn fetch(&self, id: ContentId, from: &[PeerId]) -> Result<(), String> {
        let fetch = transfer::fetch_from(
            &self.client,
            self.engine.blobs(),
            id,
            &self.config.fetch,
            from,
            None,
        );
        match tokio::time::timeout(self.config.fetch_timeout, fetch).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no complete copy within {:?}",
                self.config.fetch_timeout
            )),
        }
    }
}

/// Runs the coordinator on `client`'s swarm until `shutdown` completes. `events` is the
/// swarm's event stream (see `swarmtune_protocol::net::spawn`).
pub async fn run(
    engine: Arc<Coordinator>,
    client: Client,
    mut events: mpsc::Receiver<NetEvent>,
    config: ServiceConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServiceError> {
    let blob_server = transfer::spawn_server(
        &client,
        engine.blobs().clone(),
        config.blob_server_concurrency,
    )
    .await?;
    let requests = Arc::new(Semaphore::new(config.requests.max(1)));
    let shared = Arc::new(Shared {
        engine,
        client,
        compute: Semaphore::new(1),
        in_flight: Mutex::new(InFlight::default()),
        tasks: Mutex::new(JoinSet::new()),
        engine_calls: Arc::new(()),
        config,
    });
    info!(peer = %shared.engine.peer_id(), "coordinator service started");
    // Resume what a previous run left: open challenges are asked again (the rest the first
    // tick finds).
    resume_challenges(&shared).await?;
    let mut tick = tokio::time::interval(shared.config.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticking: Option<tokio::task::AbortHandle> = None;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            event = events.recv() => {
                let Some(event) = event else { break };
                if let NetEvent::Request(inbound) = event {
                    let Ok(permit) = requests.clone().acquire_owned().await else { break };
                    let task = shared.clone();
                    shared.spawn(async move {
                        let _permit = permit;
                        serve(&task, inbound).await;
                    });
                }
            }
            _ = tick.tick() => {
                // One tick at a time: a merge can outlast the interval.
                if ticking.as_ref().is_none_or(|t| t.is_finished()) {
                    let task = shared.clone();
                    let mut tasks = shared.tasks.lock().unwrap_or_else(|e| e.into_inner());
                    ticking = Some(tasks.spawn(async move {
                        if let Err(e) = on_tick(&task).await {
                            warn!(error = %e, "coordinator tick failed");
                        }
                    }));
                }
            }
        }
    }
    blob_server.abort();
    shared.compute.close();
    // Stop every task, then wait for the engine calls under way: each is one transaction, and
    // what it leaves undone is found again at the next start.
    let mut tasks = std::mem::take(&mut *shared.tasks.lock().unwrap_or_else(|e| e.into_inner()));
    tasks.shutdown().await;
    while Arc::strong_count(&shared.engine_calls) > 1 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    info!("coordinator service stopped");
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Requests

async fn serve(shared: &Arc<Shared>, inbound: InboundRequest) {
    let InboundRequest {
        peer,
        request,
        responder,
    } = inbound;
    let protocol = request.protocol();
    let response = match request {
        Request::Job(r) => Response::Job(on_job(shared, peer, r).await),
        Request::Lease(r) => Response::Lease(on_lease(shared, peer, r).await),
        Request::Delta(r) => Response::Delta(on_delta(shared, peer, r).await),
        Request::Status(query) => {
            let answer = shared
                .blocking(move |engine| engine.store().read(|r| status::answer(r, &query)))
                .await;
            Response::Status(match answer {
                Ok(Ok(response)) => response,
                Ok(Err(e)) | Err(e) => internal(e),
            })
        }
        Request::Blob(_) => Response::error(
            protocol,
            error_reply(v1::ErrorCode::Unavailable, "the blob server is not running"),
        ),
    };
    if let Err(e) = shared.client.respond(responder, response).await {
        debug!(%peer, %protocol, error = %e, "response not sent");
    }
}

fn internal<T: ResponseMessage>(e: EngineError) -> T {
    warn!(error = %e, "coordinator failure");
    T::from_error(error_reply(v1::ErrorCode::Internal, e.to_string()))
}

fn job_response(body: v1::job_response::Body) -> v1::JobResponse {
    v1::JobResponse {
        protocol_version: PROTOCOL_VERSION,
        body: Some(body),
    }
}

fn lease_response(body: v1::lease_response::Body) -> v1::LeaseResponse {
    v1::LeaseResponse {
        protocol_version: PROTOCOL_VERSION,
        body: Some(body),
    }
}

fn delta_response(body: v1::delta_response::Body) -> v1::DeltaResponse {
    v1::DeltaResponse {
        protocol_version: PROTOCOL_VERSION,
        body: Some(body),
    }
}

fn unsupported<T: ResponseMessage>(what: &str) -> T {
    T::from_error(error_reply(
        v1::ErrorCode::UnsupportedRequest,
        format!("a coordinator does not take {what}"),
    ))
}

/// A refusal whose cause is a bad signature counts against the peer.
async fn report_if_forged(shared: &Shared, peer: PeerId, error: &v1::ErrorReply) {
    if error.code() == v1::ErrorCode::BadSignature {
        let _ = shared
            .client
            .report_misbehaviour(peer, Misbehaviour::BadSignature)
            .await;
    }
}

async fn on_job(shared: &Arc<Shared>, peer: PeerId, request: v1::JobRequest) -> v1::JobResponse {
    let Some(v1::job_request::Body::SubmitJob(submit)) = request.body else {
        return unsupported("this job request");
    };
    let Some(spec) = submit.spec else {
        return v1::JobResponse::from_error(error_reply(
            v1::ErrorCode::InvalidArgument,
            "spec: the signed job spec is missing",
        ));
    };
    let answer = shared
        .blocking(move |engine| engine.submit(&spec, now_ms()))
        .await;
    match answer {
        Ok(Ok(submitted)) => {
            if let Ok(id) = <[u8; 32]>::try_from(submitted.job_id.as_slice()) {
                let mut in_flight = shared.in_flight();
                let sources = in_flight.job_sources.entry(id).or_default();
                if !sources.contains(&peer) && sources.len() < 8 {
                    sources.push(peer);
                }
                drop(in_flight);
                if submitted.state() == v1::JobState::Preparing {
                    start_preparing(shared, id);
                }
            }
            job_response(v1::job_response::Body::JobSubmitted(submitted))
        }
        Ok(Err(error)) => {
            report_if_forged(shared, peer, &error).await;
            v1::JobResponse::from_error(error)
        }
        Err(e) => internal(e),
    }
}

async fn on_lease(
    shared: &Arc<Shared>,
    peer: PeerId,
    request: v1::LeaseRequest,
) -> v1::LeaseResponse {
    use v1::lease_request::Body;
    use v1::lease_response::Body as Answer;
    let answer = match request.body {
        Some(Body::RequestLease(ask)) => {
            shared
                .blocking(move |engine| {
                    engine
                        .request_lease(&peer, &ask, now_ms())
                        .map(|answer| match answer {
                            LeaseAnswer::Granted(lease) => Answer::LeaseGranted(v1::LeaseGranted {
                                lease: Some(*lease),
                            }),
                            LeaseAnswer::NoWork(no) => Answer::NoWork(no),
                        })
                })
                .await
        }
        Some(Body::RenewLease(renew)) => {
            shared
                .blocking(move |engine| {
                    engine
                        .renew_lease(&peer, &renew, now_ms())
                        .map(Answer::LeaseRenewed)
                })
                .await
        }
        Some(Body::ReleaseLease(release)) => {
            shared
                .blocking(move |engine| {
                    engine
                        .release_lease(&peer, &release)
                        .map(Answer::LeaseReleased)
                })
                .await
        }
        None => return unsupported("this lease request"),
    };
    match answer {
        Ok(Ok(body)) => lease_response(body),
        Ok(Err(error)) => v1::LeaseResponse::from_error(error),
        Err(e) => internal(e),
    }
}

async fn on_delta(
    shared: &Arc<Shared>,
    peer: PeerId,
    request: v1::DeltaRequest,
) -> v1::DeltaResponse {
    let Some(v1::delta_request::Body::SubmitDelta(submit)) = request.body else {
        return unsupported("challenges or verdicts");
    };
    let Some(envelope) = submit.envelope else {
        return v1::DeltaResponse::from_error(error_reply(
            v1::ErrorCode::InvalidArgument,
            "envelope: the signed delta envelope is missing",
        ));
    };
    let answer = shared
        .blocking(move |engine| engine.submit_delta(&peer, &envelope, now_ms()))
        .await;
    match answer {
        Ok(Ok(body)) => {
            if let v1::delta_response::Body::DeltaReceipt(receipt) = &body {
                start_verifying(shared, receipt.lease_id, peer);
            }
            delta_response(body)
        }
        Ok(Err(error)) => {
            report_if_forged(shared, peer, &error).await;
            v1::DeltaResponse::from_error(error)
        }
        Err(e) => internal(e),
    }
}

// ------------------------------------------------------------------------------------------
// Verification

/// Verifies the delta of `lease_id` from `peer` in a task of its own, unless that is under
/// way already.
fn start_verifying(shared: &Arc<Shared>, lease_id: u64, peer: PeerId) {
    if !shared.in_flight().deltas.insert(lease_id) {
        return;
    }
    let task = shared.clone();
    shared.spawn(async move {
        let shared = task;
        if let Err(e) = verify_delta(&shared, lease_id, peer).await {
            warn!(lease = lease_id, error = %e, "verification did not finish; retried later");
        }
        shared.in_flight().deltas.remove(&lease_id);
    });
}

async fn verify_delta(
    shared: &Arc<Shared>,
    lease_id: u64,
    peer: PeerId,
) -> Result<(), EngineError> {
    let pending = shared.blocking(|engine| engine.pending_deltas()).await??;
    let Some((_, _, delta)) = pending.into_iter().find(|(l, _, _)| *l == lease_id) else {
        return Ok(());
    };
    let fetched = match shared.fetch(delta, &[peer]).await {
        Ok(()) => true,
        Err(reason) => {
            info!(lease = lease_id, %peer, %reason, "delta blob not fetched");
            false
        }
    };
    let next = shared
        .heavy(move |engine| engine.verify(lease_id, fetched, now_ms()))
        .await??;
    follow(shared, peer, lease_id, next).await
}

/// Carries out what the engine decided about the delta of `lease_id` until it is judged:
/// challenges (a tie-break may follow the first), then the verdict, or a wait for the delta
/// of its redundant twin (the tick delivers that verdict).
async fn follow(
    shared: &Arc<Shared>,
    peer: PeerId,
    lease_id: u64,
    mut next: Next,
) -> Result<(), EngineError> {
    loop {
        next = match next {
            Next::Verdict(verdict) => {
                shared.in_flight().awaiting.remove(&lease_id);
                deliver_verdict(shared, peer, *verdict).await;
                return Ok(());
            }
            Next::Challenge(challenge) => challenge_peer(shared, peer, challenge).await?,
            Next::AwaitingTwin => {
                info!(lease = lease_id, %peer, "delta passed its checks; waiting for its redundant twin");
                shared.in_flight().awaiting.insert(lease_id, peer);
                return Ok(());
            }
        };
    }
}

/// Sends `challenge` to `peer`, fetches the states it answers with and judges them.
async fn challenge_peer(
    shared: &Arc<Shared>,
    peer: PeerId,
    challenge: v1::SegmentChallenge,
) -> Result<Next, EngineError> {
    let lease_id = challenge.lease_id;
    info!(lease = lease_id, %peer, segments = challenge.segments.len(), "challenging");
    let request = v1::DeltaRequest {
        protocol_version: PROTOCOL_VERSION,
        body: Some(v1::delta_request::Body::SegmentChallenge(challenge)),
    };
    let asked = tokio::time::timeout(
        shared.config.challenge_timeout,
        shared.client.request(peer, request),
    )
    .await;
    let states = match asked {
        Ok(Ok(v1::DeltaResponse {
            body: Some(v1::delta_response::Body::SegmentStates(states)),
            ..
        })) if states.lease_id == lease_id => Ok(states),
        Ok(Ok(other)) => Err(match other.error() {
            Some(e) => format!("the challenge was refused: {}", e.message),
            None => "the answer to the challenge is not segment states".to_owned(),
        }),
        Ok(Err(e)) => Err(format!("the challenge could not be delivered: {e}")),
        Err(_) => Err("no answer to the challenge in time".to_owned()),
    };
    let states = match states {
        Ok(states) => states,
        Err(why) => {
            return unanswered(shared, lease_id, why).await;
        }
    };
    // Every state blob the answer names, from the volunteer.
    let mut wanted: Vec<ContentId> = states
        .states
        .iter()
        .flat_map(|s| [s.start_state.as_ref(), s.end_state.as_ref()])
        .flatten()
        .filter_map(|c| ContentId::try_from(c).ok())
        .collect();
    wanted.sort();
    wanted.dedup();
    for id in wanted {
        if let Err(reason) = shared.fetch(id, &[peer]).await {
            let why = format!("state {id} could not be fetched: {reason}");
            return unanswered(shared, lease_id, why).await;
        }
    }
    shared
        .heavy(move |engine| engine.answer_challenge(lease_id, &states, now_ms()))
        .await?
}

/// Judges the delta of `lease_id` whose challenge got no (usable) answer.
async fn unanswered(shared: &Arc<Shared>, lease_id: u64, why: String) -> Result<Next, EngineError> {
    let verdict = shared
        .heavy(move |engine| engine.challenge_unanswered(lease_id, &why, now_ms()))
        .await??;
    Ok(Next::Verdict(Box::new(verdict)))
}

/// Tells the volunteer its verdict (best effort: the verdict is recorded, and the same
/// envelope delivered again gets it).
async fn deliver_verdict(shared: &Shared, peer: PeerId, verdict: v1::VerificationVerdict) {
    info!(
        lease = verdict.lease_id,
        %peer,
        outcome = ?verdict.outcome(),
        reason = ?verdict.reason(),
        "verdict"
    );
    let request = v1::DeltaRequest {
        protocol_version: PROTOCOL_VERSION,
        body: Some(v1::delta_request::Body::Verdict(verdict)),
    };
    if let Err(e) = shared.client.request(peer, request).await {
        debug!(%peer, error = %e, "verdict not delivered");
    }
}

async fn resume_challenges(shared: &Arc<Shared>) -> Result<(), EngineError> {
    let open = shared
        .blocking(|engine| engine.store().read(status::open_challenges))
        .await??;
    for (lease_id, peer, challenge) in open {
        let Ok(peer) = PeerId::from_bytes(&peer) else {
            continue;
        };
        if !shared.in_flight().deltas.insert(lease_id) {
            continue;
        }
        let task = shared.clone();
        shared.spawn(async move {
            let shared = task;
            let next = if challenge.respond_by_unix_ms <= now_ms() {
                unanswered(
                    &shared,
                    lease_id,
                    "no answer to the challenge in time".into(),
                )
                .await
            } else {
                challenge_peer(&shared, peer, challenge).await
            };
            let result = match next {
                Ok(next) => follow(&shared, peer, lease_id, next).await,
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                warn!(lease = lease_id, error = %e, "resumed challenge failed");
            }
            shared.in_flight().deltas.remove(&lease_id);
        });
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Jobs

/// Fetches a preparing job's blobs and prepares it, in a task of its own.
fn start_preparing(shared: &Arc<Shared>, job_id: [u8; 32]) {
    if !shared.in_flight().preparing.insert(job_id) {
        return;
    }
    let task = shared.clone();
    shared.spawn(async move {
        let shared = task;
        match prepare(&shared, job_id).await {
            Ok(()) => {
                shared.in_flight().prepare_failures.remove(&job_id);
            }
            Err(reason) => {
                let failures = {
                    let mut in_flight = shared.in_flight();
                    let n = in_flight.prepare_failures.entry(job_id).or_default();
                    *n += 1;
                    *n
                };
                warn!(job = %hex(&job_id), attempt = failures, %reason, "job not prepared");
                if failures >= shared.config.prepare_attempts {
                    let why = format!("its blobs could not be fetched: {reason}");
                    let _ = shared
                        .blocking(move |engine| engine.fail_preparing(&job_id, &why))
                        .await;
                }
            }
        }
        shared.in_flight().preparing.remove(&job_id);
    });
}

async fn prepare(shared: &Arc<Shared>, job_id: [u8; 32]) -> Result<(), String> {
    let needed = shared
        .blocking(move |engine| engine.needed_blobs(&job_id))
        .await
        .and_then(|r| r)
        .map_err(|e| e.to_string())?;
    let owner = shared
        .blocking(move |engine| engine.job(&job_id))
        .await
        .and_then(|r| r)
        .map_err(|e| e.to_string())?
        .owner;
    let mut sources = shared
        .in_flight()
        .job_sources
        .get(&job_id)
        .cloned()
        .unwrap_or_default();
    sources.extend(PeerId::from_bytes(&owner).ok());
    for id in needed {
        shared.fetch(id, &sources).await?;
    }
    shared
        .heavy(move |engine| engine.prepare(&job_id, now_ms()))
        .await
        .and_then(|r| r)
        .map_err(|e| e.to_string())?;
    let job = shared
        .blocking(move |engine| engine.job(&job_id))
        .await
        .and_then(|r| r)
        .map_err(|e| e.to_string())?;
    if job.state == JobState::Running {
        info!(job = %hex(&job_id), module = %job.module, "job running");
    }
    publish_news(shared, &[job_id]).await;
    Ok(())
}

// ------------------------------------------------------------------------------------------
// The tick

async fn on_tick(shared: &Arc<Shared>) -> Result<(), EngineError> {
    // A failure here is logged and the rest of the tick still runs (the engine's tick itself
    // goes on past a job that fails).
    let closed = match shared.heavy(|engine| engine.tick(now_ms())).await {
        Ok(Ok(closed)) => closed,
        Ok(Err(e)) | Err(e) => {
            warn!(error = %e, "rounds not closed this tick");
            Vec::new()
        }
    };
    // Stragglers: deltas and jobs a restart (or a failed attempt) left behind.
    let pending = shared.blocking(|engine| engine.pending_deltas()).await??;
    for (lease_id, peer, _) in pending {
        start_verifying(shared, lease_id, peer);
    }
    // Challenges nobody is waiting for: a restart's, and the tie-breaks a redundant twin's
    // delta opened for a delta that was waiting for it.
    resume_challenges(shared).await?;
    deliver_awaited(shared).await?;
    let preparing = shared.blocking(|engine| engine.preparing_jobs()).await??;
    for job_id in preparing {
        start_preparing(shared, job_id);
    }
    if !closed.is_empty() || shared.in_flight().provided.is_empty() {
        publish_news(shared, &closed).await;
    }
    Ok(())
}

/// Delivers the verdicts that came for deltas that were waiting for their redundant twin
/// (also those a restart left waiting).
async fn deliver_awaited(shared: &Arc<Shared>) -> Result<(), EngineError> {
    let waiting = shared.blocking(|engine| engine.awaiting_twin()).await??;
    let leases: Vec<(u64, PeerId)> = {
        let mut in_flight = shared.in_flight();
        for (lease_id, peer) in waiting {
            in_flight.awaiting.entry(lease_id).or_insert(peer);
        }
        in_flight.awaiting.iter().map(|(l, p)| (*l, *p)).collect()
    };
    for (lease_id, peer) in leases {
        if let Some(verdict) = shared
            .blocking(move |engine| engine.verdict(lease_id))
            .await??
        {
            shared.in_flight().awaiting.remove(&lease_id);
            deliver_verdict(shared, peer, verdict).await;
        }
    }
    Ok(())
}

/// Provides every blob not yet provided, announces `jobs` on `swarmtune/jobs/1` and every
/// module version not yet announced on `swarmtune/modules/1`.
async fn publish_news(shared: &Arc<Shared>, jobs: &[[u8; 32]]) {
    let news = shared
        .blocking({
            let jobs = jobs.to_vec();
            move |engine| {
                engine.store().read(|r| {
                    let blobs = status::provided_blobs(r)?;
                    let mut announcements = Vec::new();
                    for id in &jobs {
                        if let Some(job) = r.get(crate::store::JOBS, id)? {
                            announcements.push(status::announcement(&job, &engine.peer_id())?);
                        }
                    }
                    let manifests = status::latest_manifests(r)?;
                    Ok::<_, EngineError>((blobs, announcements, manifests))
                })
            }
        })
        .await
        .and_then(|r| r);
    let (blobs, announcements, manifests) = match news {
        Ok(news) => news,
        Err(e) => {
            warn!(error = %e, "could not read what to announce");
            return;
        }
    };
    for id in blobs {
        if shared.in_flight().provided.contains(&id) {
            continue;
        }
        match shared.client.start_providing(id.as_bytes().to_vec()).await {
            Ok(()) => {
                shared.in_flight().provided.insert(id);
            }
            Err(e) => debug!(%id, error = %e, "not provided yet"),
        }
    }
    let now = now_ms();
    for announcement in announcements {
        match shared.engine.sign(&announcement, now) {
            Ok(signed) => gossip(shared, Topic::Jobs, signed).await,
            Err(e) => warn!(error = %e, "announcement not signed"),
        }
    }
    for (module, version, signed) in manifests {
        let known = shared.in_flight().announced.get(&module).copied();
        if known.is_some_and(|v| v >= version) {
            continue;
        }
        gossip(shared, Topic::Modules, signed).await;
        shared.in_flight().announced.insert(module, version);
    }
}

async fn gossip(shared: &Shared, topic: Topic, signed: v1::Signed) {
    if let Err(e) = shared.client.publish(topic, signed.encode_to_vec()).await {
        // Nobody listening yet is normal on a young network; status queries still answer.
        debug!(%topic, error = %e, "not gossiped");
    }
}
