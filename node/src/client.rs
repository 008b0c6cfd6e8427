//! What job owners and module users ask a coordinator: submit a job, read its status, pull a
//! module version. The commands in `cmd/` print what these return; the demo and the tests
//! call them directly.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use libp2p_identity::{Keypair, PeerId};
use swarmtune_coordinator::engine::{hex, lora_config};
use swarmtune_coordinator::spec::{DatasetRef, JobFile, load_job_file};
use swarmtune_protocol::net::Client;
use swarmtune_protocol::net::transfer::{self, FetchConfig};
use swarmtune_protocol::{BlobStore, ContentId, PROTOCOL_VERSION, signed, v1};
use swarmtune_trainer::checkpoint::safetensors_from_bytes;
use swarmtune_trainer::lora::Adapter;

use crate::InputError;

/// Largest signed manifest accepted.
const MAX_MANIFEST_BYTES: usize = 64 << 10;

/// Asks the coordinator's status protocol.
pub async fn status(
    client: &Client,
    coordinator: PeerId,
    body: v1::status_request::Body,
) -> anyhow::Result<v1::status_response::Body> {
    let answer = client
        .request(
            coordinator,
            v1::StatusRequest {
                protocol_version: PROTOCOL_VERSION,
                body: Some(body),
            },
        )
        .await
        .context("asking the coordinator")?;
    match answer.body {
        Some(v1::status_response::Body::Error(e)) => Err(refused(&e)),
        Some(body) => Ok(body),
        None => anyhow::bail!("the coordinator sent an empty answer"),
    }
}

fn refused(e: &v1::ErrorReply) -> anyhow::Error {
    let field = if e.field.is_empty() {
        String::new()
    } else {
        format!(" (field {})", e.field)
    };
    anyhow::anyhow!(
        "the coordinator refused: {}{field} [{:?}]",
        e.message,
        e.code()
    )
}

/// Every job of the coordinator.
pub async fn jobs(client: &Client, coordinator: PeerId) -> anyhow::Result<Vec<v1::JobSummary>> {
    let body = v1::status_request::Body::ListJobs(v1::ListJobs {
        include_finished: true,
    });
    match status(client, coordinator, body).await? {
        v1::status_response::Body::JobList(list) => Ok(list.jobs),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

/// The job `prefix` names: its full id in hex, or a prefix only one job has.
pub async fn resolve_job(
    client: &Client,
    coordinator: PeerId,
    prefix: &str,
) -> anyhow::Result<[u8; 32]> {
    let prefix = prefix.to_ascii_lowercase();
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(InputError::new(format!("{prefix:?} is not a job id (hex digits)")).into());
    }
    let matching: Vec<[u8; 32]> = jobs(client, coordinator)
        .await?
        .into_iter()
        .filter_map(|j| <[u8; 32]>::try_from(j.job_id.as_slice()).ok())
        .filter(|id| hex(id).starts_with(&prefix))
        .collect();
    match matching.as_slice() {
        [one] => Ok(*one),
        [] => Err(InputError::new(format!("the coordinator has no job {prefix}")).into()),
        _ => Err(InputError::new(format!(
            "{} jobs start with {prefix}: give more digits",
            matching.len()
        ))
        .into()),
    }
}

/// A job's status.
pub async fn job_status(
    client: &Client,
    coordinator: PeerId,
    job: &[u8; 32],
) -> anyhow::Result<v1::JobStatus> {
    let body = v1::status_request::Body::GetJobStatus(v1::GetJobStatus {
        job_id: job.to_vec(),
    });
    match status(client, coordinator, body).await? {
        v1::status_response::Body::JobStatus(s) => Ok(s),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

/// A submitted job.
#[derive(Clone, Debug)]
pub struct Submitted {
    /// Its id.
    pub job_id: [u8; 32],
    /// Its module.
    pub module: String,
}

/// Reads and checks a job file (TOML); errors name the key and what is allowed.
pub fn read_job_file(path: &Path) -> Result<JobFile, InputError> {
    load_job_file(path).map_err(|e| InputError::new(e.to_string()))
}

/// Stores and provides `file`'s dataset (a relative path is resolved against `dir`, the job
/// file's directory) and submits the job signed by `owner`. The dataset stays in `store`; the
/// caller keeps serving it (see [`wait_prepared`]).
pub async fn submit(
    client: &Client,
    store: &BlobStore,
    owner: &Keypair,
    coordinator: PeerId,
    file: &JobFile,
    dir: &Path,
) -> anyhow::Result<Submitted> {
    let dataset = match file
        .dataset_source(dir)
        .map_err(|e| InputError::new(format!("job file: {e}")))?
    {
        DatasetRef::File(path) => {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.put_file(&path))
                .await?
                .context("storing the dataset")?
        }
        DatasetRef::Blob(id) => id,
    };
    let spec = file
        .to_spec(&coordinator, dataset)
        .map_err(|e| InputError::new(format!("job file: {e}")))?;
    if store.contains(&dataset) {
        client.start_providing(dataset.as_bytes().to_vec()).await?;
    }
    let signed = signed::sign(owner, &spec, signed::unix_ms_now())?;
    let answer = client
        .request(
            coordinator,
            v1::JobRequest {
                protocol_version: PROTOCOL_VERSION,
                body: Some(v1::job_request::Body::SubmitJob(v1::SubmitJob {
                    spec: Some(signed),
                })),
            },
        )
        .await
        .context("submitting the job")?;
    match answer.body {
        Some(v1::job_response::Body::JobSubmitted(s)) => Ok(Submitted {
            job_id: s
                .job_id
                .as_slice()
                .try_into()
                .context("the coordinator sent a job id that is not 32 bytes")?,
            module: spec.module,
        }),
        Some(v1::job_response::Body::Error(e)) => Err(refused(&e)),
        None => anyhow::bail!("the coordinator sent an empty answer"),
    }
}

/// Waits until the job has left PREPARING (the coordinator has fetched the dataset from us).
pub async fn wait_prepared(
    client: &Client,
    coordinator: PeerId,
    job: &[u8; 32],
    timeout: Duration,
) -> anyhow::Result<v1::JobSummary> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let status = job_status(client, coordinator, job).await?;
        let summary = status.summary.unwrap_or_default();
        match summary.state() {
            v1::JobState::Preparing => {}
            v1::JobState::Failed => {
                anyhow::bail!(
                    "the coordinator could not prepare the job: {}",
                    summary.message
                )
            }
            _ => return Ok(summary),
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "the job is still being prepared after {} s",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `MODULE` or `MODULE@VERSION`.
pub fn parse_module_ref(text: &str) -> Result<(String, Option<u64>), InputError> {
    match text.split_once('@') {
        None => Ok((text.to_owned(), None)),
        Some((module, version)) => {
            let version = version.parse().map_err(|_| {
                InputError::new(format!(
                    "{text}: the version after @ must be a number, e.g. {module}@3"
                ))
            })?;
            Ok((module.to_owned(), Some(version)))
        }
    }
}

/// A module version's manifest, verified: signed by `coordinator`, and the one asked for.
pub async fn manifest(
    client: &Client,
    coordinator: PeerId,
    module: &str,
    version: Option<u64>,
) -> anyhow::Result<(v1::ModuleManifest, v1::Signed)> {
    let body = match version {
        None => v1::status_request::Body::GetLatestVersion(v1::GetLatestVersion {
            module: module.to_owned(),
        }),
        Some(version) => v1::status_request::Body::GetVersion(v1::GetVersion {
            module: module.to_owned(),
            version,
        }),
    };
    let v1::status_response::Body::ModuleVersion(answer) =
        status(client, coordinator, body).await?
    else {
        anyhow::bail!("the coordinator did not answer with a module version");
    };
    let envelope = answer
        .manifest
        .context("the coordinator's answer holds no manifest")?;
    let manifest =
        signed::verify::<v1::ModuleManifest>(&envelope, Some(&coordinator), MAX_MANIFEST_BYTES)
            .context("the manifest's signature")?
            .message;
    if manifest.module != module || version.is_some_and(|v| v != manifest.version) {
        anyhow::bail!(
            "the coordinator answered with {}@{} for {module}{}",
            manifest.module,
            manifest.version,
            version.map(|v| format!("@{v}")).unwrap_or_default()
        );
    }
    Ok((manifest, envelope))
}

/// What `pull` wrote.
#[derive(Clone, Debug)]
pub struct Pulled {
    /// The manifest.
    pub manifest: v1::ModuleManifest,
    /// The PEFT adapter directory.
    pub dir: PathBuf,
    /// The merged checkpoint, with `--merged`.
    pub merged: Option<PathBuf>,
}

/// Fetches `module[@version]`'s adapter from `coordinator` (and whoever provides it), checks
/// it against the signed manifest, and writes a PEFT adapter directory at `out`
/// (`adapter_model.safetensors`, `adapter_config.json`, `manifest.json`, `manifest.signed`).
/// With `merged`, also writes base + adapter as a Hugging Face checkpoint in `out/merged`.
#[allow(clippy::too_many_arguments)]
pub async fn pull(
    client: &Client,
    store: &BlobStore,
    data_dir: &Path,
    coordinator: PeerId,
    module: &str,
    version: Option<u64>,
    out: &Path,
    merged: bool,
) -> anyhow::Result<Pulled> {
    let (manifest, envelope) = self::manifest(client, coordinator, module, version).await?;
    let adapter_id = manifest
        .adapter
        .as_ref()
        .and_then(|c| ContentId::try_from(c).ok())
        .context("the manifest names no adapter")?;
    transfer::fetch_from(
        client,
        store,
        adapter_id,
        &FetchConfig::default(),
        &[coordinator],
        None,
    )
    .await
    .with_context(|| format!("fetching the adapter {adapter_id}"))?;
    let bytes = store.read(&adapter_id)?;
    let (tensors, _) = safetensors_from_bytes(&bytes, Path::new("the adapter blob"))?;
    let lora = manifest
        .lora
        .as_ref()
        .map(lora_config)
        .context("the manifest names no LoRA config")?;
    let adapter = Adapter {
        config: lora,
        tensors,
    };
    let base_name = if manifest.base_name.is_empty() {
        None
    } else {
        Some(manifest.base_name.as_str())
    };
    adapter.save(out, base_name, false)?;
    std::fs::write(
        out.join("manifest.json"),
        manifest_json(&manifest).to_string(),
    )?;
    std::fs::write(
        out.join("manifest.signed"),
        prost::Message::encode_to_vec(&envelope),
    )?;
    let merged = if merged {
        let base = manifest
            .base
            .as_ref()
            .and_then(|c| ContentId::try_from(c).ok())
            .context("the manifest names no base")?;
        let base_dir =
            crate::models::base_dir(client, store, data_dir, base, Some(coordinator)).await?;
        let target = out.join("merged");
        swarmtune_trainer::lora::merge_into_base(&base_dir, &adapter, &target)?;
        Some(target)
    } else {
        None
    };
    Ok(Pulled {
        manifest,
        dir: out.to_owned(),
        merged,
    })
}

/// The manifest for people and scripts.
pub fn manifest_json(m: &v1::ModuleManifest) -> serde_json::Value {
    let id = |c: &Option<v1::ContentId>| {
        c.as_ref()
            .and_then(|c| ContentId::try_from(c).ok())
            .map(|c| c.to_string())
    };
    serde_json::json!({
        "module": m.module,
        "version": m.version,
        "parent_version": m.parent_version,
        "coordinator": PeerId::from_bytes(&m.coordinator_peer_id).map(|p| p.to_string()).ok(),
        "job": hex(&m.job_id),
        "round": m.round,
        "base": id(&m.base),
        "base_name": m.base_name,
        "adapter": id(&m.adapter),
        "adapter_bytes": m.adapter_bytes,
        "lora": m.lora.as_ref().map(|l| serde_json::json!({
            "rank": l.rank, "alpha": l.alpha, "dropout": l.dropout,
            "target_modules": l.target_modules,
        })),
        "metrics": m.metrics.as_ref().map(metrics_json),
        "contributors": m.contributors.iter().map(|c| serde_json::json!({
            "peer": PeerId::from_bytes(&c.peer_id).map(|p| p.to_string()).ok(),
            "tokens": c.tokens,
            "deltas": c.deltas,
        })).collect::<Vec<_>>(),
        "created_at_unix_ms": m.created_at_unix_ms,
    })
}

/// Eval metrics as JSON.
pub fn metrics_json(m: &v1::EvalMetrics) -> serde_json::Value {
    serde_json::json!({
        "eval_loss": m.eval_loss,
        "perplexity": m.perplexity,
        "eval_tokens": m.eval_tokens,
        "exact_match": m.exact_match,
        "exact_match_examples": m.exact_match_examples,
    })
}
