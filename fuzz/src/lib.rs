//! The fuzz targets' bodies, shared with the seed writer (`examples/seeds.rs`) and the table of
//! bad inputs (`examples/bad_inputs.rs`), so the errors the README lists come from exactly the
//! code the fuzzer runs.
//!
//! Each target is a function from the fuzzer's bytes to a [`Verdict`]: `Ok` with a short
//! summary when the decoder accepted the input, `Err` with the first error it returned. A
//! target calls the real decoder with the limits production passes, then what production does
//! next with an accepted value (accessors, the follow-up checks), and never asserts anything a
//! malformed input may legitimately fail: the bug hunted is a panic, an abort, a hang or an
//! allocation out of proportion to the input. The one assertion (in [`bundle`]) is a property
//! no input may break: an accepted bundle path never leaves the directory it is written to.
//!
//! Signatures: a fuzzer cannot forge Ed25519, so a mutated `Signed` envelope stops at the
//! signature check. The targets whose interesting part is the payload ([`job_spec`],
//! [`delta_envelope`], [`gossip`] in signed mode) take the payload bytes and sign them with a
//! fixed test key, exactly as `proto/swarmtune/v1/envelope.proto` specifies the signing input,
//! so the fuzzer reaches the payload decoder and the checks after it. [`signed_envelope`] and
//! [`frame`] take raw envelope bytes and cover the checks before the signature.

use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

pub mod samples;

use libp2p_identity::{Keypair, PeerId};
use prost::Message;
use swarmtune_coordinator::engine::{MAX_ENVELOPE_BYTES, MAX_SPEC_BYTES};
use swarmtune_coordinator::{spec, verify};
use swarmtune_protocol::net::SignatureVerifier;
use swarmtune_protocol::net::codec::{
    self, BLOB_MAX_BYTES, DELTA_MAX_BYTES, Frame, JOB_MAX_BYTES, LEASE_MAX_BYTES, STATUS_MAX_BYTES,
    WireMessage,
};
use swarmtune_protocol::net::gossip::{self, GossipVerdict, Topic};
use swarmtune_protocol::net::transfer::FetchConfig;
use swarmtune_protocol::signed::{self, ReplayGuard, SignedPayload};
use swarmtune_protocol::{ChunkManifest, ContentId, PROTOCOL_VERSION, bundle, v1};
use swarmtune_trainer::checkpoint::safetensors_from_bytes;
use swarmtune_trainer::config::ModelConfig;
use swarmtune_trainer::data::{Shard, ShardLimits, ShardPlan, build_shards, find_eos_token};
use swarmtune_trainer::delta::{self, DecodeLimits};
use swarmtune_trainer::device::DeviceKind;
use swarmtune_trainer::lora::{Adapter, LoraConfig, LoraSite};
use swarmtune_trainer::model::CausalLm;
use swarmtune_trainer::tensors::{HostTensor, NamedTensors};
use swarmtune_trainer::train::LoraState;

/// What a target made of its input: `Ok(summary)` when accepted, `Err(first error)`.
pub type Verdict = Result<String, String>;

/// A fuzz target: its name (the file under `fuzz_targets/` and the corpus directory) and body.
pub struct Target {
    /// Name of the target, its corpus and artifact directories.
    pub name: &'static str,
    /// The decoder it drives, for people.
    pub decoder: &'static str,
    /// The body.
    pub run: fn(&[u8]) -> Verdict,
}

/// Every target, in the order the README lists them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "frame",
        decoder: "net::codec::read_frame (every protocol, both directions) + what a peer does with the message",
        run: frame,
    },
    Target {
        name: "signed_envelope",
        decoder: "v1::Signed decode + signed::verify for JobSpec, DeltaEnvelope, JobAnnouncement, ModuleManifest",
        run: signed_envelope,
    },
    Target {
        name: "gossip",
        decoder: "net::gossip::validate with SignatureVerifier (jobs and modules topics)",
        run: gossip,
    },
    Target {
        name: "job_spec",
        decoder: "signed JobSpec: signed::verify + spec::validate_spec + spec::check_lora_fits",
        run: job_spec,
    },
    Target {
        name: "delta_envelope",
        decoder: "signed DeltaEnvelope: signed::verify + verify::check_envelope against a lease",
        run: delta_envelope,
    },
    Target {
        name: "blob_manifest",
        decoder: "v1::BlobManifest decode + ChunkManifest::try_from + validate",
        run: blob_manifest,
    },
    Target {
        name: "bundle",
        decoder: "v1::Bundle decode + bundle::files (path checks)",
        run: bundle,
    },
    Target {
        name: "shard",
        decoder: "trainer::data::Shard::decode (ShardLimits::default())",
        run: shard,
    },
    Target {
        name: "delta",
        decoder: "trainer::delta::decode_packed (DecodeLimits::default()) + PackedDelta reads",
        run: delta,
    },
    Target {
        name: "delta_verify",
        decoder: "coordinator verify::open_delta against a lease and an adapter layout",
        run: delta_verify,
    },
    Target {
        name: "lora_state",
        decoder: "trainer::train::LoraState::from_bytes (a segment challenge's answer)",
        run: lora_state,
    },
    Target {
        name: "safetensors",
        decoder: "trainer::checkpoint::safetensors_from_bytes",
        run: safetensors,
    },
    Target {
        name: "adapter_dir",
        decoder: "trainer::lora::Adapter::load (adapter_config.json + adapter_model.safetensors)",
        run: adapter_dir,
    },
    Target {
        name: "base_model",
        decoder: "trainer::model::CausalLm::load (config.json + model.safetensors)",
        run: base_model,
    },
    Target {
        name: "model_config",
        decoder: "trainer::config::ModelConfig::from_json",
        run: model_config,
    },
    Target {
        name: "tokenizer",
        decoder: "tokenizer.json: data::tokenizer_from_bytes + find_eos_token + data::build_shards",
        run: tokenizer,
    },
    Target {
        name: "job_file",
        decoder: "coordinator spec::parse_job_file + JobFile::to_spec",
        run: job_file,
    },
    Target {
        name: "dataset",
        decoder: "trainer::data::read_dataset (.jsonl and .txt)",
        run: dataset,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> &'static Target {
    TARGETS
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no fuzz target {name}"))
}

// ---------------------------------------------------------------------------------------------
// Fixtures: keys, a lease, an adapter layout, scratch files
// ---------------------------------------------------------------------------------------------

/// Seed of the coordinator's test key.
pub const COORDINATOR: u8 = 1;
/// Seed of the volunteer's test key.
pub const VOLUNTEER: u8 = 2;
/// Seed of the job owner's test key.
pub const OWNER: u8 = 3;
/// When the targets sign: a fixed past time, so every run is the same.
pub const TIMESTAMP_MS: u64 = 1_700_000_000_000;
/// Tokens per sequence of the fixture job (what `check_envelope` counts tokens with).
pub const SEQ_LEN: u32 = 64;
/// The adapter's rank in [`layout`].
pub const RANK: usize = 2;

/// A fixed Ed25519 key.
pub fn keypair(seed: u8) -> Keypair {
    Keypair::ed25519_from_bytes([seed; 32]).expect("32 bytes are an Ed25519 secret")
}

/// The PeerId of [`keypair`]`(seed)`.
pub fn peer(seed: u8) -> PeerId {
    keypair(seed).public().to_peer_id()
}

fn coordinator_peer() -> &'static PeerId {
    static PEER: OnceLock<PeerId> = OnceLock::new();
    PEER.get_or_init(|| peer(COORDINATOR))
}

fn volunteer_peer() -> &'static PeerId {
    static PEER: OnceLock<PeerId> = OnceLock::new();
    PEER.get_or_init(|| peer(VOLUNTEER))
}

fn cached_keypair(seed: u8) -> &'static Keypair {
    static KEYS: OnceLock<[Keypair; 4]> = OnceLock::new();
    &KEYS.get_or_init(|| [keypair(0), keypair(1), keypair(2), keypair(3)])[usize::from(seed)]
}

/// An envelope around `payload` (raw bytes, not re-encoded) signed by `keypair`, built as
/// `envelope.proto` specifies: `"swarmtune-signed-v1:" ‖ version (u32 LE) ‖ tag length (u32
/// LE) ‖ tag ‖ timestamp (u64 LE) ‖ nonce (u64 LE) ‖ payload length (u64 LE) ‖ payload`.
pub fn sign_raw(keypair: &Keypair, type_tag: &str, payload: &[u8], nonce: u64) -> v1::Signed {
    let mut input = Vec::with_capacity(64 + type_tag.len() + payload.len());
    input.extend_from_slice(b"swarmtune-signed-v1:");
    input.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    input.extend_from_slice(&(type_tag.len() as u32).to_le_bytes());
    input.extend_from_slice(type_tag.as_bytes());
    input.extend_from_slice(&TIMESTAMP_MS.to_le_bytes());
    input.extend_from_slice(&nonce.to_le_bytes());
    input.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    input.extend_from_slice(payload);
    v1::Signed {
        protocol_version: PROTOCOL_VERSION,
        type_tag: type_tag.to_owned(),
        payload: payload.to_vec(),
        public_key: keypair.public().encode_protobuf(),
        signature: keypair.sign(&input).expect("Ed25519 signs"),
        timestamp_unix_ms: TIMESTAMP_MS,
        nonce,
    }
}

/// The adapter layout of the fixture lease: q_proj and v_proj of one 8-wide layer, rank 2,
/// under their PEFT names.
pub fn sites() -> Vec<LoraSite> {
    ["q_proj", "v_proj"]
        .iter()
        .map(|m| LoraSite {
            path: format!("model.layers.0.self_attn.{m}"),
            in_features: 8,
            out_features: 8,
            fan_in_fan_out: false,
        })
        .collect()
}

/// The tensors (zeros) of [`sites`] at rank [`RANK`].
pub fn layout() -> &'static NamedTensors {
    static LAYOUT: OnceLock<NamedTensors> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        let mut out = NamedTensors::new();
        for s in sites() {
            out.insert(s.a_name(), HostTensor::zeros(vec![RANK, s.in_features]));
            out.insert(s.b_name(), HostTensor::zeros(vec![s.out_features, RANK]));
        }
        out
    })
}

/// The encodings a lease can name, by index (the `delta_verify` target's first byte).
pub const ENCODINGS: [v1::DeltaEncoding; 4] = [
    v1::DeltaEncoding::F32,
    v1::DeltaEncoding::F16,
    v1::DeltaEncoding::Int8Rowwise,
    v1::DeltaEncoding::Topk,
];

/// The top-k fraction of the fixture lease when it asks for top-k.
pub const TOPK_FRACTION: f32 = 0.25;

/// A lease as the coordinator grants it (4 steps, a commitment every 2, batches of 2).
pub fn lease(encoding: v1::DeltaEncoding) -> v1::Lease {
    v1::Lease {
        lease_id: 7,
        job_id: vec![0x11; 32],
        round: 3,
        holder_peer_id: volunteer_peer().to_bytes(),
        module: "shout".into(),
        start_version: 2,
        start_adapter: Some(ContentId::from_bytes([0x22; 32]).to_proto()),
        base: Some(ContentId::from_bytes([0x33; 32]).to_proto()),
        lora: Some(v1::LoraConfig {
            rank: RANK as u32,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
        }),
        shards: vec![ContentId::from_bytes([0x44; 32]).to_proto()],
        seed: 5,
        inner: Some(v1::TrainSettings {
            inner_steps: 4,
            batch_size: 2,
            micro_batch: 2,
            learning_rate: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            commit_every: 2,
        }),
        delta_encoding: encoding as i32,
        topk_fraction: if encoding == v1::DeltaEncoding::Topk {
            TOPK_FRACTION
        } else {
            0.0
        },
        max_delta_bytes: 1 << 20,
        granted_at_unix_ms: TIMESTAMP_MS,
        expires_at_unix_ms: TIMESTAMP_MS + 60_000,
        renew_interval_ms: 10_000,
        round_deadline_unix_ms: TIMESTAMP_MS + 300_000,
    }
}

/// An honest envelope for [`lease`] and a delta blob `delta` of `delta_bytes` bytes.
pub fn envelope_for(lease: &v1::Lease, delta: &[u8]) -> v1::DeltaEnvelope {
    let steps = 4u64;
    v1::DeltaEnvelope {
        protocol_version: PROTOCOL_VERSION,
        job_id: lease.job_id.clone(),
        round: lease.round,
        lease_id: lease.lease_id,
        start_version: lease.start_version,
        base: lease.base.clone(),
        delta: Some(ContentId::of(delta).to_proto()),
        delta_bytes: delta.len() as u64,
        encoding: lease.delta_encoding,
        topk_fraction: lease.topk_fraction,
        steps,
        tokens: steps * 2 * u64::from(SEQ_LEN),
        target_tokens: 300,
        loss_before: 2.5,
        loss_after: 2.0,
        commitments: [0u64, 2, 4]
            .iter()
            .map(|&step| v1::Commitment {
                step,
                state_hash: vec![step as u8; 32],
            })
            .collect(),
        provenance: Some(v1::Provenance {
            backend: "flex".into(),
            threads: 2,
            kernel_family: "fuzz".into(),
        }),
        train_seconds: 1.5,
    }
}

/// The config of the built-in base (what `check_lora_fits` checks a spec against).
pub fn builtin_config() -> &'static ModelConfig {
    static CONFIG: OnceLock<ModelConfig> = OnceLock::new();
    CONFIG.get_or_init(|| {
        ModelConfig::from_json(include_str!("../../trainer/builtin/base/config.json"))
            .expect("the built-in base's config parses")
    })
}

/// A directory for the decoders that only read files, made once per process.
fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("swarmtune-fuzz-")
            .tempdir()
            .expect("a temporary directory")
    })
    .path()
}

/// `text` with the scratch directory's path replaced by `DIR`, so errors read the same on
/// every run.
fn tidy(text: impl ToString) -> String {
    text.to_string()
        .replace(&scratch().display().to_string(), "DIR")
}

/// Splits `data` into two files: a little-endian u16 length, that many bytes (fewer if the
/// input is shorter), then the rest.
pub fn split2(data: &[u8]) -> (&[u8], &[u8]) {
    let (len, rest) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), rest),
        _ => (0, data),
    };
    rest.split_at(len.min(rest.len()))
}

/// The inverse of [`split2`] (for seeds and the bad-input table).
pub fn join2(first: &[u8], second: &[u8]) -> Vec<u8> {
    let len = u16::try_from(first.len()).expect("the first file is under 64 KiB");
    let mut out = len.to_le_bytes().to_vec();
    out.extend_from_slice(first);
    out.extend_from_slice(second);
    out
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(path, bytes).map_err(|e| format!("scratch file {}: {e}", tidy(path.display())))
}

/// A fresh empty directory `name` under the scratch directory.
fn fresh_dir(name: &str) -> Result<PathBuf, String> {
    let dir = scratch().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("scratch dir: {e}"))?;
    Ok(dir)
}

// ---------------------------------------------------------------------------------------------
// Wire: frames, envelopes, gossip
// ---------------------------------------------------------------------------------------------

/// The request-response protocols and directions, by the `frame` target's first byte.
pub const FRAME_KINDS: [&str; 10] = [
    "JobRequest",
    "JobResponse",
    "LeaseRequest",
    "LeaseResponse",
    "DeltaRequest",
    "DeltaResponse",
    "StatusRequest",
    "StatusResponse",
    "BlobRequest",
    "BlobResponse",
];

fn read_one<M: WireMessage>(stream: &[u8], max: usize) -> Result<M, String> {
    let mut io = futures::io::Cursor::new(stream);
    match futures::executor::block_on(codec::read_frame::<M, _>(&mut io, max)) {
        Ok(Frame::Message(m)) => Ok(m),
        Ok(Frame::UnsupportedVersion(v)) => Err(format!("Frame::UnsupportedVersion({v})")),
        Ok(Frame::Malformed(why)) => Err(format!("Frame::Malformed({why:?})")),
        Ok(Frame::TooLarge { len, max }) => {
            Err(format!("Frame::TooLarge {{ len: {len}, max: {max} }}"))
        }
        Err(e) => Err(format!("io::Error({:?}): {e}", e.kind())),
    }
}

/// One frame of a request-response stream: byte 0 picks the protocol and direction
/// ([`FRAME_KINDS`]), the rest is the stream, read with the protocol's size limit. A decoded
/// message then goes through what its receiver does first: a submitted job's envelope and
/// spec, a granted lease's settings, a submitted delta's envelope and its lease checks, a
/// module version's manifest, a blob manifest, the ids of blob requests.
pub fn frame(data: &[u8]) -> Verdict {
    let Some((&kind, stream)) = data.split_first() else {
        return Err("empty input".into());
    };
    let kind = usize::from(kind) % FRAME_KINDS.len();
    let what = FRAME_KINDS[kind];
    match kind {
        0 => {
            let m: v1::JobRequest = read_one(stream, JOB_MAX_BYTES)?;
            if let Some(v1::job_request::Body::SubmitJob(v1::SubmitJob { spec: Some(env) })) =
                &m.body
            {
                submit_job(env)?;
            }
        }
        1 => {
            let m: v1::JobResponse = read_one(stream, JOB_MAX_BYTES)?;
            let _ = codec::ResponseMessage::error(&m);
        }
        2 => {
            let _: v1::LeaseRequest = read_one(stream, LEASE_MAX_BYTES)?;
        }
        3 => {
            let m: v1::LeaseResponse = read_one(stream, LEASE_MAX_BYTES)?;
            if let Some(v1::lease_response::Body::LeaseGranted(v1::LeaseGranted {
                lease: Some(lease),
            })) = &m.body
            {
                // What the volunteer does with a granted lease before it trains.
                verify::train_spec(lease).map_err(|e| e.to_string())?;
                verify::lease_encoding(lease).map_err(|e| e.to_string())?;
                for id in &lease.shards {
                    ContentId::try_from(id).map_err(|e| e.to_string())?;
                }
            }
        }
        4 => {
            let m: v1::DeltaRequest = read_one(stream, DELTA_MAX_BYTES)?;
            if let Some(v1::delta_request::Body::SubmitDelta(v1::SubmitDelta {
                envelope: Some(env),
            })) = &m.body
            {
                submit_delta(env)?;
            }
        }
        5 => {
            let _: v1::DeltaResponse = read_one(stream, DELTA_MAX_BYTES)?;
        }
        6 => {
            let _: v1::StatusRequest = read_one(stream, STATUS_MAX_BYTES)?;
        }
        7 => {
            let m: v1::StatusResponse = read_one(stream, STATUS_MAX_BYTES)?;
            if let Some(v1::status_response::Body::ModuleVersion(v1::ModuleVersion {
                manifest: Some(env),
            })) = &m.body
            {
                // `swarmtune pull`: the manifest must be the coordinator's (node/src/client.rs).
                signed::verify::<v1::ModuleManifest>(env, Some(coordinator_peer()), 64 << 10)
                    .map_err(|e| e.to_string())?;
            }
        }
        8 => {
            let m: v1::BlobRequest = read_one(stream, BLOB_MAX_BYTES)?;
            let id = match &m.body {
                Some(v1::blob_request::Body::GetBlobManifest(g)) => g.id.as_ref(),
                Some(v1::blob_request::Body::GetChunk(g)) => g.id.as_ref(),
                None => None,
            };
            if let Some(id) = id {
                ContentId::try_from(id).map_err(|e| e.to_string())?;
            }
        }
        _ => {
            let m: v1::BlobResponse = read_one(stream, BLOB_MAX_BYTES)?;
            if let Some(v1::blob_response::Body::BlobManifest(manifest)) = &m.body {
                check_manifest(manifest)?;
            }
        }
    }
    Ok(format!("{what} accepted"))
}

/// The coordinator's intake of a signed spec (`Coordinator::submit`): the envelope, then the
/// spec's rules, then (when the base is known) the LoRA targets against the base's config.
fn submit_job(env: &v1::Signed) -> Verdict {
    let verified = signed::verify::<v1::JobSpec>(env, None, MAX_SPEC_BYTES).map_err(|e| {
        let reply = codec::error_reply(e.code(), e.to_string());
        format!("{} ({})", reply.message, e.code().as_str_name())
    })?;
    let _ = signed::envelope_id(env);
    let spec = verified.message;
    spec::validate_spec(&spec, coordinator_peer()).map_err(|e| {
        let reply = e.to_error_reply();
        format!("{}: {}", reply.field, reply.message)
    })?;
    spec::check_lora_fits(&spec.lora.clone().unwrap_or_default(), builtin_config())
        .map_err(|e| e.to_string())?;
    Ok(format!("job spec for module {:?} accepted", spec.module))
}

/// The coordinator's intake of a signed delta envelope (`Coordinator::submit_delta`): the
/// envelope from the connection's peer, then the checks against its lease.
fn submit_delta(env: &v1::Signed) -> Verdict {
    let verified =
        signed::verify::<v1::DeltaEnvelope>(env, Some(volunteer_peer()), MAX_ENVELOPE_BYTES)
            .map_err(|e| e.to_string())?;
    let env = verified.message;
    let lease = lease(v1::DeltaEncoding::Int8Rowwise);
    verify::check_envelope(&env, &lease, SEQ_LEN).map_err(|e| e.to_string())?;
    let _ = env.delta.as_ref().map(ContentId::try_from);
    Ok("delta envelope accepted".into())
}

/// A raw `Signed` envelope, checked as every receiver checks one: `signed::verify` for each
/// payload type with the limit and signer its receiver uses, then the replay guard. The error
/// reported is the one for the type the envelope's tag names (a JobSpec's when it names none).
pub fn signed_envelope(data: &[u8]) -> Verdict {
    let env = v1::Signed::decode(data).map_err(|e| format!("Signed does not decode: {e}"))?;
    let _ = signed::envelope_id(&env);
    let mut guard = ReplayGuard::new(8);
    let now = TIMESTAMP_MS + 1_000;
    // The coordinator's job intake, its delta intake, a volunteer's announcement check, a
    // client's manifest check; the fresh-only types then go through the replay guard.
    let spec = signed::verify::<v1::JobSpec>(&env, None, MAX_SPEC_BYTES);
    if let Ok(v) = &spec {
        let _ = guard.check(v, now);
    }
    let delta =
        signed::verify::<v1::DeltaEnvelope>(&env, Some(volunteer_peer()), MAX_ENVELOPE_BYTES);
    if let Ok(v) = &delta {
        let _ = guard.check(v, now);
    }
    let announcement = signed::verify::<v1::JobAnnouncement>(&env, None, 1 << 20);
    let manifest = signed::verify::<v1::ModuleManifest>(&env, Some(coordinator_peer()), 64 << 10);
    let results = [
        (v1::JobSpec::TYPE_TAG, spec.map(|_| ())),
        (v1::DeltaEnvelope::TYPE_TAG, delta.map(|_| ())),
        (v1::JobAnnouncement::TYPE_TAG, announcement.map(|_| ())),
        (v1::ModuleManifest::TYPE_TAG, manifest.map(|_| ())),
    ];
    let (tag, result) = results
        .iter()
        .find(|(tag, _)| *tag == env.type_tag)
        .unwrap_or(&results[0]);
    match result {
        Ok(()) => Ok(format!("{tag} envelope verified")),
        Err(e) => Err(format!("{e} (answered with {})", e.code().as_str_name())),
    }
}

/// A gossipsub message: bit 0 of byte 0 picks the topic; with bit 1 set the rest is a payload
/// that the coordinator's key signs into an envelope with the topic's tag, else the rest is
/// the message as received. Then `gossip::validate` with the default `SignatureVerifier`, and
/// for an accepted job announcement what a volunteer checks next.
pub fn gossip(data: &[u8]) -> Verdict {
    let Some((&mode, rest)) = data.split_first() else {
        return Err("empty input".into());
    };
    let topic = if mode & 1 == 0 {
        Topic::Jobs
    } else {
        Topic::Modules
    };
    let signed_bytes;
    let message = if mode & 2 != 0 {
        signed_bytes =
            sign_raw(cached_keypair(COORDINATOR), topic.type_tag(), rest, 9).encode_to_vec();
        signed_bytes.as_slice()
    } else {
        rest
    };
    let publisher = Some(*coordinator_peer());
    let envelope =
        gossip::validate(topic, publisher, message, &SignatureVerifier).map_err(|verdict| {
            match verdict {
                GossipVerdict::Reject(why) => format!("Reject: {why}"),
                GossipVerdict::Ignore(why) => format!("Ignore: {why}"),
                GossipVerdict::Accept => "Accept".into(),
            }
        })?;
    if topic == Topic::Jobs {
        // node/src/volunteer.rs, `announced_coordinator`.
        let verified =
            signed::verify::<v1::JobAnnouncement>(&envelope, publisher.as_ref(), 1 << 20)
                .map_err(|e| e.to_string())?;
        let coordinator =
            PeerId::from_bytes(&verified.message.coordinator_peer_id).map_err(|e| e.to_string())?;
        let _ = (coordinator, verified.message.state());
    }
    Ok(format!("{topic} message accepted"))
}

/// A job spec as a job owner sends it: the bytes are the `JobSpec` payload, signed by the
/// owner's key, then the coordinator's intake checks.
pub fn job_spec(data: &[u8]) -> Verdict {
    let env = sign_raw(cached_keypair(OWNER), v1::JobSpec::TYPE_TAG, data, 11);
    submit_job(&env)
}

/// A delta envelope as a volunteer sends it: the bytes are the `DeltaEnvelope` payload, signed
/// by the volunteer's key, then the coordinator's intake checks against the lease.
pub fn delta_envelope(data: &[u8]) -> Verdict {
    let env = sign_raw(
        cached_keypair(VOLUNTEER),
        v1::DeltaEnvelope::TYPE_TAG,
        data,
        13,
    );
    submit_delta(&env)
}

fn check_manifest(proto: &v1::BlobManifest) -> Verdict {
    let manifest = ChunkManifest::try_from(proto).map_err(|e| e.to_string())?;
    manifest
        .validate(FetchConfig::default().max_blob_bytes)
        .map_err(|e| e.to_string())?;
    // What a fetch then does: every chunk's range.
    let count = u32::try_from(manifest.chunk_count()).map_err(|e| e.to_string())?;
    for index in 0..count {
        let _ = manifest.chunk_range(index);
    }
    let _ = manifest.to_proto();
    Ok(format!("manifest of {} chunks accepted", count))
}

/// A blob manifest a provider answered with (`transfer.rs`, `get_manifest`).
pub fn blob_manifest(data: &[u8]) -> Verdict {
    let proto =
        v1::BlobManifest::decode(data).map_err(|e| format!("BlobManifest does not decode: {e}"))?;
    check_manifest(&proto)
}

/// A bundle blob (a base model's file list) as `bundle::read` checks it after reading it from
/// the store: the size cap, the decode, then `bundle::files`.
pub fn bundle(data: &[u8]) -> Verdict {
    if data.len() > bundle::MAX_BUNDLE_BYTES {
        return Err(format!(
            "{} bytes, over the limit of {}",
            data.len(),
            bundle::MAX_BUNDLE_BYTES
        ));
    }
    let id = ContentId::of(data);
    let decoded = v1::Bundle::decode(data).map_err(|e| format!("bundle {id} is invalid: {e}"))?;
    let files = bundle::files(&decoded, id).map_err(|e| e.to_string())?;
    for (path, _, _) in &files {
        // `write_dir` joins each path to the directory it writes into.
        assert!(
            Path::new(path)
                .components()
                .all(|c| matches!(c, Component::Normal(_))),
            "bundle::files accepted a path that leaves the directory: {path:?}"
        );
    }
    Ok(format!("bundle of {} files accepted", files.len()))
}

// ---------------------------------------------------------------------------------------------
// Trainer formats
// ---------------------------------------------------------------------------------------------

/// A shard blob as volunteers and the coordinator decode it, then what training reads.
pub fn shard(data: &[u8]) -> Verdict {
    let shard = Shard::decode(data, &ShardLimits::default()).map_err(|e| e.to_string())?;
    let n = shard.n_seqs();
    for i in 0..n {
        let _ = shard.sequence(i);
    }
    let _ = shard.target_tokens();
    shard
        .validate_vocab(builtin_config().vocab_size() as u32)
        .map_err(|e| e.to_string())?;
    Ok(format!(
        "shard of {n} sequences of {} accepted",
        shard.seq_len
    ))
}

/// A delta blob through the codec with its default limits, then every read a merge makes.
pub fn delta(data: &[u8]) -> Verdict {
    let packed = delta::decode_packed(data, &DecodeLimits::default()).map_err(|e| e.to_string())?;
    let _ = packed.encoding();
    let names: Vec<(String, Vec<usize>)> = packed
        .tensors()
        .map(|(n, s)| (n.to_owned(), s.to_vec()))
        .collect();
    let _ = packed.squared_norm();
    let _ = packed.first_non_finite();
    let mut block = [0f32; 1024];
    let mut start = 0;
    while start < packed.len() {
        let take = block.len().min(packed.len() - start);
        packed.read(start, &mut block[..take]);
        start += take;
    }
    let len = packed.len();
    let _ = packed.into_tensors();
    Ok(format!(
        "delta of {} tensors, {len} values accepted",
        names.len()
    ))
}

/// A delta blob as the coordinator's verifier opens it (`verify::open_delta`): byte 0 picks
/// the lease's encoding ([`ENCODINGS`]), the rest is the blob; the envelope is an honest one
/// naming exactly these bytes, so the checks reach the codec and the layout.
pub fn delta_verify(data: &[u8]) -> Verdict {
    let Some((&pick, blob)) = data.split_first() else {
        return Err("empty input".into());
    };
    let lease = lease(ENCODINGS[usize::from(pick) % ENCODINGS.len()]);
    let env = envelope_for(&lease, blob);
    let packed = verify::open_delta(blob, &env, &lease, layout()).map_err(|e| e.to_string())?;
    let policy = v1::VerificationPolicy {
        max_delta_norm: 100.0,
        ..Default::default()
    };
    let _ = verify::check_packed_norm(&packed, &policy);
    let tensors = packed.into_tensors();
    verify::check_norm(&tensors, &policy).map_err(|e| e.to_string())?;
    Ok(format!("delta of {} tensors accepted", tensors.len()))
}

/// A segment challenge's state blob, parsed against the adapter's layout with the cap the
/// verifier uses.
pub fn lora_state(data: &[u8]) -> Verdict {
    let layout = layout();
    let state = LoraState::from_bytes(data, layout, verify::state_byte_cap(layout))
        .map_err(|e| e.to_string())?;
    let _ = state.hash();
    Ok(format!("state at step {} accepted", state.step()))
}

/// A safetensors image (a module version's adapter, a merged state) as the engine reads it
/// from the blob store.
pub fn safetensors(data: &[u8]) -> Verdict {
    let (tensors, meta) =
        safetensors_from_bytes(data, Path::new("blob.safetensors")).map_err(|e| e.to_string())?;
    Ok(format!(
        "{} tensors, {} metadata entries accepted",
        tensors.len(),
        meta.len()
    ))
}

/// A PEFT adapter directory (`swarmtune generate --adapter`, `merge`): [`split2`] gives
/// `adapter_config.json` and `adapter_model.safetensors`. `Adapter::load` reads only paths,
/// so the two files are written to a scratch directory first. Then the trainer's check that
/// the adapter fits the model's LoRA sites, and the weight deltas of those sites.
pub fn adapter_dir(data: &[u8]) -> Verdict {
    let (config, tensors) = split2(data);
    let dir = fresh_dir("adapter")?;
    write(&dir.join("adapter_config.json"), config)?;
    write(&dir.join("adapter_model.safetensors"), tensors)?;
    let adapter = Adapter::load(&dir).map_err(tidy)?;
    let sites = sites();
    adapter.check_sites(&sites).map_err(tidy)?;
    for site in &sites {
        adapter.weight_delta(site).map_err(tidy)?;
    }
    Ok(format!("adapter of rank {} accepted", adapter.config.rank))
}

/// A base model directory (unpacked from a job owner's bundle): [`split2`] gives `config.json`
/// and `model.safetensors`, written to a scratch directory (`CausalLm::load` reads only
/// paths), then loaded on the CPU device as the coordinator's `prepare` does, then a LoRA
/// config's targets checked against it.
pub fn base_model(data: &[u8]) -> Verdict {
    let device = DeviceKind::Cpu.device().map_err(|e| e.to_string())?;
    let (config, weights) = split2(data);
    let dir = fresh_dir("base")?;
    write(&dir.join("config.json"), config)?;
    write(&dir.join("model.safetensors"), weights)?;
    let model = CausalLm::load(&dir, &device).map_err(tidy)?;
    // A job's LoRA config: the first adaptable layer name of the architecture.
    let lora = LoraConfig {
        target_modules: vec![model.config().lora_target_names()[0].to_owned()],
        ..LoraConfig::default()
    };
    let sites = model.lora_sites(&lora);
    let wire = v1::LoraConfig {
        rank: lora.rank as u32,
        alpha: lora.alpha,
        dropout: lora.dropout,
        target_modules: lora.target_modules.clone(),
    };
    spec::check_lora_fits(&wire, model.config()).map_err(|e| e.to_string())?;
    Ok(format!("model with {} LoRA sites accepted", sites.len()))
}

/// A `config.json` as `ModelConfig::from_file` reads it (UTF-8 text, then `from_json`), then
/// the accessors the loaders call before any tensor is read.
pub fn model_config(data: &[u8]) -> Verdict {
    let text = std::str::from_utf8(data).map_err(|e| format!("not UTF-8: {e}"))?;
    let config = ModelConfig::from_json(text).map_err(|e| e.to_string())?;
    let _ = (
        config.vocab_size(),
        config.num_layers(),
        config.max_positions(),
        config.eos_token_id(),
        config.fan_in_fan_out(),
        config.lora_target_names(),
    );
    Ok(format!(
        "config with {} layers, vocab {} accepted",
        config.num_layers(),
        config.vocab_size()
    ))
}

/// A `tokenizer.json` from a base bundle: `data::tokenizer_from_bytes` (what
/// `data::load_tokenizer_with_hash` calls on the file's bytes), the EOS lookup, then the
/// tokenizer cutting a two-example dataset into shards as the coordinator's `prepare` does.
pub fn tokenizer(data: &[u8]) -> Verdict {
    // tokenizers 0.22 panics on some malformed files (an upstream bug); the node catches that
    // panic inside `tokenizer_from_bytes` and refuses the file. libFuzzer's panic hook would
    // abort the process before the unwind reaches the catch, so the parse runs with a silent
    // hook: a panic caught there is a refusal, as in the node. Panics anywhere else still
    // abort (the hook is restored before anything else runs).
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let parsed = swarmtune_trainer::data::tokenizer_from_bytes(data);
    std::panic::set_hook(hook);
    let tokenizer = parsed.map_err(|e| format!("tokenizer: {e}"))?;
    let eos = find_eos_token(&tokenizer);
    let examples = [
        swarmtune_trainer::data::Example::Text("the cat sees ben".into()),
        swarmtune_trainer::data::Example::PromptCompletion {
            prompt: "Shout: the cat =>".into(),
            completion: " THE CAT".into(),
        },
    ];
    let plan = ShardPlan {
        seq_len: 16,
        seqs_per_shard: 4,
        eval_fraction: 0.0,
        seed: 1,
    };
    let hash = *blake3::hash(data).as_bytes();
    let built =
        build_shards(&examples, &tokenizer, hash, eos, 0, &plan).map_err(|e| e.to_string())?;
    Ok(format!(
        "tokenizer accepted ({} train shards)",
        built.train.len()
    ))
}

/// A job file's text (`swarmtune submit job.toml`), then its conversion to a wire spec.
pub fn job_file(data: &[u8]) -> Verdict {
    let text = std::str::from_utf8(data).map_err(|e| format!("not UTF-8: {e}"))?;
    let file = spec::parse_job_file(text).map_err(|e| e.to_string())?;
    let spec = file
        .to_spec(coordinator_peer(), ContentId::from_bytes([0x55; 32]))
        .map_err(|e| e.to_string())?;
    Ok(format!("job file for module {:?} accepted", spec.module))
}

/// A dataset file (the job owner's, uploaded as a blob and read by the coordinator): bit 0 of
/// byte 0 picks `.jsonl` or `.txt`, the rest is written to a scratch file (`read_dataset` reads
/// only paths) and read.
pub fn dataset(data: &[u8]) -> Verdict {
    let Some((&pick, text)) = data.split_first() else {
        return Err("empty input".into());
    };
    let name = if pick & 1 == 0 {
        "dataset.jsonl"
    } else {
        "dataset.txt"
    };
    let path = scratch().join(name);
    write(&path, text)?;
    let examples = swarmtune_trainer::data::read_dataset(&path).map_err(tidy)?;
    Ok(format!("{} examples accepted", examples.len()))
}
