//! The swarm's `NetworkBehaviour`: every protocol a swarmtune node speaks, composed with
//! `#[derive(NetworkBehaviour)]`. Built once by [`Behaviour::new`] from the node's key and
//! [`NetConfig`]; driven only by the event loop.

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, allow_block_list, autonat, connection_limits, dcutr, gossipsub, identify, kad,
    mdns, ping, relay,
};

use super::codec::ProstCodec;
use super::gossip::GOSSIP_MAX_BYTES;
use super::rpc::Protocol;
use super::swarm::NetConfig;
use crate::v1;

/// The Kademlia protocol id: our own DHT, apart from the public IPFS one.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/swarmtune/kad/1.0.0");

/// What identify announces as the protocol family.
pub const IDENTIFY_PROTOCOL_VERSION: &str = "/swarmtune/1";

/// The request-response behaviour of one protocol.
pub type Rpc<Req, Resp> = request_response::Behaviour<ProstCodec<Req, Resp>>;

/// Every protocol of a swarmtune node.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    // First, so that a connection over the limits or from a banned peer is denied before any
    // other behaviour sets up state for it. libp2p's `memory_connection_limits` is left out:
    // it polls the process's memory through `sysinfo`, and a node's memory is dominated by
    // training, not connections; the connection caps and bounded queues bound the network's.
    /// Caps on pending and established connections.
    pub connection_limits: connection_limits::Behaviour,
    /// Banned peers: their connections are closed and new ones refused.
    pub blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    /// Who the peer is and where it listens.
    pub identify: identify::Behaviour,
    /// Liveness and round-trip time.
    pub ping: ping::Behaviour,
    /// The DHT: peer routing and blob provider records.
    pub kad: kad::Behaviour<MemoryStore>,
    /// Job announcements and module manifests.
    pub gossipsub: gossipsub::Behaviour,
    /// `/swarmtune/job/1`.
    pub job: Rpc<v1::JobRequest, v1::JobResponse>,
    /// `/swarmtune/lease/1`.
    pub lease: Rpc<v1::LeaseRequest, v1::LeaseResponse>,
    /// `/swarmtune/delta/1`.
    pub delta: Rpc<v1::DeltaRequest, v1::DeltaResponse>,
    /// `/swarmtune/status/1`.
    pub status: Rpc<v1::StatusRequest, v1::StatusResponse>,
    /// `/swarmtune/blob/2`.
    pub blob: Rpc<v1::BlobRequest, v1::BlobResponse>,
    /// Peers on the same LAN; off in tests (it multicasts beyond loopback).
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    /// Whether we are reachable from outside.
    pub autonat: autonat::Behaviour,
    /// Reservations on relays, for peers behind NAT.
    pub relay_client: relay::client::Behaviour,
    /// Hole punching through a relayed connection.
    pub dcutr: dcutr::Behaviour,
}

/// Why the behaviour could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BehaviourError {
    /// The gossipsub configuration was refused.
    #[error("gossipsub: {0}")]
    Gossipsub(String),
    /// mDNS could not open its socket.
    #[error("mdns: {0}")]
    Mdns(#[from] std::io::Error),
}

impl Behaviour {
    /// Every behaviour, configured from `config`.
    pub fn new(
        key: &Keypair,
        relay_client: relay::client::Behaviour,
        config: &NetConfig,
    ) -> Result<Self, BehaviourError> {
        let peer_id = key.public().to_peer_id();

        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL_VERSION.into(), key.public())
                .with_agent_version(config.agent_version.clone()),
        );

        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        kad_config.set_query_timeout(config.kad_query_timeout);
        let store = MemoryStore::with_config(
            peer_id,
            MemoryStoreConfig {
                max_provided_keys: config.kad_max_provided_keys,
                ..Default::default()
            },
        );
        let mut kad = kad::Behaviour::with_config(peer_id, store, kad_config);
        // Without a confirmed external address Kademlia stays a client; a node configured as
        // reachable serves the DHT from the start, the others let AutoNAT decide.
        if config.kad_server {
            kad.set_mode(Some(kad::Mode::Server));
        }

        let gossip_config = gossipsub::ConfigBuilder::default()
            .validation_mode(gossipsub::ValidationMode::Strict)
            .validate_messages()
            .max_transmit_size(GOSSIP_MAX_BYTES)
            .heartbeat_interval(config.gossip_heartbeat)
            .build()
            .map_err(|e| BehaviourError::Gossipsub(e.to_string()))?;
        let gossipsub = gossipsub::Behaviour::new(
            gossipsub::MessageAuthenticity::Signed(key.clone()),
            gossip_config,
        )
        .map_err(|e| BehaviourError::Gossipsub(e.to_string()))?;

        let rpc_config = request_response::Config::default()
            .with_request_timeout(config.request_timeout)
            .with_max_concurrent_streams(config.limits.max_concurrent_streams);

        let mdns = if config.mdns {
            Some(mdns::tokio::Behaviour::new(
                mdns::Config::default(),
                peer_id,
            )?)
        } else {
            None
        };

        Ok(Self {
            connection_limits: connection_limits::Behaviour::new(config.limits.connection_limits()),
            blocked: Default::default(),
            identify,
            ping: ping::Behaviour::new(ping::Config::new().with_interval(config.ping_interval)),
            kad,
            gossipsub,
            job: rpc(Protocol::Job, &rpc_config),
            lease: rpc(Protocol::Lease, &rpc_config),
            delta: rpc(Protocol::Delta, &rpc_config),
            status: rpc(Protocol::Status, &rpc_config),
            blob: rpc(Protocol::Blob, &rpc_config),
            mdns: mdns.into(),
            autonat: autonat::Behaviour::new(peer_id, autonat::Config::default()),
            relay_client,
            dcutr: dcutr::Behaviour::new(peer_id),
        })
    }
}

fn rpc<Req, Resp>(protocol: Protocol, config: &request_response::Config) -> Rpc<Req, Resp>
where
    Req: super::codec::WireMessage,
    Resp: super::codec::WireMessage,
{
    request_response::Behaviour::with_codec(
        ProstCodec::new(protocol.max_bytes()),
        [(protocol.stream_protocol(), ProtocolSupport::Full)],
        config.clone(),
    )
}

/// Default ping interval; the idle timeout, not ping, decides when a quiet connection closes.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(15);
