//! The gossipsub topics and the validation every message goes through before it is
//! delivered or forwarded (`proto/swarmtune/v1/rpc.proto`, "Gossipsub topics").
//!
//! What can be checked from the bytes alone is checked here: size, the `Signed` envelope's
//! encoding, its version and its payload's version, and that its type tag is the topic's.
//! Whether the signature verifies and the signer may sign this type is checked through
//! [`EnvelopeVerifier`]; the default, [`SignatureVerifier`], uses `crate::signed`.

use std::fmt;
use std::sync::Arc;

use libp2p::PeerId;
use libp2p::gossipsub::{IdentTopic, TopicHash};
use prost::Message;

use super::codec::PROTOCOL_VERSION;
use crate::{signed, v1};

/// Largest gossipsub message (the `Signed` envelope's encoding): 64 KiB.
pub const GOSSIP_MAX_BYTES: usize = 64 * 1024;

/// A swarmtune gossipsub topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// `swarmtune/jobs/1`: signed `JobAnnouncement`s.
    Jobs,
    /// `swarmtune/modules/1`: signed `ModuleManifest`s.
    Modules,
}

impl Topic {
    /// Both topics.
    pub const ALL: [Topic; 2] = [Topic::Jobs, Topic::Modules];

    /// The topic's name on the wire.
    pub const fn name(self) -> &'static str {
        match self {
            Topic::Jobs => "swarmtune/jobs/1",
            Topic::Modules => "swarmtune/modules/1",
        }
    }

    /// The type tag an envelope on this topic must carry.
    pub const fn type_tag(self) -> &'static str {
        match self {
            Topic::Jobs => "swarmtune.v1.JobAnnouncement",
            Topic::Modules => "swarmtune.v1.ModuleManifest",
        }
    }

    /// The gossipsub topic (identity-hashed: the hash is the name, as go and js expect).
    pub fn ident(self) -> IdentTopic {
        IdentTopic::new(self.name())
    }

    /// The topic whose hash this is, if it is one of ours.
    pub fn from_hash(hash: &TopicHash) -> Option<Topic> {
        Topic::ALL.into_iter().find(|t| t.ident().hash() == *hash)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What validation decided about a gossipsub message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GossipVerdict {
    /// Deliver and forward.
    Accept,
    /// Drop and penalise the peer that forwarded it: the message is invalid.
    Reject(String),
    /// Drop without penalty: valid perhaps, but not for us (another version, stale).
    Ignore(String),
}

/// The hook for the checks that need more than bytes: the envelope's signature, its signer
/// and replay rules. Called from the event loop for each message that passed the structural
/// checks, so it must be quick and must not block.
pub trait EnvelopeVerifier: Send + Sync + 'static {
    /// Judges `envelope`, which arrived on `topic` and was published by `publisher` (the
    /// gossipsub author, whose own libp2p signature gossipsub has checked already).
    fn verify(
        &self,
        topic: Topic,
        publisher: Option<PeerId>,
        envelope: &v1::Signed,
    ) -> GossipVerdict;
}

/// Accepts whatever passed the structural checks: for tests of the network layer alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct StructuralOnly;

/// The default verifier: the envelope's signature verifies (`crate::signed::verify`), its
/// signer is the payload's `coordinator_peer_id`, and its timestamp is not more than 5
/// minutes ahead of our clock. Staleness and duplicates (an older announcement, a manifest
/// already held) need the application's state and are its business.
#[derive(Debug, Clone, Copy, Default)]
pub struct SignatureVerifier;

impl EnvelopeVerifier for SignatureVerifier {
    fn verify(&self, topic: Topic, _: Option<PeerId>, envelope: &v1::Signed) -> GossipVerdict {
        let checked = match topic {
            Topic::Jobs => signed::verify::<v1::JobAnnouncement>(envelope, None, GOSSIP_MAX_BYTES)
                .map(|v| (v.signer, v.message.coordinator_peer_id)),
            Topic::Modules => {
                signed::verify::<v1::ModuleManifest>(envelope, None, GOSSIP_MAX_BYTES)
                    .map(|v| (v.signer, v.message.coordinator_peer_id))
            }
        };
        let (signer, coordinator) = match checked {
            Ok(c) => c,
            // Another version is for a newer peer, not an attack.
            Err(e @ signed::SignedError::UnsupportedVersion { .. }) => {
                return GossipVerdict::Ignore(e.to_string());
            }
            Err(e) => return GossipVerdict::Reject(e.to_string()),
        };
        if PeerId::from_bytes(&coordinator).ok() != Some(signer) {
            return GossipVerdict::Reject(format!(
                "signed by {signer}, which is not the coordinator the {} names",
                topic.type_tag()
            ));
        }
        if envelope.timestamp_unix_ms > signed::unix_ms_now() + signed::MAX_CLOCK_SKEW_MS {
            return GossipVerdict::Ignore("timestamp more than 5 minutes ahead".into());
        }
        GossipVerdict::Accept
    }
}

impl EnvelopeVerifier for StructuralOnly {
    fn verify(&self, _: Topic, _: Option<PeerId>, _: &v1::Signed) -> GossipVerdict {
        GossipVerdict::Accept
    }
}

impl<F> EnvelopeVerifier for F
where
    F: Fn(Topic, Option<PeerId>, &v1::Signed) -> GossipVerdict + Send + Sync + 'static,
{
    fn verify(
        &self,
        topic: Topic,
        publisher: Option<PeerId>,
        envelope: &v1::Signed,
    ) -> GossipVerdict {
        self(topic, publisher, envelope)
    }
}

/// A shared verifier.
pub type SharedVerifier = Arc<dyn EnvelopeVerifier>;

/// The structural checks of a message on `topic`; the decoded envelope when they pass.
pub fn check_structure(topic: Topic, data: &[u8]) -> Result<v1::Signed, GossipVerdict> {
    if data.len() > GOSSIP_MAX_BYTES {
        return Err(GossipVerdict::Reject(format!(
            "message of {} bytes is over the limit of {GOSSIP_MAX_BYTES}",
            data.len()
        )));
    }
    let probe = v1::VersionProbe::decode(data)
        .map_err(|e| GossipVerdict::Reject(format!("not a Signed envelope: {e}")))?;
    if probe.protocol_version != PROTOCOL_VERSION {
        return Err(GossipVerdict::Ignore(format!(
            "envelope protocol_version {} is not {PROTOCOL_VERSION}",
            probe.protocol_version
        )));
    }
    let envelope = v1::Signed::decode(data)
        .map_err(|e| GossipVerdict::Reject(format!("not a Signed envelope: {e}")))?;
    if envelope.type_tag != topic.type_tag() {
        return Err(GossipVerdict::Reject(format!(
            "type tag {:?} on topic {topic}, which carries {}",
            envelope.type_tag,
            topic.type_tag()
        )));
    }
    let payload = v1::VersionProbe::decode(envelope.payload.as_slice())
        .map_err(|e| GossipVerdict::Reject(format!("payload does not decode: {e}")))?;
    if payload.protocol_version != PROTOCOL_VERSION {
        return Err(GossipVerdict::Ignore(format!(
            "payload protocol_version {} is not {PROTOCOL_VERSION}",
            payload.protocol_version
        )));
    }
    Ok(envelope)
}

/// Structural checks, then `verifier`.
pub fn validate(
    topic: Topic,
    publisher: Option<PeerId>,
    data: &[u8],
    verifier: &dyn EnvelopeVerifier,
) -> Result<v1::Signed, GossipVerdict> {
    let envelope = check_structure(topic, data)?;
    match verifier.verify(topic, publisher, &envelope) {
        GossipVerdict::Accept => Ok(envelope),
        refused => Err(refused),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(topic: Topic, version: u32, payload_version: u32) -> Vec<u8> {
        v1::Signed {
            protocol_version: version,
            type_tag: topic.type_tag().into(),
            payload: v1::VersionProbe {
                protocol_version: payload_version,
            }
            .encode_to_vec(),
            public_key: vec![0x08, 0x01, 0x12, 0x20],
            signature: vec![0; 64],
            timestamp_unix_ms: 1,
            nonce: 2,
        }
        .encode_to_vec()
    }

    #[test]
    fn topic_names_and_hashes_are_the_contract() {
        assert_eq!(Topic::Jobs.ident().hash().as_str(), "swarmtune/jobs/1");
        assert_eq!(Topic::Modules.name(), "swarmtune/modules/1");
        assert_eq!(
            Topic::from_hash(&Topic::Modules.ident().hash()),
            Some(Topic::Modules)
        );
        assert_eq!(Topic::from_hash(&IdentTopic::new("other").hash()), None);
    }

    #[test]
    fn a_well_formed_envelope_passes() {
        let data = envelope(Topic::Jobs, 1, 1);
        let env = check_structure(Topic::Jobs, &data).unwrap();
        assert_eq!(env.type_tag, "swarmtune.v1.JobAnnouncement");
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(matches!(
            check_structure(Topic::Jobs, &[0xff, 0xff, 0xff]),
            Err(GossipVerdict::Reject(_))
        ));
    }

    #[test]
    fn another_version_is_ignored_not_rejected() {
        for data in [envelope(Topic::Jobs, 2, 1), envelope(Topic::Jobs, 1, 0)] {
            assert!(matches!(
                check_structure(Topic::Jobs, &data),
                Err(GossipVerdict::Ignore(_))
            ));
        }
    }

    #[test]
    fn a_type_tag_from_the_other_topic_is_rejected() {
        let data = envelope(Topic::Modules, 1, 1);
        let Err(GossipVerdict::Reject(why)) = check_structure(Topic::Jobs, &data) else {
            panic!("a manifest on the jobs topic must be rejected");
        };
        assert!(why.contains("ModuleManifest"), "{why}");
    }

    #[test]
    fn oversize_is_rejected() {
        let data = vec![0u8; GOSSIP_MAX_BYTES + 1];
        assert!(matches!(
            check_structure(Topic::Jobs, &data),
            Err(GossipVerdict::Reject(_))
        ));
    }

    fn announcement(coordinator: &libp2p::identity::Keypair) -> v1::JobAnnouncement {
        v1::JobAnnouncement {
            protocol_version: 1,
            job_id: vec![1; 32],
            coordinator_peer_id: coordinator.public().to_peer_id().to_bytes(),
            ..Default::default()
        }
    }

    #[test]
    fn a_coordinator_signed_announcement_is_accepted() {
        let key = libp2p::identity::Keypair::generate_ed25519();
        let env = signed::sign(&key, &announcement(&key), signed::unix_ms_now()).unwrap();
        let data = env.encode_to_vec();
        assert!(validate(Topic::Jobs, None, &data, &SignatureVerifier).is_ok());
    }

    #[test]
    fn forged_tampered_and_wrong_signer_envelopes_are_rejected() {
        let key = libp2p::identity::Keypair::generate_ed25519();
        let other = libp2p::identity::Keypair::generate_ed25519();
        let now = signed::unix_ms_now();
        // Signed by someone else than the coordinator it names.
        let wrong_signer = signed::sign(&other, &announcement(&key), now).unwrap();
        // A valid envelope with one payload byte changed.
        let mut tampered = signed::sign(&key, &announcement(&key), now).unwrap();
        let last = tampered.payload.len() - 1;
        tampered.payload[last] ^= 1;
        // A zero signature.
        let mut forged = signed::sign(&key, &announcement(&key), now).unwrap();
        forged.signature = vec![0; 64];
        for env in [wrong_signer, tampered, forged] {
            let data = env.encode_to_vec();
            assert!(
                matches!(
                    validate(Topic::Jobs, None, &data, &SignatureVerifier),
                    Err(GossipVerdict::Reject(_))
                ),
                "{env:?}"
            );
        }
        // From the future: ignored, not rejected.
        let ahead = signed::sign(&key, &announcement(&key), now + 3_600_000).unwrap();
        assert!(matches!(
            validate(
                Topic::Jobs,
                None,
                &ahead.encode_to_vec(),
                &SignatureVerifier
            ),
            Err(GossipVerdict::Ignore(_))
        ));
    }

    #[test]
    fn the_verifier_has_the_last_word() {
        let data = envelope(Topic::Jobs, 1, 1);
        let refuse = |_: Topic, _: Option<PeerId>, _: &v1::Signed| {
            GossipVerdict::Reject("bad signature".into())
        };
        assert_eq!(
            validate(Topic::Jobs, None, &data, &refuse).unwrap_err(),
            GossipVerdict::Reject("bad signature".into())
        );
        assert!(validate(Topic::Jobs, None, &data, &StructuralOnly).is_ok());
    }
}
