//! Base models named by their bundle id: the built-in base from the binary, others fetched
//! once into `DATA_DIR/models/<id>`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use libp2p_identity::PeerId;
use swarmtune_protocol::net::Client;
use swarmtune_protocol::net::transfer::{self, FetchConfig};
use swarmtune_protocol::{BlobStore, ContentId, bundle};
use tracing::info;

/// A directory holding base `base` (config.json, tokenizer.json, weights), fetching its
/// bundle and files (from `hint` first) when it is not the built-in base and not there yet.
pub async fn base_dir(
    client: &Client,
    store: &BlobStore,
    data_dir: &Path,
    base: ContentId,
    hint: Option<PeerId>,
) -> anyhow::Result<PathBuf> {
    let dir = data_dir.join("models").join(base.to_string());
    if dir.join("config.json").exists() {
        return Ok(dir);
    }
    // Every node carries the built-in base; its bundle id is the same everywhere.
    let builtin = crate::cmd::model_dir(None)?;
    let builtin_id = {
        let (store, builtin) = (store.clone(), builtin.clone());
        tokio::task::spawn_blocking(move || bundle::put_dir(&store, &builtin)).await??
    };
    if builtin_id == base {
        return Ok(builtin);
    }
    info!(%base, "fetching the base model");
    let known: Vec<PeerId> = hint.into_iter().collect();
    let config = FetchConfig::default();
    transfer::fetch_from(client, store, base, &config, &known, None)
        .await
        .with_context(|| format!("fetching the base bundle {base}"))?;
    let bundle = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || bundle::read(&store, &base)).await??
    };
    for (path, file, _) in bundle::files(&bundle, base)? {
        transfer::fetch_from(client, store, file, &config, &known, None)
            .await
            .with_context(|| format!("fetching the base's {path}"))?;
    }
    let (store, target) = (store.clone(), dir.clone());
    tokio::task::spawn_blocking(move || bundle::write_dir(&store, &base, &target).map(|_| ()))
        .await??;
    Ok(dir)
}
