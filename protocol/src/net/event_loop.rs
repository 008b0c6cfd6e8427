//! The task that owns the swarm. It turns [`Command`]s from the [`Client`] into swarm calls
//! (keeping the oneshot of each pending one in a map keyed by query or request id), and swarm
//! events into answers and [`NetEvent`]s. Nothing a peer sends can make it panic: invalid
//! input is logged with the peer, scored, and the loop carries on.
//!
//! [`Client`]: super::client::Client

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::gossipsub::{self, MessageAcceptance};
use libp2p::request_response::{
    self, InboundRequestId, OutboundFailure, OutboundRequestId, ResponseChannel,
};
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::{Multiaddr, PeerId, Swarm, identify, kad, mdns, multiaddr::Protocol as AddrPart};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::behaviour::{Behaviour, BehaviourEvent, KAD_PROTOCOL, Rpc};
use super::client::{
    Command, GossipMessage, InboundRequest, NetError, NetEvent, PeerInfo, PublishFailure,
    RequestError, Responder, ResponseSlot,
};
use super::codec::{Frame, ResponseMessage, error_reply, unsupported_version_reply};
use super::gossip::{self, GossipVerdict, SharedVerifier, Topic};
use super::limits::{Misbehaviour, PeerLimits, Verdict};
use super::rpc::{Protocol, Request, Response, RpcRequest};
use super::swarm::NetConfig;
use crate::v1;

/// At most this many of a peer's identify listen addresses go into the DHT: the list is the
/// peer's claim and its length is not bounded by the protocol.
const MAX_IDENTIFY_ADDRS: usize = 16;

/// How often bans are checked for expiry.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// The hint sent with ERROR_CODE_UNAVAILABLE when our queue is full.
const BUSY_RETRY_AFTER: Duration = Duration::from_millis(200);

/// Ties a request type to its behaviour and response channel, so one generic function
/// handles all five protocols.
trait Wired: RpcRequest + Sized {
    fn rpc(b: &mut Behaviour) -> &mut Rpc<Self, Self::Response>;
    fn slot(channel: ResponseChannel<Frame<Self::Response>>) -> ResponseSlot;
}

macro_rules! wired {
    ($($request:ident, $field:ident, $slot:ident;)*) => {$(
        impl Wired for v1::$request {
            fn rpc(b: &mut Behaviour) -> &mut Rpc<Self, Self::Response> {
                &mut b.$field
            }
            fn slot(channel: ResponseChannel<Frame<Self::Response>>) -> ResponseSlot {
                ResponseSlot::$slot(channel)
            }
        }
    )*};
}

wired! {
    JobRequest, job, Job;
    LeaseRequest, lease, Lease;
    DeltaRequest, delta, Delta;
    StatusRequest, status, Status;
    BlobRequest, blob, Blob;
}

/// What identify told us about a connected peer.
#[derive(Debug, Clone, Default)]
struct Identified {
    agent_version: String,
    protocols: Vec<String>,
    listen_addrs: Vec<Multiaddr>,
}

/// A provider query still running: the providers found so far and who waits for them.
struct ProviderQuery {
    found: HashSet<PeerId>,
    reply: oneshot::Sender<Result<HashSet<PeerId>, NetError>>,
}

/// The swarm's owner.
pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetEvent>,
    blob_sink: Option<mpsc::Sender<InboundRequest>>,
    verifier: SharedVerifier,
    limits: PeerLimits,
    pending_listen:
        HashMap<libp2p::core::transport::ListenerId, oneshot::Sender<Result<Multiaddr, NetError>>>,
    pending_dial: HashMap<PeerId, Vec<oneshot::Sender<Result<(), NetError>>>>,
    pending_start_providing: HashMap<kad::QueryId, oneshot::Sender<Result<(), NetError>>>,
    pending_get_providers: HashMap<kad::QueryId, ProviderQuery>,
    pending_requests:
        HashMap<(Protocol, OutboundRequestId), oneshot::Sender<Result<Response, RequestError>>>,
    /// Inbound requests handed to the application and not yet answered, for the in-flight
    /// limit.
    routed: HashMap<(Protocol, InboundRequestId), PeerId>,
    identified: HashMap<PeerId, Identified>,
    /// The last ping round trip of each connected peer.
    rtt: HashMap<PeerId, Duration>,
    dropped_events: u64,
}

impl EventLoop {
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<NetEvent>,
        config: &NetConfig,
    ) -> Self {
        Self {
            swarm,
            commands,
            events,
            blob_sink: None,
            verifier: config.verifier.clone(),
            limits: PeerLimits::new(config.limits.clone()),
            pending_listen: HashMap::new(),
            pending_dial: HashMap::new(),
            pending_start_providing: HashMap::new(),
            pending_get_providers: HashMap::new(),
            pending_requests: HashMap::new(),
            routed: HashMap::new(),
            identified: HashMap::new(),
            rtt: HashMap::new(),
            dropped_events: 0,
        }
    }

    /// Adds the bootstrap peers to Kademlia, dials them and starts a bootstrap query.
    pub(crate) fn bootstrap(&mut self, peers: &[Multiaddr]) {
        for addr in peers {
            let Some(AddrPart::P2p(peer)) = addr.iter().last() else {
                warn!(%addr, "bootstrap address has no /p2p/<peer id>; skipped");
                continue;
            };
            self.swarm
                .behaviour_mut()
                .kad
                .add_address(&peer, addr.clone());
            self.swarm.add_peer_address(peer, addr.clone());
            if let Err(e) = self.swarm.dial(
                DialOpts::peer_id(peer)
                    .addresses(vec![addr.clone()])
                    .build(),
            ) {
                warn!(%peer, %addr, error = %e, "could not dial bootstrap peer");
            }
        }
        if !peers.is_empty()
            && let Err(e) = self.swarm.behaviour_mut().kad.bootstrap()
        {
            warn!(error = %e, "kademlia bootstrap did not start");
        }
    }

    /// Runs until shutdown or until every `Client` is dropped.
    pub(crate) async fn run(mut self) {
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING_INTERVAL);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown { reply }) => {
                        info!(peer = %self.swarm.local_peer_id(), "network shutting down");
                        drop(self.swarm);
                        let _ = reply.send(());
                        return;
                    }
                    Some(command) => self.on_command(command),
                    None => {
                        debug!("every client is gone; network stops");
                        return;
                    }
                },
                _ = housekeeping.tick() => self.housekeeping(),
            }
        }
    }

    fn housekeeping(&mut self) {
        for peer in self.limits.expire(Instant::now()) {
            info!(%peer, "ban expired");
            self.swarm.behaviour_mut().blocked.unblock_peer(peer);
        }
    }

    /// Hands a notification to the application, or drops it when the queue is full.
    fn notify(&mut self, event: NetEvent) {
        if let Err(e) = self.events.try_send(event) {
            self.dropped_events += 1;
            match e {
                mpsc::error::TrySendError::Full(event) => warn!(
                    dropped = self.dropped_events,
                    ?event,
                    "event queue full; event dropped"
                ),
                mpsc::error::TrySendError::Closed(_) => {
                    debug!("event stream closed; event dropped")
                }
            }
        }
    }

    /// Lowers `peer`'s score; bans it past the threshold.
    fn penalise(&mut self, peer: PeerId, what: Misbehaviour) {
        match self.limits.penalise(peer, &what, Instant::now()) {
            Verdict::Scored { score } => {
                warn!(%peer, reason = %what, score, "peer misbehaved");
            }
            Verdict::Ban { score, until } => {
                let secs = until.saturating_duration_since(Instant::now()).as_secs();
                warn!(%peer, reason = %what, score, ban_secs = secs, "peer banned");
                // Closes its connections now and refuses new ones, both ways.
                self.swarm.behaviour_mut().blocked.block_peer(peer);
                self.swarm.behaviour_mut().kad.remove_peer(&peer);
                self.notify(NetEvent::PeerBanned {
                    peer,
                    reason: what.to_string(),
                });
            }
            Verdict::AlreadyBanned => debug!(%peer, reason = %what, "banned peer misbehaved"),
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Listen { addr, reply } => match self.swarm.listen_on(addr.clone()) {
                Ok(id) => {
                    self.pending_listen.insert(id, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(NetError::Listen(format!("{addr}: {e}"))));
                }
            },
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::Dial { peer, addr, reply } => self.dial(peer, addr, reply),
            Command::StartProviding { key, reply } => {
                match self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .start_providing(kad::RecordKey::new(&key))
                {
                    Ok(id) => {
                        self.pending_start_providing.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NetError::Kademlia(e.to_string())));
                    }
                }
            }
            Command::StopProviding { key } => {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .stop_providing(&kad::RecordKey::new(&key));
            }
            Command::GetProviders { key, reply } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(kad::RecordKey::new(&key));
                self.pending_get_providers.insert(
                    id,
                    ProviderQuery {
                        found: HashSet::new(),
                        reply,
                    },
                );
            }
            Command::Subscribe { topic, reply } => {
                let result = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .subscribe(&topic.ident())
                    .map(|_| ())
                    .map_err(|e| NetError::Subscribe(e.to_string()));
                let _ = reply.send(result);
            }
            Command::Publish { topic, data, reply } => {
                let result = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(topic.ident(), data)
                    .map(|_| ())
                    .map_err(|e| match e {
                        gossipsub::PublishError::NoPeersSubscribedToTopic => {
                            PublishFailure::NoPeers
                        }
                        other => PublishFailure::Other(other.to_string()),
                    });
                let _ = reply.send(result);
            }
            Command::Request {
                peer,
                request,
                reply,
            } => {
                let b = self.swarm.behaviour_mut();
                let key = match *request {
                    Request::Job(r) => {
                        (Protocol::Job, b.job.send_request(&peer, Frame::Message(r)))
                    }
                    Request::Lease(r) => (
                        Protocol::Lease,
                        b.lease.send_request(&peer, Frame::Message(r)),
                    ),
                    Request::Delta(r) => (
                        Protocol::Delta,
                        b.delta.send_request(&peer, Frame::Message(r)),
                    ),
                    Request::Status(r) => (
                        Protocol::Status,
                        b.status.send_request(&peer, Frame::Message(r)),
                    ),
                    Request::Blob(r) => (
                        Protocol::Blob,
                        b.blob.send_request(&peer, Frame::Message(r)),
                    ),
                };
                self.pending_requests.insert(key, reply);
            }
            Command::Respond {
                responder,
                response,
                reply,
            } => {
                let _ = reply.send(self.respond(responder, *response));
            }
            Command::ReportMisbehaviour { peer, reason } => self.penalise(peer, reason),
            Command::PeerInfo { peer, reply } => {
                let standing = self.limits.standing(&peer, Instant::now());
                let known = self.identified.get(&peer).cloned().unwrap_or_default();
                let _ = reply.send(PeerInfo {
                    peer,
                    connected: self.swarm.is_connected(&peer),
                    agent_version: Some(known.agent_version).filter(|a| !a.is_empty()),
                    protocols: known.protocols,
                    listen_addrs: known.listen_addrs,
                    ping_rtt: self.rtt.get(&peer).copied(),
                    score: standing.score,
                    banned: standing.banned_until.is_some(),
                });
            }
            Command::ConnectedPeers { reply } => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::RoutingTable { reply } => {
                let mut peers = Vec::new();
                for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
                    peers.extend(bucket.iter().map(|entry| *entry.node.key.preimage()));
                }
                let _ = reply.send(peers);
            }
            Command::ServeBlobs { sink } => self.blob_sink = Some(sink),
            // Handled in `run`, which owns the swarm's end.
            Command::Shutdown { reply } => {
                let _ = reply.send(());
            }
        }
    }

    fn dial(
        &mut self,
        peer: PeerId,
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), NetError>>,
    ) {
        self.swarm.add_peer_address(peer, addr.clone());
        if self.swarm.is_connected(&peer) {
            let _ = reply.send(Ok(()));
            return;
        }
        match self
            .swarm
            .dial(DialOpts::peer_id(peer).addresses(vec![addr]).build())
        {
            Ok(()) => self.pending_dial.entry(peer).or_default().push(reply),
            Err(e) => {
                let _ = reply.send(Err(NetError::Dial {
                    peer,
                    reason: e.to_string(),
                }));
            }
        }
    }

    fn respond(&mut self, responder: Responder, response: Response) -> Result<(), NetError> {
        let Responder { peer, id, channel } = responder;
        let protocol = channel.protocol();
        let b = self.swarm.behaviour_mut();
        let sent = match (channel, response) {
            (ResponseSlot::Job(c), Response::Job(r)) => {
                b.job.send_response(c, Frame::Message(r)).is_ok()
            }
            (ResponseSlot::Lease(c), Response::Lease(r)) => {
                b.lease.send_response(c, Frame::Message(r)).is_ok()
            }
            (ResponseSlot::Delta(c), Response::Delta(r)) => {
                b.delta.send_response(c, Frame::Message(r)).is_ok()
            }
            (ResponseSlot::Status(c), Response::Status(r)) => {
                b.status.send_response(c, Frame::Message(r)).is_ok()
            }
            (ResponseSlot::Blob(c), Response::Blob(r)) => {
                b.blob.send_response(c, Frame::Message(r)).is_ok()
            }
            (slot, response) => {
                // The channel is dropped here; the peer sees the request fail, and the
                // in-flight count is released by the InboundFailure that follows.
                let got = response.protocol();
                drop(slot);
                return Err(NetError::WrongProtocol {
                    expected: protocol,
                    got,
                });
            }
        };
        if sent {
            Ok(())
        } else {
            // The stream is gone; no ResponseSent or InboundFailure will follow for it.
            if self.routed.remove(&(protocol, id)).is_some() {
                self.limits.end_inbound(peer);
            }
            Err(NetError::ResponseNotSent)
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                info!(%address, "listening");
                if let Some(reply) = self.pending_listen.remove(&listener_id) {
                    let _ = reply.send(Ok(address));
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some(reply) = self.pending_listen.remove(&listener_id) {
                    let reason = match reason {
                        Ok(()) => "listener closed".to_string(),
                        Err(e) => e.to_string(),
                    };
                    let _ = reply.send(Err(NetError::Listen(reason)));
                }
            }
            SwarmEvent::ListenerError { listener_id, error } => {
                warn!(error = %error, "listener error");
                if let Some(reply) = self.pending_listen.remove(&listener_id) {
                    let _ = reply.send(Err(NetError::Listen(error.to_string())));
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                endpoint,
                ..
            } => {
                debug!(peer = %peer_id, address = %endpoint.get_remote_address(), "connected");
                for reply in self.pending_dial.remove(&peer_id).unwrap_or_default() {
                    let _ = reply.send(Ok(()));
                }
                if num_established.get() == 1 {
                    self.notify(NetEvent::PeerConnected(peer_id));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                debug!(peer = %peer_id, cause = ?cause, "connection closed");
                if num_established == 0 {
                    self.limits.peer_disconnected(peer_id);
                    self.identified.remove(&peer_id);
                    self.rtt.remove(&peer_id);
                    self.notify(NetEvent::PeerDisconnected(peer_id));
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(peer = ?peer_id, error = %error, "dial failed");
                if let Some(peer) = peer_id
                    && !self.swarm.is_connected(&peer)
                {
                    for reply in self.pending_dial.remove(&peer).unwrap_or_default() {
                        let _ = reply.send(Err(NetError::Dial {
                            peer,
                            reason: error.to_string(),
                        }));
                    }
                }
            }
            SwarmEvent::IncomingConnectionError {
                peer_id,
                error,
                send_back_addr,
                ..
            } => {
                debug!(peer = ?peer_id, address = %send_back_addr, error = %error, "incoming connection refused or failed");
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                info!(%address, "external address confirmed");
            }
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::ConnectionLimits(never) | BehaviourEvent::Blocked(never) => {
                match never {}
            }
            BehaviourEvent::Identify(event) => self.on_identify(event),
            BehaviourEvent::Ping(event) => match event.result {
                Ok(rtt) => {
                    self.rtt.insert(event.peer, rtt);
                }
                Err(e) => debug!(peer = %event.peer, error = %e, "ping failed"),
            },
            BehaviourEvent::Kad(event) => self.on_kad(event),
            BehaviourEvent::Gossipsub(event) => self.on_gossipsub(event),
            BehaviourEvent::Job(event) => self.on_rpc::<v1::JobRequest>(event),
            BehaviourEvent::Lease(event) => self.on_rpc::<v1::LeaseRequest>(event),
            BehaviourEvent::Delta(event) => self.on_rpc::<v1::DeltaRequest>(event),
            BehaviourEvent::Status(event) => self.on_rpc::<v1::StatusRequest>(event),
            BehaviourEvent::Blob(event) => self.on_rpc::<v1::BlobRequest>(event),
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    debug!(%peer, %addr, "found on the LAN");
                    self.swarm.add_peer_address(peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self
                            .swarm
                            .dial(DialOpts::peer_id(peer).addresses(vec![addr]).build());
                    }
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Expired(_)) => {}
            BehaviourEvent::Autonat(event) => debug!(?event, "autonat"),
            BehaviourEvent::RelayClient(event) => debug!(?event, "relay client"),
            BehaviourEvent::Dcutr(event) => debug!(?event, "dcutr"),
        }
    }

    fn on_identify(&mut self, event: identify::Event) {
        let identify::Event::Received { peer_id, info, .. } = event else {
            return;
        };
        let speaks_kad = info.protocols.contains(&KAD_PROTOCOL);
        let addrs: Vec<Multiaddr> = info
            .listen_addrs
            .into_iter()
            .take(MAX_IDENTIFY_ADDRS)
            .collect();
        // Kademlia does not learn addresses by itself; identify is how it hears of them.
        if speaks_kad {
            for addr in &addrs {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer_id, addr.clone());
            }
        }
        self.identified.insert(
            peer_id,
            Identified {
                agent_version: info.agent_version,
                protocols: info.protocols.iter().map(ToString::to_string).collect(),
                listen_addrs: addrs,
            },
        );
    }

    fn on_kad(&mut self, event: kad::Event) {
        let kad::Event::OutboundQueryProgressed {
            id, result, step, ..
        } = event
        else {
            return;
        };
        match result {
            kad::QueryResult::StartProviding(result) => {
                if let Some(reply) = self.pending_start_providing.remove(&id) {
                    let _ = reply.send(
                        result
                            .map(|_| ())
                            .map_err(|e| NetError::Kademlia(e.to_string())),
                    );
                }
            }
            kad::QueryResult::GetProviders(result) => {
                let local = *self.swarm.local_peer_id();
                let Some(query) = self.pending_get_providers.get_mut(&id) else {
                    return;
                };
                let failed = match result {
                    Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
                        query
                            .found
                            .extend(providers.into_iter().filter(|p| *p != local));
                        None
                    }
                    Ok(kad::GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => None,
                    Err(e) => Some(e.to_string()),
                };
                if step.last || failed.is_some() {
                    if let Some(query) = self.pending_get_providers.remove(&id) {
                        // A timed-out query that found some providers still found them.
                        let answer = match failed {
                            Some(e) if query.found.is_empty() => Err(NetError::Kademlia(e)),
                            _ => Ok(query.found),
                        };
                        let _ = query.reply.send(answer);
                    }
                    if !step.last
                        && let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id)
                    {
                        q.finish();
                    }
                }
            }
            kad::QueryResult::Bootstrap(result) => match result {
                Ok(ok) => debug!(remaining = ok.num_remaining, "kademlia bootstrap step"),
                Err(e) => debug!(error = %e, "kademlia bootstrap failed"),
            },
            other => debug!(?other, "kademlia query progressed"),
        }
    }

    fn on_gossipsub(&mut self, event: gossipsub::Event) {
        let gossipsub::Event::Message {
            propagation_source,
            message_id,
            message,
        } = event
        else {
            return;
        };
        let verdict = match Topic::from_hash(&message.topic) {
            Some(topic) => gossip::validate(topic, message.source, &message.data, &*self.verifier)
                .map(|envelope| (topic, envelope)),
            None => Err(GossipVerdict::Reject(format!(
                "unknown topic {}",
                message.topic
            ))),
        };
        let acceptance = match &verdict {
            Ok(_) => MessageAcceptance::Accept,
            Err(GossipVerdict::Ignore(_)) => MessageAcceptance::Ignore,
            Err(_) => MessageAcceptance::Reject,
        };
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&message_id, &propagation_source, acceptance);
        match verdict {
            Ok((topic, envelope)) => self.notify(NetEvent::Gossip(GossipMessage {
                topic,
                publisher: message.source,
                propagation_source,
                envelope,
            })),
            Err(GossipVerdict::Ignore(why)) => {
                debug!(peer = %propagation_source, publisher = ?message.source, reason = %why, "gossip message ignored");
            }
            Err(GossipVerdict::Reject(why)) => {
                warn!(peer = %propagation_source, publisher = ?message.source, reason = %why, "gossip message rejected");
                self.penalise(propagation_source, Misbehaviour::InvalidGossip);
            }
            // `validate` returns Accept as Ok; nothing to do for this shape.
            Err(GossipVerdict::Accept) => {}
        }
    }

    fn on_rpc<R: Wired>(&mut self, event: request_response::Event<Frame<R>, Frame<R::Response>>) {
        match event {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request_id,
                        request,
                        channel,
                    },
                ..
            } => self.on_inbound::<R>(peer, request_id, request, channel),
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                let result = match response {
                    Frame::Message(r) => Ok(r.into()),
                    Frame::UnsupportedVersion(v) => {
                        self.penalise(peer, Misbehaviour::UnsupportedVersion);
                        Err(RequestError::UnsupportedVersion(v))
                    }
                    Frame::Malformed(e) => {
                        self.penalise(peer, Misbehaviour::Malformed);
                        Err(RequestError::Malformed(e))
                    }
                    Frame::TooLarge { len, max } => {
                        warn!(%peer, protocol = %R::PROTOCOL, len, max, "oversize response refused");
                        self.penalise(peer, Misbehaviour::OversizeFrame);
                        Err(RequestError::TooLarge { len, max })
                    }
                };
                if let Some(reply) = self.pending_requests.remove(&(R::PROTOCOL, request_id)) {
                    let _ = reply.send(result);
                }
            }
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                debug!(%peer, protocol = %R::PROTOCOL, error = %error, "outbound request failed");
                let error = match error {
                    OutboundFailure::DialFailure => RequestError::DialFailure,
                    OutboundFailure::Timeout => RequestError::Timeout,
                    OutboundFailure::ConnectionClosed => RequestError::ConnectionClosed,
                    OutboundFailure::UnsupportedProtocols => RequestError::UnsupportedProtocols,
                    OutboundFailure::Io(e) => RequestError::Io(e.to_string()),
                };
                if let Some(reply) = self.pending_requests.remove(&(R::PROTOCOL, request_id)) {
                    let _ = reply.send(Err(error));
                }
            }
            request_response::Event::InboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                debug!(%peer, protocol = %R::PROTOCOL, error = %error, "inbound request failed");
                if self.routed.remove(&(R::PROTOCOL, request_id)).is_some() {
                    self.limits.end_inbound(peer);
                }
            }
            request_response::Event::ResponseSent {
                peer, request_id, ..
            } => {
                if self.routed.remove(&(R::PROTOCOL, request_id)).is_some() {
                    self.limits.end_inbound(peer);
                }
            }
        }
    }

    fn on_inbound<R: Wired>(
        &mut self,
        peer: PeerId,
        id: InboundRequestId,
        frame: Frame<R>,
        channel: ResponseChannel<Frame<R::Response>>,
    ) {
        let protocol = R::PROTOCOL;
        if let Err(wait) = self.limits.check_rate(peer, protocol, Instant::now()) {
            let rate = match protocol {
                Protocol::Blob => self.limits.config().blob_request_rate,
                _ => self.limits.config().request_rate,
            };
            let mut error = error_reply(
                v1::ErrorCode::RateLimited,
                format!(
                    "more than {} requests per second (burst {}) on {protocol}",
                    rate.per_second, rate.burst
                ),
            );
            error.retry_after_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
            debug!(%peer, %protocol, retry_after_ms = error.retry_after_ms, "rate limited");
            self.reply_now::<R>(channel, R::Response::from_error(error));
            self.penalise(peer, Misbehaviour::RateLimited);
            return;
        }
        let request = match frame {
            Frame::Message(r) => r,
            Frame::UnsupportedVersion(v) => {
                info!(%peer, %protocol, version = v, "request of an unsupported version refused");
                self.reply_now::<R>(channel, unsupported_version_reply(v));
                self.penalise(peer, Misbehaviour::UnsupportedVersion);
                return;
            }
            Frame::TooLarge { len, max } => {
                // Dropping the channel resets the stream unanswered; its body was never read.
                warn!(%peer, %protocol, len, max, "oversize request refused");
                drop(channel);
                self.penalise(peer, Misbehaviour::OversizeFrame);
                return;
            }
            Frame::Malformed(why) => {
                let error = error_reply(
                    v1::ErrorCode::Malformed,
                    format!("the request is not a valid {protocol} request: {why}"),
                );
                self.reply_now::<R>(channel, R::Response::from_error(error));
                self.penalise(peer, Misbehaviour::Malformed);
                return;
            }
        };
        if !request.has_body() {
            let error = error_reply(
                v1::ErrorCode::UnsupportedRequest,
                format!("the {protocol} request has no body this peer knows"),
            );
            self.reply_now::<R>(channel, R::Response::from_error(error));
            return;
        }
        if !self.limits.try_begin_inbound(peer) {
            let mut error = error_reply(
                v1::ErrorCode::RateLimited,
                format!(
                    "more than {} requests of this peer are being served",
                    self.limits.config().max_inbound_in_flight_per_peer
                ),
            );
            error.retry_after_ms = BUSY_RETRY_AFTER.as_millis() as u64;
            self.reply_now::<R>(channel, R::Response::from_error(error));
            return;
        }
        let inbound = InboundRequest {
            peer,
            request: request.into(),
            responder: Responder {
                peer,
                id,
                channel: R::slot(channel),
            },
        };
        // Err(None) cannot happen (only requests travel this path) but costs no panic.
        let sent: Result<(), Option<InboundRequest>> = match (&self.blob_sink, protocol) {
            (Some(sink), Protocol::Blob) => {
                sink.try_send(inbound).map_err(|e| Some(e.into_inner()))
            }
            _ => self
                .events
                .try_send(NetEvent::Request(inbound))
                .map_err(|e| match e.into_inner() {
                    NetEvent::Request(r) => Some(r),
                    _ => None,
                }),
        };
        match sent {
            Ok(()) => {
                self.routed.insert((protocol, id), peer);
            }
            Err(None) => self.limits.end_inbound(peer),
            Err(Some(inbound)) => {
                // The application is behind: push back on the peer instead of queueing.
                self.limits.end_inbound(peer);
                self.dropped_events += 1;
                warn!(%peer, %protocol, "request queue full; answered unavailable");
                let mut error =
                    error_reply(v1::ErrorCode::Unavailable, "this peer is busy; retry later");
                error.retry_after_ms = BUSY_RETRY_AFTER.as_millis() as u64;
                let _ = self.respond(inbound.responder, Response::error(protocol, error));
            }
        }
    }

    /// Answers from the event loop itself (refusals), bypassing the application.
    fn reply_now<R: Wired>(
        &mut self,
        channel: ResponseChannel<Frame<R::Response>>,
        response: R::Response,
    ) {
        if R::rpc(self.swarm.behaviour_mut())
            .send_response(channel, Frame::Message(response))
            .is_err()
        {
            debug!(protocol = %R::PROTOCOL, "refusal not sent: the requester is gone");
        }
    }
}
