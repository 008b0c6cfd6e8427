//! Limits and abuse control (issue 5, point 6): per-peer request rates (token buckets),
//! per-peer in-flight inbound requests, connection limits, and a score per peer that invalid
//! data lowers; a peer whose score falls to the ban threshold is disconnected and refused
//! for a while (the refusal itself is libp2p's `allow_block_list`, driven by the event loop).
//!
//! All state here is bounded: buckets and in-flight counts exist only for connected peers,
//! scores for at most `max_tracked_peers` peers.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::rpc::Protocol;

/// A token bucket's shape: `per_second` tokens refill, up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub per_second: f64,
    /// Requests allowed at once after a quiet spell.
    pub burst: u32,
}

/// What a peer did wrong, and what it costs its score.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Misbehaviour {
    /// A frame over the protocol's limit (the stream was reset).
    OversizeFrame,
    /// Bytes that do not decode as the message expected.
    Malformed,
    /// A message of a protocol version we do not speak.
    UnsupportedVersion,
    /// A request after its rate-limit bucket ran dry.
    RateLimited,
    /// A gossipsub message that failed validation.
    InvalidGossip,
    /// A blob chunk whose length or hash is wrong (reported by the blob fetcher).
    BadChunk,
    /// A `Signed` envelope that does not verify (reported by upper layers).
    BadSignature,
    /// Anything else an upper layer caught; the text is for the log.
    Other(String),
}

impl fmt::Display for Misbehaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Misbehaviour::OversizeFrame => f.write_str("oversize frame"),
            Misbehaviour::Malformed => f.write_str("malformed message"),
            Misbehaviour::UnsupportedVersion => f.write_str("unsupported protocol version"),
            Misbehaviour::RateLimited => f.write_str("request over its rate limit"),
            Misbehaviour::InvalidGossip => f.write_str("invalid gossipsub message"),
            Misbehaviour::BadChunk => f.write_str("bad blob chunk"),
            Misbehaviour::BadSignature => f.write_str("bad signature"),
            Misbehaviour::Other(reason) => write!(f, "{reason}"),
        }
    }
}

/// Score penalties, one per kind of misbehaviour (positive numbers, subtracted).
#[derive(Debug, Clone, PartialEq)]
pub struct Penalties {
    /// For [`Misbehaviour::OversizeFrame`].
    pub oversize_frame: f64,
    /// For [`Misbehaviour::Malformed`].
    pub malformed: f64,
    /// For [`Misbehaviour::UnsupportedVersion`]: small, an old peer is not an attacker.
    pub unsupported_version: f64,
    /// For [`Misbehaviour::RateLimited`]: small, so only a persistent flood leads to a ban.
    pub rate_limited: f64,
    /// For [`Misbehaviour::InvalidGossip`].
    pub invalid_gossip: f64,
    /// For [`Misbehaviour::BadChunk`].
    pub bad_chunk: f64,
    /// For [`Misbehaviour::BadSignature`].
    pub bad_signature: f64,
    /// For [`Misbehaviour::Other`].
    pub other: f64,
}

impl Default for Penalties {
    fn default() -> Self {
        Self {
            oversize_frame: 25.0,
            malformed: 20.0,
            unsupported_version: 2.0,
            rate_limited: 1.0,
            invalid_gossip: 20.0,
            bad_chunk: 50.0,
            bad_signature: 50.0,
            other: 20.0,
        }
    }
}

impl Penalties {
    /// What `m` costs.
    pub fn of(&self, m: &Misbehaviour) -> f64 {
        match m {
            Misbehaviour::OversizeFrame => self.oversize_frame,
            Misbehaviour::Malformed => self.malformed,
            Misbehaviour::UnsupportedVersion => self.unsupported_version,
            Misbehaviour::RateLimited => self.rate_limited,
            Misbehaviour::InvalidGossip => self.invalid_gossip,
            Misbehaviour::BadChunk => self.bad_chunk,
            Misbehaviour::BadSignature => self.bad_signature,
            Misbehaviour::Other(_) => self.other,
        }
    }
}

/// Every limit of the swarm, configurable.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitsConfig {
    /// Inbound request rate per peer on job, lease, delta and status, each protocol its own
    /// bucket.
    pub request_rate: RateLimit,
    /// Inbound request rate per peer on the blob protocol (a fetch asks for many chunks).
    pub blob_request_rate: RateLimit,
    /// Inbound requests of one peer handed to the application and not yet answered; more are
    /// answered ERROR_CODE_RATE_LIMITED at once.
    pub max_inbound_in_flight_per_peer: usize,
    /// Concurrent request-response streams per connection and protocol (libp2p's own limit).
    pub max_concurrent_streams: usize,
    /// Established connections in all.
    pub max_established: u32,
    /// Established connections to one peer.
    pub max_established_per_peer: u32,
    /// Incoming connections still in their handshake.
    pub max_pending_incoming: u32,
    /// Outgoing connections still in their handshake.
    pub max_pending_outgoing: u32,
    /// What each misbehaviour costs.
    pub penalties: Penalties,
    /// A peer whose score falls to `-ban_threshold` or below is banned.
    pub ban_threshold: f64,
    /// How long a ban lasts.
    pub ban_duration: Duration,
    /// Score points a peer regains per second, up to 0, so old mistakes are forgiven.
    pub score_recovery_per_second: f64,
    /// Peers whose score is remembered at once; the most forgiven are forgotten first.
    pub max_tracked_peers: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            request_rate: RateLimit {
                per_second: 10.0,
                burst: 20,
            },
            blob_request_rate: RateLimit {
                per_second: 200.0,
                burst: 64,
            },
            max_inbound_in_flight_per_peer: 32,
            max_concurrent_streams: 64,
            max_established: 256,
            max_established_per_peer: 4,
            max_pending_incoming: 64,
            max_pending_outgoing: 64,
            penalties: Penalties::default(),
            ban_threshold: 100.0,
            ban_duration: Duration::from_secs(30 * 60),
            score_recovery_per_second: 0.05,
            max_tracked_peers: 10_000,
        }
    }
}

impl LimitsConfig {
    /// The libp2p connection limits these settings give.
    pub fn connection_limits(&self) -> libp2p::connection_limits::ConnectionLimits {
        libp2p::connection_limits::ConnectionLimits::default()
            .with_max_established(Some(self.max_established))
            .with_max_established_per_peer(Some(self.max_established_per_peer))
            .with_max_pending_incoming(Some(self.max_pending_incoming))
            .with_max_pending_outgoing(Some(self.max_pending_outgoing))
    }

    fn rate_for(&self, protocol: Protocol) -> RateLimit {
        match protocol {
            Protocol::Blob => self.blob_request_rate,
            _ => self.request_rate,
        }
    }
}

/// A token bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(limit: RateLimit, now: Instant) -> Self {
        Self {
            tokens: f64::from(limit.burst),
            last: now,
        }
    }

    /// Takes one token, or says how long until one is there.
    pub fn try_take(&mut self, limit: RateLimit, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit.per_second).min(f64::from(limit.burst));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else if limit.per_second > 0.0 {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / limit.per_second,
            ))
        } else {
            Err(Duration::MAX)
        }
    }
}

/// A peer's standing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerStanding {
    /// 0 is neutral; misbehaviour lowers it; it recovers towards 0 with time.
    pub score: f64,
    /// When the ban ends, if the peer is banned.
    pub banned_until: Option<Instant>,
}

#[derive(Debug, Clone)]
struct ScoreEntry {
    score: f64,
    updated: Instant,
    banned_until: Option<Instant>,
}

/// What a penalty led to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// The peer stays.
    Scored {
        /// The score after the penalty.
        score: f64,
    },
    /// The peer crossed the threshold now: disconnect and refuse it until the time given.
    Ban {
        /// The score after the penalty.
        score: f64,
        /// When the ban ends.
        until: Instant,
    },
    /// The peer was banned already.
    AlreadyBanned,
}

/// Rate limits, in-flight counts and scores of every peer; owned by the event loop.
#[derive(Debug)]
pub struct PeerLimits {
    config: LimitsConfig,
    buckets: HashMap<(PeerId, Protocol), TokenBucket>,
    in_flight: HashMap<PeerId, usize>,
    scores: HashMap<PeerId, ScoreEntry>,
}

impl PeerLimits {
    /// Empty state for `config`.
    pub fn new(config: LimitsConfig) -> Self {
        Self {
            config,
            buckets: HashMap::new(),
            in_flight: HashMap::new(),
            scores: HashMap::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &LimitsConfig {
        &self.config
    }

    /// Takes a token for a request of `peer` on `protocol`, or says how long to wait.
    pub fn check_rate(
        &mut self,
        peer: PeerId,
        protocol: Protocol,
        now: Instant,
    ) -> Result<(), Duration> {
        let limit = self.config.rate_for(protocol);
        self.buckets
            .entry((peer, protocol))
            .or_insert_with(|| TokenBucket::full(limit, now))
            .try_take(limit, now)
    }

    /// Counts one more request of `peer` handed to the application, if under the limit.
    pub fn try_begin_inbound(&mut self, peer: PeerId) -> bool {
        let n = self.in_flight.entry(peer).or_default();
        if *n >= self.config.max_inbound_in_flight_per_peer {
            return false;
        }
        *n += 1;
        true
    }

    /// One request of `peer` was answered (or given up).
    pub fn end_inbound(&mut self, peer: PeerId) {
        if let Some(n) = self.in_flight.get_mut(&peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.in_flight.remove(&peer);
            }
        }
    }

    /// Forgets the per-connection state of a peer that has no connection left.
    pub fn peer_disconnected(&mut self, peer: PeerId) {
        self.buckets.retain(|(p, _), _| *p != peer);
        self.in_flight.remove(&peer);
    }

    /// Lowers `peer`'s score for `what`; says whether that bans it.
    pub fn penalise(&mut self, peer: PeerId, what: &Misbehaviour, now: Instant) -> Verdict {
        let penalty = self.config.penalties.of(what);
        let recovery = self.config.score_recovery_per_second;
        let entry = self.scores.entry(peer).or_insert(ScoreEntry {
            score: 0.0,
            updated: now,
            banned_until: None,
        });
        recover(entry, recovery, now);
        entry.score -= penalty;
        if entry.banned_until.is_some_and(|t| t > now) {
            return Verdict::AlreadyBanned;
        }
        let verdict = if entry.score <= -self.config.ban_threshold {
            let until = now + self.config.ban_duration;
            entry.banned_until = Some(until);
            Verdict::Ban {
                score: entry.score,
                until,
            }
        } else {
            Verdict::Scored { score: entry.score }
        };
        self.evict_if_full(peer, now);
        verdict
    }

    /// `peer`'s standing now.
    pub fn standing(&mut self, peer: &PeerId, now: Instant) -> PeerStanding {
        let recovery = self.config.score_recovery_per_second;
        match self.scores.get_mut(peer) {
            Some(entry) => {
                recover(entry, recovery, now);
                PeerStanding {
                    score: entry.score,
                    banned_until: entry.banned_until.filter(|t| *t > now),
                }
            }
            None => PeerStanding {
                score: 0.0,
                banned_until: None,
            },
        }
    }

    /// Whether `peer` is banned now.
    pub fn is_banned(&self, peer: &PeerId, now: Instant) -> bool {
        self.scores
            .get(peer)
            .and_then(|e| e.banned_until)
            .is_some_and(|t| t > now)
    }

    /// Ends bans that have run out and forgets forgiven peers; returns the peers to unblock.
    pub fn expire(&mut self, now: Instant) -> Vec<PeerId> {
        let recovery = self.config.score_recovery_per_second;
        let mut unbanned = Vec::new();
        self.scores.retain(|peer, entry| {
            if entry.banned_until.is_some_and(|t| t <= now) {
                entry.banned_until = None;
                // A ban served wipes the slate only partly: one more offence bans again soon.
                entry.score = entry.score.max(-self.config.ban_threshold / 2.0);
                entry.updated = now;
                unbanned.push(*peer);
            }
            recover(entry, recovery, now);
            entry.banned_until.is_some() || entry.score < 0.0
        });
        unbanned
    }

    fn evict_if_full(&mut self, keep: PeerId, now: Instant) {
        if self.scores.len() <= self.config.max_tracked_peers {
            return;
        }
        // Forget the unbanned peer closest to neutral; banned peers and the one just scored
        // are kept, so a flood of fresh identities cannot wash a bad peer's record out.
        let victim = self
            .scores
            .iter()
            .filter(|(p, e)| **p != keep && e.banned_until.is_none_or(|t| t <= now))
            .max_by(|a, b| a.1.score.total_cmp(&b.1.score))
            .map(|(p, _)| *p);
        if let Some(p) = victim {
            self.scores.remove(&p);
        }
    }
}

fn recover(entry: &mut ScoreEntry, per_second: f64, now: Instant) {
    let elapsed = now.saturating_duration_since(entry.updated).as_secs_f64();
    entry.score = (entry.score + elapsed * per_second).min(0.0);
    entry.updated = now;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let limit = RateLimit {
            per_second: 2.0,
            burst: 3,
        };
        let t0 = Instant::now();
        let mut bucket = TokenBucket::full(limit, t0);
        for _ in 0..3 {
            assert!(bucket.try_take(limit, t0).is_ok());
        }
        let wait = bucket.try_take(limit, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert!(
            bucket
                .try_take(limit, t0 + Duration::from_millis(500))
                .is_ok()
        );
        assert!(
            bucket
                .try_take(limit, t0 + Duration::from_millis(500))
                .is_err()
        );
    }

    #[test]
    fn buckets_are_per_peer_and_per_protocol() {
        let config = LimitsConfig {
            request_rate: RateLimit {
                per_second: 0.0,
                burst: 1,
            },
            ..Default::default()
        };
        let mut limits = PeerLimits::new(config);
        let (a, b) = (PeerId::random(), PeerId::random());
        let now = Instant::now();
        assert!(limits.check_rate(a, Protocol::Job, now).is_ok());
        assert!(limits.check_rate(a, Protocol::Job, now).is_err());
        assert!(limits.check_rate(a, Protocol::Lease, now).is_ok());
        assert!(limits.check_rate(b, Protocol::Job, now).is_ok());
    }

    #[test]
    fn in_flight_requests_are_capped_per_peer() {
        let config = LimitsConfig {
            max_inbound_in_flight_per_peer: 2,
            ..Default::default()
        };
        let mut limits = PeerLimits::new(config);
        let peer = PeerId::random();
        assert!(limits.try_begin_inbound(peer));
        assert!(limits.try_begin_inbound(peer));
        assert!(!limits.try_begin_inbound(peer));
        limits.end_inbound(peer);
        assert!(limits.try_begin_inbound(peer));
    }

    #[test]
    fn penalties_past_the_threshold_ban_and_the_ban_expires() {
        let config = LimitsConfig {
            ban_threshold: 50.0,
            ban_duration: Duration::from_secs(10),
            score_recovery_per_second: 0.0,
            ..Default::default()
        };
        let mut limits = PeerLimits::new(config);
        let peer = PeerId::random();
        let t0 = Instant::now();
        assert_eq!(
            limits.penalise(peer, &Misbehaviour::Malformed, t0),
            Verdict::Scored { score: -20.0 }
        );
        assert!(matches!(
            limits.penalise(peer, &Misbehaviour::Malformed, t0),
            Verdict::Scored { .. }
        ));
        let Verdict::Ban { until, .. } = limits.penalise(peer, &Misbehaviour::Malformed, t0) else {
            panic!("third offence should ban");
        };
        assert_eq!(until, t0 + Duration::from_secs(10));
        assert!(limits.is_banned(&peer, t0));
        assert_eq!(
            limits.penalise(peer, &Misbehaviour::Malformed, t0),
            Verdict::AlreadyBanned
        );
        assert!(limits.expire(t0 + Duration::from_secs(5)).is_empty());
        assert_eq!(limits.expire(t0 + Duration::from_secs(11)), vec![peer]);
        assert!(!limits.is_banned(&peer, t0 + Duration::from_secs(11)));
    }

    #[test]
    fn scores_recover_towards_zero() {
        let config = LimitsConfig {
            score_recovery_per_second: 1.0,
            ..Default::default()
        };
        let mut limits = PeerLimits::new(config);
        let peer = PeerId::random();
        let t0 = Instant::now();
        limits.penalise(peer, &Misbehaviour::Malformed, t0);
        let later = limits.standing(&peer, t0 + Duration::from_secs(5));
        assert!((later.score + 15.0).abs() < 1e-9, "{later:?}");
        let much_later = limits.standing(&peer, t0 + Duration::from_secs(60));
        assert_eq!(much_later.score, 0.0);
        assert!(limits.expire(t0 + Duration::from_secs(60)).is_empty());
        assert!(limits.scores.is_empty(), "a forgiven peer is forgotten");
    }

    #[test]
    fn the_score_table_is_bounded() {
        let config = LimitsConfig {
            max_tracked_peers: 3,
            score_recovery_per_second: 0.0,
            ..Default::default()
        };
        let mut limits = PeerLimits::new(config);
        let now = Instant::now();
        for _ in 0..10 {
            limits.penalise(PeerId::random(), &Misbehaviour::RateLimited, now);
        }
        assert_eq!(limits.scores.len(), 3);
    }
}
