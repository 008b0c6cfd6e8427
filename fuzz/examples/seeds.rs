//! Writes the seed corpora, `fuzz/corpus/<target>/seed-*`: a few small valid inputs per
//! target, made with the project's own encoders (and the trainer's test fixtures), then runs
//! each through its target and prints what the target made of it.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example seeds`

use std::collections::BTreeMap;

use prost::Message;
use swarmtune_fuzz::samples::*;
use swarmtune_fuzz::{
    self as fz, COORDINATOR, ENCODINGS, OWNER, envelope_for, join2, keypair, layout, lease,
    sign_raw,
};
use swarmtune_protocol::signed::SignedPayload;
use swarmtune_protocol::{ChunkManifest, ContentId, PROTOCOL_VERSION, v1};
use swarmtune_trainer::checkpoint::safetensors_bytes;
use swarmtune_trainer::data::Shard;
use swarmtune_trainer::lora::{Adapter, LoraConfig};
use swarmtune_trainer::train::LoraState;

/// Largest seed written: every seed is well under it.
const MAX_SEED_BYTES: usize = 64 << 10;

fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out: Vec<(&'static str, String, Vec<u8>)> = Vec::new();
    let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| {
        out.push((target, name.to_owned(), bytes));
    };

    // Envelopes.
    let spec = job_spec();
    let spec_env = sign_raw(
        &keypair(OWNER),
        v1::JobSpec::TYPE_TAG,
        &spec.encode_to_vec(),
        1,
    );
    let delta_env = signed_delta_envelope();
    let ann_env = sign_raw(
        &keypair(COORDINATOR),
        v1::JobAnnouncement::TYPE_TAG,
        &announcement().encode_to_vec(),
        3,
    );
    let man_env = sign_raw(
        &keypair(COORDINATOR),
        v1::ModuleManifest::TYPE_TAG,
        &manifest().encode_to_vec(),
        4,
    );
    add("signed_envelope", "job-spec", spec_env.encode_to_vec());
    add(
        "signed_envelope",
        "delta-envelope",
        delta_env.encode_to_vec(),
    );
    add("signed_envelope", "announcement", ann_env.encode_to_vec());
    add("signed_envelope", "manifest", man_env.encode_to_vec());

    // Gossip: signed payloads (mode 2, 3) and received messages (mode 0, 1).
    add(
        "gossip",
        "jobs-payload",
        [&[2u8][..], &announcement().encode_to_vec()].concat(),
    );
    add(
        "gossip",
        "modules-payload",
        [&[3u8][..], &manifest().encode_to_vec()].concat(),
    );
    add(
        "gossip",
        "jobs-message",
        [&[0u8][..], &ann_env.encode_to_vec()].concat(),
    );
    add(
        "gossip",
        "modules-message",
        [&[1u8][..], &man_env.encode_to_vec()].concat(),
    );

    // Job specs (payloads the owner's key signs) and delta envelopes (the volunteer's).
    add("job_spec", "example-job", spec.encode_to_vec());
    let mut topk = spec.clone();
    topk.delta_encoding = v1::DeltaEncoding::Topk as i32;
    topk.topk_fraction = 0.1;
    add("job_spec", "topk-job", topk.encode_to_vec());
    for (i, encoding) in ENCODINGS.iter().enumerate() {
        let lease = lease(*encoding);
        let env = envelope_for(&lease, &delta_blob(*encoding));
        if i == 2 {
            add("delta_envelope", "int8", env.encode_to_vec());
        }
    }

    // Frames: one valid message of each protocol and direction, length-prefixed.
    let lease_int8 = lease(v1::DeltaEncoding::Int8Rowwise);
    let frames: [(u8, &str, Vec<u8>); 10] = [
        (
            0,
            "submit-job",
            framed(&v1::JobRequest {
                protocol_version: PROTOCOL_VERSION,
                body: Some(v1::job_request::Body::SubmitJob(v1::SubmitJob {
                    spec: Some(spec_env.clone()),
                })),
            }),
        ),
        (
            1,
            "job-submitted",
            framed(&v1::JobResponse {
                protocol_version: PROTOCOL_VERSION,
                body: Some(v1::job_response::Body::JobSubmitted(v1::JobSubmitted {
                    job_id: vec![0x11; 32],
                    state: v1::JobState::Preparing as i32,
                })),
            }),
        ),
        (
            2,
            "request-lease",
            framed(&v1::LeaseRequest {
                protocol_version: PROTOCOL_VERSION,
                body: Some(v1::lease_request::Body::RequestLease(v1::RequestLease {
                    job_id: vec![0x11; 32],
                    capabilities: Some(v1::PeerCapabilities {
                        cpu_cores: 2,
                        memory_bytes: 1 << 30,
                        ..Default::default()
                    }),
                })),
            }),
        ),
        (
            3,
            "lease-granted",
            framed(&v1::LeaseResponse {
                protocol_version: PROTOCOL_VERSION,
                body: Some(v1::lease_response::Body::LeaseGranted(v1::LeaseGranted {
                    lease: Some(lease_int8.clone()),
                })),
            }),
        ),
        (
            4,
            "submit-delta",
            framed(&v1::DeltaRequest {
                protocol_version: PROTOCOL_VERSION,
                body: Some(v1::delta_request::Body::SubmitDelta(v1::SubmitDelta {
                    envelope: Some(delta_env.clone()),
                })),
            }),
        ),
        (
            5,
            "delta-receipt",
            framed(&v1::DeltaResponse {
                protocol_version: PROTOCOL_VERSION,
                body: Some(v1::delta_response::Body::DeltaReceipt(v1::DeltaReceipt {
                    lease_id: 7,
                    verdict_expected_by_unix_ms: 1,
                })),
            }),
        ),
        (
            6,
            "get-latest-version",
            framed(&v1::StatusRequest {
                protocol_version: PROTOCOL_VERSION,
                body: Some(v1::status_request::Body::GetLatestVersion(
                    v1::GetLatestVersion {
                        module: "shout".into(),
                    },
                )),
            }),
        ),
        (
            7,
            "module-version",
            framed(&v1::StatusResponse {
                protocol_version: PROTOCOL_VERSION,
                body: Some(v1::status_response::Body::ModuleVersion(
                    v1::ModuleVersion {
                        manifest: Some(man_env.clone()),
                    },
                )),
            }),
        ),
        (
            8,
            "get-chunk",
            framed(&v1::BlobRequest {
                protocol_version: PROTOCOL_VERSION,
                body: Some(v1::blob_request::Body::GetChunk(v1::GetChunk {
                    id: Some(ContentId::of(b"blob").to_proto()),
                    index: 0,
                })),
            }),
        ),
        (
            9,
            "blob-manifest",
            framed(&v1::BlobResponse {
                protocol_version: PROTOCOL_VERSION,
                body: Some(v1::blob_response::Body::BlobManifest(
                    ChunkManifest::for_bytes(&vec![7u8; 2_500_000]).to_proto(),
                )),
            }),
        ),
    ];
    for (kind, name, bytes) in frames {
        add("frame", name, [&[kind][..], &bytes].concat());
    }

    // Blob manifests and bundles.
    add(
        "blob_manifest",
        "empty",
        ChunkManifest::for_bytes(&[]).to_proto().encode_to_vec(),
    );
    add(
        "blob_manifest",
        "one-chunk",
        ChunkManifest::for_bytes(b"hello")
            .to_proto()
            .encode_to_vec(),
    );
    add(
        "blob_manifest",
        "three-chunks",
        ChunkManifest::for_bytes(&vec![7u8; 2_500_000])
            .to_proto()
            .encode_to_vec(),
    );
    let file = |path: &str, bytes: &[u8]| v1::BundleFile {
        path: path.into(),
        id: Some(ContentId::of(bytes).to_proto()),
        size_bytes: bytes.len() as u64,
    };
    add(
        "bundle",
        "base",
        v1::Bundle {
            protocol_version: PROTOCOL_VERSION,
            files: vec![
                file("config.json", b"{}"),
                file("model.safetensors", b"weights"),
                file("tokenizer.json", b"{}"),
            ],
        }
        .encode_to_vec(),
    );
    add(
        "bundle",
        "nested",
        v1::Bundle {
            protocol_version: PROTOCOL_VERSION,
            files: vec![file("a/b.txt", b"b"), file("c", b"c")],
        }
        .encode_to_vec(),
    );

    // Shards.
    let tokens: Vec<u32> = (0..8).map(|i| (i * 7) % 300).collect();
    let shard = Shard::new(4, tokens, vec![0, 1, 1, 1, 0, 0, 1, 1], [9; 32]).unwrap();
    add("shard", "two-seqs", shard.encode());
    add(
        "shard",
        "empty",
        Shard::new(16, vec![], vec![], [0; 32]).unwrap().encode(),
    );

    // Deltas, raw and behind the verifier (first byte: the lease's encoding).
    for (i, encoding) in ENCODINGS.iter().enumerate() {
        let blob = delta_blob(*encoding);
        let name = encoding.as_str_name().to_ascii_lowercase();
        add("delta", &name, blob.clone());
        add("delta_verify", &name, [&[i as u8][..], &blob].concat());
    }

    // A challenge's state blob.
    let start = LoraState::start(&Adapter {
        config: LoraConfig {
            rank: fz::RANK,
            ..Default::default()
        },
        tensors: filled(layout(), 5),
    });
    add("lora_state", "start", start.to_bytes().unwrap());

    // Safetensors images.
    let meta = BTreeMap::from([("format".to_owned(), "pt".to_owned())]);
    add(
        "safetensors",
        "adapter",
        safetensors_bytes(&filled(layout(), 1), &meta),
    );
    add(
        "safetensors",
        "qwen2-fixture-adapter",
        fixture("trainer/tests/fixtures/qwen2/adapter/adapter_model.safetensors"),
    );

    // Adapter directories and base models: two files in one input (fuzz::split2).
    let (config, weights) = adapter_files();
    add("adapter_dir", "saved", join2(&config, &weights));
    add(
        "adapter_dir",
        "qwen2-fixture",
        join2(
            &fixture("trainer/tests/fixtures/qwen2/adapter/adapter_config.json"),
            &fixture("trainer/tests/fixtures/qwen2/adapter/adapter_model.safetensors"),
        ),
    );
    let (config, weights) = tiny_llama();
    add("base_model", "tiny-llama", join2(&config, &weights));
    let (config, weights) = tiny_gpt2();
    add("base_model", "tiny-gpt2", join2(&config, &weights));

    // Model configs and tokenizers: the fixtures.
    for (name, dir) in [
        ("builtin", "trainer/builtin/base"),
        ("llama", "trainer/tests/fixtures/llama/model"),
        ("qwen2", "trainer/tests/fixtures/qwen2/model"),
        ("gpt2", "trainer/tests/fixtures/gpt2/model"),
    ] {
        add("model_config", name, fixture(&format!("{dir}/config.json")));
        add("tokenizer", name, fixture(&format!("{dir}/tokenizer.json")));
    }

    // Job files and datasets.
    add("job_file", "example", fixture("examples/job.toml"));
    add(
        "job_file",
        "minimal",
        b"module = \"m\"\nbase = \"builtin\"\n[dataset]\nblob = \"0000000000000000000000000000000000000000000000000000000000000000\"\nformat = \"text\"\n[rounds]\ntoken_budget = 100000\n"
            .to_vec(),
    );
    add(
        "dataset",
        "jsonl",
        [
            &[0u8][..],
            b"{\"prompt\": \"Shout: the cat =>\", \"completion\": \" THE CAT\"}\n{\"text\": \"a document\"}\n",
        ]
        .concat(),
    );
    add(
        "dataset",
        "text",
        [
            &[1u8][..],
            b"first document\nline two\n\nsecond document\n".as_slice(),
        ]
        .concat(),
    );
    out
}

fn main() {
    let corpus = root().join("corpus");
    let mut total = 0;
    for (target, name, bytes) in seeds() {
        assert!(
            bytes.len() <= MAX_SEED_BYTES,
            "seed {target}/{name} is {} bytes",
            bytes.len()
        );
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), &bytes).unwrap();
        total += bytes.len();
        let verdict = (fz::target(target).run)(&bytes);
        let shown = match &verdict {
            Ok(s) => format!("ok: {s}"),
            Err(e) => format!("ERR: {e}"),
        };
        println!("{target:16} {name:24} {:6} bytes  {shown}", bytes.len());
    }
    println!("{total} bytes of seeds in {}", corpus.display());
}
