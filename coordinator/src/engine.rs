//! The coordinator's engine: the rules of a job from submission to its last version, on top
//! of the store (state), the blob store (bytes) and the trainer (math). It does no
//! networking: the service feeds it what peers send and carries out what it decides (fetch
//! this blob, send that challenge), so every rule can be tested without a network.
//!
//! Every change is one store transaction. Long computations (preparing a job, verifying a
//! delta, merging a round) run outside any transaction and commit their result in one, after
//! checking that what they started from has not changed in between.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use libp2p_identity::{Keypair, PeerId};
use prost::Message;
use rand::SeedableRng;
use swarmtune_protocol::net::codec::error_reply;
use swarmtune_protocol::signed::{self, envelope_id};
use swarmtune_protocol::{BlobStore, ContentId, bundle, v1};
use swarmtune_trainer::checkpoint::{safetensors_bytes, safetensors_from_bytes};
use swarmtune_trainer::data::{Example, Shard, ShardLimits, ShardPlan, build_shards};
use swarmtune_trainer::eval::eval_loss;
use swarmtune_trainer::lora::{Adapter, DeviceLora, LoraConfig};
use swarmtune_trainer::model::{CausalLm, ForwardOptions};
use swarmtune_trainer::tensors::NamedTensors;
use swarmtune_trainer::train::{LeaseData, LocalTrainer, LoraState, Provenance};
use tracing::{info, warn};

use crate::leases::{self, LeaseAnswer, LeaseError, LeasePolicy, StartPoint};
use crate::merge::{self, Contribution};
use crate::records::{
    DeltaRecord, DeltaStatus, JobRecord, JobState, LeaseRecord, LeaseState, Prepared,
};
use crate::registry;
use crate::spec;
use crate::store::{DELTAS, JOBS, LEASES, REPUTATIONS, Store, StoreError, u64_key};
use crate::verify::{self, Rejection, Reputation, Verdict};

/// Largest signed job spec (job.proto).
pub const MAX_SPEC_BYTES: usize = 32 << 10;
/// Largest signed delta envelope (delta.proto).
pub const MAX_ENVELOPE_BYTES: usize = 256 << 10;
/// Time a volunteer has to answer a challenge.
pub const CHALLENGE_ANSWER_MS: u64 = 120_000;

/// Settings of a coordinator.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the database, blobs and unpacked bases live.
    pub data_dir: PathBuf,
    /// How leases are sized.
    pub leases: LeasePolicy,
    /// Largest blob accepted.
    pub max_blob_bytes: u64,
    /// Sequences per batch when evaluating.
    pub eval_batch: usize,
}

impl Config {
    /// Defaults for `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            leases: LeasePolicy::default(),
            max_blob_bytes: 16 << 30,
            eval_batch: 16,
        }
    }
}

/// Why the engine failed (as opposed to refusing a peer, which is an `ErrorReply`).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The blob store failed.
    #[error(transparent)]
    Blob(#[from] swarmtune_protocol::BlobError),
    /// A bundle was invalid.
    #[error(transparent)]
    Bundle(#[from] bundle::BundleError),
    /// The trainer failed.
    #[error(transparent)]
    Trainer(#[from] swarmtune_trainer::error::TrainerError),
    /// Something the engine stored does not make sense any more.
    #[error("{0}")]
    Internal(String),
}

impl From<registry::RegistryError> for EngineError {
    fn from(e: registry::RegistryError) -> Self {
        Self::Internal(e.to_string())
    }
}

impl From<LeaseError> for EngineError {
    fn from(e: LeaseError) -> Self {
        match e {
            LeaseError::Store(s) => Self::Store(s),
            LeaseError::Refused(r) => Self::Internal(r.message),
        }
    }
}

/// A refusal or a failure, as the wire answers it.
fn reply(e: EngineError) -> v1::ErrorReply {
    warn!(error = %e, "coordinator failure");
    error_reply(v1::ErrorCode::Internal, e.to_string())
}

/// What a job needs in memory to verify and merge: its base, its shards, its adapter layout.
struct Runtime {
    model: CausalLm,
    train: Vec<Shard>,
    eval: Vec<Shard>,
    lora: LoraConfig,
    layout: NamedTensors,
}

/// The coordinator.
pub struct Coordinator {
    store: Store,
    blobs: BlobStore,
    keypair: Keypair,
    peer: PeerId,
    config: Config,
    device: burn::tensor::Device,
    provenance: Provenance,
    runtimes: Mutex<HashMap<[u8; 32], Arc<Runtime>>>,
}

/// What to do about a delivered delta next.
#[derive(Debug)]
pub enum Next {
    /// Send this verdict to the volunteer; it is final and recorded.
    Verdict(Box<v1::VerificationVerdict>),
    /// Send this challenge to the volunteer and call [`Coordinator::answer_challenge`] with
    /// its answer (or [`Coordinator::challenge_unanswered`] if none comes in time).
    Challenge(v1::SegmentChallenge),
    /// The delta passed its checks, and its lease has a redundant twin whose delta it must be
    /// compared with: the verdict comes when that delta is judged (or the round closes), and
    /// [`Coordinator::verdict`] has it then. The comparison may challenge this volunteer again
    /// (a tie-break, found by [`crate::status::open_challenges`]).
    AwaitingTwin,
}

/// Where the redundant twin of a delta's work stands.
enum Twin {
    /// The delta's unit has no twin (or its round is over).
    None,
    /// The twin unit has no delta yet.
    Missing,
    /// The twin unit's delta.
    Delta(Box<DeltaRecord>),
}

impl Coordinator {
    /// Opens (or creates) the coordinator's state in `config.data_dir`, signing as `keypair`,
    /// computing on `device` (`backend` and `threads` describe it for replay comparisons).
    pub fn open(
        config: Config,
        keypair: Keypair,
        device: burn::tensor::Device,
        backend: &str,
        threads: usize,
    ) -> Result<Self, EngineError> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| EngineError::Internal(format!("{}: {e}", config.data_dir.display())))?;
        let store = Store::open(config.data_dir.join("coordinator.redb"))?;
        let blobs = BlobStore::open(config.data_dir.join("blobs"), config.max_blob_bytes)?;
        Ok(Self {
            store,
            blobs,
            peer: keypair.public().to_peer_id(),
            keypair,
            config,
            device,
            provenance: Provenance::here(backend, threads),
            runtimes: Mutex::new(HashMap::new()),
        })
    }

    /// This coordinator's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.peer
    }

    /// Signs `message` as this coordinator (announcements, manifests).
    pub fn sign<T: signed::SignedPayload>(
        &self,
        message: &T,
        now: u64,
    ) -> Result<v1::Signed, EngineError> {
        signed::sign(&self.keypair, message, now).map_err(|e| EngineError::Internal(e.to_string()))
    }

    /// The blob store (the service serves and fills it).
    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// The state store (for status queries).
    pub fn store(&self) -> &Store {
        &self.store
    }

    // --------------------------------------------------------------------------------------
    // Intake

    /// A job owner submits a signed spec. A retry of the same envelope gets the same answer.
    pub fn submit(
        &self,
        envelope: &v1::Signed,
        now: u64,
    ) -> Result<v1::JobSubmitted, v1::ErrorReply> {
        let verified = signed::verify::<v1::JobSpec>(envelope, None, MAX_SPEC_BYTES)
            .map_err(|e| error_reply(e.code(), e.to_string()))?;
        let spec = verified.message;
        spec::validate_spec(&spec, &self.peer).map_err(|e| e.to_error_reply())?;
        let id = envelope_id(envelope);
        let owner = verified.signer.to_bytes();
        self.store
            .write(|w| {
                if let Some(job) = w.get::<JobRecord>(JOBS, &id)? {
                    return Ok(Ok(v1::JobSubmitted {
                        job_id: id.to_vec(),
                        state: job.state.to_proto() as i32,
                    }));
                }
                // One job at a time trains a module: two would both publish its next version.
                if let Some((_, other)) = w.scan::<JobRecord>(JOBS, &[])?.into_iter().find(|(_, j)| {
                    j.module == spec.module
                        && matches!(j.state, JobState::Preparing | JobState::Running)
                }) {
                    return Ok(Err(error_reply(
                        v1::ErrorCode::Conflict,
                        format!(
                            "module {:?} is being trained by job {} ({}); submit again when it has finished",
                            spec.module,
                            hex(&other.id),
                            other.state.to_proto().as_str_name()
                        ),
                    )));
                }
                if let Some(module) =
                    w.get::<registry::ModuleRecord>(crate::store::MODULES, spec.module.as_bytes())?
                {
                    if module.owner != owner {
                        return Ok(Err(error_reply(
                            v1::ErrorCode::Unauthorized,
                            format!("module {:?} belongs to another owner", spec.module),
                        )));
                    }
                    if module.lora != spec.lora.clone().unwrap_or_default().encode_to_vec() {
                        return Ok(Err(error_reply(
                            v1::ErrorCode::Conflict,
                            format!("module {:?} has another LoRA config", spec.module),
                        )));
                    }
                }
                w.put(
                    JOBS,
                    &id,
                    &JobRecord {
                        id,
                        signed_spec: envelope.encode_to_vec(),
                        owner: owner.clone(),
                        module: spec.module.clone(),
                        created_at_ms: now,
                        state: JobState::Preparing,
                        message: String::new(),
                        prepared: None,
                        round: 0,
                        rounds_opened: 0,
                        round_deadline_ms: 0,
                        units: Vec::new(),
                        rounds_merged: 0,
                        tokens_trained: 0,
                        latest_version: 0,
                        momentum: None,
                        replayed_steps: 0,
                        judged_steps: 0,
                    },
                )?;
                info!(job = %hex(&id), module = %spec.module, "job accepted");
                Ok(Ok(v1::JobSubmitted {
                    job_id: id.to_vec(),
                    state: v1::JobState::Preparing as i32,
                }))
            })
            .map_err(|e: EngineError| reply(e))?
    }

    /// The blobs a preparing job needs in the blob store before [`Coordinator::prepare`] can
    /// run: its dataset, and its base unless it is named.
    pub fn needed_blobs(&self, job_id: &[u8; 32]) -> Result<Vec<ContentId>, EngineError> {
        let job = self.job(job_id)?;
        let spec = decode_spec(&job)?;
        let mut out = Vec::new();
        if let Some(v1::job_spec::Base::BaseId(id)) = &spec.base {
            out.push(content_id(id)?);
        }
        if let Some(v1::dataset_source::Source::Raw(raw)) =
            spec.dataset.as_ref().and_then(|d| d.source.as_ref())
            && let Some(blob) = &raw.blob
        {
            out.push(content_id(blob)?);
        }
        Ok(out
            .into_iter()
            .filter(|id| !self.blobs.contains(id))
            .collect())
    }

    /// Prepares job `job_id` (its blobs must be in the store): unpacks the base, cuts the
    /// dataset into shards, publishes the module's first version (or continues from its
    /// latest) and opens round 1. A job that cannot be prepared is marked failed with the
    /// reason.
    pub fn prepare(&self, job_id: &[u8; 32], now: u64) -> Result<(), EngineError> {
        match self.try_prepare(job_id, now) {
            Ok(()) => Ok(()),
            Err(e @ (EngineError::Store(_) | EngineError::Internal(_))) => Err(e),
            Err(e) => {
                warn!(job = %hex(job_id), error = %e, "job failed");
                self.store.write(|w| {
                    if let Some(mut job) = w.get::<JobRecord>(JOBS, job_id)? {
                        job.state = JobState::Failed;
                        job.message = e.to_string();
                        w.put(JOBS, job_id, &job)?;
                    }
                    Ok::<_, EngineError>(())
                })
            }
        }
    }

    /// Marks a preparing job failed with `reason` (for example: its blobs could not be
    /// fetched from anyone). A job past preparing is left alone.
    pub fn fail_preparing(&self, job_id: &[u8; 32], reason: &str) -> Result<(), EngineError> {
        self.store.write(|w| {
            if let Some(mut job) = w.get::<JobRecord>(JOBS, job_id)?
                && job.state == JobState::Preparing
            {
                warn!(job = %hex(job_id), %reason, "job failed");
                job.state = JobState::Failed;
                job.message = truncate(reason.to_owned(), 1024);
                w.put(JOBS, job_id, &job)?;
            }
            Ok::<_, EngineError>(())
        })
    }

    fn try_prepare(&self, job_id: &[u8; 32], now: u64) -> Result<(), EngineError> {
        let job = self.job(job_id)?;
        if job.state != JobState::Preparing {
            return Ok(());
        }
        let spec = decode_spec(&job)?;
        let (base, base_name) = match &spec.base {
            Some(v1::job_spec::Base::BaseName(name)) if name == "builtin" => {
                let dir = self.config.data_dir.join("builtin-base");
                std::fs::create_dir_all(&dir)
                    .map_err(|e| EngineError::Internal(format!("{}: {e}", dir.display())))?;
                swarmtune_trainer::builtin::base::write_to(&dir)?;
                (bundle::put_dir(&self.blobs, &dir)?, name.clone())
            }
            Some(v1::job_spec::Base::BaseName(name)) => {
                return Err(EngineError::Bundle(bundle::BundleError::Invalid {
                    id: ContentId::of(name.as_bytes()),
                    reason: format!("no base named {name:?} here; only `builtin`"),
                }));
            }
            Some(v1::job_spec::Base::BaseId(id)) => (content_id(id)?, String::new()),
            None => return Err(EngineError::Internal("the spec names no base".into())),
        };
        let base_dir = self.base_dir(&base)?;
        let model = CausalLm::load(&base_dir, &self.device)?;
        let lora_wire = spec.lora.clone().unwrap_or_default();
        spec::check_lora_fits(&lora_wire, model.config())
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        let (tokenizer, tokenizer_hash) =
            swarmtune_trainer::data::load_tokenizer_with_hash(base_dir.join("tokenizer.json"))
                .map_err(|e| EngineError::Internal(e.to_string()))?;
        let eos = model.config().eos_token_id();

        let (train_ids, eval_ids, seq_len) =
            match spec.dataset.as_ref().and_then(|d| d.source.as_ref()) {
                Some(v1::dataset_source::Source::Raw(raw)) => {
                    let blob = content_id(
                        raw.blob
                            .as_ref()
                            .ok_or_else(|| EngineError::Internal("no dataset blob".into()))?,
                    )?;
                    let examples = self.read_dataset(&blob, raw.format())?;
                    let plan = ShardPlan {
                        seq_len: raw.seq_len,
                        seqs_per_shard: raw.seqs_per_shard,
                        eval_fraction: raw.eval_fraction,
                        seed: raw.shard_seed,
                    };
                    let sharded = build_shards(
                        &examples,
                        &tokenizer,
                        tokenizer_hash,
                        eos,
                        eos.unwrap_or(0),
                        &plan,
                    )
                    .map_err(|e| EngineError::Internal(format!("the dataset: {e}")))?;
                    let mut train = Vec::new();
                    for shard in &sharded.train {
                        train.push(*self.blobs.put_bytes(&shard.encode())?.as_bytes());
                    }
                    let eval = vec![*self.blobs.put_bytes(&sharded.eval.encode())?.as_bytes()];
                    (train, eval, raw.seq_len)
                }
                Some(v1::dataset_source::Source::Prepared(p)) => {
                    let ids = |list: &[v1::ContentId]| -> Result<Vec<[u8; 32]>, EngineError> {
                        list.iter()
                            .map(|c| content_id(c).map(|c| *c.as_bytes()))
                            .collect()
                    };
                    let train = ids(&p.train_shards)?;
                    let first = self.shard(&train[0])?;
                    (train, ids(&p.eval_shards)?, first.seq_len)
                }
                None => return Err(EngineError::Internal("the spec has no dataset".into())),
            };
        let prepared = Prepared {
            base: *base.as_bytes(),
            base_name,
            train_shards: train_ids,
            eval_shards: eval_ids,
            seq_len,
        };
        // The module's first version is the fresh adapter (the base itself: B is zero), or
        // the job continues the module from its latest version.
        let existing = self.store.read(|r| registry::module(r, &spec.module))?;
        let lora = lora_config(&lora_wire);
        let sites = model.lora_sites(&lora);
        let mut job = job;
        job.prepared = Some(prepared.clone());
        let runtime = self.runtime_for(&job)?;
        let (first_version, first_manifest) = match existing {
            Some(module) => {
                if module.base != *base.as_bytes() {
                    return Err(EngineError::Internal(format!(
                        "module {:?} was trained on another base",
                        spec.module
                    )));
                }
                (module.latest, None)
            }
            None => {
                let adapter = Adapter::init(lora.clone(), &sites, seed_of(job_id));
                let adapter_id = self.put_tensors(&adapter.tensors)?;
                let metrics = self.evaluate(&runtime, &adapter.tensors)?;
                let manifest = v1::ModuleManifest {
                    protocol_version: swarmtune_protocol::PROTOCOL_VERSION,
                    module: spec.module.clone(),
                    version: 1,
                    parent_version: 0,
                    coordinator_peer_id: self.peer.to_bytes(),
                    job_id: job_id.to_vec(),
                    round: 0,
                    base: Some(base.to_proto()),
                    base_name: prepared.base_name.clone(),
                    adapter: Some(adapter_id.to_proto()),
                    adapter_bytes: self.blobs.size(&adapter_id)?,
                    lora: Some(lora_wire.clone()),
                    metrics: Some(metrics),
                    contributors: Vec::new(),
                    created_at_unix_ms: now,
                };
                (1, Some(manifest))
            }
        };
        self.store.write(|w| {
            let Some(mut job) = w.get::<JobRecord>(JOBS, job_id)? else {
                return Err(EngineError::Internal("the job vanished".into()));
            };
            if job.state != JobState::Preparing {
                return Ok(());
            }
            if let Some(manifest) = &first_manifest {
                let loss = manifest.metrics.as_ref().map_or(f64::INFINITY, |m| m.eval_loss);
                registry::publish(w, &self.keypair, manifest, &job.owner, loss, now)?;
            }
            job.prepared = Some(prepared.clone());
            job.latest_version = first_version;
            job.state = JobState::Running;
            leases::open_round(&mut job, &spec, now);
            w.put(JOBS, job_id, &job)?;
            info!(job = %hex(job_id), shards = prepared.train_shards.len(), "job running; round 1 open");
            Ok(())
        })
    }

    fn read_dataset(
        &self,
        blob: &ContentId,
        format: v1::DatasetFormat,
    ) -> Result<Vec<Example>, EngineError> {
        let ext = match format {
            v1::DatasetFormat::Jsonl => "jsonl",
            _ => "txt",
        };
        let dir = tempfile::tempdir().map_err(|e| EngineError::Internal(e.to_string()))?;
        let path = dir.path().join(format!("dataset.{ext}"));
        let mut reader = self.blobs.open_verified(blob)?;
        let mut file =
            std::fs::File::create(&path).map_err(|e| EngineError::Internal(e.to_string()))?;
        std::io::copy(&mut reader, &mut file)
            .map_err(|e| EngineError::Internal(format!("the dataset blob: {e}")))?;
        swarmtune_trainer::data::read_dataset(&path)
            .map_err(|e| EngineError::Internal(format!("the dataset: {e}")))
    }

    /// The base bundle `base` unpacked under the data dir.
    fn base_dir(&self, base: &ContentId) -> Result<PathBuf, EngineError> {
        let dir = self.config.data_dir.join("bases").join(base.to_string());
        bundle::write_dir(&self.blobs, base, &dir)?;
        Ok(dir)
    }

    fn shard(&self, id: &[u8; 32]) -> Result<Shard, EngineError> {
        let bytes = self.blobs.read(&ContentId::from_bytes(*id))?;
        Shard::decode(&bytes, &ShardLimits::default())
            .map_err(|e| EngineError::Internal(format!("shard {}: {e}", hex(id))))
    }

    fn put_tensors(&self, tensors: &NamedTensors) -> Result<ContentId, EngineError> {
        let meta = std::collections::BTreeMap::from([("format".to_owned(), "pt".to_owned())]);
        Ok(self.blobs.put_bytes(&safetensors_bytes(tensors, &meta))?)
    }

    fn tensors(&self, id: &ContentId) -> Result<NamedTensors, EngineError> {
        let bytes = self.blobs.read(id)?;
        Ok(safetensors_from_bytes(&bytes, &self.blobs.blob_path(id))?.0)
    }

    fn runtime_for(&self, job: &JobRecord) -> Result<Arc<Runtime>, EngineError> {
        if let Some(rt) = self
            .runtimes
            .lock()
            .ok()
            .and_then(|m| m.get(&job.id).cloned())
        {
            return Ok(rt);
        }
        let prepared = job
            .prepared
            .as_ref()
            .ok_or_else(|| EngineError::Internal("the job is not prepared".into()))?;
        let spec = decode_spec(job)?;
        let dir = self.base_dir(&ContentId::from_bytes(prepared.base))?;
        let model = CausalLm::load(&dir, &self.device)?.to_autodiff();
        let lora = lora_config(&spec.lora.clone().unwrap_or_default());
        let layout = Adapter::init(lora.clone(), &model.lora_sites(&lora), 0).tensors;
        let train = prepared
            .train_shards
            .iter()
            .map(|id| self.shard(id))
            .collect::<Result<_, _>>()?;
        let eval = prepared
            .eval_shards
            .iter()
            .map(|id| self.shard(id))
            .collect::<Result<_, _>>()?;
        let rt = Arc::new(Runtime {
            model,
            train,
            eval,
            lora,
            layout,
        });
        if let Ok(mut map) = self.runtimes.lock() {
            map.insert(job.id, rt.clone());
        }
        Ok(rt)
    }

    fn evaluate(
        &self,
        rt: &Runtime,
        params: &NamedTensors,
    ) -> Result<v1::EvalMetrics, EngineError> {
        let adapter = Adapter {
            config: rt.lora.clone(),
            tensors: params.clone(),
        };
        let lora = DeviceLora::new(
            &adapter,
            &rt.model.lora_sites(&rt.lora),
            &self.device,
            false,
            0,
        )?;
        let eval = eval_loss(
            &rt.model,
            ForwardOptions { lora: Some(&lora) },
            &rt.eval,
            self.config.eval_batch,
        )?;
        Ok(v1::EvalMetrics {
            eval_loss: eval.loss,
            perplexity: eval.perplexity,
            eval_tokens: eval.target_tokens,
            exact_match: 0.0,
            exact_match_examples: 0,
        })
    }

    // --------------------------------------------------------------------------------------
    // Leases

    /// A volunteer asks for work.
    pub fn request_lease(
        &self,
        peer: &PeerId,
        request: &v1::RequestLease,
        now: u64,
    ) -> Result<LeaseAnswer, v1::ErrorReply> {
        let capabilities = request.capabilities.clone().unwrap_or_default();
        let result = self.store.write(|w| {
            if w.get::<Reputation>(REPUTATIONS, &peer.to_bytes())?
                .is_some_and(|r| r.banned)
            {
                return Ok(Err(error_reply(
                    v1::ErrorCode::Banned,
                    "you are banned at this coordinator",
                )));
            }
            let mut jobs: Vec<JobRecord> = if request.job_id.is_empty() {
                w.scan::<JobRecord>(JOBS, &[])?
                    .into_iter()
                    .map(|(_, j)| j)
                    .filter(|j| j.state == JobState::Running)
                    .collect()
            } else {
                let Some(job) = w.get::<JobRecord>(JOBS, &request.job_id)? else {
                    return Ok(Err(error_reply(
                        v1::ErrorCode::NotFound,
                        "no such job here",
                    )));
                };
                vec![job]
            };
            if jobs.is_empty() {
                return Ok(Ok(LeaseAnswer::NoWork(v1::NoWork {
                    reason: v1::NoWorkReason::NoJobs as i32,
                    retry_after_ms: 10_000,
                    message: "no job is running here".into(),
                })));
            }
            // Fairness: the job with the fewest leases out goes first.
            jobs.sort_by_key(|j| (leases::active_leases(j), j.created_at_ms));
            let mut last = None;
            for mut job in jobs {
                leases::expire(w, &mut job, now)?;
                let spec = decode_spec(&job)?;
                let start = self.start_point(w, &job)?;
                let answer = leases::grant(
                    w,
                    &mut job,
                    &spec,
                    &start,
                    peer,
                    &capabilities,
                    &self.config.leases,
                    now,
                )?;
                w.put(JOBS, &job.id, &job)?;
                if matches!(answer, LeaseAnswer::Granted(_)) {
                    return Ok(Ok(answer));
                }
                last = Some(answer);
            }
            Ok(Ok(
                last.unwrap_or(LeaseAnswer::NoWork(v1::NoWork::default()))
            ))
        });
        match result {
            Ok(answer) => answer,
            Err(e) => Err(lease_reply(e)),
        }
    }

    fn start_point(
        &self,
        w: &crate::store::Write<'_>,
        job: &JobRecord,
    ) -> Result<StartPoint, EngineError> {
        let record = w
            .get::<registry::VersionRecord>(
                crate::store::VERSIONS,
                &crate::store::version_key(&job.module, job.latest_version),
            )?
            .ok_or_else(|| {
                EngineError::Internal(format!(
                    "version {} of {} is missing",
                    job.latest_version, job.module
                ))
            })?;
        Ok(StartPoint {
            version: job.latest_version,
            adapter: ContentId::from_bytes(record.adapter),
        })
    }

    /// A heartbeat.
    pub fn renew_lease(
        &self,
        peer: &PeerId,
        renew: &v1::RenewLease,
        now: u64,
    ) -> Result<v1::LeaseRenewed, v1::ErrorReply> {
        self.store
            .write(|w| {
                let job = lease_job(w, renew.lease_id)?;
                let spec = decode_spec(&job).map_err(|e| LeaseError::Refused(reply(e)))?;
                leases::renew(w, &job, &spec, renew, peer, &self.config.leases, now)
            })
            .map_err(lease_error_reply)
    }

    /// A lease given back.
    pub fn release_lease(
        &self,
        peer: &PeerId,
        release: &v1::ReleaseLease,
    ) -> Result<v1::LeaseReleased, v1::ErrorReply> {
        self.store
            .write(|w| {
                let mut job = lease_job(w, release.lease_id)?;
                let out = leases::release(w, &mut job, release.lease_id, peer)?;
                w.put(JOBS, &job.id, &job)?;
                Ok::<_, LeaseError>(out)
            })
            .map_err(lease_error_reply)
    }

    // --------------------------------------------------------------------------------------
    // Deltas

    /// A volunteer delivers a signed delta envelope. Answered with a receipt (the delta
    /// blob must then be fetched from `peer` and [`Coordinator::verify`] called), or with the
    /// final verdict when it is refused at once.
    pub fn submit_delta(
        &self,
        peer: &PeerId,
        envelope: &v1::Signed,
        now: u64,
    ) -> Result<v1::delta_response::Body, v1::ErrorReply> {
        let verified =
            match signed::verify::<v1::DeltaEnvelope>(envelope, Some(peer), MAX_ENVELOPE_BYTES) {
                Ok(verified) => verified,
                Err(e) => {
                    if e.code() == v1::ErrorCode::BadSignature {
                        // The transport authenticated the sender: an envelope it did not sign
                        // with its own key is a forgery (or a broken node) and counts against
                        // it like a malformed delta.
                        self.penalize_forgery(peer, &e.to_string(), now)
                            .map_err(reply)?;
                    }
                    return Err(error_reply(e.code(), e.to_string()));
                }
            };
        let env = verified.message;
        let bytes = envelope.encode_to_vec();
        let result = self.store.write(|w| {
            let Some(mut lease) = w.get::<LeaseRecord>(LEASES, &u64_key(env.lease_id))? else {
                return Ok(Err(error_reply(
                    v1::ErrorCode::NotFound,
                    format!("no lease {}", env.lease_id),
                )));
            };
            if lease.holder != peer.to_bytes() {
                return Ok(Err(error_reply(
                    v1::ErrorCode::Unauthorized,
                    format!("lease {} is not yours", env.lease_id),
                )));
            }
            if let Some(existing) = w.get::<DeltaRecord>(DELTAS, &u64_key(env.lease_id))? {
                if existing.envelope != bytes {
                    return Ok(Err(error_reply(
                        v1::ErrorCode::Conflict,
                        "this lease already has another delta",
                    )));
                }
                return Ok(Ok(match existing.verdict {
                    Some(v) => v1::delta_response::Body::Verdict(decode_verdict(&v)?),
                    None => v1::delta_response::Body::DeltaReceipt(v1::DeltaReceipt {
                        lease_id: env.lease_id,
                        verdict_expected_by_unix_ms: 0,
                    }),
                }));
            }
            let mut job = w
                .get::<JobRecord>(JOBS, &lease.job)?
                .ok_or_else(|| EngineError::Internal("the lease's job vanished".into()))?;
            let lease_msg = v1::Lease::decode(lease.lease.as_slice())
                .map_err(|e| EngineError::Internal(e.to_string()))?;
            let seq_len = job.prepared.as_ref().map_or(0, |p| p.seq_len);
            let delta_id = env.delta.as_ref().and_then(|c| ContentId::try_from(c).ok());
            // Late, or not for this lease: the verdict at once.
            let refusal = match leases::check_usable(&lease, &job, now) {
                Err(LeaseError::Refused(r)) => Some(Rejection::new(
                    if r.code() == v1::ErrorCode::RoundClosed {
                        v1::RejectReason::RoundClosed
                    } else {
                        v1::RejectReason::Late
                    },
                    r.message,
                )),
                Err(LeaseError::Store(e)) => return Err(e.into()),
                Ok(()) => verify::check_envelope(&env, &lease_msg, seq_len)
                    .err()
                    .or_else(|| {
                        delta_id.is_none().then(|| {
                            Rejection::new(
                                v1::RejectReason::MalformedDelta,
                                "the envelope names no delta blob",
                            )
                        })
                    }),
            };
            let record = DeltaRecord {
                envelope: bytes.clone(),
                lease_id: env.lease_id,
                job: job.id,
                round: lease.round,
                peer: peer.to_bytes(),
                delta: delta_id.map_or([0; 32], |c| *c.as_bytes()),
                tokens: env.tokens,
                target_tokens: env.target_tokens,
                status: DeltaStatus::Pending,
                verdict: None,
            };
            if let Some(rejection) = refusal {
                // The verdict is final: the lease is used up. A live lease counts as delivered
                // (its unit goes back to the pool with the rejection), a lapsed one as expired.
                if lease.state == LeaseState::Active {
                    lease.state = if now >= lease.expires_at_ms {
                        LeaseState::Expired
                    } else {
                        LeaseState::Delivered
                    };
                    w.put(LEASES, &u64_key(env.lease_id), &lease)?;
                }
                let verdict = self.decide(w, &mut job, record, Err(rejection), "", now)?;
                w.put(JOBS, &job.id, &job)?;
                return Ok(Ok(v1::delta_response::Body::Verdict(verdict)));
            }
            lease.state = LeaseState::Delivered;
            w.put(LEASES, &u64_key(env.lease_id), &lease)?;
            if let Some(unit) = job.units.get_mut(lease.unit as usize) {
                unit.delivered = true;
            }
            w.put(DELTAS, &u64_key(env.lease_id), &record)?;
            w.put(JOBS, &job.id, &job)?;
            Ok(Ok(v1::delta_response::Body::DeltaReceipt(
                v1::DeltaReceipt {
                    lease_id: env.lease_id,
                    verdict_expected_by_unix_ms: job.round_deadline_ms,
                },
            )))
        });
        match result {
            Ok(answer) => answer,
            Err(e) => Err(reply(e)),
        }
    }

    /// Counts an envelope `peer` sent with a signature that is not its own against it, as a
    /// penalized rejection; a ban that follows drops its open deltas as any ban does.
    fn penalize_forgery(&self, peer: &PeerId, why: &str, now: u64) -> Result<(), EngineError> {
        let key = peer.to_bytes();
        self.store.write(|w| {
            let mut reputation: Reputation = w.get(REPUTATIONS, &key)?.unwrap_or_default();
            let was_banned = reputation.banned;
            let banned = reputation.apply(Verdict::Rejected {
                reason: v1::RejectReason::MalformedDelta,
                equal_provenance: false,
            });
            w.put(REPUTATIONS, &key, &reputation)?;
            if !banned || was_banned {
                return Ok::<(), EngineError>(());
            }
            warn!(peer = %peer, "volunteer banned for forged envelopes; its open deltas are dropped");
            let deltas: Vec<(Vec<u8>, DeltaRecord)> = w.scan(DELTAS, &[])?;
            let mut jobs: Vec<[u8; 32]> = deltas
                .iter()
                .filter(|(_, d)| d.peer == key && d.status != DeltaStatus::Rejected)
                .map(|(_, d)| d.job)
                .collect();
            jobs.sort_unstable();
            jobs.dedup();
            for id in jobs {
                let Some(mut job) = w.get::<JobRecord>(JOBS, &id)? else {
                    continue;
                };
                let cause = v1::VerificationVerdict {
                    job_id: id.to_vec(),
                    round: job.round,
                    peer_id: key.clone(),
                    message: truncate(format!("dropped: the volunteer was banned for forged envelopes ({why})"), 1024),
                    decided_at_unix_ms: now,
                    ..Default::default()
                };
                drop_open_deltas(w, &mut job, &key, &cause, reputation.score)?;
                w.put(JOBS, &id, &job)?;
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Deltas waiting for their blob and cheap checks: (lease id, volunteer, delta blob).
    pub fn pending_deltas(&self) -> Result<Vec<(u64, PeerId, ContentId)>, EngineError> {
        let all: Vec<(Vec<u8>, DeltaRecord)> = self.store.read(|r| r.scan(DELTAS, &[]))?;
        Ok(all
            .into_iter()
            .filter(|(_, d)| d.status == DeltaStatus::Pending)
            .filter_map(|(_, d)| {
                Some((
                    d.lease_id,
                    PeerId::from_bytes(&d.peer).ok()?,
                    ContentId::from_bytes(d.delta),
                ))
            })
            .collect())
    }

    /// Runs the cheap checks on a delivered delta whose blob is now in the store (or records
    /// that it could not be fetched, with `fetched = false`), and decides: a verdict, a
    /// challenge, or a wait for its redundant twin.
    pub fn verify(&self, lease_id: u64, fetched: bool, now: u64) -> Result<Next, EngineError> {
        let (record, lease, job, env) = self.delta_context(lease_id)?;
        // Judged already (dropped with a banned volunteer, or a second call).
        if let Some(v) = &record.verdict {
            return Ok(Next::Verdict(Box::new(decode_verdict(v)?)));
        }
        let rt = self.runtime_for(&job)?;
        let spec = decode_spec(&job)?;
        let policy = spec.verification.unwrap_or_default();
        let checked = if fetched {
            self.cheap_checks(&rt, &record, &lease, &env, &policy)
        } else {
            Err(Rejection::new(
                v1::RejectReason::BlobUnavailable,
                "the delta blob could not be fetched from you",
            ))
        };
        if let Err(rejection) = checked {
            return self.finish(lease_id, Err(rejection), 0, now);
        }
        let reputation: Reputation = self
            .store
            .read(|r| r.get(REPUTATIONS, &record.peer))?
            .unwrap_or_default();
        let mut rng = rand::rngs::StdRng::from_os_rng();
        let plan = verify::plan_challenge(&env.commitments, &policy, &reputation, &mut rng);
        if plan.is_empty() {
            return self.finish(lease_id, Ok(()), 0, now);
        }
        let challenge = self.store.write(|w| {
            let mut d: DeltaRecord = w
                .get(DELTAS, &u64_key(lease_id))?
                .ok_or_else(|| EngineError::Internal("delta vanished".into()))?;
            let challenge = challenge_status(&mut d, &plan, false, now);
            w.put(DELTAS, &u64_key(lease_id), &d)?;
            Ok::<_, EngineError>(challenge)
        })?;
        Ok(Next::Challenge(challenge))
    }

    fn cheap_checks(
        &self,
        rt: &Runtime,
        record: &DeltaRecord,
        lease: &v1::Lease,
        env: &v1::DeltaEnvelope,
        policy: &v1::VerificationPolicy,
    ) -> Result<(), Rejection> {
        let internal =
            |e: &dyn std::fmt::Display| Rejection::new(v1::RejectReason::Internal, e.to_string());
        let bytes = self
            .blobs
            .read(&ContentId::from_bytes(record.delta))
            .map_err(|e| internal(&e))?;
        let delta = verify::decode_delta(&bytes, env, lease, &rt.layout)?;
        verify::check_norm(&delta, policy)?;
        let start = self.lease_start(lease).map_err(|e| internal(&e))?;
        verify::check_start_commitment(
            env,
            &LoraState::start(&Adapter {
                config: rt.lora.clone(),
                tensors: start.clone(),
            }),
        )?;
        let trainer = LocalTrainer::new(&rt.model, rt.lora.clone(), self.provenance.clone())
            .map_err(|e| internal(&e))?;
        let shards = lease_shards(
            rt,
            lease,
            &self.prepared_of(lease).map_err(|e| internal(&e))?,
        );
        let data =
            LeaseData::new(&shards, rt.model.config().vocab_size()).map_err(|e| internal(&e))?;
        let train_spec = verify::train_spec(lease)?;
        let (probe, mask) = data.batch(train_spec.seed, 0, train_spec.batch_size);
        verify::check_probe_loss(
            &trainer,
            &start,
            &delta,
            (&probe, &mask),
            policy.probe_loss_tolerance,
        )?;
        Ok(())
    }

    /// The volunteer's answer to a challenge: state blobs (already fetched into the store).
    /// Decides: a verdict, a tie-break challenge (when a redundant twin disagrees), or a wait
    /// for the twin's delta.
    pub fn answer_challenge(
        &self,
        lease_id: u64,
        answer: &v1::SegmentStates,
        now: u64,
    ) -> Result<Next, EngineError> {
        let (record, lease, job, env) = self.delta_context(lease_id)?;
        // Judged while the volunteer was answering (its ban dropped the delta, or the answer
        // came late): that verdict stands.
        if let Some(v) = &record.verdict {
            return Ok(Next::Verdict(Box::new(decode_verdict(v)?)));
        }
        let DeltaStatus::Challenged {
            segments, replayed, ..
        } = &record.status
        else {
            return Err(EngineError::Internal(format!(
                "lease {lease_id} was not challenged"
            )));
        };
        let asked: Vec<v1::Segment> = segments
            .iter()
            .filter_map(|s| v1::Segment::decode(s.as_slice()).ok())
            .collect();
        let rt = self.runtime_for(&job)?;
        let spec = decode_spec(&job)?;
        let policy = spec.verification.unwrap_or_default();
        let outcome = (|| -> Result<u64, Rejection> {
            let internal = |e: &dyn std::fmt::Display| {
                Rejection::new(v1::RejectReason::Internal, e.to_string())
            };
            if answer.states.len() != asked.len() {
                return Err(Rejection::new(
                    v1::RejectReason::ChallengeUnanswered,
                    format!(
                        "{} segments asked, {} answered",
                        asked.len(),
                        answer.states.len()
                    ),
                ));
            }
            let trainer = LocalTrainer::new(&rt.model, rt.lora.clone(), self.provenance.clone())
                .map_err(|e| internal(&e))?;
            let shards = lease_shards(
                &rt,
                &lease,
                &self.prepared_of(&lease).map_err(|e| internal(&e))?,
            );
            let data = LeaseData::new(&shards, rt.model.config().vocab_size())
                .map_err(|e| internal(&e))?;
            let train_spec = verify::train_spec(&lease)?;
            // The delta the chain's final state must explain: it passed the cheap checks, so
            // it decodes.
            let bytes = self
                .blobs
                .read(&ContentId::from_bytes(record.delta))
                .map_err(|e| internal(&e))?;
            let delta =
                verify::decode_delta(&bytes, &env, &lease, &rt.layout).map_err(|r| internal(&r))?;
            let start = self.lease_start(&lease).map_err(|e| internal(&e))?;
            let delivered = verify::Delivered {
                start: &start,
                delta: &delta,
                encoding: verify::lease_encoding(&lease)?,
            };
            let replay = verify::Replay {
                trainer: &trainer,
                data: &data,
                spec: &train_spec,
                layout: &rt.layout,
                provenance: &self.provenance,
                delivered,
            };
            let mut replayed_steps = 0;
            for (i, (segment, state)) in asked.iter().zip(&answer.states).enumerate() {
                let blob = |c: Option<&v1::ContentId>| -> Result<Option<Vec<u8>>, Rejection> {
                    match c.and_then(|c| ContentId::try_from(c).ok()) {
                        Some(id) => self.blobs.read(&id).map(Some).map_err(|e| {
                            Rejection::new(
                                v1::RejectReason::ChallengeUnanswered,
                                format!("a state blob: {e}"),
                            )
                        }),
                        None => Ok(None),
                    }
                };
                let start = blob(state.start_state.as_ref())?.ok_or_else(|| {
                    Rejection::new(v1::RejectReason::ChallengeUnanswered, "no start state")
                })?;
                let end = blob(state.end_state.as_ref())?;
                // A challenge stored before replay flags existed replays every segment.
                let replays = replayed.get(i).copied().unwrap_or(true);
                verify::check_segment(
                    &replay,
                    &env,
                    &policy,
                    segment,
                    replays,
                    &verify::SegmentAnswer {
                        state,
                        start_state: &start,
                        end_state: end.as_deref(),
                    },
                )?;
                if replays {
                    replayed_steps += segment.end_step.saturating_sub(segment.start_step);
                }
            }
            Ok(replayed_steps)
        })();
        match outcome {
            Ok(steps) => self.finish(lease_id, Ok(()), steps, now),
            Err(r) => self.finish(lease_id, Err(r), 0, now),
        }
    }

    /// The challenged volunteer did not answer in time.
    pub fn challenge_unanswered(
        &self,
        lease_id: u64,
        why: &str,
        now: u64,
    ) -> Result<v1::VerificationVerdict, EngineError> {
        let next = self.finish(
            lease_id,
            Err(Rejection::new(
                v1::RejectReason::ChallengeUnanswered,
                why.to_owned(),
            )),
            0,
            now,
        )?;
        match next {
            Next::Verdict(v) => Ok(*v),
            other => Err(EngineError::Internal(format!(
                "lease {lease_id}: a rejection led to {other:?}"
            ))),
        }
    }

    /// The verdict reached for the delta of `lease_id`, if any (for a delta that was
    /// [`Next::AwaitingTwin`]).
    pub fn verdict(&self, lease_id: u64) -> Result<Option<v1::VerificationVerdict>, EngineError> {
        let record: Option<DeltaRecord> = self.store.read(|r| r.get(DELTAS, &u64_key(lease_id)))?;
        record
            .and_then(|d| d.verdict)
            .map(|v| decode_verdict(&v))
            .transpose()
    }

    /// Deltas that passed their checks and wait for their redundant twin: (lease, volunteer).
    pub fn awaiting_twin(&self) -> Result<Vec<(u64, PeerId)>, EngineError> {
        let all: Vec<(Vec<u8>, DeltaRecord)> = self.store.read(|r| r.scan(DELTAS, &[]))?;
        Ok(all
            .into_iter()
            .filter(|(_, d)| matches!(d.status, DeltaStatus::AwaitingTwin { .. }))
            .filter_map(|(_, d)| Some((d.lease_id, PeerId::from_bytes(&d.peer).ok()?)))
            .collect())
    }

    /// Records the result of a delta's checks (`replayed` optimizer steps of replay spent on
    /// them) and decides what follows: a rejection is final; a delta that passed is accepted,
    /// or, when its work was leased twice, compared with its twin's delta first.
    fn finish(
        &self,
        lease_id: u64,
        result: Result<(), Rejection>,
        replayed: u64,
        now: u64,
    ) -> Result<Next, EngineError> {
        let (_, _, job, _) = self.delta_context(lease_id)?;
        // What a twin comparison needs, loaded outside the transaction.
        let rt = self.runtime_for(&job)?;
        let policy = decode_spec(&job)?.verification.unwrap_or_default();
        self.store.write(|w| {
            let record: DeltaRecord = w
                .get(DELTAS, &u64_key(lease_id))?
                .ok_or_else(|| EngineError::Internal("delta vanished".into()))?;
            if let Some(v) = &record.verdict {
                return Ok(Next::Verdict(Box::new(decode_verdict(v)?)));
            }
            let mut job: JobRecord = w
                .get(JOBS, &record.job)?
                .ok_or_else(|| EngineError::Internal("job vanished".into()))?;
            job.replayed_steps += replayed;
            let tie_break = matches!(
                record.status,
                DeltaStatus::Challenged {
                    tie_break: true,
                    ..
                }
            );
            let next = match result {
                Err(rejection) => {
                    let twin = self.twin(w, &job, &record)?;
                    let verdict = self.decide(w, &mut job, record, Err(rejection), "", now)?;
                    // A twin that passed its tie-break against this delta is right.
                    if let Twin::Delta(twin) = twin
                        && twin.status == (DeltaStatus::AwaitingTwin { tie_break: true })
                    {
                        let note = format!(
                            "its redundant twin (lease {}) disagreed and failed the tie-break",
                            verdict.lease_id
                        );
                        self.decide(w, &mut job, *twin, Ok(()), &note, now)?;
                    }
                    Next::Verdict(Box::new(verdict))
                }
                Ok(()) => self.passed(w, &mut job, record, tie_break, &rt, &policy, now)?,
            };
            w.put(JOBS, &job.id, &job)?;
            Ok(next)
        })
    }

    /// A delta that passed its checks (with `tie_break`: the tie-break against its twin):
    /// accepted, unless its work was leased twice and the twin's delta is still to be
    /// compared with, or disagrees with it.
    #[allow(clippy::too_many_arguments)]
    fn passed(
        &self,
        w: &crate::store::Write<'_>,
        job: &mut JobRecord,
        mut record: DeltaRecord,
        tie_break: bool,
        rt: &Runtime,
        policy: &v1::VerificationPolicy,
        now: u64,
    ) -> Result<Next, EngineError> {
        let accept = |job: &mut JobRecord, record: DeltaRecord, note: &str| {
            self.decide(w, job, record, Ok(()), note, now)
                .map(|v| Next::Verdict(Box::new(v)))
        };
        let banned = w
            .get::<Reputation>(REPUTATIONS, &record.peer)?
            .is_some_and(|r| r.banned);
        if banned {
            return accept(job, record, "");
        }
        let wait = |mut record: DeltaRecord| -> Result<Next, EngineError> {
            record.status = DeltaStatus::AwaitingTwin { tie_break };
            w.put(DELTAS, &u64_key(record.lease_id), &record)?;
            Ok(Next::AwaitingTwin)
        };
        let twin = match self.twin(w, job, &record)? {
            Twin::None => return accept(job, record, ""),
            // After a tie-break: the twin's delta failed its own (and its unit went back to
            // the pool), so nothing disagrees with this one any more.
            Twin::Missing if tie_break => {
                return accept(
                    job,
                    record,
                    "its redundant twin disagreed with it and failed the tie-break",
                );
            }
            Twin::Missing => return wait(record),
            Twin::Delta(twin) => *twin,
        };
        let twin_tie_break = match twin.status {
            DeltaStatus::AwaitingTwin { tie_break } => tie_break,
            // The twin's tie-break is under way.
            DeltaStatus::Challenged {
                tie_break: true, ..
            } => return wait(record),
            // A new delta for the other unit, whose earlier delta lost the tie-break.
            DeltaStatus::Pending | DeltaStatus::Challenged { .. } if tie_break => {
                return accept(job, record, "");
            }
            // Its own checks are under way.
            DeltaStatus::Pending | DeltaStatus::Challenged { .. } => return wait(record),
            // Judged already, without this delta: this one is judged alone.
            DeltaStatus::Accepted | DeltaStatus::Rejected => return accept(job, record, ""),
        };
        match (tie_break, twin_tie_break) {
            (true, true) => {
                // Both passed the tie-break (on different provenances two different results
                // can each pass within tolerance): neither is shown wrong, so both are kept,
                // and the verdicts and the log say they are suspicious.
                let note = |other: u64| {
                    format!(
                        "suspicious: its redundant twin (lease {other}) disagreed with it and both passed the tie-break"
                    )
                };
                warn!(job = %hex(&job.id), lease = record.lease_id, twin = twin.lease_id, "redundant deltas disagree and both passed the tie-break");
                let twin_note = note(record.lease_id);
                let own_note = note(twin.lease_id);
                accept(job, twin, &twin_note)?;
                return accept(job, record, &own_note);
            }
            // Not a pair of this dispute (a delta of a unit given out again): judged alone;
            // the waiting one is judged when the round closes.
            (true, false) | (false, true) => return accept(job, record, ""),
            (false, false) => {}
        }

        // Both passed their own checks: compare them.
        let envelope = decode_envelope(&record.envelope)?;
        let twin_envelope = decode_envelope(&twin.envelope)?;
        let delta = self.decoded_delta(w, rt, &record, &envelope)?;
        let twin_delta = self.decoded_delta(w, rt, &twin, &twin_envelope)?;
        match verify::compare_twins((&envelope, &delta), (&twin_envelope, &twin_delta), policy) {
            verify::TwinComparison::Agree => {
                let note = |other: u64| format!("agrees with its redundant twin (lease {other})");
                let twin_note = note(record.lease_id);
                let own_note = note(twin.lease_id);
                accept(job, twin, &twin_note)?;
                accept(job, record, &own_note)
            }
            verify::TwinComparison::Disagree { divergence, why } => {
                warn!(job = %hex(&job.id), lease = record.lease_id, twin = twin.lease_id, %why, "redundant deltas disagree; tie-break");
                // Both are challenged again; whichever fails is rejected, the other accepted.
                let mut rng = rand::rngs::StdRng::from_os_rng();
                let mut twin = twin;
                let plan = verify::plan_tie_break(
                    &twin_envelope.commitments,
                    divergence,
                    policy,
                    &mut rng,
                );
                challenge_status(&mut twin, &plan, true, now);
                w.put(DELTAS, &u64_key(twin.lease_id), &twin)?;
                let plan =
                    verify::plan_tie_break(&envelope.commitments, divergence, policy, &mut rng);
                let challenge = challenge_status(&mut record, &plan, true, now);
                w.put(DELTAS, &u64_key(record.lease_id), &record)?;
                Ok(Next::Challenge(challenge))
            }
        }
    }

    /// The delta of the unit that repeats `record`'s work in its (open) round.
    fn twin(
        &self,
        w: &crate::store::Write<'_>,
        job: &JobRecord,
        record: &DeltaRecord,
    ) -> Result<Twin, EngineError> {
        if record.round != job.round || job.state != JobState::Running {
            return Ok(Twin::None);
        }
        let Some(lease) = w.get::<LeaseRecord>(LEASES, &u64_key(record.lease_id))? else {
            return Ok(Twin::None);
        };
        let Some(twin_unit) = leases::twin_of(&job.units, lease.unit as usize) else {
            return Ok(Twin::None);
        };
        let twin_lease = job.units[twin_unit].lease;
        Ok(
            match twin_lease.map(|id| w.get::<DeltaRecord>(DELTAS, &u64_key(id))) {
                Some(found) => found?.map_or(Twin::Missing, |d| Twin::Delta(Box::new(d))),
                None => Twin::Missing,
            },
        )
    }

    /// A delta blob that passed its checks, decoded.
    fn decoded_delta(
        &self,
        w: &crate::store::Write<'_>,
        rt: &Runtime,
        record: &DeltaRecord,
        env: &v1::DeltaEnvelope,
    ) -> Result<NamedTensors, EngineError> {
        let lease: LeaseRecord = w
            .get(LEASES, &u64_key(record.lease_id))?
            .ok_or_else(|| EngineError::Internal("lease vanished".into()))?;
        let lease = v1::Lease::decode(lease.lease.as_slice())
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        let bytes = self.blobs.read(&ContentId::from_bytes(record.delta))?;
        verify::decode_delta(&bytes, env, &lease, &rt.layout)
            .map_err(|r| EngineError::Internal(format!("lease {}: {r}", record.lease_id)))
    }

    /// Records a verdict in the transaction `w`: the delta's status, the volunteer's
    /// reputation (a ban drops its other deltas of the open round), the job's verification
    /// accounting, and a rejected delta's unit goes back to the pool. `note` is the message
    /// of an accepted verdict.
    fn decide(
        &self,
        w: &crate::store::Write<'_>,
        job: &mut JobRecord,
        mut record: DeltaRecord,
        result: Result<(), Rejection>,
        note: &str,
        now: u64,
    ) -> Result<v1::VerificationVerdict, EngineError> {
        let env = decode_envelope(&record.envelope)?;
        let equal = verify::same_provenance(&env, &self.provenance);
        let mut reputation: Reputation = w.get(REPUTATIONS, &record.peer)?.unwrap_or_default();
        let was_banned = reputation.banned;
        // A banned volunteer's deltas are dropped, also one judged after the ban (delivered
        // before it, or verified while it happened): it must not come back as accepted.
        let result = match result {
            Ok(()) if was_banned => Err(Rejection::new(
                v1::RejectReason::PeerBanned,
                "the volunteer is banned at this coordinator; its deltas are dropped",
            )),
            other => other,
        };
        let (outcome, reason, message) = match &result {
            Ok(()) => (
                v1::VerdictOutcome::Accepted,
                v1::RejectReason::Unspecified,
                note.to_owned(),
            ),
            Err(r) => (v1::VerdictOutcome::Rejected, r.reason, r.message.clone()),
        };
        let banned = reputation.apply(match &result {
            Ok(()) => Verdict::Accepted,
            Err(r) => Verdict::Rejected {
                reason: r.reason,
                equal_provenance: equal,
            },
        });
        w.put(REPUTATIONS, &record.peer, &reputation)?;
        job.judged_steps += env.steps;
        let verdict = v1::VerificationVerdict {
            job_id: record.job.to_vec(),
            round: record.round,
            lease_id: record.lease_id,
            delta: env.delta.clone(),
            peer_id: record.peer.clone(),
            outcome: outcome as i32,
            reason: reason as i32,
            message: truncate(message, 1024),
            segments_checked: 0,
            reputation_after: reputation.score,
            banned,
            decided_at_unix_ms: now,
        };
        record.status = if result.is_ok() {
            DeltaStatus::Accepted
        } else {
            DeltaStatus::Rejected
        };
        record.verdict = Some(verdict.encode_to_vec());
        if result.is_err() && record.round == job.round {
            // The work was not done (or not believably): someone else redoes it.
            if let Some(lease) = w.get::<LeaseRecord>(LEASES, &u64_key(record.lease_id))?
                && let Some(unit) = job.units.get_mut(lease.unit as usize)
                && unit.lease == Some(record.lease_id)
            {
                unit.lease = None;
                unit.delivered = false;
            }
        }
        w.put(DELTAS, &u64_key(record.lease_id), &record)?;
        if banned && !was_banned {
            warn!(peer = %hex(&record.peer), reason = ?reason, "volunteer banned; its open deltas are dropped");
            drop_open_deltas(w, job, &record.peer, &verdict, reputation.score)?;
        }
        Ok(verdict)
    }

    fn delta_context(
        &self,
        lease_id: u64,
    ) -> Result<(DeltaRecord, v1::Lease, JobRecord, v1::DeltaEnvelope), EngineError> {
        self.store.read(|r| {
            let record: DeltaRecord = r
                .get(DELTAS, &u64_key(lease_id))?
                .ok_or_else(|| EngineError::Internal(format!("no delta for lease {lease_id}")))?;
            let lease: LeaseRecord = r
                .get(LEASES, &u64_key(lease_id))?
                .ok_or_else(|| EngineError::Internal(format!("no lease {lease_id}")))?;
            let job: JobRecord = r
                .get(JOBS, &record.job)?
                .ok_or_else(|| EngineError::Internal("job vanished".into()))?;
            let lease = v1::Lease::decode(lease.lease.as_slice())
                .map_err(|e| EngineError::Internal(e.to_string()))?;
            let env = decode_envelope(&record.envelope)?;
            Ok((record, lease, job, env))
        })
    }

    fn lease_start(&self, lease: &v1::Lease) -> Result<NamedTensors, EngineError> {
        let id = lease
            .start_adapter
            .as_ref()
            .ok_or_else(|| EngineError::Internal("lease without start adapter".into()))?;
        self.tensors(&content_id(id)?)
    }

    fn prepared_of(&self, lease: &v1::Lease) -> Result<Prepared, EngineError> {
        let job: JobRecord = self.job(
            lease
                .job_id
                .as_slice()
                .try_into()
                .map_err(|_| EngineError::Internal("bad job id".into()))?,
        )?;
        job.prepared
            .ok_or_else(|| EngineError::Internal("the job is not prepared".into()))
    }

    // --------------------------------------------------------------------------------------
    // Rounds

    /// Periodic work at `now`: lapsed leases go back to the pool, and rounds that reached
    /// their quorum (or their deadline) are merged. Returns the jobs whose round closed. A job
    /// that fails is logged and left for the next tick; the others go on.
    pub fn tick(&self, now: u64) -> Result<Vec<[u8; 32]>, EngineError> {
        let jobs: Vec<(Vec<u8>, JobRecord)> = self.store.read(|r| r.scan(JOBS, &[]))?;
        let mut closed = Vec::new();
        for (_, job) in jobs
            .into_iter()
            .filter(|(_, j)| j.state == JobState::Running)
        {
            match self.tick_job(&job, now) {
                Ok(true) => closed.push(job.id),
                Ok(false) => {}
                Err(e) => {
                    warn!(job = %hex(&job.id), module = %job.module, round = job.round, error = %e, "tick failed for this job");
                }
            }
        }
        Ok(closed)
    }

    /// [`Coordinator::tick`] for one running job; true when its round closed.
    fn tick_job(&self, job: &JobRecord, now: u64) -> Result<bool, EngineError> {
        self.store.write(|w| {
            let Some(mut job) = w.get::<JobRecord>(JOBS, &job.id)? else {
                return Ok::<_, EngineError>(());
            };
            if !leases::expire(w, &mut job, now)?.is_empty() {
                w.put(JOBS, &job.id, &job)?;
            }
            Ok(())
        })?;
        let spec = decode_spec(job)?;
        let deltas = self.round_deltas(job)?;
        // A delta waiting for its redundant twin has passed its checks: it counts, and is
        // accepted alone if the twin's delta is not in when the round closes.
        let accepted = deltas
            .iter()
            .filter(|d| {
                matches!(
                    d.status,
                    DeltaStatus::Accepted | DeltaStatus::AwaitingTwin { .. }
                )
            })
            .count();
        let undecided = deltas.iter().any(|d| {
            matches!(
                d.status,
                DeltaStatus::Pending | DeltaStatus::Challenged { .. }
            )
        });
        let quorum = accepted >= spec.quorum as usize && !undecided;
        if quorum || now >= job.round_deadline_ms {
            self.close_round(&job.id, job.round, now)?;
            return Ok(true);
        }
        Ok(false)
    }

    fn round_deltas(&self, job: &JobRecord) -> Result<Vec<DeltaRecord>, EngineError> {
        let all: Vec<(Vec<u8>, DeltaRecord)> = self.store.read(|r| r.scan(DELTAS, &[]))?;
        Ok(all
            .into_iter()
            .map(|(_, d)| d)
            .filter(|d| d.job == job.id && d.round == job.round)
            .collect())
    }

    /// Merges (or abandons) the open round `round` of `job_id` and opens the next one, or
    /// completes the job when its budget is spent.
    pub fn close_round(&self, job_id: &[u8; 32], round: u64, now: u64) -> Result<(), EngineError> {
        let job = self.job(job_id)?;
        if job.state != JobState::Running || job.round != round {
            return Ok(());
        }
        let spec = decode_spec(&job)?;
        // Deltas still waiting for a redundant twin are judged alone: the twin's delta did
        // not come in time.
        self.store.write(|w| {
            let Some(mut job) = w.get::<JobRecord>(JOBS, job_id)? else {
                return Ok::<_, EngineError>(());
            };
            let waiting: Vec<(Vec<u8>, DeltaRecord)> = w.scan(DELTAS, &[])?;
            for (_, d) in waiting {
                if d.job == job.id
                    && d.round == round
                    && matches!(d.status, DeltaStatus::AwaitingTwin { .. })
                {
                    self.decide(
                        w,
                        &mut job,
                        d,
                        Ok(()),
                        "judged alone: its redundant twin's delta did not come before the round closed",
                        now,
                    )?;
                }
            }
            w.put(JOBS, job_id, &job)?;
            Ok(())
        })?;
        let job = self.job(job_id)?;
        let deltas = self.round_deltas(&job)?;
        let accepted: Vec<&DeltaRecord> = deltas
            .iter()
            .filter(|d| d.status == DeltaStatus::Accepted)
            .collect();
        // The merge, computed outside the transaction.
        let outcome = if accepted.is_empty() {
            None
        } else {
            let rt = self.runtime_for(&job)?;
            let current = self
                .store
                .read(|r| registry::version_record(r, &job.module, job.latest_version))?
                .ok_or_else(|| EngineError::Internal("the latest version is missing".into()))?;
            let start = self.tensors(&ContentId::from_bytes(current.adapter))?;
            let momentum = match job.momentum {
                Some(id) => self.tensors(&ContentId::from_bytes(id))?,
                None => NamedTensors::new(),
            };
            let mut contributions = Vec::new();
            for d in &accepted {
                let env = decode_envelope(&d.envelope)?;
                let lease: LeaseRecord = self
                    .store
                    .read(|r| r.get(LEASES, &u64_key(d.lease_id)))?
                    .ok_or_else(|| EngineError::Internal("lease vanished".into()))?;
                let lease = v1::Lease::decode(lease.lease.as_slice())
                    .map_err(|e| EngineError::Internal(e.to_string()))?;
                let bytes = self.blobs.read(&ContentId::from_bytes(d.delta))?;
                // Kept packed: the merge reads it a block at a time (merge.rs).
                let delta = verify::open_delta(bytes, &env, &lease, &rt.layout)
                    .map_err(|r| EngineError::Internal(r.message))?;
                contributions.push(Contribution {
                    lease_id: d.lease_id,
                    peer: d.peer.clone(),
                    tokens: d.tokens,
                    target_tokens: d.target_tokens,
                    delta,
                });
            }
            let outer = spec.outer.unwrap_or_default();
            let merged = merge::merge(&start, momentum, &mut contributions, &outer)
                .map_err(|e| EngineError::Internal(e.to_string()))?;
            let metrics = self.evaluate(&rt, &merged.params)?;
            let publish =
                merge::passes_gate(metrics.eval_loss, current.eval_loss, spec.gate.as_ref());
            let adapter = if publish {
                Some(self.put_tensors(&merged.params)?)
            } else {
                None
            };
            let momentum_id = self.put_tensors(&merged.momentum)?;
            Some((
                contributions,
                metrics,
                adapter,
                momentum_id,
                current.eval_loss,
            ))
        };
        self.store.write(|w| {
            let Some(mut job) = w.get::<JobRecord>(JOBS, job_id)? else {
                return Ok(());
            };
            if job.state != JobState::Running || job.round != round {
                return Ok(());
            }
            // Leases still out in the closed round lapse with it.
            for unit in &job.units {
                if let Some(id) = unit.lease
                    && let Some(mut lease) = w.get::<LeaseRecord>(LEASES, &u64_key(id))?
                    && lease.state == LeaseState::Active
                {
                    lease.state = LeaseState::Expired;
                    w.put(LEASES, &u64_key(id), &lease)?;
                }
            }
            match &outcome {
                None => info!(job = %hex(job_id), round, "round abandoned: no accepted delta"),
                Some((contributions, metrics, adapter, momentum_id, previous)) => {
                    job.rounds_merged += 1;
                    job.tokens_trained += contributions.iter().map(|c| c.tokens).sum::<u64>();
                    // A merge the gate refused leaves the module where it was, and so its
                    // momentum: the outer optimizer restarts from zero, or the refused
                    // direction would carry into every later round (and keep being refused).
                    job.momentum = adapter.is_some().then_some(*momentum_id.as_bytes());
                    if let Some(adapter) = adapter {
                        let prepared = job.prepared.clone().ok_or_else(|| EngineError::Internal("unprepared".into()))?;
                        let manifest = v1::ModuleManifest {
                            protocol_version: swarmtune_protocol::PROTOCOL_VERSION,
                            module: job.module.clone(),
                            version: job.latest_version + 1,
                            parent_version: job.latest_version,
                            coordinator_peer_id: self.peer.to_bytes(),
                            job_id: job_id.to_vec(),
                            round,
                            base: Some(ContentId::from_bytes(prepared.base).to_proto()),
                            base_name: prepared.base_name.clone(),
                            adapter: Some(adapter.to_proto()),
                            adapter_bytes: self.blobs.size(adapter)?,
                            lora: spec.lora.clone(),
                            metrics: Some(*metrics),
                            contributors: merge::contributors(contributions),
                            created_at_unix_ms: now,
                        };
                        registry::publish(w, &self.keypair, &manifest, &job.owner, metrics.eval_loss, now)?;
                        job.latest_version += 1;
                        info!(job = %hex(job_id), round, version = job.latest_version, eval_loss = metrics.eval_loss, previous, "version published");
                    } else {
                        info!(job = %hex(job_id), round, eval_loss = metrics.eval_loss, previous, "merge gated out");
                    }
                }
            }
            let spent = match spec.budget {
                Some(v1::job_spec::Budget::Rounds(n)) => job.rounds_merged >= n,
                Some(v1::job_spec::Budget::TokenBudget(t)) => job.tokens_trained >= t,
                None => true,
            };
            if spent {
                job.state = JobState::Completed;
                job.round = 0;
                job.units.clear();
                info!(job = %hex(job_id), "job completed");
            } else {
                leases::open_round(&mut job, &spec, now);
            }
            w.put(JOBS, job_id, &job)?;
            Ok::<_, EngineError>(())
        })
    }

    // --------------------------------------------------------------------------------------
    // Status

    /// A job's record.
    pub fn job(&self, id: &[u8; 32]) -> Result<JobRecord, EngineError> {
        self.store
            .read(|r| r.get::<JobRecord>(JOBS, id))?
            .ok_or_else(|| EngineError::Internal(format!("no job {}", hex(id))))
    }

    /// Ids of jobs waiting to be prepared.
    pub fn preparing_jobs(&self) -> Result<Vec<[u8; 32]>, EngineError> {
        let jobs: Vec<(Vec<u8>, JobRecord)> = self.store.read(|r| r.scan(JOBS, &[]))?;
        Ok(jobs
            .into_iter()
            .filter(|(_, j)| j.state == JobState::Preparing)
            .map(|(_, j)| j.id)
            .collect())
    }

    /// Verification compute as a share of the training compute judged, for a job.
    pub fn verification_overhead(&self, id: &[u8; 32]) -> Result<f64, EngineError> {
        let job = self.job(id)?;
        Ok(if job.judged_steps == 0 {
            0.0
        } else {
            job.replayed_steps as f64 / job.judged_steps as f64
        })
    }
}

/// Sets `record` challenged with `plan` (a tie-break with `tie_break`), the answer due two
/// minutes after `now`; returns the challenge to send.
fn challenge_status(
    record: &mut DeltaRecord,
    plan: &verify::ChallengePlan,
    tie_break: bool,
    now: u64,
) -> v1::SegmentChallenge {
    let respond_by = now + CHALLENGE_ANSWER_MS;
    record.status = DeltaStatus::Challenged {
        segments: plan.segments.iter().map(Message::encode_to_vec).collect(),
        respond_by_ms: respond_by,
        replayed: plan.replayed.clone(),
        tie_break,
    };
    v1::SegmentChallenge {
        lease_id: record.lease_id,
        segments: plan.segments.clone(),
        respond_by_unix_ms: respond_by,
    }
}

fn lease_job(w: &crate::store::Write<'_>, lease_id: u64) -> Result<JobRecord, LeaseError> {
    let lease = w
        .get::<LeaseRecord>(LEASES, &u64_key(lease_id))?
        .ok_or_else(|| {
            LeaseError::Refused(error_reply(
                v1::ErrorCode::NotFound,
                format!("no lease {lease_id}"),
            ))
        })?;
    w.get::<JobRecord>(JOBS, &lease.job)?.ok_or_else(|| {
        LeaseError::Refused(error_reply(
            v1::ErrorCode::NotFound,
            "the lease's job is gone",
        ))
    })
}

fn lease_error_reply(e: LeaseError) -> v1::ErrorReply {
    match e {
        LeaseError::Refused(r) => r,
        LeaseError::Store(s) => reply(s.into()),
    }
}

fn lease_reply(e: EngineError) -> v1::ErrorReply {
    reply(e)
}

fn lease_shards(rt: &Runtime, lease: &v1::Lease, prepared: &Prepared) -> Vec<Shard> {
    lease
        .shards
        .iter()
        .filter_map(|c| ContentId::try_from(c).ok())
        .filter_map(|c| prepared.train_shards.iter().position(|s| s == c.as_bytes()))
        .filter_map(|i| rt.train.get(i).cloned())
        .collect()
}

pub(crate) fn decode_spec(job: &JobRecord) -> Result<v1::JobSpec, EngineError> {
    let envelope = v1::Signed::decode(job.signed_spec.as_slice())
        .map_err(|e| EngineError::Internal(format!("stored spec: {e}")))?;
    v1::JobSpec::decode(envelope.payload.as_slice())
        .map_err(|e| EngineError::Internal(format!("stored spec: {e}")))
}

fn decode_envelope(bytes: &[u8]) -> Result<v1::DeltaEnvelope, EngineError> {
    let envelope = v1::Signed::decode(bytes)
        .map_err(|e| EngineError::Internal(format!("stored envelope: {e}")))?;
    v1::DeltaEnvelope::decode(envelope.payload.as_slice())
        .map_err(|e| EngineError::Internal(format!("stored envelope: {e}")))
}

pub(crate) fn decode_verdict(bytes: &[u8]) -> Result<v1::VerificationVerdict, EngineError> {
    v1::VerificationVerdict::decode(bytes)
        .map_err(|e| EngineError::Internal(format!("stored verdict: {e}")))
}

fn content_id(c: &v1::ContentId) -> Result<ContentId, EngineError> {
    ContentId::try_from(c).map_err(|e| EngineError::Internal(e.to_string()))
}

/// Drops the deltas `peer` has in `job`'s open round that are not rejected yet, because
/// `cause` banned it: each gets a verdict of its own (so a late answer to its challenge or a
/// second delivery of its envelope gets that verdict), and its unit goes back to the pool, or
/// the round could never fill again.
fn drop_open_deltas(
    w: &crate::store::Write<'_>,
    job: &mut JobRecord,
    peer: &[u8],
    cause: &v1::VerificationVerdict,
    score: f64,
) -> Result<(), EngineError> {
    let all: Vec<(Vec<u8>, DeltaRecord)> = w.scan(DELTAS, &[])?;
    for (key, mut other) in all {
        if other.peer != peer
            || other.job != job.id
            || other.round != job.round
            || other.status == DeltaStatus::Rejected
        {
            continue;
        }
        let dropped = v1::VerificationVerdict {
            lease_id: other.lease_id,
            delta: decode_envelope(&other.envelope).ok().and_then(|e| e.delta),
            outcome: v1::VerdictOutcome::Rejected as i32,
            reason: v1::RejectReason::PeerBanned as i32,
            message: if cause.lease_id == 0 {
                cause.message.clone()
            } else {
                format!(
                    "dropped: the volunteer was banned for its delta of lease {}",
                    cause.lease_id
                )
            },
            banned: true,
            reputation_after: score,
            ..cause.clone()
        };
        other.status = DeltaStatus::Rejected;
        other.verdict = Some(dropped.encode_to_vec());
        w.put(DELTAS, &key, &other)?;
        if let Some(lease) = w.get::<LeaseRecord>(LEASES, &u64_key(other.lease_id))?
            && let Some(unit) = job.units.get_mut(lease.unit as usize)
            && unit.lease == Some(other.lease_id)
        {
            unit.lease = None;
            unit.delivered = false;
        }
    }
    Ok(())
}

/// The trainer's LoRA settings from the wire's.
pub fn lora_config(l: &v1::LoraConfig) -> LoraConfig {
    LoraConfig {
        rank: l.rank as usize,
        alpha: l.alpha,
        dropout: l.dropout,
        target_modules: l.target_modules.clone(),
    }
}

fn seed_of(id: &[u8; 32]) -> u64 {
    u64::from_le_bytes(id[..8].try_into().unwrap_or([0; 8]))
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Lowercase hex of bytes, for logs.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
