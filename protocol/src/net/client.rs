//! The only door into the swarm: a cheap, cloneable [`Client`] that sends commands to the
//! event loop over a bounded channel and awaits each answer on a oneshot, and the events
//! ([`NetEvent`]) the event loop delivers from peers.
//!
//! Backpressure. Commands: the channel is bounded, so callers wait when the event loop is
//! behind. Events: the event loop never waits for the application (that would stall every
//! connection, pings included). When the event queue is full, an inbound request is answered
//! at once with ERROR_CODE_UNAVAILABLE and a retry hint, so the asking peer slows down; a
//! gossipsub message or a peer notification is dropped and logged. A consumer that keeps up
//! loses nothing.

use std::collections::HashSet;
use std::time::Duration;

use libp2p::request_response::{InboundRequestId, ResponseChannel};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

use super::codec::Frame;
use super::gossip::Topic;
use super::limits::Misbehaviour;
use super::rpc::{Protocol, Request, Response, RpcRequest};
use crate::v1;

/// Why a command failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum NetError {
    /// The transport could not be built.
    #[error("transport: {0}")]
    Transport(String),
    /// Listening on an address failed.
    #[error("listen: {0}")]
    Listen(String),
    /// Dialling a peer failed.
    #[error("dial {peer}: {reason}")]
    Dial {
        /// The peer dialled.
        peer: PeerId,
        /// What went wrong.
        reason: String,
    },
    /// Joining a topic failed.
    #[error("subscribe: {0}")]
    Subscribe(String),
    /// Publishing failed (after retries, when no peer was subscribed).
    #[error("publish on {topic}: {reason}")]
    Publish {
        /// The topic.
        topic: Topic,
        /// What went wrong.
        reason: String,
    },
    /// A DHT operation failed.
    #[error("kademlia: {0}")]
    Kademlia(String),
    /// A response of one protocol was given to a request of another.
    #[error("a {got} response cannot answer a {expected} request")]
    WrongProtocol {
        /// The request's protocol.
        expected: Protocol,
        /// The response's protocol.
        got: Protocol,
    },
    /// The request's stream is gone (the peer left or the request timed out).
    #[error("the requester is gone; the response was not sent")]
    ResponseNotSent,
    /// The event loop has stopped.
    #[error("the network has shut down")]
    Shutdown,
}

/// Why an outbound request got no usable response.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// The peer could not be reached.
    #[error("could not dial the peer")]
    DialFailure,
    /// No response in time.
    #[error("timed out")]
    Timeout,
    /// The connection closed before the response.
    #[error("connection closed before the response")]
    ConnectionClosed,
    /// The peer does not speak the protocol.
    #[error("the peer does not speak the protocol")]
    UnsupportedProtocols,
    /// The stream failed (e.g. reset, or an oversize response).
    #[error("stream: {0}")]
    Io(String),
    /// The response is of a protocol version we do not speak.
    #[error("the response has protocol_version {0}")]
    UnsupportedVersion(u32),
    /// The response does not decode.
    #[error("malformed response: {0}")]
    Malformed(String),
    /// The response announced more than the protocol's limit (it was not read).
    #[error("response of {len} bytes is over the limit of {max}")]
    TooLarge {
        /// The announced length.
        len: usize,
        /// The protocol's limit.
        max: usize,
    },
    /// The response is of another protocol than the request (a bug, not a peer's doing).
    #[error("response of the wrong protocol")]
    WrongProtocol,
    /// The event loop has stopped.
    #[error("the network has shut down")]
    Shutdown,
}

/// What arrives from peers.
#[derive(Debug)]
pub enum NetEvent {
    /// A peer asks something; answer with [`Client::respond`].
    Request(InboundRequest),
    /// A gossipsub message that passed validation.
    Gossip(GossipMessage),
    /// The first connection to a peer is up.
    PeerConnected(PeerId),
    /// The last connection to a peer closed.
    PeerDisconnected(PeerId),
    /// A peer was banned for misbehaving: disconnected and refused until the ban ends.
    PeerBanned {
        /// The peer.
        peer: PeerId,
        /// The misbehaviour that crossed the threshold.
        reason: String,
    },
}

/// A request from a peer, with what is needed to answer it.
#[derive(Debug)]
pub struct InboundRequest {
    /// Who asks (authenticated by Noise).
    pub peer: PeerId,
    /// The request, of protocol version 1 and with a body.
    pub request: Request,
    /// Pass to [`Client::respond`]; dropping it answers nothing and the peer sees a failure.
    pub responder: Responder,
}

/// The one-time right to answer an inbound request.
#[derive(Debug)]
pub struct Responder {
    pub(crate) peer: PeerId,
    pub(crate) id: InboundRequestId,
    pub(crate) channel: ResponseSlot,
}

impl Responder {
    /// The peer waiting for the answer.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// The protocol the answer must be on.
    pub fn protocol(&self) -> Protocol {
        self.channel.protocol()
    }
}

/// libp2p's response channel of one of the protocols.
#[derive(Debug)]
pub(crate) enum ResponseSlot {
    Job(ResponseChannel<Frame<v1::JobResponse>>),
    Lease(ResponseChannel<Frame<v1::LeaseResponse>>),
    Delta(ResponseChannel<Frame<v1::DeltaResponse>>),
    Status(ResponseChannel<Frame<v1::StatusResponse>>),
    Blob(ResponseChannel<Frame<v1::BlobResponse>>),
}

impl ResponseSlot {
    pub(crate) fn protocol(&self) -> Protocol {
        match self {
            ResponseSlot::Job(_) => Protocol::Job,
            ResponseSlot::Lease(_) => Protocol::Lease,
            ResponseSlot::Delta(_) => Protocol::Delta,
            ResponseSlot::Status(_) => Protocol::Status,
            ResponseSlot::Blob(_) => Protocol::Blob,
        }
    }
}

/// A gossipsub message that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct GossipMessage {
    /// The topic it came on.
    pub topic: Topic,
    /// Its author (gossipsub's signed `from`).
    pub publisher: Option<PeerId>,
    /// The peer that forwarded it to us.
    pub propagation_source: PeerId,
    /// The decoded envelope.
    pub envelope: v1::Signed,
}

/// What we know of a peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerInfo {
    /// The peer.
    pub peer: PeerId,
    /// Whether a connection is up.
    pub connected: bool,
    /// Its agent string (from identify), if it told us.
    pub agent_version: Option<String>,
    /// The protocols it speaks (from identify).
    pub protocols: Vec<String>,
    /// Where it says it listens (from identify).
    pub listen_addrs: Vec<Multiaddr>,
    /// The last ping round trip, while connected.
    pub ping_rtt: Option<Duration>,
    /// Its score with us: 0 is neutral, negative is bad.
    pub score: f64,
    /// Whether it is banned now.
    pub banned: bool,
}

/// What the event loop is asked to do.
#[derive(Debug)]
pub(crate) enum Command {
    Listen {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<Multiaddr, NetError>>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    Dial {
        peer: PeerId,
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    StartProviding {
        key: Vec<u8>,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    StopProviding {
        key: Vec<u8>,
    },
    GetProviders {
        key: Vec<u8>,
        reply: oneshot::Sender<Result<HashSet<PeerId>, NetError>>,
    },
    Subscribe {
        topic: Topic,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Publish {
        topic: Topic,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), PublishFailure>>,
    },
    // Boxed: messages are large and most commands are small.
    Request {
        peer: PeerId,
        request: Box<Request>,
        reply: oneshot::Sender<Result<Response, RequestError>>,
    },
    Respond {
        responder: Responder,
        response: Box<Response>,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    ReportMisbehaviour {
        peer: PeerId,
        reason: Misbehaviour,
    },
    PeerInfo {
        peer: PeerId,
        reply: oneshot::Sender<PeerInfo>,
    },
    ConnectedPeers {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    RoutingTable {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    ServeBlobs {
        sink: mpsc::Sender<InboundRequest>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// Why one publish attempt failed.
#[derive(Debug)]
pub(crate) enum PublishFailure {
    /// No peer subscribed to the topic yet: worth retrying.
    NoPeers,
    /// Anything else: final.
    Other(String),
}

/// A handle on the swarm; clone it freely.
#[derive(Debug, Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    local_peer_id: PeerId,
    request_timeout: Duration,
    publish_retry: Duration,
}

impl Client {
    pub(crate) fn new(
        commands: mpsc::Sender<Command>,
        local_peer_id: PeerId,
        request_timeout: Duration,
        publish_retry: Duration,
    ) -> Self {
        Self {
            commands,
            local_peer_id,
            request_timeout,
            publish_retry,
        }
    }

    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| NetError::Shutdown)?;
        answer.await.map_err(|_| NetError::Shutdown)
    }

    /// Listens on `addr` (port 0 picks one); returns the address actually bound.
    pub async fn listen_on(&self, addr: Multiaddr) -> Result<Multiaddr, NetError> {
        self.call(|reply| Command::Listen { addr, reply }).await?
    }

    /// The addresses this node listens on.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        self.call(|reply| Command::ListenAddrs { reply }).await
    }

    /// Connects to `peer` at `addr`; returns once a connection is up (at once if one is).
    pub async fn dial(&self, peer: PeerId, addr: Multiaddr) -> Result<(), NetError> {
        self.call(|reply| Command::Dial { peer, addr, reply })
            .await?
    }

    /// Announces on the DHT that this node provides `key` (a blob's 32 ContentId bytes).
    pub async fn start_providing(&self, key: Vec<u8>) -> Result<(), NetError> {
        self.call(|reply| Command::StartProviding { key, reply })
            .await?
    }

    /// Stops announcing `key`.
    pub async fn stop_providing(&self, key: Vec<u8>) -> Result<(), NetError> {
        self.commands
            .send(Command::StopProviding { key })
            .await
            .map_err(|_| NetError::Shutdown)
    }

    /// The peers that provide `key`, as the DHT knows them (this node left out).
    pub async fn get_providers(&self, key: Vec<u8>) -> Result<HashSet<PeerId>, NetError> {
        self.call(|reply| Command::GetProviders { key, reply })
            .await?
    }

    /// Joins `topic`.
    pub async fn subscribe(&self, topic: Topic) -> Result<(), NetError> {
        self.call(|reply| Command::Subscribe { topic, reply })
            .await?
    }

    /// Publishes `data` (an encoded `Signed` envelope) on `topic`. While no peer is subscribed
    /// yet (subscriptions take a heartbeat or two to spread) it retries with backoff, for at
    /// most the configured `publish_retry`.
    pub async fn publish(&self, topic: Topic, data: Vec<u8>) -> Result<(), NetError> {
        let deadline = tokio::time::Instant::now() + self.publish_retry;
        let mut backoff = Duration::from_millis(50);
        loop {
            let data = data.clone();
            let attempt = self
                .call(|reply| Command::Publish { topic, data, reply })
                .await?;
            match attempt {
                Ok(()) => return Ok(()),
                Err(PublishFailure::NoPeers)
                    if tokio::time::Instant::now() + backoff < deadline =>
                {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(PublishFailure::NoPeers) => {
                    return Err(NetError::Publish {
                        topic,
                        reason: "no peer is subscribed to the topic".into(),
                    });
                }
                Err(PublishFailure::Other(reason)) => {
                    return Err(NetError::Publish { topic, reason });
                }
            }
        }
    }

    /// Sends `request` to `peer` on its protocol and waits for the typed response (an
    /// `ErrorReply` from the peer is a response, not an error: see `ResponseMessage::error`).
    pub async fn request<R: RpcRequest>(
        &self,
        peer: PeerId,
        request: R,
    ) -> Result<R::Response, RequestError> {
        let response = self.request_any(peer, request.into()).await?;
        R::Response::try_from(response).map_err(|_| RequestError::WrongProtocol)
    }

    /// Sends a request of any protocol and waits for the response.
    pub async fn request_any(
        &self,
        peer: PeerId,
        request: Request,
    ) -> Result<Response, RequestError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Request {
                peer,
                request: Box::new(request),
                reply,
            })
            .await
            .map_err(|_| RequestError::Shutdown)?;
        // libp2p times the request out itself; this bound (twice that, plus a dial's worth)
        // only guards against a lost answer.
        let bound = self.request_timeout * 2 + Duration::from_secs(5);
        match tokio::time::timeout(bound, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(RequestError::Shutdown),
            Err(_) => Err(RequestError::Timeout),
        }
    }

    /// Answers an inbound request.
    pub async fn respond(
        &self,
        responder: Responder,
        response: impl Into<Response>,
    ) -> Result<(), NetError> {
        let response = Box::new(response.into());
        self.call(|reply| Command::Respond {
            responder,
            response,
            reply,
        })
        .await?
    }

    /// Reports that `peer` sent something invalid that only an upper layer could see (a bad
    /// signature, a bad chunk, ...); its score drops and, past the threshold, it is banned.
    pub async fn report_misbehaviour(
        &self,
        peer: PeerId,
        reason: Misbehaviour,
    ) -> Result<(), NetError> {
        self.commands
            .send(Command::ReportMisbehaviour { peer, reason })
            .await
            .map_err(|_| NetError::Shutdown)
    }

    /// What this node knows of `peer`.
    pub async fn peer_info(&self, peer: PeerId) -> Result<PeerInfo, NetError> {
        self.call(|reply| Command::PeerInfo { peer, reply }).await
    }

    /// The peers with a connection up.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, NetError> {
        self.call(|reply| Command::ConnectedPeers { reply }).await
    }

    /// The peers in this node's Kademlia routing table (how far discovery has got).
    pub async fn routing_table(&self) -> Result<Vec<PeerId>, NetError> {
        self.call(|reply| Command::RoutingTable { reply }).await
    }

    /// From now on, inbound `/swarmtune/blob/2` requests go to the returned receiver instead
    /// of the event stream (for the blob server); `capacity` bounds it, and requests that
    /// find it full are answered ERROR_CODE_UNAVAILABLE.
    pub async fn take_blob_requests(
        &self,
        capacity: usize,
    ) -> Result<mpsc::Receiver<InboundRequest>, NetError> {
        let (sink, requests) = mpsc::channel(capacity.max(1));
        self.commands
            .send(Command::ServeBlobs { sink })
            .await
            .map_err(|_| NetError::Shutdown)?;
        Ok(requests)
    }

    /// Stops the event loop and closes every connection; returns once it has stopped.
    pub async fn shutdown(&self) -> Result<(), NetError> {
        self.call(|reply| Command::Shutdown { reply }).await
    }
}
