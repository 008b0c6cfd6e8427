//! Signed envelopes: how a message that outlives its connection (a job spec, a job
//! announcement, a delta, a module manifest) carries its author's signature, and how a
//! receiver checks it. The exact bytes signed and the checks, in order, are specified in
//! `proto/swarmtune/v1/envelope.proto`; this module is that text in code.

use std::collections::{HashMap, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

use libp2p_identity::{KeyType, Keypair, PeerId, PublicKey};
use prost::Message;
use rand::Rng;

use crate::PROTOCOL_VERSION;
use crate::v1;

/// The domain prefix of every signing input, keeping these signatures apart from every other
/// use of a peer's key.
const DOMAIN: &[u8] = b"swarmtune-signed-v1:";
/// The longest type tag accepted.
const MAX_TYPE_TAG_BYTES: usize = 128;
/// An Ed25519 public key in libp2p's protobuf encoding.
const PUBLIC_KEY_BYTES: usize = 36;
/// An Ed25519 signature.
const SIGNATURE_BYTES: usize = 64;
/// How far ahead of the receiver's clock a timestamp may be.
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
/// How old a fresh-only envelope (a job being submitted, a delta) may be.
pub const FRESHNESS_WINDOW_MS: u64 = 10 * 60 * 1000;

/// A message type that travels inside a `Signed` envelope.
pub trait SignedPayload: Message + Default {
    /// The full protobuf name, the envelope's type tag.
    const TYPE_TAG: &'static str;
    /// The payload's own `protocol_version` field.
    fn protocol_version(&self) -> u32;
}

macro_rules! signed_payload {
    ($($ty:ident),*) => {$(
        impl SignedPayload for v1::$ty {
            const TYPE_TAG: &'static str = concat!("swarmtune.v1.", stringify!($ty));
            fn protocol_version(&self) -> u32 {
                self.protocol_version
            }
        }
    )*};
}
signed_payload!(JobSpec, JobAnnouncement, DeltaEnvelope, ModuleManifest);

/// Why an envelope was refused. Each names what failed so the log says who sent what.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignedError {
    /// A field is larger or smaller than the contract allows.
    #[error("signed envelope: {field} is {got} bytes, {allowed}")]
    BadSize {
        /// The field.
        field: &'static str,
        /// Its size.
        got: usize,
        /// What is allowed.
        allowed: String,
    },
    /// The envelope or payload speaks another protocol version.
    #[error(
        "signed envelope: protocol version {got} is not supported (this peer speaks {PROTOCOL_VERSION})"
    )]
    UnsupportedVersion {
        /// The version found.
        got: u32,
    },
    /// The type tag is not the one expected here.
    #[error("signed envelope: expected a {expected}, got a {got:?}")]
    WrongType {
        /// The expected tag.
        expected: &'static str,
        /// The tag found.
        got: String,
    },
    /// The public key does not parse or is not Ed25519.
    #[error("signed envelope: bad public key ({0})")]
    BadKey(String),
    /// The signature does not verify over the signing input.
    #[error("signed envelope: the signature does not verify")]
    BadSignature,
    /// A valid signature, but by a peer other than the one that must sign this message.
    #[error("signed envelope: signed by {signer}, but only {expected} may sign it")]
    WrongSigner {
        /// Who signed.
        signer: Box<PeerId>,
        /// Who had to.
        expected: Box<PeerId>,
    },
    /// The timestamp is outside the accepted window, or the nonce was seen before.
    #[error("signed envelope: replayed or stale ({0})")]
    Replayed(String),
    /// The payload is not a valid encoding of its type.
    #[error("signed envelope: the payload does not decode as {type_tag}: {reason}")]
    Malformed {
        /// The payload type.
        type_tag: &'static str,
        /// The decoder's complaint.
        reason: String,
    },
    /// The replay guard is full of envelopes still inside their window; try again later.
    #[error("signed envelope: too many recent envelopes to check for replay; retry later")]
    Busy,
}

impl SignedError {
    /// The wire error code a responder answers this refusal with.
    pub fn code(&self) -> v1::ErrorCode {
        match self {
            Self::BadSize { .. } => v1::ErrorCode::TooLarge,
            Self::UnsupportedVersion { .. } => v1::ErrorCode::UnsupportedVersion,
            Self::WrongType { .. }
            | Self::BadKey(_)
            | Self::BadSignature
            | Self::WrongSigner { .. } => v1::ErrorCode::BadSignature,
            Self::Replayed(_) => v1::ErrorCode::Replayed,
            Self::Malformed { .. } => v1::ErrorCode::Malformed,
            Self::Busy => v1::ErrorCode::Unavailable,
        }
    }
}

/// A checked envelope: its message and who signed it, when.
#[derive(Clone, Debug, PartialEq)]
pub struct Verified<T> {
    /// The decoded payload.
    pub message: T,
    /// The signer's PeerId, derived from the key that verified.
    pub signer: PeerId,
    /// The signer's clock when it signed.
    pub timestamp_unix_ms: u64,
    /// The signer's nonce.
    pub nonce: u64,
}

/// Milliseconds since the Unix epoch by this machine's clock.
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The exact bytes an envelope's signature covers (envelope.proto).
fn signing_input(
    version: u32,
    type_tag: &str,
    timestamp: u64,
    nonce: u64,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(DOMAIN.len() + 4 + 4 + type_tag.len() + 24 + payload.len());
    out.extend_from_slice(DOMAIN);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(type_tag.len() as u32).to_le_bytes());
    out.extend_from_slice(type_tag.as_bytes());
    out.extend_from_slice(&timestamp.to_le_bytes());
    out.extend_from_slice(&nonce.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The BLAKE3 hash of what `envelope`'s signature covers: anyone holding the envelope can
/// recompute it, it differs for every signing (the nonce is in it), and it is the same for
/// every retry of one envelope. A job's id is this hash of its signed spec (job.proto).
pub fn envelope_id(envelope: &v1::Signed) -> [u8; 32] {
    let input = signing_input(
        envelope.protocol_version,
        &envelope.type_tag,
        envelope.timestamp_unix_ms,
        envelope.nonce,
        &envelope.payload,
    );
    *blake3::hash(&input).as_bytes()
}

/// Signs `message` with `keypair` (Ed25519) at `timestamp_unix_ms`, with a fresh random nonce.
pub fn sign<T: SignedPayload>(
    keypair: &Keypair,
    message: &T,
    timestamp_unix_ms: u64,
) -> Result<v1::Signed, SignedError> {
    sign_with_nonce(keypair, message, timestamp_unix_ms, rand::rng().random())
}

/// [`sign`] with the nonce given: for reproducible runs (a job's id, and with it every seed of
/// the job, is the hash of its signed envelope). A peer must never reuse a nonce within the
/// freshness window: the replay guard refuses the second envelope.
pub fn sign_with_nonce<T: SignedPayload>(
    keypair: &Keypair,
    message: &T,
    timestamp_unix_ms: u64,
    nonce: u64,
) -> Result<v1::Signed, SignedError> {
    if keypair.key_type() != KeyType::Ed25519 {
        return Err(SignedError::BadKey(format!(
            "{:?}; only Ed25519 keys sign swarmtune envelopes",
            keypair.key_type()
        )));
    }
    let payload = message.encode_to_vec();
    let input = signing_input(
        PROTOCOL_VERSION,
        T::TYPE_TAG,
        timestamp_unix_ms,
        nonce,
        &payload,
    );
    let signature = keypair
        .sign(&input)
        .map_err(|e| SignedError::BadKey(e.to_string()))?;
    Ok(v1::Signed {
        protocol_version: PROTOCOL_VERSION,
        type_tag: T::TYPE_TAG.to_owned(),
        payload,
        public_key: keypair.public().encode_protobuf(),
        signature,
        timestamp_unix_ms,
        nonce,
    })
}

/// Checks `envelope` in the order envelope.proto gives: sizes, version, type tag, key,
/// signature, signer (when `expected_signer` is given, the peer that must have signed it, e.g.
/// the connection's remote peer or a manifest's coordinator), then decodes the payload from
/// the bytes received. Timestamps and nonces are the `ReplayGuard`'s business.
pub fn verify<T: SignedPayload>(
    envelope: &v1::Signed,
    expected_signer: Option<&PeerId>,
    max_payload_bytes: usize,
) -> Result<Verified<T>, SignedError> {
    let size = |field, got: usize, ok: bool, allowed: String| {
        if ok {
            Ok(())
        } else {
            Err(SignedError::BadSize {
                field,
                got,
                allowed,
            })
        }
    };
    let tag = &envelope.type_tag;
    size(
        "type_tag",
        tag.len(),
        tag.len() <= MAX_TYPE_TAG_BYTES,
        format!("at most {MAX_TYPE_TAG_BYTES}"),
    )?;
    let key = &envelope.public_key;
    size(
        "public_key",
        key.len(),
        key.len() == PUBLIC_KEY_BYTES,
        format!("exactly {PUBLIC_KEY_BYTES}"),
    )?;
    let sig = &envelope.signature;
    size(
        "signature",
        sig.len(),
        sig.len() == SIGNATURE_BYTES,
        format!("exactly {SIGNATURE_BYTES}"),
    )?;
    let payload = &envelope.payload;
    size(
        "payload",
        payload.len(),
        payload.len() <= max_payload_bytes,
        format!("at most {max_payload_bytes}"),
    )?;
    if envelope.protocol_version != PROTOCOL_VERSION {
        return Err(SignedError::UnsupportedVersion {
            got: envelope.protocol_version,
        });
    }
    if tag != T::TYPE_TAG {
        return Err(SignedError::WrongType {
            expected: T::TYPE_TAG,
            got: tag.chars().take(MAX_TYPE_TAG_BYTES).collect(),
        });
    }
    let public =
        PublicKey::try_decode_protobuf(key).map_err(|e| SignedError::BadKey(e.to_string()))?;
    if public.key_type() != KeyType::Ed25519 {
        return Err(SignedError::BadKey(format!(
            "{:?}; only Ed25519 is accepted",
            public.key_type()
        )));
    }
    let input = signing_input(
        envelope.protocol_version,
        tag,
        envelope.timestamp_unix_ms,
        envelope.nonce,
        payload,
    );
    if !public.verify(&input, sig) {
        return Err(SignedError::BadSignature);
    }
    let signer = public.to_peer_id();
    if let Some(expected) = expected_signer
        && *expected != signer
    {
        return Err(SignedError::WrongSigner {
            signer: Box::new(signer),
            expected: Box::new(*expected),
        });
    }
    let message = T::decode(payload.as_slice()).map_err(|e| SignedError::Malformed {
        type_tag: T::TYPE_TAG,
        reason: e.to_string(),
    })?;
    if message.protocol_version() != PROTOCOL_VERSION {
        return Err(SignedError::UnsupportedVersion {
            got: message.protocol_version(),
        });
    }
    Ok(Verified {
        message,
        signer,
        timestamp_unix_ms: envelope.timestamp_unix_ms,
        nonce: envelope.nonce,
    })
}

/// Refuses stale, future-dated and repeated envelopes of the fresh-only types (a job being
/// submitted, a delta): it remembers every (signer, nonce) it accepted for the freshness
/// window, up to a fixed number, so its memory is bounded whatever peers send.
#[derive(Debug)]
pub struct ReplayGuard {
    seen: HashMap<(PeerId, u64), u64>,
    order: VecDeque<(u64, PeerId, u64)>,
    capacity: usize,
}

impl ReplayGuard {
    /// A guard remembering at most `capacity` recent envelopes.
    pub fn new(capacity: usize) -> Self {
        Self {
            seen: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Accepts `verified` once, if it was signed within the freshness window of `now_ms`.
    pub fn check<T>(&mut self, verified: &Verified<T>, now_ms: u64) -> Result<(), SignedError> {
        let ts = verified.timestamp_unix_ms;
        if ts > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(SignedError::Replayed(format!(
                "signed {} s in the future; check the signer's clock",
                (ts - now_ms) / 1000
            )));
        }
        if ts.saturating_add(FRESHNESS_WINDOW_MS) < now_ms {
            return Err(SignedError::Replayed(format!(
                "signed {} s ago, more than the {} s allowed; sign it again",
                (now_ms - ts) / 1000,
                FRESHNESS_WINDOW_MS / 1000
            )));
        }
        self.forget_before(now_ms.saturating_sub(FRESHNESS_WINDOW_MS));
        let key = (verified.signer, verified.nonce);
        if self.seen.contains_key(&key) {
            return Err(SignedError::Replayed(format!(
                "nonce {:#x} of {} was already used",
                verified.nonce, verified.signer
            )));
        }
        if self.seen.len() >= self.capacity {
            return Err(SignedError::Busy);
        }
        self.seen.insert(key, ts);
        self.order.push_back((ts, verified.signer, verified.nonce));
        Ok(())
    }

    /// Envelopes remembered now.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Drops what was signed before `cutoff`: older envelopes are refused by age anyway.
    /// Envelopes arrive roughly in timestamp order, so the queue's front is the oldest; one
    /// that arrived out of order is dropped when it reaches the front.
    fn forget_before(&mut self, cutoff: u64) {
        while let Some(&(ts, peer, nonce)) = self.order.front() {
            if ts >= cutoff {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&(peer, nonce));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 64 * 1024;

    fn signed<T: SignedPayload>(key: &Keypair, message: &T, ts: u64) -> v1::Signed {
        sign(key, message, ts).unwrap()
    }

    fn manifest(module: &str) -> v1::ModuleManifest {
        v1::ModuleManifest {
            protocol_version: PROTOCOL_VERSION,
            module: module.into(),
            version: 3,
            ..Default::default()
        }
    }

    #[test]
    fn a_signed_message_verifies_and_names_its_signer() {
        let key = Keypair::generate_ed25519();
        let env = signed(&key, &manifest("sql"), 1_000);
        let ok =
            verify::<v1::ModuleManifest>(&env, Some(&key.public().to_peer_id()), LIMIT).unwrap();
        assert_eq!(ok.message, manifest("sql"));
        assert_eq!(ok.signer, key.public().to_peer_id());
        assert_eq!(ok.timestamp_unix_ms, 1_000);
        // Without a required signer it verifies too, and still names who signed.
        assert_eq!(
            verify::<v1::ModuleManifest>(&env, None, LIMIT)
                .unwrap()
                .signer,
            ok.signer
        );
        // Two signatures of the same message use different nonces.
        let again = signed(&key, &manifest("sql"), 1_000);
        assert_ne!(again.nonce, env.nonce);
        // The envelope's id is the same for every copy of it, and differs for another signing
        // of the same message or a changed payload.
        assert_eq!(envelope_id(&env), envelope_id(&env.clone()));
        assert_ne!(envelope_id(&again), envelope_id(&env));
        let mut changed = env.clone();
        changed.payload.push(0);
        assert_ne!(envelope_id(&changed), envelope_id(&env));
    }

    #[test]
    fn a_forged_envelope_is_refused() {
        // Mallory signs with her key but claims Alice's public key.
        let alice = Keypair::generate_ed25519();
        let mallory = Keypair::generate_ed25519();
        let mut env = signed(&mallory, &manifest("sql"), 1_000);
        env.public_key = alice.public().encode_protobuf();
        let err = verify::<v1::ModuleManifest>(&env, None, LIMIT).unwrap_err();
        assert_eq!(err, SignedError::BadSignature);
        assert_eq!(err.code(), v1::ErrorCode::BadSignature);
        // A signature of zeros is no better.
        let mut env = signed(&alice, &manifest("sql"), 1_000);
        env.signature = vec![0; 64];
        assert_eq!(
            verify::<v1::ModuleManifest>(&env, None, LIMIT).unwrap_err(),
            SignedError::BadSignature
        );
    }

    #[test]
    fn every_tampered_signed_field_is_refused() {
        let key = Keypair::generate_ed25519();
        let env = signed(&key, &manifest("sql"), 1_000);
        let mut payload = env.clone();
        payload.payload = manifest("evil").encode_to_vec();
        let mut flipped = env.clone();
        let last = flipped.payload.len() - 1;
        flipped.payload[last] ^= 1;
        let mut time = env.clone();
        time.timestamp_unix_ms += 1;
        let mut nonce = env.clone();
        nonce.nonce ^= 1;
        for tampered in [payload, flipped, time, nonce] {
            assert_eq!(
                verify::<v1::ModuleManifest>(&tampered, None, LIMIT).unwrap_err(),
                SignedError::BadSignature
            );
        }
    }

    #[test]
    fn a_valid_signature_by_the_wrong_peer_is_refused() {
        let coordinator = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519();
        let env = signed(&other, &manifest("sql"), 1_000);
        let expected = coordinator.public().to_peer_id();
        match verify::<v1::ModuleManifest>(&env, Some(&expected), LIMIT).unwrap_err() {
            SignedError::WrongSigner {
                signer,
                expected: e,
            } => {
                assert_eq!(*signer, other.public().to_peer_id());
                assert_eq!(*e, expected);
            }
            e => panic!("expected WrongSigner, got {e}"),
        }
    }

    #[test]
    fn a_signature_over_one_type_is_not_accepted_as_another() {
        let key = Keypair::generate_ed25519();
        let spec = v1::JobSpec {
            protocol_version: PROTOCOL_VERSION,
            ..Default::default()
        };
        let env = signed(&key, &spec, 1_000);
        assert!(matches!(
            verify::<v1::ModuleManifest>(&env, None, LIMIT),
            Err(SignedError::WrongType { .. })
        ));
        // Relabelling the tag breaks the signature, which covers it.
        let mut relabelled = env;
        relabelled.type_tag = v1::ModuleManifest::TYPE_TAG.into();
        assert_eq!(
            verify::<v1::ModuleManifest>(&relabelled, None, LIMIT).unwrap_err(),
            SignedError::BadSignature
        );
    }

    #[test]
    fn other_versions_sizes_and_keys_are_refused_with_clear_errors() {
        let key = Keypair::generate_ed25519();
        let mut env = signed(&key, &manifest("sql"), 1_000);
        env.protocol_version = 2;
        let err = verify::<v1::ModuleManifest>(&env, None, LIMIT).unwrap_err();
        assert_eq!(err, SignedError::UnsupportedVersion { got: 2 });
        assert!(
            err.to_string()
                .contains("protocol version 2 is not supported")
        );
        // A correctly signed payload of another version is refused too.
        let mut old = manifest("sql");
        old.protocol_version = 0;
        let env = signed(&key, &old, 1_000);
        assert_eq!(
            verify::<v1::ModuleManifest>(&env, None, LIMIT).unwrap_err(),
            SignedError::UnsupportedVersion { got: 0 }
        );
        let env = signed(&key, &manifest("sql"), 1_000);
        assert!(matches!(
            verify::<v1::ModuleManifest>(&env, None, 4),
            Err(SignedError::BadSize {
                field: "payload",
                ..
            })
        ));
        let mut short = env.clone();
        short.signature.pop();
        assert!(matches!(
            verify::<v1::ModuleManifest>(&short, None, LIMIT),
            Err(SignedError::BadSize {
                field: "signature",
                ..
            })
        ));
        let mut junk_key = env.clone();
        junk_key.public_key = vec![0xff; PUBLIC_KEY_BYTES];
        assert!(matches!(
            verify::<v1::ModuleManifest>(&junk_key, None, LIMIT),
            Err(SignedError::BadKey(_))
        ));
        let mut junk_payload = signed(&key, &manifest("sql"), 1_000);
        junk_payload.payload = vec![0xff, 0xff, 0xff];
        let input = signing_input(
            PROTOCOL_VERSION,
            &junk_payload.type_tag,
            junk_payload.timestamp_unix_ms,
            junk_payload.nonce,
            &junk_payload.payload,
        );
        junk_payload.signature = key.sign(&input).unwrap();
        assert!(matches!(
            verify::<v1::ModuleManifest>(&junk_payload, None, LIMIT),
            Err(SignedError::Malformed { .. })
        ));
    }

    #[test]
    fn replayed_stale_and_future_envelopes_are_refused() {
        let key = Keypair::generate_ed25519();
        let now = 100 * FRESHNESS_WINDOW_MS;
        let mut guard = ReplayGuard::new(16);
        let fresh =
            verify::<v1::ModuleManifest>(&signed(&key, &manifest("sql"), now - 1_000), None, LIMIT)
                .unwrap();
        guard.check(&fresh, now).unwrap();
        let err = guard.check(&fresh, now + 1).unwrap_err();
        assert!(matches!(err, SignedError::Replayed(_)), "{err}");
        assert_eq!(err.code(), v1::ErrorCode::Replayed);

        let stale = verify::<v1::ModuleManifest>(
            &signed(&key, &manifest("sql"), now - FRESHNESS_WINDOW_MS - 1),
            None,
            LIMIT,
        )
        .unwrap();
        assert!(
            guard
                .check(&stale, now)
                .unwrap_err()
                .to_string()
                .contains("ago")
        );
        let future = verify::<v1::ModuleManifest>(
            &signed(&key, &manifest("sql"), now + MAX_CLOCK_SKEW_MS + 1),
            None,
            LIMIT,
        )
        .unwrap();
        assert!(
            guard
                .check(&future, now)
                .unwrap_err()
                .to_string()
                .contains("future")
        );
        // The same message signed again (new nonce) is accepted.
        let again = verify::<v1::ModuleManifest>(&signed(&key, &manifest("sql"), now), None, LIMIT)
            .unwrap();
        guard.check(&again, now).unwrap();
    }

    #[test]
    fn the_replay_guard_stays_bounded_and_forgets_only_what_age_refuses() {
        let key = Keypair::generate_ed25519();
        let now = 100 * FRESHNESS_WINDOW_MS;
        let mut guard = ReplayGuard::new(3);
        let at = |ts| {
            verify::<v1::ModuleManifest>(&signed(&key, &manifest("m"), ts), None, LIMIT).unwrap()
        };
        let first = at(now - FRESHNESS_WINDOW_MS + 10);
        guard.check(&first, now).unwrap();
        guard.check(&at(now), now).unwrap();
        guard.check(&at(now), now).unwrap();
        // Full of envelopes still inside the window: refuse rather than forget one.
        assert_eq!(guard.check(&at(now), now).unwrap_err(), SignedError::Busy);
        assert_eq!(guard.len(), 3);
        // Once the first one has aged out it is forgotten, and its replay is refused by age.
        let later = now + 20;
        guard.check(&at(later), later).unwrap();
        assert_eq!(guard.len(), 3);
        assert!(matches!(
            guard.check(&first, later),
            Err(SignedError::Replayed(_))
        ));
    }
}
