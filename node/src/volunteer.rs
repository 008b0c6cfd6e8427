//! The volunteer (`swarmtune node`): finds coordinators, takes leases, trains them and
//! delivers signed deltas, answers the coordinator's challenges from the states it kept, and
//! serves the blobs it holds.
//!
//! Two tasks share the work. [`run`]'s loop asks the coordinators it knows for a lease, fetches
//! what the lease names, trains it on the blocking pool (renewing the lease meanwhile) and
//! delivers the delta. The event task answers what peers send: job announcements teach it new
//! coordinators, and a delivered lease's `SegmentChallenge` and verdict arrive as requests.
//! Blob requests are served by [`transfer::spawn_server`].
//!
//! A coordinator that cannot be reached or answers with an error is asked again after an
//! exponential backoff; nothing it says can crash the node. On shutdown the lease being trained
//! is released, and the node waits (for a bounded time) for the verdicts of the deltas it has
//! delivered, so that its challenges are answered and its reputation kept.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use libp2p_identity::{Keypair, PeerId};
use swarmtune_coordinator::engine::lora_config;
use swarmtune_coordinator::verify;
use swarmtune_protocol::net::codec::error_reply;
use swarmtune_protocol::net::transfer::{self, FetchConfig};
use swarmtune_protocol::net::{Client, InboundRequest, NetEvent, Request, Response, Topic};
use swarmtune_protocol::{BlobStore, ContentId, PROTOCOL_VERSION, signed, v1};
use swarmtune_trainer::checkpoint::safetensors_from_bytes;
use swarmtune_trainer::data::{Shard, ShardLimits};
use swarmtune_trainer::delta;
use swarmtune_trainer::device::{DeviceKind, ThreadPool};
use swarmtune_trainer::lora::Adapter;
use swarmtune_trainer::model::CausalLm;
use swarmtune_trainer::train::{LeaseData, LocalTrainer, Provenance, TrainOutcome};
use tokio::sync::{Notify, mpsc};
use tracing::{debug, info, warn};

/// How a volunteer behaves.
#[derive(Clone, Debug)]
pub struct VolunteerConfig {
    /// Where the model cache and the speed measurement live.
    pub data_dir: PathBuf,
    /// The compute backend.
    pub device: DeviceKind,
    /// Math threads (0: one per core).
    pub threads: usize,
    /// Memory training may use, in bytes (0: not limited by the user); told to coordinators.
    pub max_memory_bytes: u64,
    /// Coordinators to ask even before one announces a job (the bootstrap peers).
    pub coordinators: Vec<PeerId>,
    /// How blobs are fetched.
    pub fetch: FetchConfig,
    /// How long one blob fetch may take.
    pub fetch_timeout: Duration,
    /// The first wait after a failed request to a coordinator; doubled up to `max_backoff`.
    pub min_backoff: Duration,
    /// The longest wait between asks.
    pub max_backoff: Duration,
    /// How long a shutdown waits for the verdicts of delivered deltas.
    pub verdict_grace: Duration,
    /// Delivered leases kept for their challenges at once (the oldest is dropped past this).
    pub max_held: usize,
    /// Stop after this many verdicts (for tests and the demo; `None`: run until shut down).
    pub max_leases: Option<usize>,
}

impl VolunteerConfig {
    /// Settings for a volunteer with data in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            device: DeviceKind::Cpu,
            threads: 0,
            max_memory_bytes: 0,
            coordinators: Vec::new(),
            fetch: FetchConfig::default(),
            fetch_timeout: Duration::from_secs(600),
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            verdict_grace: Duration::from_secs(60),
            max_held: 16,
            max_leases: None,
        }
    }
}

/// What the volunteer tells its user (a progress display, a log, a test).
#[derive(Clone, Debug, PartialEq)]
pub enum Report {
    /// A lease was granted.
    Leased {
        /// The lease.
        lease_id: u64,
        /// Its module.
        module: String,
        /// Its round.
        round: u64,
        /// Optimizer steps it asks for.
        steps: u64,
    },
    /// Training progress.
    Step {
        /// The lease.
        lease_id: u64,
        /// Steps done.
        step: u64,
        /// Steps in the lease.
        total: u64,
        /// This step's loss.
        loss: f32,
    },
    /// The delta was delivered and the coordinator took it.
    Delivered {
        /// The lease.
        lease_id: u64,
        /// Loss of the first batch before and after training.
        loss_before: f32,
        /// See `loss_before`.
        loss_after: f32,
        /// Training seconds.
        seconds: f64,
    },
    /// The coordinator asked to replay part of the lease.
    Challenged {
        /// The lease.
        lease_id: u64,
        /// Segments asked for.
        segments: usize,
    },
    /// The verdict on a delivered delta.
    Verdict {
        /// The lease.
        lease_id: u64,
        /// Accepted or rejected.
        accepted: bool,
        /// Why, for people.
        message: String,
    },
    /// A lease was given back or lost, with the reason.
    Dropped {
        /// The lease.
        lease_id: u64,
        /// Why.
        reason: String,
    },
}

/// A delivered lease: kept until its verdict, to answer challenges.
struct Held {
    outcome: Arc<TrainOutcome>,
    coordinator: PeerId,
    delivered: Instant,
}

/// When to ask a coordinator next.
#[derive(Clone, Copy)]
struct Backoff {
    next: Instant,
    wait: Duration,
}

struct Shared {
    key: Keypair,
    client: Client,
    store: BlobStore,
    config: VolunteerConfig,
    coordinators: Mutex<BTreeMap<PeerId, Backoff>>,
    held: Mutex<HashMap<u64, Held>>,
    /// Wakes the lease loop: a coordinator appeared, a verdict came.
    wake: Notify,
    verdicts: Mutex<usize>,
    reports: Option<mpsc::Sender<Report>>,
}

impl Shared {
    fn report(&self, report: Report) {
        if let Some(tx) = &self.reports {
            // A slow display loses reports rather than slowing training.
            let _ = tx.try_send(report);
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn coordinators(&self) -> std::sync::MutexGuard<'_, BTreeMap<PeerId, Backoff>> {
        self.coordinators.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn learn_coordinator(&self, peer: PeerId) {
        let mut known = self.coordinators();
        if let std::collections::btree_map::Entry::Vacant(entry) = known.entry(peer) {
            info!(%peer, "found a coordinator");
            entry.insert(Backoff {
                next: Instant::now(),
                wait: self.config.min_backoff,
            });
            self.wake.notify_one();
        }
    }

    /// The coordinator to ask now, or how long until one may be asked.
    fn next_coordinator(&self) -> Result<PeerId, Duration> {
        let known = self.coordinators();
        let now = Instant::now();
        let due = known
            .iter()
            .filter(|(_, b)| b.next <= now)
            .min_by_key(|(_, b)| b.next);
        match due {
            Some((peer, _)) => Ok(*peer),
            None => Err(known
                .values()
                .map(|b| b.next.saturating_duration_since(now))
                .min()
                .unwrap_or(self.config.max_backoff)),
        }
    }

    /// Asks `peer` again after `after`, or after its doubled backoff when `after` is `None`.
    fn defer(&self, peer: PeerId, after: Option<Duration>) {
        let (min, max) = (self.config.min_backoff, self.config.max_backoff);
        let mut known = self.coordinators();
        let entry = known.entry(peer).or_insert(Backoff {
            next: Instant::now(),
            wait: min,
        });
        let wait = match after {
            Some(after) => {
                entry.wait = min;
                after.clamp(min, max)
            }
            None => {
                let wait = entry.wait;
                entry.wait = (wait * 2).min(max);
                wait
            }
        };
        entry.next = Instant::now() + wait;
    }

    fn reset_backoff(&self, peer: PeerId) {
        if let Some(b) = self.coordinators().get_mut(&peer) {
            b.wait = self.config.min_backoff;
            b.next = Instant::now();
        }
    }

    fn done(&self) -> bool {
        let verdicts = *self.verdicts.lock().unwrap_or_else(|e| e.into_inner());
        self.config.max_leases.is_some_and(|max| verdicts >= max)
    }
}

/// Runs a volunteer on `client` until `shutdown` resolves (or `config.max_leases` verdicts
/// came). `events` is the swarm's event stream; the volunteer serves `store`'s blobs.
pub async fn run(
    key: Keypair,
    client: Client,
    events: mpsc::Receiver<NetEvent>,
    store: BlobStore,
    config: VolunteerConfig,
    reports: Option<mpsc::Sender<Report>>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    transfer::spawn_server(&client, store.clone(), 4).await?;
    let pool = Arc::new(ThreadPool::new(config.threads)?);
    let speed = measure_speed(&config, &pool).await?;
    info!(tokens_per_s = speed, "measured training speed");
    let shared = Arc::new(Shared {
        key,
        client,
        store,
        coordinators: Mutex::new(BTreeMap::new()),
        held: Mutex::new(HashMap::new()),
        wake: Notify::new(),
        verdicts: Mutex::new(0),
        reports,
        config,
    });
    for peer in shared.config.coordinators.clone() {
        shared.learn_coordinator(peer);
    }
    let event_task = tokio::spawn(serve_events(shared.clone(), events));
    let mut models = ModelCache::default();
    let stop = Arc::new(AtomicBool::new(false));
    let work = lease_loop(&shared, &pool, speed, &mut models, &stop);
    tokio::pin!(work);
    tokio::pin!(shutdown);
    let result = tokio::select! {
        r = &mut work => r,
        () = &mut shutdown => {
            info!("shutting down: giving back the lease in hand");
            stop.store(true, Ordering::Relaxed);
            // The loop notices, releases its lease and returns.
            work.await
        }
    };
    // Delivered deltas may still be challenged: stay for their verdicts, for a while.
    let deadline = Instant::now() + shared.config.verdict_grace;
    while !shared.held().is_empty() && Instant::now() < deadline {
        let waiting = shared.held().len();
        info!(
            waiting,
            "waiting for the verdicts of delivered deltas (Ctrl-C again to quit now)"
        );
        tokio::select! {
            () = shared.wake.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    event_task.abort();
    result
}

/// Asks coordinators for leases and works them until stopped.
async fn lease_loop(
    shared: &Arc<Shared>,
    pool: &Arc<ThreadPool>,
    speed: f64,
    models: &mut ModelCache,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<()> {
    loop {
        if stop.load(Ordering::Relaxed) || shared.done() {
            return Ok(());
        }
        let peer = match shared.next_coordinator() {
            Ok(peer) => peer,
            Err(wait) => {
                debug!(?wait, "no coordinator to ask yet");
                tokio::select! {
                    () = shared.wake.notified() => {}
                    () = tokio::time::sleep(wait.min(Duration::from_secs(1))) => {}
                }
                continue;
            }
        };
        let request = v1::LeaseRequest {
            protocol_version: PROTOCOL_VERSION,
            body: Some(v1::lease_request::Body::RequestLease(v1::RequestLease {
                job_id: Vec::new(),
                capabilities: Some(capabilities(&shared.config, pool, speed)),
            })),
        };
        let answer = match shared.client.request(peer, request).await {
            Ok(answer) => answer,
            Err(e) => {
                debug!(%peer, "lease request failed: {e}");
                shared.defer(peer, None);
                continue;
            }
        };
        match answer.body {
            Some(v1::lease_response::Body::LeaseGranted(v1::LeaseGranted {
                lease: Some(lease),
            })) => {
                shared.reset_backoff(peer);
                let lease_id = lease.lease_id;
                if let Err(e) = work_lease(shared, pool, models, stop, peer, lease).await {
                    warn!(lease_id, "lease failed: {e:#}");
                    shared.report(Report::Dropped {
                        lease_id,
                        reason: format!("{e:#}"),
                    });
                    shared.defer(peer, None);
                }
            }
            Some(v1::lease_response::Body::NoWork(no)) => {
                debug!(%peer, reason = ?no.reason(), "{}", no.message);
                let after = Duration::from_millis(no.retry_after_ms);
                let after = match no.reason() {
                    v1::NoWorkReason::JobNotRunning
                    | v1::NoWorkReason::InsufficientCapabilities
                    | v1::NoWorkReason::NoJobs
                        if no.retry_after_ms == 0 =>
                    {
                        shared.config.max_backoff
                    }
                    _ => after,
                };
                shared.defer(peer, Some(after));
            }
            Some(v1::lease_response::Body::Error(e)) => {
                debug!(%peer, code = ?e.code(), "lease refused: {}", e.message);
                let after = (e.retry_after_ms > 0).then(|| Duration::from_millis(e.retry_after_ms));
                shared.defer(peer, after);
            }
            other => {
                debug!(%peer, "unexpected lease answer {other:?}");
                shared.defer(peer, None);
            }
        }
    }
}

/// What a volunteer tells a coordinator about itself.
fn capabilities(config: &VolunteerConfig, pool: &ThreadPool, speed: f64) -> v1::PeerCapabilities {
    let provenance = Provenance::here(config.device.backend_name(), pool.threads());
    v1::PeerCapabilities {
        cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get()) as u32,
        memory_bytes: config.max_memory_bytes,
        device_kind: match config.device {
            DeviceKind::Gpu => v1::DeviceKind::Gpu as i32,
            _ => v1::DeviceKind::Cpu as i32,
        },
        tokens_per_second: speed,
        provenance: Some(verify::provenance_to_wire(&provenance)),
        ..Default::default()
    }
}

/// Fetches, trains and delivers one lease. On a stop request the lease is released.
async fn work_lease(
    shared: &Arc<Shared>,
    pool: &Arc<ThreadPool>,
    models: &mut ModelCache,
    stop: &Arc<AtomicBool>,
    coordinator: PeerId,
    lease: v1::Lease,
) -> anyhow::Result<()> {
    let lease_id = lease.lease_id;
    let steps = lease.inner.as_ref().map_or(0, |i| u64::from(i.inner_steps));
    info!(lease_id, module = %lease.module, round = lease.round, steps, "got a lease");
    shared.report(Report::Leased {
        lease_id,
        module: lease.module.clone(),
        round: lease.round,
        steps,
    });
    // Heartbeats until the delta is delivered; a refused renewal stops the work.
    let cancel = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Mutex::new((0u64, 0f32)));
    let renewer = tokio::spawn(renew(
        shared.clone(),
        coordinator,
        lease.clone(),
        cancel.clone(),
        progress.clone(),
    ));
    let stopper = {
        let (stop, cancel) = (stop.clone(), cancel.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            cancel.store(true, Ordering::Relaxed);
        })
    };
    let trained = train_lease(
        shared,
        pool,
        models,
        coordinator,
        &lease,
        &cancel,
        &progress,
    )
    .await;
    stopper.abort();
    let outcome = match trained {
        Ok(outcome) => outcome,
        Err(e) => {
            renewer.abort();
            let (reason, why) = if stop.load(Ordering::Relaxed) {
                (
                    v1::ReleaseReason::Shutdown,
                    "the node is shutting down".to_owned(),
                )
            } else if cancel.load(Ordering::Relaxed) {
                // The coordinator refused a renewal: the lease is gone already.
                shared.report(Report::Dropped {
                    lease_id,
                    reason: "the coordinator ended the lease".into(),
                });
                return Ok(());
            } else {
                (e.reason, format!("{:#}", e.error))
            };
            release(shared, coordinator, lease_id, reason, &why).await;
            shared.report(Report::Dropped {
                lease_id,
                reason: why,
            });
            if e.reason == v1::ReleaseReason::Shutdown {
                return Ok(());
            }
            return Err(e.error);
        }
    };
    let delivered = deliver(shared, coordinator, &lease, outcome).await;
    renewer.abort();
    delivered
}

/// A failed lease and what to tell the coordinator.
struct LeaseFailure {
    reason: v1::ReleaseReason,
    error: anyhow::Error,
}

fn failed(reason: v1::ReleaseReason) -> impl FnOnce(anyhow::Error) -> LeaseFailure {
    move |error| LeaseFailure { reason, error }
}

/// Fetches what the lease names and trains it.
async fn train_lease(
    shared: &Arc<Shared>,
    pool: &Arc<ThreadPool>,
    models: &mut ModelCache,
    coordinator: PeerId,
    lease: &v1::Lease,
    cancel: &Arc<AtomicBool>,
    progress: &Arc<Mutex<(u64, f32)>>,
) -> Result<TrainOutcome, LeaseFailure> {
    use v1::ReleaseReason::{FetchFailed, Other, TrainingFailed};
    let coordinator = Some(coordinator);
    let id = |c: Option<&v1::ContentId>, what: &str| {
        c.and_then(|c| ContentId::try_from(c).ok())
            .with_context(|| format!("the lease names no valid {what}"))
            .map_err(failed(Other))
    };
    let base = id(lease.base.as_ref(), "base")?;
    let start = id(lease.start_adapter.as_ref(), "start adapter")?;
    let model = models
        .get(shared, base, coordinator)
        .await
        .map_err(failed(FetchFailed))?;
    let start_bytes = fetch(shared, start, coordinator)
        .await
        .map_err(failed(FetchFailed))?;
    let mut shards = Vec::new();
    for c in &lease.shards {
        let shard = id(Some(c), "shard")?;
        let bytes = fetch(shared, shard, coordinator)
            .await
            .map_err(failed(FetchFailed))?;
        shards.push(
            Shard::decode(&bytes, &ShardLimits::default())
                .with_context(|| format!("shard {shard}"))
                .map_err(failed(FetchFailed))?,
        );
    }
    let lora = lease
        .lora
        .as_ref()
        .map(lora_config)
        .context("the lease names no LoRA config")
        .map_err(failed(Other))?;
    let spec = verify::train_spec(lease)
        .map_err(|r| anyhow::anyhow!("the lease's settings: {}", r.message))
        .map_err(failed(Other))?;
    let (start_tensors, _) = safetensors_from_bytes(&start_bytes, Path::new("start adapter"))
        .context("the start adapter")
        .map_err(failed(FetchFailed))?;
    let backend = shared.config.device.backend_name();
    let (pool, cancel, progress) = (pool.clone(), cancel.clone(), progress.clone());
    let shared_for_task = shared.clone();
    let lease_id = lease.lease_id;
    tokio::task::spawn_blocking(move || {
        pool.install(|| {
            let trainer = LocalTrainer::new(
                &model,
                lora.clone(),
                Provenance::here(backend, pool.threads()),
            )?;
            let data = LeaseData::new(&shards, model.config().vocab_size())?;
            let start = Adapter {
                config: lora,
                tensors: start_tensors,
            };
            trainer.train(
                &start,
                &data,
                &spec,
                &mut |p| {
                    *progress.lock().unwrap_or_else(|e| e.into_inner()) = (p.step as u64, p.loss);
                    shared_for_task.report(Report::Step {
                        lease_id,
                        step: p.step as u64,
                        total: p.total as u64,
                        loss: p.loss,
                    });
                },
                &cancel,
            )
        })
    })
    .await
    .map_err(|e| anyhow::anyhow!("the training task failed: {e}"))
    .map_err(failed(TrainingFailed))?
    .context("training")
    .map_err(failed(TrainingFailed))
}

/// Fetches blob `id` (from `hint` first) and reads it.
async fn fetch(shared: &Shared, id: ContentId, hint: Option<PeerId>) -> anyhow::Result<Vec<u8>> {
    let known: Vec<PeerId> = hint.into_iter().collect();
    tokio::time::timeout(
        shared.config.fetch_timeout,
        transfer::fetch_from(
            &shared.client,
            &shared.store,
            id,
            &shared.config.fetch,
            &known,
            None,
        ),
    )
    .await
    .with_context(|| format!("fetching {id} timed out"))?
    .with_context(|| format!("fetching {id}"))?;
    let store = shared.store.clone();
    Ok(tokio::task::spawn_blocking(move || store.read(&id)).await??)
}

/// Renews `lease` every `renew_interval_ms` until aborted; a refused renewal sets `cancel`.
async fn renew(
    shared: Arc<Shared>,
    coordinator: PeerId,
    lease: v1::Lease,
    cancel: Arc<AtomicBool>,
    progress: Arc<Mutex<(u64, f32)>>,
) {
    let every = Duration::from_millis(lease.renew_interval_ms.clamp(1_000, 600_000));
    loop {
        tokio::time::sleep(every).await;
        let (steps_done, last_loss) = *progress.lock().unwrap_or_else(|e| e.into_inner());
        let request = v1::LeaseRequest {
            protocol_version: PROTOCOL_VERSION,
            body: Some(v1::lease_request::Body::RenewLease(v1::RenewLease {
                lease_id: lease.lease_id,
                steps_done,
                last_loss,
            })),
        };
        match shared.client.request(coordinator, request).await {
            Ok(v1::LeaseResponse {
                body: Some(v1::lease_response::Body::LeaseRenewed(_)),
                ..
            }) => {}
            Ok(v1::LeaseResponse {
                body: Some(v1::lease_response::Body::Error(e)),
                ..
            }) if e.code() != v1::ErrorCode::RateLimited
                && e.code() != v1::ErrorCode::Unavailable =>
            {
                warn!(
                    lease_id = lease.lease_id,
                    "the coordinator ended the lease: {}", e.message
                );
                cancel.store(true, Ordering::Relaxed);
                return;
            }
            // A lost heartbeat is retried at the next one; the lease outlives a few.
            other => debug!(
                lease_id = lease.lease_id,
                "renewal not confirmed: {other:?}"
            ),
        }
    }
}

async fn release(
    shared: &Shared,
    coordinator: PeerId,
    lease_id: u64,
    reason: v1::ReleaseReason,
    message: &str,
) {
    let request = v1::LeaseRequest {
        protocol_version: PROTOCOL_VERSION,
        body: Some(v1::lease_request::Body::ReleaseLease(v1::ReleaseLease {
            lease_id,
            reason: reason as i32,
            message: truncate(message, 1024),
        })),
    };
    match shared.client.request(coordinator, request).await {
        Ok(_) => info!(lease_id, "gave the lease back"),
        // It lapses on its own at its expiry.
        Err(e) => warn!(lease_id, "could not give the lease back: {e}"),
    }
}

/// Encodes, stores, provides and delivers the delta; keeps the outcome for its challenges.
async fn deliver(
    shared: &Arc<Shared>,
    coordinator: PeerId,
    lease: &v1::Lease,
    outcome: TrainOutcome,
) -> anyhow::Result<()> {
    let encoding = verify::lease_encoding(lease).map_err(|r| anyhow::anyhow!("{}", r.message))?;
    let outcome = Arc::new(outcome);
    let bytes = {
        let outcome = outcome.clone();
        tokio::task::spawn_blocking(move || delta::encode(&outcome.delta, encoding)).await??
    };
    let store = shared.store.clone();
    let size = bytes.len() as u64;
    let id = tokio::task::spawn_blocking(move || store.put_bytes(&bytes)).await??;
    shared
        .client
        .start_providing(id.as_bytes().to_vec())
        .await?;
    let envelope = verify::delta_envelope(lease, &outcome, id, size);
    let signed = signed::sign(&shared.key, &envelope, signed::unix_ms_now())?;
    // Held before sending: the challenge can arrive before the receipt.
    shared.held().insert(
        lease.lease_id,
        Held {
            outcome: outcome.clone(),
            coordinator,
            delivered: Instant::now(),
        },
    );
    trim_held(shared);
    let request = v1::DeltaRequest {
        protocol_version: PROTOCOL_VERSION,
        body: Some(v1::delta_request::Body::SubmitDelta(v1::SubmitDelta {
            envelope: Some(signed),
        })),
    };
    // A coordinator that is restarting comes back on the same key: retry for a while (the
    // renewals keep the lease alive meanwhile).
    let mut wait = shared.config.min_backoff.max(Duration::from_millis(500));
    let mut attempts = 0;
    let answer = loop {
        match shared.client.request(coordinator, request.clone()).await {
            Err(e) if attempts < 8 && !shared.done() => {
                warn!(
                    lease_id = lease.lease_id,
                    "delivering failed ({e}); retrying in {wait:?}"
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(shared.config.max_backoff);
                attempts += 1;
            }
            other => break other,
        }
    };
    let stats = &outcome.stats;
    match answer.map(|a| a.body) {
        Ok(Some(v1::delta_response::Body::DeltaReceipt(_))) => {
            info!(
                lease_id = lease.lease_id,
                loss_before = stats.loss_before,
                loss_after = stats.loss_after,
                "delivered the delta"
            );
            shared.report(Report::Delivered {
                lease_id: lease.lease_id,
                loss_before: stats.loss_before,
                loss_after: stats.loss_after,
                seconds: stats.seconds,
            });
            Ok(())
        }
        Ok(Some(v1::delta_response::Body::Verdict(verdict))) => {
            on_verdict(shared, &verdict);
            Ok(())
        }
        Ok(Some(v1::delta_response::Body::Error(e))) => {
            shared.held().remove(&lease.lease_id);
            anyhow::bail!(
                "the coordinator refused the delta: {} ({:?})",
                e.message,
                e.code()
            )
        }
        Ok(other) => {
            shared.held().remove(&lease.lease_id);
            anyhow::bail!("unexpected answer to a delta: {other:?}")
        }
        Err(e) => {
            shared.held().remove(&lease.lease_id);
            anyhow::bail!("delivering the delta: {e}")
        }
    }
}

/// Drops the oldest held leases past `max_held`.
fn trim_held(shared: &Shared) {
    let mut held = shared.held();
    while held.len() > shared.config.max_held.max(1) {
        let Some(oldest) = held
            .iter()
            .min_by_key(|(_, h)| h.delivered)
            .map(|(id, _)| *id)
        else {
            break;
        };
        held.remove(&oldest);
    }
}

fn on_verdict(shared: &Shared, verdict: &v1::VerificationVerdict) {
    let accepted = verdict.outcome() == v1::VerdictOutcome::Accepted;
    let message = if accepted {
        "accepted".to_owned()
    } else {
        format!("rejected ({:?}): {}", verdict.reason(), verdict.message)
    };
    info!(lease_id = verdict.lease_id, "verdict: {message}");
    shared.held().remove(&verdict.lease_id);
    *shared.verdicts.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    shared.report(Report::Verdict {
        lease_id: verdict.lease_id,
        accepted,
        message,
    });
    shared.wake.notify_one();
}

/// Answers what peers send until the stream ends.
async fn serve_events(shared: Arc<Shared>, mut events: mpsc::Receiver<NetEvent>) {
    while let Some(event) = events.recv().await {
        match event {
            NetEvent::Gossip(message) if message.topic == Topic::Jobs => {
                if let Some(coordinator) = announced_coordinator(&message) {
                    shared.learn_coordinator(coordinator);
                }
            }
            NetEvent::Request(inbound) => {
                let shared = shared.clone();
                tokio::spawn(async move { answer(&shared, inbound).await });
            }
            _ => {}
        }
    }
}

/// The coordinator of a running job's announcement, checked: signed by that coordinator.
fn announced_coordinator(message: &swarmtune_protocol::net::GossipMessage) -> Option<PeerId> {
    let verified = signed::verify::<v1::JobAnnouncement>(
        &message.envelope,
        message.publisher.as_ref(),
        1 << 20,
    )
    .ok()?;
    let announcement = verified.message;
    let coordinator = PeerId::from_bytes(&announcement.coordinator_peer_id).ok()?;
    (Some(coordinator) == message.publisher && announcement.state() == v1::JobState::Running)
        .then_some(coordinator)
}

/// Answers one request: challenges and verdicts of our leases; nothing else is ours to answer.
async fn answer(shared: &Shared, inbound: InboundRequest) {
    let InboundRequest {
        peer,
        request,
        responder,
    } = inbound;
    let protocol = responder.protocol();
    let response = match request {
        Request::Delta(request) => match request.body {
            Some(v1::delta_request::Body::SegmentChallenge(challenge)) => {
                Response::Delta(on_challenge(shared, peer, &challenge).await)
            }
            Some(v1::delta_request::Body::Verdict(verdict)) => {
                let ours = shared
                    .held()
                    .get(&verdict.lease_id)
                    .is_some_and(|h| h.coordinator == peer);
                if ours {
                    on_verdict(shared, &verdict);
                }
                Response::Delta(v1::DeltaResponse {
                    protocol_version: PROTOCOL_VERSION,
                    body: Some(v1::delta_response::Body::VerdictReceived(
                        v1::VerdictReceived {
                            lease_id: verdict.lease_id,
                        },
                    )),
                })
            }
            _ => unsupported(protocol),
        },
        _ => unsupported(protocol),
    };
    if let Err(e) = shared.client.respond(responder, response).await {
        debug!(%peer, "could not answer: {e}");
    }
}

fn unsupported(protocol: swarmtune_protocol::net::Protocol) -> Response {
    Response::error(
        protocol,
        error_reply(
            v1::ErrorCode::UnsupportedRequest,
            "this peer is a volunteer: it answers only challenges and verdicts of its own leases",
        ),
    )
}

/// The states a challenge asks for, stored and provided, or an error reply.
async fn on_challenge(
    shared: &Shared,
    peer: PeerId,
    challenge: &v1::SegmentChallenge,
) -> v1::DeltaResponse {
    let reply = |body| v1::DeltaResponse {
        protocol_version: PROTOCOL_VERSION,
        body: Some(body),
    };
    let error =
        |code, message: String| reply(v1::delta_response::Body::Error(error_reply(code, message)));
    let outcome = match shared.held().get(&challenge.lease_id) {
        Some(h) if h.coordinator == peer => h.outcome.clone(),
        Some(_) => {
            return error(
                v1::ErrorCode::Unauthorized,
                "only the lease's coordinator may challenge it".into(),
            );
        }
        None => {
            return error(
                v1::ErrorCode::NotFound,
                format!("no delivered lease {} is held here", challenge.lease_id),
            );
        }
    };
    shared.report(Report::Challenged {
        lease_id: challenge.lease_id,
        segments: challenge.segments.len(),
    });
    let mut states = Vec::new();
    for s in challenge.segments.iter().take(64) {
        let snapshot = |step: u64| outcome.snapshots.iter().find(|x| x.step() == step);
        let claimed = outcome.commitments.iter().find(|c| c.step == s.end_step);
        let (Some(start), Some(end), Some(claimed)) =
            (snapshot(s.start_step), snapshot(s.end_step), claimed)
        else {
            return error(
                v1::ErrorCode::InvalidArgument,
                format!(
                    "segment {}..{} does not start and end at commitments",
                    s.start_step, s.end_step
                ),
            );
        };
        let mut ids = Vec::new();
        for state in [start, end] {
            let stored = state
                .to_bytes()
                .map_err(anyhow::Error::from)
                .and_then(|bytes| Ok(shared.store.put_bytes(&bytes)?));
            match stored {
                Ok(id) => ids.push(id),
                Err(e) => return error(v1::ErrorCode::Internal, format!("storing a state: {e:#}")),
            }
        }
        for id in &ids {
            if let Err(e) = shared.client.start_providing(id.as_bytes().to_vec()).await {
                warn!("cannot provide a state: {e}");
            }
        }
        states.push(v1::SegmentState {
            segment: Some(*s),
            start_state: Some(ids[0].to_proto()),
            claimed_end_hash: claimed.state_hash.to_vec(),
            end_state: Some(ids[1].to_proto()),
        });
    }
    reply(v1::delta_response::Body::SegmentStates(v1::SegmentStates {
        lease_id: challenge.lease_id,
        states,
    }))
}

/// Base models by bundle id: the built-in base without fetching anything, others fetched
/// once into the data dir.
#[derive(Default)]
struct ModelCache {
    loaded: Option<(ContentId, Arc<CausalLm>)>,
}

impl ModelCache {
    async fn get(
        &mut self,
        shared: &Shared,
        base: ContentId,
        hint: Option<PeerId>,
    ) -> anyhow::Result<Arc<CausalLm>> {
        if let Some((id, model)) = &self.loaded
            && *id == base
        {
            return Ok(model.clone());
        }
        let dir = crate::models::base_dir(
            &shared.client,
            &shared.store,
            &shared.config.data_dir,
            base,
            hint,
        )
        .await?;
        let device = shared.config.device;
        let model = tokio::task::spawn_blocking(move || -> anyhow::Result<CausalLm> {
            Ok(CausalLm::load(&dir, &device.device()?)?.to_autodiff())
        })
        .await??;
        let model = Arc::new(model);
        self.loaded = Some((base, model.clone()));
        Ok(model)
    }
}

/// Training tokens per second on the built-in base, measured once per backend and thread
/// count and cached in the data dir.
async fn measure_speed(config: &VolunteerConfig, pool: &Arc<ThreadPool>) -> anyhow::Result<f64> {
    let backend = config.device.backend_name();
    let path = config.data_dir.join(format!(
        "speed-{backend}-{}t-{}.json",
        pool.threads(),
        swarmtune_trainer::train::kernel_family()
    ));
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Ok(value) = serde_json::from_str::<serde_json::Value>(&text)
        && let Some(speed) = value.get("tokens_per_s").and_then(|v| v.as_f64())
        && speed.is_finite()
        && speed > 0.0
    {
        return Ok(speed);
    }
    info!("measuring this machine's training speed (once)");
    let (device, pool) = (config.device, pool.clone());
    let report = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let bench = swarmtune_trainer::bench::TrainBench {
            shape: swarmtune_trainer::bench::BenchShape::Builtin,
            seq: 64,
            batch: 8,
            rank: 8,
            steps: 3,
        };
        let device_handle = device.device()?;
        Ok(pool.install(|| {
            swarmtune_trainer::bench::train_bench(
                &bench,
                &device_handle,
                device.backend_name(),
                pool.threads(),
            )
        })?)
    })
    .await??;
    std::fs::create_dir_all(&config.data_dir)?;
    let tmp = path.with_extension("json.part");
    std::fs::write(
        &tmp,
        serde_json::json!({"tokens_per_s": report.tokens_per_s}).to_string(),
    )?;
    std::fs::rename(&tmp, &path)?;
    Ok(report.tokens_per_s)
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}
