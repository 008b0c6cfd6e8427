//! Blob transfer between real swarms on the memory transport: a blob provided by one node is
//! fetched by others through the DHT, then from several providers at once; a provider that
//! serves corrupt chunks is caught and dropped while the fetch succeeds; one whose manifest
//! does not make the id is refused before any chunk is asked of it; one that rate-limits the
//! fetch is waited for, not dropped; a fetch cut short resumes from what it had. Every wait is
//! bounded.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol as AddrPart;
use libp2p::{Multiaddr, PeerId};
use swarmtune_protocol::net::transfer::{self, FetchConfig, Progress};
use swarmtune_protocol::net::{
    Client, LimitsConfig, NetConfig, NetEvent, RateLimit, Request, spawn_memory,
};
use swarmtune_protocol::{BlobStore, ContentId, v1};
use tokio::sync::mpsc;
use tokio::time::timeout;

const STEP: Duration = Duration::from_secs(60);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match timeout(STEP, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

struct Node {
    client: Client,
    addr: Multiaddr,
    store: BlobStore,
    _dir: tempfile::TempDir,
    _events: mpsc::Receiver<NetEvent>,
}

impl Node {
    fn peer(&self) -> PeerId {
        self.client.local_peer_id()
    }
}

async fn node(bootstrap: Option<&Node>) -> Node {
    node_with(bootstrap, NetConfig::for_tests().limits).await
}

async fn node_with(bootstrap: Option<&Node>, limits: LimitsConfig) -> Node {
    let config = NetConfig {
        bootstrap: bootstrap.map(|b| vec![b.addr.clone()]).unwrap_or_default(),
        limits,
        ..NetConfig::for_tests()
    };
    let (client, events) = spawn_memory(Keypair::generate_ed25519(), config).unwrap();
    let addr = within("listen", client.listen_on("/memory/0".parse().unwrap()))
        .await
        .unwrap()
        .with(AddrPart::P2p(client.local_peer_id()));
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), 1 << 30).unwrap();
    Node {
        client,
        addr,
        store,
        _dir: dir,
        _events: events,
    }
}

/// What a test blob server gets wrong on purpose.
#[derive(Clone, Copy, PartialEq)]
enum Lie {
    /// Nothing.
    No,
    /// A byte of every chunk it sends is flipped.
    Chunks,
    /// Its manifests list another hash for chunk 0 (the chunks themselves are true).
    Manifest,
}

/// A blob server that counts the chunk requests it answers and lies as `lie` says.
/// `serve_chunks_below` stops it serving chunks from that index on.
fn counting_server(
    node: &Node,
    lie: Lie,
    serve_chunks_below: u32,
) -> impl Future<Output = Arc<AtomicUsize>> + use<> {
    let (client, store) = (node.client.clone(), node.store.clone());
    async move {
        let served = Arc::new(AtomicUsize::new(0));
        let mut requests = client.take_blob_requests(16).await.unwrap();
        let counter = served.clone();
        tokio::spawn(async move {
            while let Some(inbound) = requests.recv().await {
                let Request::Blob(request) = inbound.request else {
                    continue;
                };
                let index = match &request.body {
                    Some(v1::blob_request::Body::GetChunk(get)) => Some(get.index),
                    _ => None,
                };
                let mut response = if index.is_some_and(|i| i >= serve_chunks_below) {
                    v1::BlobResponse::default_error()
                } else {
                    transfer::answer(&store, &request)
                };
                match &mut response.body {
                    Some(v1::blob_response::Body::Chunk(chunk)) => {
                        counter.fetch_add(1, Ordering::SeqCst);
                        if lie == Lie::Chunks {
                            chunk.data[0] ^= 0xff;
                        }
                    }
                    Some(v1::blob_response::Body::BlobManifest(manifest))
                        if lie == Lie::Manifest =>
                    {
                        manifest.chunk_hashes[0] ^= 0xff;
                    }
                    _ => {}
                }
                let _ = client.respond(inbound.responder, response).await;
            }
        });
        served
    }
}

trait DefaultError {
    fn default_error() -> Self;
}

impl DefaultError for v1::BlobResponse {
    fn default_error() -> Self {
        use swarmtune_protocol::net::ResponseMessage;
        v1::BlobResponse::from_error(v1::ErrorReply {
            code: v1::ErrorCode::Unavailable as i32,
            message: "not serving that chunk".into(),
            ..Default::default()
        })
    }
}

/// Announces `id` from every node of `providers` until `seeker` finds all of them through the
/// DHT: a record put before the DHT has settled can land nowhere.
async fn announce_until_found(seeker: &Node, id: ContentId, providers: &[&Node]) {
    within("providers found", async {
        loop {
            for p in providers {
                let _ = p.client.start_providing(id.as_bytes().to_vec()).await;
            }
            let found = seeker
                .client
                .get_providers(id.as_bytes().to_vec())
                .await
                .unwrap_or_default();
            if providers.iter().all(|p| found.contains(&p.peer())) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

fn blob(len: usize, seed: u8) -> Vec<u8> {
    // Not all zeros, so that chunks differ and a mix-up shows.
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

async fn fetch(
    node: &Node,
    id: ContentId,
    progress: Option<mpsc::Sender<Progress>>,
) -> Result<ContentId, transfer::FetchError> {
    within(
        "fetch",
        transfer::fetch(
            &node.client,
            &node.store,
            id,
            &FetchConfig::default(),
            progress,
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_blob_spreads_to_three_nodes_then_a_fourth_fetches_from_all() {
    let a = node(None).await;
    let data = blob(64 << 20, 1);
    let id = a.store.put_bytes(&data).unwrap();
    let _server = transfer::spawn_server(&a.client, a.store.clone(), 4)
        .await
        .unwrap();
    a.client
        .start_providing(id.as_bytes().to_vec())
        .await
        .unwrap();

    let fetchers = [
        node(Some(&a)).await,
        node(Some(&a)).await,
        node(Some(&a)).await,
    ];
    for f in &fetchers {
        let (tx, mut rx) = mpsc::channel(1024);
        assert_eq!(fetch(f, id, Some(tx)).await.unwrap(), id);
        assert_eq!(f.store.read(&id).unwrap().len(), data.len());
        let mut last = None;
        while let Ok(p) = rx.try_recv() {
            last = Some(p);
        }
        let last = last.expect("progress events");
        assert_eq!((last.done_bytes, last.total_bytes), (64 << 20, 64 << 20));
    }
    // Each of them now serves it too, counted.
    let mut counters = Vec::new();
    for f in &fetchers {
        counters.push(counting_server(f, Lie::No, u32::MAX).await);
    }
    let fourth = node(Some(&a)).await;
    let [f1, f2, f3] = &fetchers;
    announce_until_found(&fourth, id, &[f1, f2, f3]).await;
    assert_eq!(fetch(&fourth, id, None).await.unwrap(), id);
    assert_eq!(ContentId::of(&fourth.store.read(&id).unwrap()), id);
    let from_fetchers: Vec<usize> = counters.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    assert!(
        from_fetchers.iter().filter(|n| **n > 0).count() >= 2,
        "chunks came from fewer than two of the new providers: {from_fetchers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_serving_corrupt_chunks_is_dropped_and_the_fetch_succeeds() {
    let honest = node(None).await;
    let liar = node(Some(&honest)).await;
    let data = blob((6 << 20) + 12_345, 2);
    let id = honest.store.put_bytes(&data).unwrap();
    assert_eq!(liar.store.put_bytes(&data).unwrap(), id);
    let honest_served = counting_server(&honest, Lie::No, u32::MAX).await;
    let liar_served = counting_server(&liar, Lie::Chunks, u32::MAX).await;
    let fetcher = node(Some(&honest)).await;
    announce_until_found(&fetcher, id, &[&honest, &liar]).await;
    assert_eq!(fetch(&fetcher, id, None).await.unwrap(), id);
    assert_eq!(fetcher.store.read(&id).unwrap(), data);
    // The liar was asked, caught at its first bad chunk, and dropped: the honest node served
    // every chunk, and the liar's standing with the fetcher fell.
    let liar_sent = liar_served.load(Ordering::SeqCst);
    assert!(liar_sent >= 1, "the liar was never asked");
    assert!(liar_sent <= 4, "the liar kept being asked: {liar_sent}");
    assert_eq!(honest_served.load(Ordering::SeqCst), 7);
    // One bad-chunk report (50 points), however many of its chunks were in flight.
    let standing = fetcher.client.peer_info(liar.peer()).await.unwrap();
    assert!(
        standing.score < -40.0 && standing.score > -60.0,
        "{standing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_with_a_lying_manifest_is_refused_before_any_chunk_and_never_asked_again() {
    let honest = node(None).await;
    // Providers are asked for a manifest in PeerId order: the liar comes first.
    let liar = loop {
        let candidate = node(Some(&honest)).await;
        if candidate.peer() < honest.peer() {
            break candidate;
        }
    };
    let data = blob((3 << 20) + 77, 4);
    let id = honest.store.put_bytes(&data).unwrap();
    assert_eq!(liar.store.put_bytes(&data).unwrap(), id);
    let honest_served = counting_server(&honest, Lie::No, u32::MAX).await;
    let liar_served = counting_server(&liar, Lie::Manifest, u32::MAX).await;
    let fetcher = node(Some(&honest)).await;
    announce_until_found(&fetcher, id, &[&honest, &liar]).await;

    // Asked alone, the liar's manifest does not make the id: refused, nothing fetched.
    let only_liar = within(
        "fetch from the liar",
        transfer::fetch_from(
            &fetcher.client,
            &fetcher.store,
            id,
            &FetchConfig::default(),
            &[liar.peer()],
            None,
        ),
    )
    .await;
    assert!(
        matches!(only_liar, Err(transfer::FetchError::NoManifest { .. })),
        "{only_liar:?}"
    );
    assert_eq!(liar_served.load(Ordering::SeqCst), 0);
    let standing = fetcher.client.peer_info(liar.peer()).await.unwrap();
    assert!(standing.score < 0.0, "{standing:?}");

    // With both named, the liar is asked first and refused again; the fetch takes the honest
    // manifest and every chunk from the honest provider.
    let both = within(
        "fetch from both",
        transfer::fetch_from(
            &fetcher.client,
            &fetcher.store,
            id,
            &FetchConfig::default(),
            &[liar.peer(), honest.peer()],
            None,
        ),
    )
    .await;
    assert_eq!(both.unwrap(), id);
    assert_eq!(fetcher.store.read(&id).unwrap(), data);
    assert_eq!(liar_served.load(Ordering::SeqCst), 0);
    assert_eq!(honest_served.load(Ordering::SeqCst), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_rate_limits_the_fetch_is_waited_for_not_dropped() {
    // A provider far stricter than the default: 20 chunk requests a second, 3 at once.
    let strict = LimitsConfig {
        blob_request_rate: RateLimit {
            per_second: 20.0,
            burst: 3,
        },
        ..NetConfig::for_tests().limits
    };
    let provider = node_with(None, strict).await;
    let data = blob((12 << 20) + 5, 5);
    let id = provider.store.put_bytes(&data).unwrap();
    let served = counting_server(&provider, Lie::No, u32::MAX).await;
    let fetcher = node(Some(&provider)).await;
    announce_until_found(&fetcher, id, &[&provider]).await;
    // 13 chunks at 20 a second: the default pace (180 a second) runs into the limit, the
    // provider answers ERROR_CODE_RATE_LIMITED with a retry_after_ms, and the fetch waits
    // that long instead of counting failures and giving the only provider up.
    assert_eq!(fetch(&fetcher, id, None).await.unwrap(), id);
    assert_eq!(fetcher.store.read(&id).unwrap(), data);
    assert_eq!(served.load(Ordering::SeqCst), 13);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_cut_short_resumes_from_what_it_had() {
    let first = node(None).await;
    let data = blob(5 << 20, 3);
    let id = first.store.put_bytes(&data).unwrap();
    // The first provider serves chunks 0..3 only, then is gone.
    let first_served = counting_server(&first, Lie::No, 3).await;
    first
        .client
        .start_providing(id.as_bytes().to_vec())
        .await
        .unwrap();
    let fetcher = node(Some(&first)).await;
    announce_until_found(&fetcher, id, &[&first]).await;
    let cut = fetch(&fetcher, id, None).await;
    assert!(cut.is_err(), "the fetch cannot finish: {cut:?}");
    assert_eq!(first_served.load(Ordering::SeqCst), 3);
    assert!(!fetcher.store.contains(&id));
    first.client.shutdown().await.unwrap();

    // A second provider appears; only the two missing chunks are fetched from it.
    let second = node(Some(&fetcher)).await;
    assert_eq!(second.store.put_bytes(&data).unwrap(), id);
    let second_served = counting_server(&second, Lie::No, u32::MAX).await;
    announce_until_found(&fetcher, id, &[&second]).await;
    assert_eq!(fetch(&fetcher, id, None).await.unwrap(), id);
    assert_eq!(fetcher.store.read(&id).unwrap(), data);
    assert_eq!(second_served.load(Ordering::SeqCst), 2);
}
