//! The libp2p swarm of a swarmtune node (issue 5, points 4 to 6): transports, the behaviour,
//! the event loop that owns the swarm, the typed [`Client`], request-response codecs with
//! their size limits, gossipsub validation, limits and peer scoring, and blob transfer.
//!
//! Shape (as rust-libp2p's `file-sharing` example): [`spawn`] starts one task that owns the
//! `Swarm` and returns a cloneable [`Client`] (commands over a bounded channel, answers on
//! oneshots) and a bounded stream of [`NetEvent`]s (what peers send).
//!
//! - `behaviour`: the `#[derive(NetworkBehaviour)]` struct (identify, ping, Kademlia,
//!   gossipsub, the five request-response protocols, mDNS, AutoNAT, relay client, DCUtR,
//!   connection limits, the block list).
//! - `event_loop`: the task that owns the swarm.
//! - `client`: [`Client`], [`NetEvent`] and the errors; what happens when the application
//!   is slow.
//! - `codec`: length-prefixed prost frames with a limit per protocol; the version check.
//! - `rpc`: the protocols and one [`Request`] / [`Response`] enum over them.
//! - `gossip`: topics and message validation ([`SignatureVerifier`] by default).
//! - `limits`: rate limits, in-flight limits, scores and bans.
//! - `swarm`: [`NetConfig`], the transports, [`spawn`] / [`spawn_memory`].
//! - `transfer`: serving and fetching blobs in verified chunks.

pub mod behaviour;
pub mod bench;
pub mod client;
pub mod codec;
mod event_loop;
pub mod gossip;
pub mod limits;
pub mod rpc;
pub mod swarm;
pub mod transfer;

pub use client::{
    Client, GossipMessage, InboundRequest, NetError, NetEvent, PeerInfo, RequestError, Responder,
};
pub use codec::{Frame, PROTOCOL_VERSION, ResponseMessage, WireMessage};
pub use gossip::{EnvelopeVerifier, GossipVerdict, SignatureVerifier, StructuralOnly, Topic};
pub use limits::{LimitsConfig, Misbehaviour, Penalties, RateLimit};
pub use rpc::{Protocol, Request, Response, RpcRequest};
pub use swarm::{NetConfig, spawn, spawn_memory};
