//! Valid sample inputs, made with the project's own encoders (and the trainer's test
//! fixtures): the seeds (`examples/seeds.rs`) and the starting points of the bad inputs
//! (`examples/bad_inputs.rs`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prost::Message;
use swarmtune_coordinator::spec::parse_job_file;
use swarmtune_protocol::signed::SignedPayload;
use swarmtune_protocol::{ContentId, PROTOCOL_VERSION, v1};
use swarmtune_trainer::checkpoint::safetensors_bytes;
use swarmtune_trainer::delta::{self, DeltaEncoding};
use swarmtune_trainer::lora::{Adapter, LoraConfig};
use swarmtune_trainer::tensors::{HostTensor, NamedTensors};

use crate::{COORDINATOR, OWNER, VOLUNTEER, envelope_for, keypair, layout, lease, peer, sign_raw};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_owned()
}

pub fn fixture(path: &str) -> Vec<u8> {
    let path = root().join("..").join(path);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Deterministic values in about [-0.5, 0.5].
pub fn values(n: usize, salt: u32) -> Vec<f32> {
    let mut x = 0x9E37_79B9u32 ^ salt;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x % 1000) as f32 / 1000.0 - 0.5
        })
        .collect()
}

pub fn filled(layout: &NamedTensors, salt: u32) -> NamedTensors {
    layout
        .iter()
        .enumerate()
        .map(|(i, (name, t))| {
            let data = values(t.len(), salt + i as u32);
            (
                name.clone(),
                HostTensor::new(t.shape.clone(), data).unwrap(),
            )
        })
        .collect()
}

pub fn framed(message: &impl Message) -> Vec<u8> {
    message.encode_length_delimited_to_vec()
}

pub fn job_spec() -> v1::JobSpec {
    let text = String::from_utf8(fixture("examples/job.toml")).unwrap();
    parse_job_file(&text)
        .unwrap()
        .to_spec(&peer(COORDINATOR), ContentId::from_bytes([0x55; 32]))
        .unwrap()
}

pub fn announcement() -> v1::JobAnnouncement {
    v1::JobAnnouncement {
        protocol_version: PROTOCOL_VERSION,
        job_id: vec![0x11; 32],
        coordinator_peer_id: peer(COORDINATOR).to_bytes(),
        spec: Some(sign_raw(
            &keypair(OWNER),
            v1::JobSpec::TYPE_TAG,
            &job_spec().encode_to_vec(),
            1,
        )),
        base: Some(ContentId::from_bytes([0x33; 32]).to_proto()),
        state: v1::JobState::Running as i32,
        ..Default::default()
    }
}

pub fn manifest() -> v1::ModuleManifest {
    v1::ModuleManifest {
        protocol_version: PROTOCOL_VERSION,
        module: "shout".into(),
        version: 3,
        parent_version: 2,
        coordinator_peer_id: peer(COORDINATOR).to_bytes(),
        job_id: vec![0x11; 32],
        round: 3,
        ..Default::default()
    }
}

pub fn delta_blob(encoding: v1::DeltaEncoding) -> Vec<u8> {
    let encoding = match encoding {
        v1::DeltaEncoding::F32 => DeltaEncoding::F32,
        v1::DeltaEncoding::F16 => DeltaEncoding::F16,
        v1::DeltaEncoding::Int8Rowwise => DeltaEncoding::Int8RowWise,
        _ => DeltaEncoding::TopK {
            fraction: crate::TOPK_FRACTION,
        },
    };
    delta::encode(&filled(layout(), 7), encoding).unwrap()
}

pub fn signed_delta_envelope() -> v1::Signed {
    let lease = lease(v1::DeltaEncoding::Int8Rowwise);
    let env = envelope_for(&lease, &delta_blob(v1::DeltaEncoding::Int8Rowwise));
    sign_raw(
        &keypair(VOLUNTEER),
        v1::DeltaEnvelope::TYPE_TAG,
        &env.encode_to_vec(),
        2,
    )
}

pub fn f32_tensor(shape: &[usize], salt: u32) -> HostTensor {
    let n = shape.iter().product();
    HostTensor::new(shape.to_vec(), values(n, salt)).unwrap()
}

/// A one-layer Llama small enough for a seed: config.json and model.safetensors.
pub fn tiny_llama() -> (Vec<u8>, Vec<u8>) {
    let config = serde_json::json!({
        "model_type": "llama",
        "vocab_size": 16,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 4,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false,
        "max_position_embeddings": 32,
        "bos_token_id": 1,
        "eos_token_id": 2,
    });
    let mut t = NamedTensors::new();
    let mut add = |name: &str, shape: &[usize]| {
        let salt = t.len() as u32;
        t.insert(name.to_owned(), f32_tensor(shape, salt));
    };
    add("model.embed_tokens.weight", &[16, 8]);
    let p = "model.layers.0";
    add(&format!("{p}.self_attn.q_proj.weight"), &[8, 8]);
    add(&format!("{p}.self_attn.k_proj.weight"), &[4, 8]);
    add(&format!("{p}.self_attn.v_proj.weight"), &[4, 8]);
    add(&format!("{p}.self_attn.o_proj.weight"), &[8, 8]);
    add(&format!("{p}.mlp.gate_proj.weight"), &[16, 8]);
    add(&format!("{p}.mlp.up_proj.weight"), &[16, 8]);
    add(&format!("{p}.mlp.down_proj.weight"), &[8, 16]);
    add(&format!("{p}.input_layernorm.weight"), &[8]);
    add(&format!("{p}.post_attention_layernorm.weight"), &[8]);
    add("model.norm.weight", &[8]);
    add("lm_head.weight", &[16, 8]);
    let meta = BTreeMap::from([("format".to_owned(), "pt".to_owned())]);
    (
        serde_json::to_vec_pretty(&config).unwrap(),
        safetensors_bytes(&t, &meta),
    )
}

/// A one-layer GPT-2 small enough for a seed.
pub fn tiny_gpt2() -> (Vec<u8>, Vec<u8>) {
    let config = serde_json::json!({
        "model_type": "gpt2",
        "vocab_size": 16,
        "n_embd": 8,
        "n_layer": 1,
        "n_head": 2,
        "n_positions": 8,
        "n_inner": 16,
        "eos_token_id": 2,
    });
    let mut t = NamedTensors::new();
    let mut add = |name: &str, shape: &[usize]| {
        let salt = t.len() as u32;
        t.insert(format!("transformer.{name}"), f32_tensor(shape, salt));
    };
    for ln in ["h.0.ln_1", "h.0.ln_2", "ln_f"] {
        add(&format!("{ln}.weight"), &[8]);
        add(&format!("{ln}.bias"), &[8]);
    }
    add("h.0.attn.c_attn.weight", &[8, 24]);
    add("h.0.attn.c_attn.bias", &[24]);
    add("h.0.attn.c_proj.weight", &[8, 8]);
    add("h.0.attn.c_proj.bias", &[8]);
    add("h.0.mlp.c_fc.weight", &[8, 16]);
    add("h.0.mlp.c_fc.bias", &[16]);
    add("h.0.mlp.c_proj.weight", &[16, 8]);
    add("h.0.mlp.c_proj.bias", &[8]);
    add("wte.weight", &[16, 8]);
    add("wpe.weight", &[8, 8]);
    let meta = BTreeMap::from([("format".to_owned(), "pt".to_owned())]);
    (
        serde_json::to_vec_pretty(&config).unwrap(),
        safetensors_bytes(&t, &meta),
    )
}

/// The fixture adapter as a PEFT directory written by `Adapter::save`.
pub fn adapter_files() -> (Vec<u8>, Vec<u8>) {
    let adapter = Adapter {
        config: LoraConfig {
            rank: crate::RANK,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
        },
        tensors: filled(layout(), 3),
    };
    let dir = tempfile::tempdir().unwrap();
    adapter.save(dir.path(), Some("builtin"), false).unwrap();
    (
        std::fs::read(dir.path().join("adapter_config.json")).unwrap(),
        std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap(),
    )
}
