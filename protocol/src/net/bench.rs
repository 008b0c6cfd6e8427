//! `swarmtune bench net`: what the network layer moves, measured on loopback. Blob transfer
//! between real nodes (TCP on 127.0.0.1, Noise, Yamux, the blob protocol, verified chunks
//! written to a blob store) against a plain TCP copy of the same file into a file on the same
//! machine, from one fetcher to many; and gossipsub delivery latency across in-process nodes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol as AddrPart;
use libp2p::{Multiaddr, PeerId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::transfer::{self, FetchConfig};
use super::{Client, NetConfig, NetEvent, Topic, spawn};
use crate::{BlobStore, ContentId, signed, v1};

/// What can stop a benchmark: any of the layers it drives.
pub type BenchError = Box<dyn std::error::Error + Send + Sync>;

fn fail(message: String) -> BenchError {
    message.into()
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct NetBenchConfig {
    /// Size of the blob moved, in bytes.
    pub blob_bytes: usize,
    /// Fetch with 1, 2, … up to this many nodes at once.
    pub max_fetchers: usize,
    /// Nodes in the gossip mesh.
    pub gossip_nodes: usize,
    /// Messages published for the latency figures.
    pub gossip_messages: usize,
    /// Runs of each transfer measurement (the plain copies and every fetcher count); the
    /// best is the figure, all are reported. Both sides get the same number of tries, so
    /// the ratio is not flattered by a lucky fetch or a slow yardstick.
    pub repeats: usize,
}

impl Default for NetBenchConfig {
    fn default() -> Self {
        Self {
            blob_bytes: 64 << 20,
            max_fetchers: 4,
            gossip_nodes: 20,
            gossip_messages: 50,
            repeats: 3,
        }
    }
}

/// One blob-transfer measurement.
#[derive(Clone, Debug)]
pub struct TransferFigure {
    /// Nodes fetching at once.
    pub fetchers: usize,
    /// Wall-clock seconds until every fetcher held the verified blob, in the best run.
    pub seconds: f64,
    /// Bytes delivered per second, summed over the fetchers, in the best run.
    pub bytes_per_s: f64,
    /// The same, in every run.
    pub runs_bytes_per_s: Vec<f64>,
}

/// Everything `bench net` measured.
#[derive(Clone, Debug)]
pub struct NetBenchReport {
    /// Blob size.
    pub blob_bytes: usize,
    /// The blob file sent over one plain TCP connection on 127.0.0.1 and written to a file
    /// that is then synced (bytes landed on disk, as a fetch lands them), bytes per second,
    /// best run.
    pub plain_tcp_bytes_per_s: f64,
    /// The yardstick of the goal: the same bytes from memory to memory over plain TCP (the
    /// socket alone, into a buffer allocated and touched beforehand), best run.
    pub plain_tcp_memory_bytes_per_s: f64,
    /// The memory-to-memory copy, every run.
    pub plain_tcp_memory_runs: Vec<f64>,
    /// The memory-to-memory copy read into a `Vec` that grows as bytes arrive (the yardstick
    /// of earlier versions of this benchmark, slowed by its own reallocations and page
    /// faults), every run.
    pub plain_tcp_growing_runs: Vec<f64>,
    /// Blob transfers, by number of fetchers.
    pub transfers: Vec<TransferFigure>,
    /// Gossip nodes.
    pub gossip_nodes: usize,
    /// Deliveries seen / deliveries expected (messages × other nodes).
    pub gossip_delivered: f64,
    /// Delivery latency percentiles (50, 95, 100), milliseconds.
    pub gossip_latency_ms: [f64; 3],
}

/// Runs the benchmark; `log` hears what is being measured.
pub async fn run(
    config: &NetBenchConfig,
    log: &mut dyn FnMut(&str),
) -> Result<NetBenchReport, BenchError> {
    let work = tempfile::tempdir()?;
    let data: Vec<u8> = (0..config.blob_bytes)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
        .collect();

    log("plain TCP copy on 127.0.0.1");
    let source = work.path().join("source");
    std::fs::write(&source, &data)?;
    let repeats = config.repeats.max(1);
    let mut plain = 0f64;
    let mut plain_memory_runs = Vec::new();
    let mut plain_growing_runs = Vec::new();
    for _ in 0..repeats {
        plain_growing_runs.push(plain_tcp_memory(&data, false).await?);
        let copy = work.path().join("copy");
        plain = plain.max(plain_tcp_copy(&source, &copy).await?);
        std::fs::remove_file(&copy)?;
        plain_memory_runs.push(plain_tcp_memory(&data, true).await?);
    }
    let plain_memory = plain_memory_runs.iter().copied().fold(0f64, f64::max);

    log("blob transfer: one provider, then 1.. fetchers");
    let provider = Node::start(work.path(), "provider", None).await?;
    let id = provider.store.put_bytes(&data)?;
    let _server = transfer::spawn_server(&provider.client, provider.store.clone(), 8).await?;
    let mut transfers = Vec::new();
    let mut fetchers = 1;
    while fetchers <= config.max_fetchers.max(1) {
        let mut runs = Vec::new();
        for run in 0..repeats {
            runs.push(fetch_once(work.path(), &provider, id, fetchers, run).await?);
        }
        let best = runs.iter().copied().fold(f64::INFINITY, f64::min);
        let per_s = |seconds: f64| (fetchers * config.blob_bytes) as f64 / seconds;
        transfers.push(TransferFigure {
            fetchers,
            seconds: best,
            bytes_per_s: per_s(best),
            runs_bytes_per_s: runs.into_iter().map(per_s).collect(),
        });
        fetchers *= 2;
    }
    provider.client.shutdown().await?;

    log("gossipsub latency");
    let (delivered, latency) = gossip_latency(config).await?;
    Ok(NetBenchReport {
        blob_bytes: config.blob_bytes,
        plain_tcp_bytes_per_s: plain,
        plain_tcp_memory_bytes_per_s: plain_memory,
        plain_tcp_memory_runs: plain_memory_runs,
        plain_tcp_growing_runs: plain_growing_runs,
        transfers,
        gossip_nodes: config.gossip_nodes,
        gossip_delivered: delivered,
        gossip_latency_ms: latency,
    })
}

/// Starts `fetchers` fresh nodes, has each find `id` through the DHT, then times them
/// fetching it at once from `provider`: seconds until every one holds the verified blob.
async fn fetch_once(
    root: &std::path::Path,
    provider: &Node,
    id: ContentId,
    fetchers: usize,
    run: usize,
) -> Result<f64, BenchError> {
    let mut nodes = Vec::new();
    for i in 0..fetchers {
        let name = format!("fetch-{fetchers}-{run}-{i}");
        nodes.push(Node::start(root, &name, Some(provider)).await?);
    }
    for node in &nodes {
        announce_until_found(provider, node, id).await?;
    }
    let clock = Instant::now();
    let fetches = nodes.iter().map(|n| {
        let (client, store) = (n.client.clone(), n.store.clone());
        async move { transfer::fetch(&client, &store, id, &FetchConfig::default(), None).await }
    });
    for result in futures::future::join_all(fetches).await {
        let got = result?;
        if got != id {
            return Err(fail(format!("fetched {got}, wanted {id}")));
        }
    }
    let seconds = clock.elapsed().as_secs_f64();
    for node in nodes {
        node.client.shutdown().await?;
    }
    Ok(seconds)
}

/// A node on 127.0.0.1 with a blob store of its own.
struct Node {
    client: Client,
    addr: Multiaddr,
    store: BlobStore,
    events: Option<mpsc::Receiver<NetEvent>>,
}

impl Node {
    async fn start(
        root: &std::path::Path,
        name: &str,
        bootstrap: Option<&Node>,
    ) -> Result<Self, BenchError> {
        let config = NetConfig {
            bootstrap: bootstrap.map(|b| vec![b.addr.clone()]).unwrap_or_default(),
            ..NetConfig::for_tests()
        };
        let (client, events) = spawn(Keypair::generate_ed25519(), config)?;
        let addr = client
            .listen_on("/ip4/127.0.0.1/tcp/0".parse()?)
            .await?
            .with(AddrPart::P2p(client.local_peer_id()));
        let store = BlobStore::open(root.join(name), 1 << 34)?;
        Ok(Self {
            client,
            addr,
            store,
            events: Some(events),
        })
    }

    fn peer(&self) -> PeerId {
        self.client.local_peer_id()
    }
}

/// Provides `id` from `provider` until `seeker` finds it through the DHT (a record put before
/// the DHT settles can land nowhere).
async fn announce_until_found(
    provider: &Node,
    seeker: &Node,
    id: ContentId,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        provider
            .client
            .start_providing(id.as_bytes().to_vec())
            .await?;
        let found = seeker
            .client
            .get_providers(id.as_bytes().to_vec())
            .await
            .unwrap_or_default();
        if found.contains(&provider.peer()) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(fail("the DHT never named the provider".into()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends the file at `source` over one TCP connection on 127.0.0.1 into `target`, synced:
/// what moving a blob costs without encryption, multiplexing, chunking or hashing.
async fn plain_tcp_copy(
    source: &std::path::Path,
    target: &std::path::Path,
) -> Result<f64, BenchError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let target = target.to_owned();
    let receiver = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        let mut file = tokio::fs::File::create(&target).await?;
        let mut buffer = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = socket.read(&mut buffer).await?;
            if n == 0 {
                break;
            }
            file.write_all(&buffer[..n]).await?;
            total += n as u64;
        }
        file.sync_all().await?;
        Ok::<u64, BenchError>(total)
    });
    let clock = Instant::now();
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    let mut file = tokio::fs::File::open(source).await?;
    tokio::io::copy(&mut file, &mut socket).await?;
    socket.shutdown().await?;
    let total = receiver.await??;
    Ok(total as f64 / clock.elapsed().as_secs_f64())
}

/// Sends `data` over one TCP connection on 127.0.0.1 and reads it into memory. With
/// `ready_buffer`, into a buffer of the right size, allocated and written before the clock
/// starts, so what is timed is the socket alone; without, into a `Vec` that `read_to_end`
/// grows as the bytes arrive.
async fn plain_tcp_memory(data: &[u8], ready_buffer: bool) -> Result<f64, BenchError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut received = if ready_buffer {
        vec![1u8; data.len()]
    } else {
        Vec::new()
    };
    let receiver = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        if ready_buffer {
            socket.read_exact(&mut received).await?;
        } else {
            socket.read_to_end(&mut received).await?;
        }
        Ok::<usize, BenchError>(received.len())
    });
    let clock = Instant::now();
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    socket.write_all(data).await?;
    socket.shutdown().await?;
    let total = receiver.await??;
    Ok(total as f64 / clock.elapsed().as_secs_f64())
}

/// Publishes signed job announcements from one node of a mesh and times their arrival at all
/// the others. Returns (share delivered, [p50, p95, max] ms).
async fn gossip_latency(config: &NetBenchConfig) -> Result<(f64, [f64; 3]), BenchError> {
    let root = tempfile::tempdir()?;
    let n = config.gossip_nodes.max(2);
    let mut nodes = vec![Node::start(root.path(), "g0", None).await?];
    for i in 1..n {
        let node = Node::start(root.path(), &format!("g{i}"), Some(&nodes[0])).await?;
        nodes.push(node);
    }
    let arrivals: Arc<Mutex<HashMap<u64, Vec<Instant>>>> = Arc::default();
    let mut drains = Vec::new();
    for node in &mut nodes[1..] {
        let mut events = node
            .events
            .take()
            .expect("each node's events are taken once");
        let arrivals = arrivals.clone();
        drains.push(tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if let NetEvent::Gossip(message) = event {
                    let now = Instant::now();
                    if let Ok(mut a) = arrivals.lock() {
                        a.entry(message.envelope.nonce).or_default().push(now);
                    }
                }
            }
        }));
    }
    // Let the mesh form: a warm-up message must reach every node before timing starts.
    let key = Keypair::generate_ed25519();
    let publisher = &nodes[0];
    let sign = |key: &Keypair| -> Result<v1::Signed, BenchError> {
        let announcement = v1::JobAnnouncement {
            protocol_version: crate::PROTOCOL_VERSION,
            coordinator_peer_id: key.public().to_peer_id().to_bytes(),
            ..Default::default()
        };
        Ok(signed::sign(key, &announcement, signed::unix_ms_now())?)
    };
    use prost::Message;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let warm = sign(&key)?;
        let nonce = warm.nonce;
        let _ = publisher
            .client
            .publish(Topic::Jobs, warm.encode_to_vec())
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let reached = arrivals
            .lock()
            .map(|a| a.get(&nonce).map_or(0, Vec::len))
            .unwrap_or(0);
        if reached == n - 1 {
            break;
        }
        if Instant::now() >= deadline {
            return Err(fail(format!(
                "the gossip mesh never reached every node ({reached} of {})",
                n - 1
            )));
        }
    }
    let mut sent = HashMap::new();
    for _ in 0..config.gossip_messages {
        let envelope = sign(&key)?;
        sent.insert(envelope.nonce, Instant::now());
        publisher
            .client
            .publish(Topic::Jobs, envelope.encode_to_vec())
            .await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut latencies: Vec<f64> = Vec::new();
    if let Ok(a) = arrivals.lock() {
        for (nonce, at) in &sent {
            for t in a.get(nonce).into_iter().flatten() {
                latencies.push(t.duration_since(*at).as_secs_f64() * 1000.0);
            }
        }
    }
    for node in &nodes {
        node.client.shutdown().await?;
    }
    for drain in drains {
        drain.abort();
    }
    latencies.sort_by(f64::total_cmp);
    let expected = (config.gossip_messages * (n - 1)) as f64;
    let pick = |q: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        latencies[((latencies.len() - 1) as f64 * q).round() as usize]
    };
    Ok((
        latencies.len() as f64 / expected,
        [pick(0.5), pick(0.95), pick(1.0)],
    ))
}
