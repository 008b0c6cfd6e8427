//! The module registry (issue 6, point 5): every published version of a module as the
//! coordinator signed it, and the answers to status queries about them. A version is written
//! in the same transaction as the round that produced it.

use libp2p_identity::Keypair;
use prost::Message;
use serde::{Deserialize, Serialize};
use swarmtune_protocol::net::codec::error_reply;
use swarmtune_protocol::signed::{self, SignedError};
use swarmtune_protocol::v1;

use crate::store::{MODULES, Read, StoreError, VERSIONS, Write, module_prefix, version_key};

/// A module: what every version shares.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ModuleRecord {
    /// Its owner: the signer of the job that created it (PeerId bytes).
    pub owner: Vec<u8>,
    /// Its base (bundle id).
    pub base: [u8; 32],
    /// Its LoRA config (`v1::LoraConfig` bytes).
    pub lora: Vec<u8>,
    /// The latest version.
    pub latest: u64,
    /// The job that publishes versions now.
    pub job: [u8; 32],
}

/// One published version.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct VersionRecord {
    /// The signed manifest (`v1::Signed` bytes), as published.
    pub signed: Vec<u8>,
    /// The adapter blob.
    pub adapter: [u8; 32],
    /// Its eval loss, for the gate of the next merge.
    pub eval_loss: f64,
}

/// Why a version could not be published.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Signing failed.
    #[error(transparent)]
    Sign(#[from] SignedError),
    /// The manifest does not follow the module's history.
    #[error("{0}")]
    Conflict(String),
}

/// Signs `manifest` and stores it as the module's next version. The version must be the
/// latest plus one (1 for a new module, whose record is created from the manifest).
pub fn publish(
    w: &Write<'_>,
    keypair: &Keypair,
    manifest: &v1::ModuleManifest,
    owner: &[u8],
    eval_loss: f64,
    now: u64,
) -> Result<v1::Signed, RegistryError> {
    let module = w.get::<ModuleRecord>(MODULES, manifest.module.as_bytes())?;
    let latest = module.as_ref().map_or(0, |m| m.latest);
    if manifest.version != latest + 1 {
        return Err(RegistryError::Conflict(format!(
            "module {} is at version {latest}; cannot publish version {}",
            manifest.module, manifest.version
        )));
    }
    let adapter = manifest
        .adapter
        .as_ref()
        .and_then(|c| swarmtune_protocol::ContentId::try_from(c).ok())
        .ok_or_else(|| RegistryError::Conflict("the manifest names no adapter".into()))?;
    let base = manifest
        .base
        .as_ref()
        .and_then(|c| swarmtune_protocol::ContentId::try_from(c).ok())
        .ok_or_else(|| RegistryError::Conflict("the manifest names no base".into()))?;
    let envelope = signed::sign(keypair, manifest, now)?;
    w.put(
        VERSIONS,
        &version_key(&manifest.module, manifest.version),
        &VersionRecord {
            signed: envelope.encode_to_vec(),
            adapter: *adapter.as_bytes(),
            eval_loss,
        },
    )?;
    let job: [u8; 32] = manifest.job_id.as_slice().try_into().unwrap_or([0; 32]);
    let record = match module {
        Some(m) => ModuleRecord {
            latest: manifest.version,
            job,
            ..m
        },
        None => ModuleRecord {
            owner: owner.to_vec(),
            base: *base.as_bytes(),
            lora: manifest.lora.clone().unwrap_or_default().encode_to_vec(),
            latest: manifest.version,
            job,
        },
    };
    w.put(MODULES, manifest.module.as_bytes(), &record)?;
    Ok(envelope)
}

/// The module's record, if it exists.
pub fn module(r: &Read<'_>, name: &str) -> Result<Option<ModuleRecord>, StoreError> {
    r.get(MODULES, name.as_bytes())
}

/// A version's record.
pub fn version_record(
    r: &Read<'_>,
    name: &str,
    version: u64,
) -> Result<Option<VersionRecord>, StoreError> {
    r.get(VERSIONS, &version_key(name, version))
}

/// The answer to `GetLatestVersion` / `GetVersion` (version 0 means the latest).
pub fn get_version(
    r: &Read<'_>,
    name: &str,
    version: u64,
) -> Result<v1::StatusResponse, StoreError> {
    let not_found = |m: String| {
        status(v1::status_response::Body::Error(error_reply(
            v1::ErrorCode::NotFound,
            m,
        )))
    };
    let Some(module) = module(r, name)? else {
        return Ok(not_found(format!("no module {name:?} at this coordinator")));
    };
    let wanted = if version == 0 { module.latest } else { version };
    let Some(record) = version_record(r, name, wanted)? else {
        return Ok(not_found(format!(
            "module {name:?} has versions 1 to {}, not {wanted}",
            module.latest
        )));
    };
    let manifest = v1::Signed::decode(record.signed.as_slice()).map_err(|e| StoreError::Db {
        path: Default::default(),
        message: format!("version {wanted} of {name} is damaged: {e}"),
    })?;
    Ok(status(v1::status_response::Body::ModuleVersion(
        v1::ModuleVersion {
            manifest: Some(manifest),
        },
    )))
}

/// Summaries of a module's versions older than `before` (0: from the newest), newest first,
/// at most `limit` (1 to 256).
pub fn history(
    r: &Read<'_>,
    name: &str,
    before: u64,
    limit: u32,
) -> Result<v1::ModuleHistory, StoreError> {
    let limit = limit.clamp(1, 256) as usize;
    let all: Vec<(Vec<u8>, VersionRecord)> = r.scan(VERSIONS, &module_prefix(name))?;
    let mut versions = Vec::new();
    let mut more = false;
    for (_, record) in all.iter().rev() {
        let Some(summary) = summary(record) else {
            continue;
        };
        if before != 0 && summary.version >= before {
            continue;
        }
        if versions.len() == limit {
            more = true;
            break;
        }
        versions.push(summary);
    }
    Ok(v1::ModuleHistory {
        module: name.to_owned(),
        versions,
        more,
    })
}

/// A version's summary for status answers, from its signed manifest.
pub fn summary(record: &VersionRecord) -> Option<v1::VersionSummary> {
    let envelope = v1::Signed::decode(record.signed.as_slice()).ok()?;
    let m = v1::ModuleManifest::decode(envelope.payload.as_slice()).ok()?;
    Some(v1::VersionSummary {
        version: m.version,
        parent_version: m.parent_version,
        round: m.round,
        created_at_unix_ms: m.created_at_unix_ms,
        metrics: m.metrics,
        adapter: m.adapter,
        tokens: m.contributors.iter().map(|c| c.tokens).sum(),
        contributors: m.contributors.len() as u32,
    })
}

fn status(body: v1::status_response::Body) -> v1::StatusResponse {
    v1::StatusResponse {
        protocol_version: swarmtune_protocol::PROTOCOL_VERSION,
        body: Some(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use swarmtune_protocol::ContentId;

    fn manifest(version: u64) -> v1::ModuleManifest {
        v1::ModuleManifest {
            protocol_version: swarmtune_protocol::PROTOCOL_VERSION,
            module: "shout".into(),
            version,
            parent_version: version - 1,
            job_id: vec![3; 32],
            round: version - 1,
            base: Some(ContentId::from_bytes([1; 32]).to_proto()),
            adapter: Some(ContentId::from_bytes([version as u8; 32]).to_proto()),
            metrics: Some(v1::EvalMetrics {
                eval_loss: 3.0 - version as f64 * 0.1,
                ..Default::default()
            }),
            created_at_unix_ms: 1000 + version,
            ..Default::default()
        }
    }

    #[test]
    fn versions_publish_in_order_signed_and_answer_status_queries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("c.redb")).unwrap();
        let key = Keypair::generate_ed25519();
        for v in 1..=3 {
            store
                .write(|w| publish(w, &key, &manifest(v), b"owner", 3.0 - v as f64 * 0.1, 5_000))
                .unwrap();
        }
        let skipped = store.write(|w| publish(w, &key, &manifest(5), b"owner", 1.0, 5_000));
        assert!(matches!(skipped, Err(RegistryError::Conflict(_))));
        let again = store.write(|w| publish(w, &key, &manifest(2), b"owner", 1.0, 5_000));
        assert!(matches!(again, Err(RegistryError::Conflict(_))));

        store
            .read(|r| {
                let latest = get_version(r, "shout", 0)?;
                let Some(v1::status_response::Body::ModuleVersion(v)) = latest.body else {
                    panic!("{latest:?}");
                };
                let verified = signed::verify::<v1::ModuleManifest>(
                    v.manifest.as_ref().unwrap(),
                    Some(&key.public().to_peer_id()),
                    64 << 10,
                )
                .unwrap();
                assert_eq!(verified.message.version, 3);
                let missing = get_version(r, "shout", 9)?;
                assert!(matches!(
                    missing.body,
                    Some(v1::status_response::Body::Error(_))
                ));
                let unknown = get_version(r, "nope", 0)?;
                assert!(matches!(
                    unknown.body,
                    Some(v1::status_response::Body::Error(_))
                ));

                let page = history(r, "shout", 0, 2)?;
                let versions: Vec<u64> = page.versions.iter().map(|s| s.version).collect();
                assert_eq!((versions, page.more), (vec![3, 2], true));
                let rest = history(r, "shout", 2, 2)?;
                let versions: Vec<u64> = rest.versions.iter().map(|s| s.version).collect();
                assert_eq!((versions, rest.more), (vec![1], false));
                assert_eq!(module(r, "shout")?.unwrap().latest, 3);
                Ok::<_, StoreError>(())
            })
            .unwrap();
    }
}
