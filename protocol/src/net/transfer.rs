//! Blob transfer over `/swarmtune/blob/2` (issue 5, point 5, the network half): serving
//! manifests and chunks from the blob store, and fetching a blob from the providers the DHT
//! names, in verified chunks from several of them at once.
//!
//! The fetch follows `proto/swarmtune/v1/blob.proto`: one provider's manifest, checked against
//! the id (its chunk hashes are the blob's BLAKE3 tree, so a lying manifest is caught before
//! a byte of the blob is asked for, and its provider blamed), then the missing chunks from
//! every provider in parallel (at most `max_in_flight` requests at once), each checked against
//! the manifest by the blob store as it is written, and synced and recorded every
//! `commit_bytes` (so a crash loses at most that much progress, and a fast network is not held
//! up by a sync per chunk). A provider that sends a bad chunk is reported (its score drops)
//! and dropped from this fetch; one whose connection fails is retried a few times before it
//! is dropped, unscored. Progress lives in the store's partial download, so a fetch cut short
//! resumes where it stopped. Chunks that match a checked manifest are the blob, so there is no
//! pass over the whole at the end; then this node provides the blob.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::PeerId;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::client::{Client, InboundRequest, NetError, RequestError};
use super::codec::{PROTOCOL_VERSION, ResponseMessage, error_reply};
use super::limits::{LimitsConfig, Misbehaviour, RateLimit, TokenBucket};
use super::rpc::Request;
use crate::blob_store::{BlobError, BlobStore, CHUNK_SIZE, ChunkManifest, PartialBlob};
use crate::content::ContentId;
use crate::v1;

/// How a fetch behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchConfig {
    /// Chunk requests in flight at once, over all providers.
    pub max_in_flight: usize,
    /// Chunk requests in flight at once to one provider.
    pub max_in_flight_per_provider: usize,
    /// Failed requests (not bad chunks) a provider may have before it is dropped.
    pub max_failures_per_provider: usize,
    /// How often the provider list is asked again when every provider was dropped.
    pub provider_queries: usize,
    /// The largest blob this fetch accepts (a manifest over it is refused).
    pub max_blob_bytes: u64,
    /// Verified bytes written before they are synced and recorded as done; a crash loses at
    /// most this much progress. A fetch that stops, done or not, syncs what it wrote.
    pub commit_bytes: u64,
    /// The pace of chunk requests to one provider. A provider limits each peer's blob
    /// requests (`LimitsConfig::blob_request_rate`) and scores down a peer that goes over, so
    /// by default a fetch keeps under the default limit: 90% of its rate, 15/16 of its burst. A
    /// provider that answers `ERROR_CODE_RATE_LIMITED` all the same (a stricter one, or
    /// several fetches from it at once) is waited for, as long as it says, not dropped.
    pub provider_rate: RateLimit,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 16,
            max_in_flight_per_provider: 4,
            max_failures_per_provider: 3,
            provider_queries: 3,
            max_blob_bytes: 16 << 30,
            commit_bytes: 16 << 20,
            provider_rate: {
                let limit = LimitsConfig::default().blob_request_rate;
                RateLimit {
                    per_second: limit.per_second * 0.9,
                    // Room left for the manifest request and a request or two of another
                    // fetch from the same provider.
                    burst: (limit.burst * 15 / 16).max(1),
                }
            },
        }
    }
}

/// How far a fetch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The blob.
    pub id: ContentId,
    /// Bytes verified and written.
    pub done_bytes: u64,
    /// The blob's size.
    pub total_bytes: u64,
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The DHT names no provider (or none is left that behaves).
    #[error("no provider of {0} could deliver it")]
    NoProviders(ContentId),
    /// No provider gave a usable manifest.
    #[error("no usable manifest for {id}: {last}")]
    NoManifest {
        /// The blob.
        id: ContentId,
        /// The last reason a manifest was refused.
        last: String,
    },
    /// The store failed (disk, lock, limits).
    #[error(transparent)]
    Store(#[from] BlobError),
    /// The network failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// A blocking store task panicked or was cancelled.
    #[error("store task failed: {0}")]
    Task(String),
}

/// Serves `/swarmtune/blob/2` from `store`: takes the blob requests off the event stream and
/// answers each from a blocking task, at most `concurrency` at once.
pub async fn spawn_server(
    client: &Client,
    store: BlobStore,
    concurrency: usize,
) -> Result<JoinHandle<()>, NetError> {
    let mut requests = client.take_blob_requests(concurrency.max(1) * 4).await?;
    let client = client.clone();
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    Ok(tokio::spawn(async move {
        while let Some(inbound) = requests.recv().await {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (client, store) = (client.clone(), store.clone());
            tokio::spawn(async move {
                let _permit = permit;
                serve_one(&client, store, inbound).await;
            });
        }
    }))
}

async fn serve_one(client: &Client, store: BlobStore, inbound: InboundRequest) {
    let InboundRequest {
        peer,
        request,
        responder,
    } = inbound;
    let Request::Blob(request) = request else {
        debug!(%peer, "non-blob request routed to the blob server");
        return;
    };
    let response = tokio::task::spawn_blocking(move || answer(&store, &request))
        .await
        .unwrap_or_else(|e| {
            v1::BlobResponse::from_error(error_reply(
                v1::ErrorCode::Internal,
                format!("the blob server failed: {e}"),
            ))
        });
    if let Err(e) = client.respond(responder, response).await {
        debug!(%peer, error = %e, "blob response not sent");
    }
}

/// The answer to one blob request, from the store.
pub fn answer(store: &BlobStore, request: &v1::BlobRequest) -> v1::BlobResponse {
    let body = match &request.body {
        Some(v1::blob_request::Body::GetBlobManifest(get)) => {
            match wanted(store, get.id.as_ref())
                .and_then(|id| store.chunk_manifest(&id).map_err(|e| store_error(id, &e)))
            {
                Ok(manifest) => v1::blob_response::Body::BlobManifest(manifest.to_proto()),
                Err(e) => v1::blob_response::Body::Error(e),
            }
        }
        Some(v1::blob_request::Body::GetChunk(get)) => {
            match wanted(store, get.id.as_ref()).and_then(|id| {
                store
                    .read_chunk(&id, get.index)
                    .map(|data| (id, data))
                    .map_err(|e| store_error(id, &e))
            }) {
                Ok((id, data)) => v1::blob_response::Body::Chunk(v1::Chunk {
                    id: Some(id.to_proto()),
                    index: get.index,
                    data,
                }),
                Err(e) => v1::blob_response::Body::Error(e),
            }
        }
        None => v1::blob_response::Body::Error(error_reply(
            v1::ErrorCode::UnsupportedRequest,
            "the blob request has no body this peer knows",
        )),
    };
    v1::BlobResponse {
        protocol_version: PROTOCOL_VERSION,
        body: Some(body),
    }
}

/// The blob a request names, if it is well formed and held here.
fn wanted(store: &BlobStore, id: Option<&v1::ContentId>) -> Result<ContentId, v1::ErrorReply> {
    let Some(id) = id else {
        return Err(invalid_id("the request names no blob"));
    };
    let id = ContentId::try_from(id).map_err(|e| invalid_id(&e.to_string()))?;
    if !store.contains(&id) {
        return Err(error_reply(
            v1::ErrorCode::NotFound,
            format!("blob {id} is not held here"),
        ));
    }
    Ok(id)
}

fn invalid_id(why: &str) -> v1::ErrorReply {
    let mut e = error_reply(v1::ErrorCode::InvalidArgument, why.to_string());
    e.field = "id".into();
    e
}

fn store_error(id: ContentId, e: &BlobError) -> v1::ErrorReply {
    match e {
        BlobError::NotFound(_) | BlobError::Corrupt { .. } => error_reply(
            v1::ErrorCode::NotFound,
            format!("blob {id} is not held here"),
        ),
        BlobError::NoSuchChunk { .. } => {
            let mut r = error_reply(v1::ErrorCode::InvalidArgument, e.to_string());
            r.field = "index".into();
            r
        }
        other => {
            warn!(%id, error = %other, "blob store failed while serving");
            error_reply(v1::ErrorCode::Internal, "the blob store failed")
        }
    }
}

/// Fetches blob `id` into `store` from the providers the DHT names, then provides it.
/// Progress goes to `progress` when given (dropped, not waited for, when the receiver lags).
pub async fn fetch(
    client: &Client,
    store: &BlobStore,
    id: ContentId,
    config: &FetchConfig,
    progress: Option<mpsc::Sender<Progress>>,
) -> Result<ContentId, FetchError> {
    fetch_from(client, store, id, config, &[], progress).await
}

/// [`fetch`] from `known` peers, which are said to hold the blob (the volunteer that
/// delivered a delta, the owner that submitted a dataset), without waiting for the DHT, which
/// may not have spread their provider records yet; the DHT is asked only once every known
/// peer has failed or been dropped. Every chunk is verified all the same.
pub async fn fetch_from(
    client: &Client,
    store: &BlobStore,
    id: ContentId,
    config: &FetchConfig,
    known: &[PeerId],
    progress: Option<mpsc::Sender<Progress>>,
) -> Result<ContentId, FetchError> {
    if store.contains(&id) {
        client.start_providing(id.as_bytes().to_vec()).await?;
        return Ok(id);
    }
    let mut blamed: HashSet<PeerId> = HashSet::new();
    let providers = find_providers(client, id, known, &blamed).await?;
    let manifest = get_manifest(client, id, config, &providers, &mut blamed).await?;
    // A provider whose manifest was refused is not asked for chunks either.
    let providers: Vec<PeerId> = providers
        .into_iter()
        .filter(|p| !blamed.contains(p))
        .collect();
    let store_for_partial = store.clone();
    let manifest_for_partial = manifest.clone();
    let partial = blocking(move || store_for_partial.partial(&manifest_for_partial)).await?;
    let partial = Arc::new(Mutex::new(Some(partial)));
    fetch_chunks(
        client,
        &manifest,
        &partial,
        config,
        &providers,
        &mut blamed,
        &progress,
    )
    .await?;
    let Some(partial) = partial.lock().ok().and_then(|mut p| p.take()) else {
        return Err(FetchError::Task("the partial download was lost".into()));
    };
    let done = blocking(move || partial.finish()).await?;
    info!(%id, size = manifest.size, "blob fetched");
    client.start_providing(done.as_bytes().to_vec()).await?;
    Ok(done)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BlobError> + Send + 'static,
) -> Result<T, FetchError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FetchError::Task(e.to_string()))?
        .map_err(FetchError::Store)
}

async fn find_providers(
    client: &Client,
    id: ContentId,
    known: &[PeerId],
    blamed: &HashSet<PeerId>,
) -> Result<Vec<PeerId>, FetchError> {
    let usable = |p: &PeerId| !blamed.contains(p) && *p != client.local_peer_id();
    // Peers named for this blob first; the DHT only when none of them is left.
    let mut providers: Vec<PeerId> = known.iter().copied().filter(usable).collect();
    if providers.is_empty() {
        let found = client.get_providers(id.as_bytes().to_vec()).await?;
        providers = found.into_iter().filter(usable).collect();
    }
    providers.sort();
    providers.dedup();
    if providers.is_empty() {
        return Err(FetchError::NoProviders(id));
    }
    Ok(providers)
}

async fn get_manifest(
    client: &Client,
    id: ContentId,
    config: &FetchConfig,
    providers: &[PeerId],
    blamed: &mut HashSet<PeerId>,
) -> Result<ChunkManifest, FetchError> {
    let mut last = String::from("no provider answered");
    for &peer in providers {
        let request = v1::BlobRequest {
            protocol_version: PROTOCOL_VERSION,
            body: Some(v1::blob_request::Body::GetBlobManifest(
                v1::GetBlobManifest {
                    id: Some(id.to_proto()),
                },
            )),
        };
        let response = match client.request(peer, request).await {
            Ok(r) => r,
            Err(e) => {
                last = format!("{peer}: {e}");
                continue;
            }
        };
        let proto = match response.body {
            Some(v1::blob_response::Body::BlobManifest(m)) => m,
            Some(v1::blob_response::Body::Error(e)) => {
                last = format!("{peer}: {}", e.message);
                continue;
            }
            _ => {
                last = format!("{peer}: answered a manifest request with something else");
                client
                    .report_misbehaviour(peer, Misbehaviour::Malformed)
                    .await?;
                blamed.insert(peer);
                continue;
            }
        };
        let checked = ChunkManifest::try_from(&proto)
            .map_err(|e| e.to_string())
            .and_then(|m| {
                if m.id != id {
                    Err(format!("manifest of {} when {id} was asked", m.id))
                } else {
                    m.validate(config.max_blob_bytes)
                        .map(|()| m)
                        .map_err(|e| e.to_string())
                }
            });
        match checked {
            Ok(m) => return Ok(m),
            Err(why) => {
                warn!(%peer, %id, reason = %why, "manifest refused");
                client
                    .report_misbehaviour(
                        peer,
                        Misbehaviour::Other(format!("bad blob manifest: {why}")),
                    )
                    .await?;
                blamed.insert(peer);
                last = format!("{peer}: {why}");
            }
        }
    }
    Err(FetchError::NoManifest { id, last })
}

/// The longest a fetch waits on one provider's `retry_after_ms`.
const MAX_PROVIDER_PAUSE: Duration = Duration::from_secs(5);

/// One provider's standing during a fetch.
#[derive(Debug)]
struct ProviderState {
    in_flight: usize,
    failures: usize,
    /// Paces the requests to it (`FetchConfig::provider_rate`).
    bucket: TokenBucket,
    /// It asked to be left alone until then.
    paused_until: Option<Instant>,
}

impl ProviderState {
    fn new(config: &FetchConfig) -> Self {
        Self {
            in_flight: 0,
            failures: 0,
            bucket: TokenBucket::full(config.provider_rate, Instant::now()),
            paused_until: None,
        }
    }

    /// Whether a request may go to it now; if not, when it may (`None`: when one of its
    /// requests in flight returns).
    fn ready(&mut self, config: &FetchConfig, now: Instant) -> Result<(), Option<Instant>> {
        if self.in_flight >= config.max_in_flight_per_provider {
            return Err(None);
        }
        if let Some(until) = self.paused_until {
            if until > now {
                return Err(Some(until));
            }
            self.paused_until = None;
        }
        self.bucket
            .try_take(config.provider_rate, now)
            .map_err(|wait| Some(now + wait.min(MAX_PROVIDER_PAUSE)))
    }
}

type ChunkResult = (PeerId, u32, Result<v1::BlobResponse, RequestError>);

/// Fetches the chunks `partial` is missing, then waits for the writer to sync what it wrote,
/// whether the fetch succeeded or not: progress is kept for a resume, and the download is
/// free for the next attempt when this returns.
async fn fetch_chunks(
    client: &Client,
    manifest: &ChunkManifest,
    partial: &Arc<Mutex<Option<PartialBlob>>>,
    config: &FetchConfig,
    initial: &[PeerId],
    blamed: &mut HashSet<PeerId>,
    progress: &Option<mpsc::Sender<Progress>>,
) -> Result<(), FetchError> {
    let missing = with_partial(partial, |p| Ok(p.missing_chunks()))?;
    let capacity = config.max_in_flight.max(1);
    let (to_writer, mut written, writer) =
        spawn_writer(partial.clone(), capacity, config.commit_bytes);
    let fetched = request_chunks(
        client,
        manifest,
        missing,
        config,
        initial,
        blamed,
        progress,
        to_writer,
        &mut written,
    )
    .await;
    // The writer's input is closed now: it syncs what it staged and stops.
    let mut synced = Ok(());
    while let Some(event) = written.recv().await {
        if let Written::Failed(e) = event {
            synced = Err(e);
        }
    }
    writer
        .await
        .map_err(|e| FetchError::Task(format!("the chunk writer failed: {e}")))?;
    // A store failure explains a stopped writer better than the fetch's view of it.
    synced.and(fetched)
}

#[allow(clippy::too_many_arguments)]
async fn request_chunks(
    client: &Client,
    manifest: &ChunkManifest,
    missing: Vec<u32>,
    config: &FetchConfig,
    initial: &[PeerId],
    blamed: &mut HashSet<PeerId>,
    progress: &Option<mpsc::Sender<Progress>>,
    to_writer: mpsc::Sender<Received>,
    written: &mut mpsc::Receiver<Written>,
) -> Result<(), FetchError> {
    let id = manifest.id;
    let mut queue: VecDeque<u32> = missing.into_iter().collect();
    let mut done_bytes = manifest.size - queue.iter().map(|&i| chunk_len(manifest, i)).sum::<u64>();
    report(progress, id, done_bytes, manifest.size);

    let mut providers: HashMap<PeerId, ProviderState> = initial
        .iter()
        .map(|p| (*p, ProviderState::new(config)))
        .collect();
    let mut queries_left = config.provider_queries;
    let mut in_flight = FuturesUnordered::new();
    let mut next = 0usize;
    // Chunks received and handed to the writer, not yet checked and written (or refused).
    // They count against `max_in_flight` too, so a slow disk slows the requests instead of
    // piling up.
    let mut writing = 0usize;
    let capacity = config.max_in_flight.max(1);

    while !queue.is_empty() || !in_flight.is_empty() || writing > 0 {
        // Hand out chunks round-robin to providers with room and pace, up to the overall bound.
        let mut order: Vec<PeerId> = providers.keys().copied().collect();
        order.sort();
        // The soonest a provider that has neither room nor pace now will have them.
        let mut wake: Option<Instant> = None;
        while in_flight.len() + writing < capacity && !queue.is_empty() && !order.is_empty() {
            let mut assigned = false;
            let now = Instant::now();
            for k in 0..order.len() {
                let peer = order[(next + k) % order.len()];
                let Some(state) = providers.get_mut(&peer) else {
                    continue;
                };
                if let Err(later) = state.ready(config, now) {
                    if let Some(at) = later {
                        wake = Some(wake.map_or(at, |w| w.min(at)));
                    }
                    continue;
                }
                let Some(index) = queue.pop_front() else {
                    break;
                };
                state.in_flight += 1;
                next = (next + k + 1) % order.len();
                in_flight.push(request_chunk(client.clone(), peer, id, index));
                assigned = true;
                break;
            }
            if !assigned {
                break;
            }
        }
        if in_flight.is_empty()
            && writing == 0
            && !queue.is_empty()
            && let Some(at) = wake
        {
            // Every provider is pacing or paused: wait for the first to be ready.
            tokio::time::sleep_until(at.into()).await;
            continue;
        }
        if in_flight.is_empty() && writing == 0 {
            // Chunks left and nobody to ask: look the providers up again.
            if queries_left == 0 {
                return Err(FetchError::NoProviders(id));
            }
            queries_left -= 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            for peer in find_providers(client, id, &[], blamed).await? {
                providers
                    .entry(peer)
                    .or_insert_with(|| ProviderState::new(config));
            }
            continue;
        }
        let (peer, index, result) = tokio::select! {
            event = written.recv(), if writing > 0 => {
                writing -= 1;
                match event {
                    Some(Written::Staged { len }) => {
                        done_bytes += len;
                        report(progress, id, done_bytes, manifest.size);
                    }
                    Some(Written::Bad { peer, index, reason }) => {
                        warn!(%peer, %id, index, %reason, "bad chunk; provider dropped");
                        // Once per fetch: its other chunks already in flight are the same
                        // offence, not new ones.
                        if blamed.insert(peer) {
                            client
                                .report_misbehaviour(peer, Misbehaviour::BadChunk)
                                .await?;
                        }
                        providers.remove(&peer);
                        queue.push_back(index);
                    }
                    Some(Written::Failed(e)) => return Err(e),
                    None => return Err(FetchError::Task("the chunk writer stopped".into())),
                }
                continue;
            }
            Some(response) = in_flight.next(), if !in_flight.is_empty() => response,
            // A paced provider may take another request now.
            () = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now).into()),
                if wake.is_some() && !queue.is_empty() => continue,
        };
        if let Some(state) = providers.get_mut(&peer) {
            state.in_flight = state.in_flight.saturating_sub(1);
        }
        match result {
            Ok(response) => match response.body {
                Some(v1::blob_response::Body::Chunk(chunk))
                    if chunk.index == index
                        && chunk.id.as_ref().and_then(|c| ContentId::try_from(c).ok())
                            == Some(id) =>
                {
                    writing += 1;
                    // Never full: `writing` stays within the channel's capacity.
                    if to_writer.send((peer, index, chunk.data)).await.is_err() {
                        return Err(FetchError::Task("the chunk writer stopped".into()));
                    }
                }
                Some(v1::blob_response::Body::Error(e))
                    if e.code == v1::ErrorCode::RateLimited as i32 =>
                {
                    // Not a failure: it is busy, and says for how long.
                    let pause =
                        Duration::from_millis(e.retry_after_ms.max(1)).min(MAX_PROVIDER_PAUSE);
                    debug!(%peer, %id, index, ?pause, "provider asks the fetch to slow down");
                    if let Some(state) = providers.get_mut(&peer) {
                        state.paused_until = Some(Instant::now() + pause);
                    }
                    queue.push_front(index);
                }
                Some(v1::blob_response::Body::Error(e)) => {
                    debug!(%peer, %id, index, code = e.code, message = %e.message, "chunk refused");
                    fail(&mut providers, peer, config);
                    queue.push_back(index);
                }
                _ => {
                    warn!(%peer, %id, index, "answered a chunk request with something else");
                    if blamed.insert(peer) {
                        client
                            .report_misbehaviour(peer, Misbehaviour::Malformed)
                            .await?;
                    }
                    providers.remove(&peer);
                    queue.push_back(index);
                }
            },
            Err(e) => {
                // A dropped connection or a timeout: not the provider's fault, but after a few
                // it is not worth asking any more in this fetch.
                debug!(%peer, %id, index, error = %e, "chunk request failed");
                fail(&mut providers, peer, config);
                queue.push_back(index);
            }
        }
    }
    Ok(())
}

/// A chunk as received: who sent it, its index, its bytes.
type Received = (PeerId, u32, Vec<u8>);

/// What the chunk writer did with a chunk.
enum Written {
    /// Checked and written (synced later, with the next commit): `len` more bytes are done.
    Staged { len: u64 },
    /// The chunk does not match the manifest; `peer` sent it.
    Bad {
        peer: PeerId,
        index: u32,
        reason: crate::blob_store::BadChunkReason,
    },
    /// The store failed; the fetch cannot go on and the writer has stopped.
    Failed(FetchError),
}

/// A blocking task that checks and writes received chunks into the partial download while
/// the fetch goes on asking for more, one event per chunk. It syncs and records what it wrote
/// every `commit_bytes`, and once more when its input closes, so a fast network is not held
/// up by a sync per chunk and a stopped fetch keeps its progress. The input holds at most
/// `capacity` chunks; the events, one per chunk plus the failure that stops the writer.
fn spawn_writer(
    partial: Arc<Mutex<Option<PartialBlob>>>,
    capacity: usize,
    commit_bytes: u64,
) -> (
    mpsc::Sender<Received>,
    mpsc::Receiver<Written>,
    JoinHandle<()>,
) {
    let (tx, mut rx) = mpsc::channel::<Received>(capacity);
    let (events, written) = mpsc::channel(capacity + 1);
    let commit = move |partial: &Arc<Mutex<Option<PartialBlob>>>| {
        with_partial(partial, |p| p.commit().map(drop))
    };
    let task = tokio::task::spawn_blocking(move || {
        let mut uncommitted = 0u64;
        while let Some((peer, index, data)) = rx.blocking_recv() {
            let staged = with_partial(&partial, |p| match p.stage_chunk(index, &data) {
                Ok(()) => Ok(None),
                Err(BlobError::BadChunk { reason, .. }) => Ok(Some(reason)),
                Err(e) => Err(e),
            });
            let event = match staged {
                Ok(None) => {
                    uncommitted += data.len() as u64;
                    Written::Staged {
                        len: data.len() as u64,
                    }
                }
                Ok(Some(reason)) => Written::Bad {
                    peer,
                    index,
                    reason,
                },
                Err(e) => {
                    let _ = events.blocking_send(Written::Failed(e));
                    return;
                }
            };
            drop(data);
            if events.blocking_send(event).is_err() {
                // The fetch is gone; keep what was written.
                break;
            }
            if uncommitted >= commit_bytes {
                if let Err(e) = commit(&partial) {
                    let _ = events.blocking_send(Written::Failed(e));
                    return;
                }
                uncommitted = 0;
            }
        }
        if let Err(e) = commit(&partial) {
            let _ = events.blocking_send(Written::Failed(e));
        }
    });
    (tx, written, task)
}

fn fail(providers: &mut HashMap<PeerId, ProviderState>, peer: PeerId, config: &FetchConfig) {
    if let Some(state) = providers.get_mut(&peer) {
        state.failures += 1;
        if state.failures >= config.max_failures_per_provider {
            providers.remove(&peer);
        }
    }
}

async fn request_chunk(client: Client, peer: PeerId, id: ContentId, index: u32) -> ChunkResult {
    let request = v1::BlobRequest {
        protocol_version: PROTOCOL_VERSION,
        body: Some(v1::blob_request::Body::GetChunk(v1::GetChunk {
            id: Some(id.to_proto()),
            index,
        })),
    };
    (peer, index, client.request(peer, request).await)
}

fn with_partial<T>(
    partial: &Arc<Mutex<Option<PartialBlob>>>,
    f: impl FnOnce(&mut PartialBlob) -> Result<T, BlobError>,
) -> Result<T, FetchError> {
    let mut guard = partial
        .lock()
        .map_err(|_| FetchError::Task("the partial download's lock was poisoned".into()))?;
    let p = guard
        .as_mut()
        .ok_or_else(|| FetchError::Task("the partial download is finished".into()))?;
    f(p).map_err(FetchError::Store)
}

fn chunk_len(manifest: &ChunkManifest, index: u32) -> u64 {
    let start = u64::from(index) * CHUNK_SIZE;
    manifest.size.saturating_sub(start).min(CHUNK_SIZE)
}

fn report(progress: &Option<mpsc::Sender<Progress>>, id: ContentId, done: u64, total: u64) {
    if let Some(tx) = progress {
        // A progress bar needs the latest figure, not every one: never wait for it.
        let _ = tx.try_send(Progress {
            id,
            done_bytes: done,
            total_bytes: total,
        });
    }
}
