//! Building the swarm and starting its event loop: [`NetConfig`], the transports (TCP and QUIC
//! with Noise and Yamux, DNS, relay client; or libp2p's memory transport for tests), and
//! [`spawn`] / [`spawn_memory`], which hand back the [`Client`] and the event stream.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use libp2p::core::transport::{MemoryTransport, Transport, upgrade};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, Swarm, SwarmBuilder, noise, tcp, yamux};
use tokio::sync::mpsc;

use super::behaviour::{Behaviour, DEFAULT_PING_INTERVAL};
use super::client::{Client, NetError, NetEvent};
use super::event_loop::EventLoop;
use super::gossip::{SharedVerifier, SignatureVerifier, Topic};
use super::limits::LimitsConfig;

/// What the swarm builder takes as a behaviour constructor's error.
type BoxedError = Box<dyn std::error::Error + Send + Sync>;

/// Everything the swarm is configured with.
#[derive(Clone)]
pub struct NetConfig {
    /// Where to listen, e.g. `/ip4/0.0.0.0/tcp/4001` and `/ip4/0.0.0.0/udp/4001/quic-v1`.
    pub listen_addrs: Vec<Multiaddr>,
    /// Bootstrap peers, each ending in `/p2p/<peer id>`.
    pub bootstrap: Vec<Multiaddr>,
    /// Addresses this node is known to be reachable at (announced as external).
    pub external_addrs: Vec<Multiaddr>,
    /// Discover peers on the LAN with mDNS (on for users, off in tests).
    pub mdns: bool,
    /// Serve the DHT from the start (for nodes known to be reachable, e.g. bootstrap nodes);
    /// otherwise Kademlia serves once an external address is confirmed.
    pub kad_server: bool,
    /// Topics to join at start.
    pub topics: Vec<Topic>,
    /// Rate, stream, connection and ban limits.
    pub limits: LimitsConfig,
    /// How long an outbound request may wait for its response.
    pub request_timeout: Duration,
    /// How long a connection with no open stream stays up.
    pub idle_connection_timeout: Duration,
    /// How long a Kademlia query may run.
    pub kad_query_timeout: Duration,
    /// How many keys this node may provide at once (the memory store's cap).
    pub kad_max_provided_keys: usize,
    /// The gossipsub heartbeat.
    pub gossip_heartbeat: Duration,
    /// The ping interval.
    pub ping_interval: Duration,
    /// What identify announces as our agent.
    pub agent_version: String,
    /// How many commands may wait for the event loop before callers wait in turn.
    pub command_queue: usize,
    /// How many events may wait for the application; see [`NetEvent`] for what happens when
    /// it is full.
    pub event_queue: usize,
    /// How long `Client::publish` keeps retrying while no peer is subscribed to the topic.
    pub publish_retry: Duration,
    /// The checks of gossipsub envelopes beyond their structure ([`SignatureVerifier`] by
    /// default).
    pub verifier: SharedVerifier,
}

impl fmt::Debug for NetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetConfig")
            .field("listen_addrs", &self.listen_addrs)
            .field("bootstrap", &self.bootstrap)
            .field("external_addrs", &self.external_addrs)
            .field("mdns", &self.mdns)
            .field("kad_server", &self.kad_server)
            .field("topics", &self.topics)
            .field("limits", &self.limits)
            .field("request_timeout", &self.request_timeout)
            .field("idle_connection_timeout", &self.idle_connection_timeout)
            .finish_non_exhaustive()
    }
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            listen_addrs: vec![
                "/ip4/0.0.0.0/tcp/0"
                    .parse()
                    .expect("a valid literal multiaddr"),
                "/ip4/0.0.0.0/udp/0/quic-v1"
                    .parse()
                    .expect("a valid literal multiaddr"),
            ],
            bootstrap: Vec::new(),
            external_addrs: Vec::new(),
            mdns: true,
            kad_server: false,
            topics: Topic::ALL.to_vec(),
            limits: LimitsConfig::default(),
            request_timeout: Duration::from_secs(30),
            idle_connection_timeout: Duration::from_secs(60),
            kad_query_timeout: Duration::from_secs(60),
            kad_max_provided_keys: 16 * 1024,
            gossip_heartbeat: Duration::from_secs(1),
            ping_interval: DEFAULT_PING_INTERVAL,
            agent_version: format!("swarmtune/{}", env!("CARGO_PKG_VERSION")),
            command_queue: 64,
            event_queue: 256,
            publish_retry: Duration::from_secs(10),
            verifier: Arc::new(SignatureVerifier),
        }
    }
}

impl NetConfig {
    /// Settings for tests on loopback or the memory transport: no mDNS, every node a DHT
    /// server, fast gossipsub heartbeats and short timeouts, no listen address (tests pick).
    pub fn for_tests() -> Self {
        Self {
            listen_addrs: Vec::new(),
            mdns: false,
            kad_server: true,
            request_timeout: Duration::from_secs(5),
            kad_query_timeout: Duration::from_secs(10),
            gossip_heartbeat: Duration::from_millis(100),
            publish_retry: Duration::from_secs(5),
            ..Self::default()
        }
    }
}

/// Builds the swarm of a real node: TCP and QUIC, Noise, Yamux, DNS and a relay client.
pub fn build_swarm(key: Keypair, config: &NetConfig) -> Result<Swarm<Behaviour>, NetError> {
    let transport_err = |e: &dyn fmt::Display| NetError::Transport(e.to_string());
    let swarm = SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| transport_err(&e))?
        .with_quic()
        .with_dns()
        .map_err(|e| transport_err(&e))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| transport_err(&e))?
        .with_behaviour(|key, relay| Behaviour::new(key, relay, config).map_err(BoxedError::from))
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_connection_timeout))
        .build();
    Ok(swarm)
}

/// Builds a swarm on libp2p's in-process memory transport (addresses `/memory/<n>`), with
/// the same Noise, Yamux and behaviours as a real node; for tests and simulations.
pub fn build_memory_swarm(key: Keypair, config: &NetConfig) -> Result<Swarm<Behaviour>, NetError> {
    let swarm = SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|key| {
            Ok::<_, BoxedError>(
                MemoryTransport::default()
                    .upgrade(upgrade::Version::V1)
                    .authenticate(noise::Config::new(key)?)
                    .multiplex(yamux::Config::default()),
            )
        })
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_behaviour(|key, relay| Behaviour::new(key, relay, config).map_err(BoxedError::from))
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_connection_timeout))
        .build();
    Ok(swarm)
}

/// Starts a real node's swarm on the current tokio runtime; returns the client and the event
/// stream.
pub fn spawn(
    key: Keypair,
    config: NetConfig,
) -> Result<(Client, mpsc::Receiver<NetEvent>), NetError> {
    let swarm = build_swarm(key, &config)?;
    start(swarm, config)
}

/// Starts a memory-transport swarm on the current tokio runtime.
pub fn spawn_memory(
    key: Keypair,
    config: NetConfig,
) -> Result<(Client, mpsc::Receiver<NetEvent>), NetError> {
    let swarm = build_memory_swarm(key, &config)?;
    start(swarm, config)
}

/// Listens, dials the bootstrap peers and runs the event loop in its own task.
fn start(
    mut swarm: Swarm<Behaviour>,
    config: NetConfig,
) -> Result<(Client, mpsc::Receiver<NetEvent>), NetError> {
    for addr in &config.listen_addrs {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen(format!("{addr}: {e}")))?;
    }
    for addr in &config.external_addrs {
        swarm.add_external_address(addr.clone());
    }
    for topic in &config.topics {
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&topic.ident())
            .map_err(|e| NetError::Subscribe(e.to_string()))?;
    }
    let (command_tx, command_rx) = mpsc::channel(config.command_queue.max(1));
    let (event_tx, event_rx) = mpsc::channel(config.event_queue.max(1));
    let client = Client::new(
        command_tx,
        *swarm.local_peer_id(),
        config.request_timeout,
        config.publish_retry,
    );
    let mut event_loop = EventLoop::new(swarm, command_rx, event_tx, &config);
    event_loop.bootstrap(&config.bootstrap);
    tokio::spawn(event_loop.run());
    Ok((client, event_rx))
}
