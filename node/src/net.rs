//! Starting a swarm for a command: its key, its addresses, and the coordinator to talk to.

use std::path::Path;
use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use libp2p_identity::{Keypair, PeerId};
use swarmtune_protocol::identity;
use swarmtune_protocol::net::{Client, NetConfig, NetEvent, spawn};
use tokio::sync::mpsc;

use crate::Unreachable;

/// A running swarm.
pub struct Swarm {
    /// The node's key.
    pub key: Keypair,
    /// Commands to the swarm.
    pub client: Client,
    /// What peers send.
    pub events: mpsc::Receiver<NetEvent>,
    /// Where it listens, each ending in `/p2p/PEERID` (empty for a client).
    pub addrs: Vec<Multiaddr>,
}

/// The data dir's key, created (mode 0600) on first use.
pub fn key(data_dir: &Path) -> anyhow::Result<Keypair> {
    Ok(identity::load_or_create(data_dir)?)
}

/// Starts a swarm listening on `listen` (each address's port 0 picks a free one) and
/// joining through `bootstrap`.
pub async fn start(
    key: Keypair,
    listen: &[Multiaddr],
    bootstrap: Vec<Multiaddr>,
    mdns: bool,
) -> anyhow::Result<Swarm> {
    let config = NetConfig {
        listen_addrs: Vec::new(),
        bootstrap,
        mdns,
        // A node that listens serves the DHT; loopback and LAN setups have no AutoNAT
        // server to confirm an address.
        kad_server: !listen.is_empty(),
        ..NetConfig::default()
    };
    let (client, events) = spawn(key.clone(), config)?;
    let me = client.local_peer_id();
    let mut addrs = Vec::new();
    for addr in listen {
        let bound = client.listen_on(addr.clone()).await?;
        addrs.push(bound.with(Protocol::P2p(me)));
    }
    // Listening on 0.0.0.0 binds every interface: report each one's address.
    if listen.iter().any(is_unspecified) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let all = client.listen_addrs().await?;
        if !all.is_empty() {
            addrs = all.into_iter().map(|a| a.with(Protocol::P2p(me))).collect();
        }
    }
    Ok(Swarm {
        key,
        client,
        events,
        addrs,
    })
}

fn is_unspecified(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

/// A client's swarm (an ephemeral key unless `key` is given), connected to `coordinator`.
pub async fn connect(
    key: Option<Keypair>,
    coordinator: (PeerId, Multiaddr),
    timeout: Duration,
) -> anyhow::Result<Swarm> {
    let key = key.unwrap_or_else(Keypair::generate_ed25519);
    let (peer, addr) = coordinator;
    let swarm = start(key, &[], Vec::new(), false).await?;
    match tokio::time::timeout(timeout, swarm.client.dial(peer, addr.clone())).await {
        Ok(Ok(())) => Ok(swarm),
        Ok(Err(e)) => {
            Err(Unreachable(format!("cannot reach the coordinator at {addr}: {e}")).into())
        }
        Err(_) => Err(Unreachable(format!(
            "cannot reach the coordinator at {addr}: no answer in {} s",
            timeout.as_secs()
        ))
        .into()),
    }
}

/// The default listen addresses: TCP and QUIC on every interface, at `port`.
pub fn default_listen(port: u16) -> Vec<Multiaddr> {
    vec![
        format!("/ip4/0.0.0.0/tcp/{port}")
            .parse()
            .expect("a valid literal multiaddr"),
        format!("/ip4/0.0.0.0/udp/{port}/quic-v1")
            .parse()
            .expect("a valid literal multiaddr"),
    ]
}
