//! The README's table of bad inputs: each hand-made hostile input is run through its fuzz
//! target's body (`swarmtune_fuzz::<target>`, the same code the fuzzer runs) in a child
//! process of its own, and the table row shows the error the decoder answered with, or how the
//! process died.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example bad_inputs` prints the Markdown table.

use std::process::Command;

use prost::Message;
use swarmtune_fuzz::samples::{self, framed};
use swarmtune_fuzz::{
    self as fz, COORDINATOR, OWNER, VOLUNTEER, envelope_for, join2, keypair, layout, lease, peer,
    sign_raw,
};
use swarmtune_protocol::signed::SignedPayload;
use swarmtune_protocol::{ChunkManifest, ContentId, PROTOCOL_VERSION, v1};
use swarmtune_trainer::data::Shard;
use swarmtune_trainer::lora::{Adapter, LoraConfig};
use swarmtune_trainer::train::LoraState;

struct Case {
    target: &'static str,
    input: &'static str,
    bytes: Vec<u8>,
}

fn case(target: &'static str, input: &'static str, bytes: Vec<u8>) -> Case {
    Case {
        target,
        input,
        bytes,
    }
}

/// A safetensors image from a header written by hand.
fn st(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// `{"a":{"a":…{}…}}`, `depth` objects deep.
fn nested_objects(depth: usize) -> String {
    format!("{}{{}}{}", "{\"a\":".repeat(depth), "}".repeat(depth))
}

fn with_kind(kind: u8, stream: &[u8]) -> Vec<u8> {
    [&[kind][..], stream].concat()
}

fn varint(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

fn spec_envelope(spec: &v1::JobSpec) -> v1::Signed {
    sign_raw(
        &keypair(OWNER),
        v1::JobSpec::TYPE_TAG,
        &spec.encode_to_vec(),
        1,
    )
}

fn shard_header(seq_len: u32, n_seqs: u32) -> Vec<u8> {
    let mut out = b"STSHARD\0".to_vec();
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&seq_len.to_le_bytes());
    out.extend_from_slice(&n_seqs.to_le_bytes());
    out.extend_from_slice(&[0; 32]);
    out
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let spec = samples::job_spec();

    // ---- frames
    out.push(case(
        "frame",
        "JobRequest stream whose length prefix announces 1 GiB (5 bytes in all)",
        with_kind(0, &varint(1 << 30)),
    ));
    out.push(case(
        "frame",
        "LeaseRequest stream: prefix says 100 bytes, 3 follow, then end of stream",
        with_kind(2, &[100, 8, 1, 18]),
    ));
    out.push(case(
        "frame",
        "BlobRequest stream: a length prefix of ten 0xff bytes (varint overflow)",
        with_kind(8, &[0xff; 10]),
    ));
    out.push(case(
        "frame",
        "StatusRequest of protocol_version 2",
        with_kind(
            6,
            &framed(&v1::StatusRequest {
                protocol_version: 2,
                body: None,
            }),
        ),
    ));
    out.push(case(
        "frame",
        "DeltaResponse frame of 3 bytes ff ff ff",
        with_kind(5, &[3, 0xff, 0xff, 0xff]),
    ));
    let mut bad_lease = lease(v1::DeltaEncoding::Int8Rowwise);
    bad_lease.inner.as_mut().unwrap().inner_steps = 0;
    out.push(case(
        "frame",
        "LeaseGranted whose lease has inner_steps = 0",
        with_kind(
            3,
            &framed(&v1::LeaseResponse {
                protocol_version: PROTOCOL_VERSION,
                body: Some(v1::lease_response::Body::LeaseGranted(v1::LeaseGranted {
                    lease: Some(bad_lease),
                })),
            }),
        ),
    ));

    // ---- signed envelopes
    out.push(case(
        "signed_envelope",
        "empty input (every field default)",
        vec![],
    ));
    let mut flipped = spec_envelope(&spec);
    flipped.payload[10] ^= 1;
    out.push(case(
        "signed_envelope",
        "a signed JobSpec with one payload bit flipped",
        flipped.encode_to_vec(),
    ));
    let big = sign_raw(
        &keypair(OWNER),
        v1::JobSpec::TYPE_TAG,
        &vec![0u8; 40_000],
        1,
    );
    out.push(case(
        "signed_envelope",
        "a JobSpec envelope with a 40 000-byte payload",
        big.encode_to_vec(),
    ));
    let mut v2 = spec_envelope(&spec);
    v2.protocol_version = 2;
    out.push(case(
        "signed_envelope",
        "a JobSpec envelope claiming protocol_version 2",
        v2.encode_to_vec(),
    ));
    let mut junk_key = spec_envelope(&spec);
    junk_key.public_key = vec![0x08, 0x02, 0x12, 0x20]
        .into_iter()
        .chain([0xab; 32])
        .collect();
    out.push(case(
        "signed_envelope",
        "a JobSpec envelope whose 36-byte public key says key type 2 (secp256k1) with junk bytes",
        junk_key.encode_to_vec(),
    ));
    let by_coordinator = sign_raw(
        &keypair(COORDINATOR),
        v1::DeltaEnvelope::TYPE_TAG,
        &envelope_for(&lease(v1::DeltaEncoding::Int8Rowwise), b"x").encode_to_vec(),
        2,
    );
    out.push(case(
        "signed_envelope",
        "a DeltaEnvelope signed by a key other than the connection's peer",
        by_coordinator.encode_to_vec(),
    ));

    // ---- gossip
    let manifest_env = sign_raw(
        &keypair(COORDINATOR),
        v1::ModuleManifest::TYPE_TAG,
        &samples::manifest().encode_to_vec(),
        4,
    );
    out.push(case(
        "gossip",
        "a valid signed ModuleManifest published on the jobs topic",
        with_kind(0, &manifest_env.encode_to_vec()),
    ));
    out.push(case(
        "gossip",
        "a 70 000-byte message on the modules topic",
        with_kind(1, &vec![0u8; 70_000]),
    ));
    let mut foreign = samples::announcement();
    foreign.coordinator_peer_id = peer(VOLUNTEER).to_bytes();
    out.push(case(
        "gossip",
        "a JobAnnouncement naming another coordinator than its signer",
        with_kind(2, &foreign.encode_to_vec()),
    ));

    // ---- job specs
    out.push(case(
        "job_spec",
        "payload 0x0a 0xff (a field whose length runs past the end)",
        vec![0x0a, 0xff],
    ));
    let mut rank0 = spec.clone();
    rank0.lora.as_mut().unwrap().rank = 0;
    out.push(case(
        "job_spec",
        "the example spec with lora.rank = 0",
        rank0.encode_to_vec(),
    ));
    let mut elsewhere = spec.clone();
    elsewhere.coordinator_peer_id = peer(VOLUNTEER).to_bytes();
    out.push(case(
        "job_spec",
        "the example spec addressed to another coordinator",
        elsewhere.encode_to_vec(),
    ));
    let mut attn = spec.clone();
    attn.lora.as_mut().unwrap().target_modules = vec!["c_attn".into()];
    out.push(case(
        "job_spec",
        "the example spec targeting c_attn (a GPT-2 layer) on the Llama-style built-in base",
        attn.encode_to_vec(),
    ));
    let mut huge = spec.clone();
    huge.inner.as_mut().unwrap().inner_steps = u32::MAX;
    out.push(case(
        "job_spec",
        "the example spec with inner_steps = 4294967295",
        huge.encode_to_vec(),
    ));

    // ---- delta envelopes
    let lease8 = lease(v1::DeltaEncoding::Int8Rowwise);
    let mut tokens = envelope_for(&lease8, b"delta");
    tokens.tokens += 1;
    out.push(case(
        "delta_envelope",
        "an envelope reporting one token more than steps x batch x seq_len",
        tokens.encode_to_vec(),
    ));
    let mut short_hash = envelope_for(&lease8, b"delta");
    short_hash.commitments[1].state_hash.pop();
    out.push(case(
        "delta_envelope",
        "an envelope whose second commitment hash is 31 bytes",
        short_hash.encode_to_vec(),
    ));
    let mut nan = envelope_for(&lease8, b"delta");
    nan.loss_after = f32::NAN;
    out.push(case(
        "delta_envelope",
        "an envelope with loss_after = NaN",
        nan.encode_to_vec(),
    ));

    // ---- blob manifests
    let one = ChunkManifest::for_bytes(b"hello").to_proto();
    let mut too_big = one.clone();
    too_big.size_bytes = (16 << 30) + 1;
    out.push(case(
        "blob_manifest",
        "size_bytes = 16 GiB + 1",
        too_big.encode_to_vec(),
    ));
    let mut count = one.clone();
    count.chunk_hashes = vec![0; 96];
    out.push(case(
        "blob_manifest",
        "a 5-byte blob with three chunk hashes",
        count.encode_to_vec(),
    ));
    let mut chunk = one.clone();
    chunk.chunk_size = 4096;
    out.push(case(
        "blob_manifest",
        "chunk_size = 4096",
        chunk.encode_to_vec(),
    ));

    // ---- bundles
    let file = |path: &str| v1::BundleFile {
        path: path.into(),
        id: Some(ContentId::of(path.as_bytes()).to_proto()),
        size_bytes: 1,
    };
    out.push(case(
        "bundle",
        "a bundle listing ../../.ssh/authorized_keys",
        v1::Bundle {
            protocol_version: PROTOCOL_VERSION,
            files: vec![file("../../.ssh/authorized_keys")],
        }
        .encode_to_vec(),
    ));
    out.push(case(
        "bundle",
        "a bundle listing /etc/passwd",
        v1::Bundle {
            protocol_version: PROTOCOL_VERSION,
            files: vec![file("/etc/passwd")],
        }
        .encode_to_vec(),
    ));
    out.push(case(
        "bundle",
        "a bundle listing config.json twice",
        v1::Bundle {
            protocol_version: PROTOCOL_VERSION,
            files: vec![file("config.json"), file("config.json")],
        }
        .encode_to_vec(),
    ));
    out.push(case(
        "bundle",
        "a bundle of 300 files",
        v1::Bundle {
            protocol_version: PROTOCOL_VERSION,
            files: (0..300).map(|i| file(&format!("f{i:03}"))).collect(),
        }
        .encode_to_vec(),
    ));

    // ---- shards
    out.push(case(
        "shard",
        "a 52-byte header claiming 4294967295 sequences of 65536 tokens",
        shard_header(65_536, u32::MAX),
    ));
    out.push(case(
        "shard",
        "a header claiming 2 sequences of 4 tokens, body 3 bytes short",
        [shard_header(4, 2), vec![0; 37]].concat(),
    ));
    let good = Shard::new(2, vec![1, 2], vec![0, 1], [0; 32])
        .unwrap()
        .encode();
    let mut mask2 = good.clone();
    *mask2.last_mut().unwrap() = 2;
    out.push(case(
        "shard",
        "a valid shard whose last mask byte is 2",
        mask2,
    ));
    let mut magic = good;
    magic[0] = b'X';
    out.push(case(
        "shard",
        "a valid shard with the first magic byte changed",
        magic,
    ));

    // ---- deltas
    out.push(case(
        "delta",
        "8-byte header length 2^60, nothing else",
        (1u64 << 60).to_le_bytes().to_vec(),
    ));
    out.push(case(
        "delta",
        "a topk container whose shape metadata claims 100000 x 100000 values",
        st(
            r#"{"__metadata__":{"format":"swarmtune-delta","version":"1","encoding":"topk","shape.w":"100000,100000"},"w.idx":{"dtype":"U32","shape":[1],"data_offsets":[0,4]},"w.val":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            &[0, 0, 0, 0, 0, 0, 0x80, 0x3f],
        ),
    ));
    out.push(case(
        "delta",
        "an f32 container holding a NaN",
        st(
            r#"{"__metadata__":{"format":"swarmtune-delta","version":"1","encoding":"f32"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            &f32::NAN.to_le_bytes(),
        ),
    ));
    out.push(case(
        "delta",
        "a container whose encoding metadata is zstd",
        st(
            r#"{"__metadata__":{"format":"swarmtune-delta","version":"1","encoding":"zstd"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            &1f32.to_le_bytes(),
        ),
    ));
    out.push(case(
        "delta",
        "an int8 container whose row scale is -1",
        st(
            r#"{"__metadata__":{"format":"swarmtune-delta","version":"1","encoding":"int8-rowwise"},"w.q":{"dtype":"I8","shape":[1,4],"data_offsets":[0,4]},"w.scale":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            &[1, 2, 3, 4, 0, 0, 0x80, 0xbf],
        ),
    ));
    out.push(case(
        "delta_verify",
        "a valid int8 delta sent for a lease that asks for top-k",
        with_kind(3, &samples::delta_blob(v1::DeltaEncoding::Int8Rowwise)),
    ));
    let mut missing = samples::filled(layout(), 1);
    missing.pop_first();
    out.push(case(
        "delta_verify",
        "a valid f32 delta missing one of the adapter's four tensors",
        with_kind(
            0,
            &swarmtune_trainer::delta::encode(
                &missing,
                swarmtune_trainer::delta::DeltaEncoding::F32,
            )
            .unwrap(),
        ),
    ));

    // ---- LoRA states, safetensors, adapters, base models
    let mut other = samples::filled(layout(), 2);
    other.pop_first();
    let state = LoraState::start(&Adapter {
        config: LoraConfig::default(),
        tensors: other,
    });
    out.push(case(
        "lora_state",
        "the state of an adapter with 3 of the layout's 4 tensors",
        state.to_bytes().unwrap(),
    ));
    out.push(case(
        "safetensors",
        "a tensor whose data_offsets run past the end of the file",
        st(
            r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            &[0; 8],
        ),
    ));
    out.push(case(
        "safetensors",
        "a well-formed I64 tensor",
        st(
            r#"{"w":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#,
            &[0; 8],
        ),
    ));
    out.push(case(
        "safetensors",
        "a header of 100 000 nested JSON objects ({\"a\":{\"a\":...}})",
        st(&nested_objects(100_000), &[]),
    ));
    let (config, weights) = samples::adapter_files();
    let dora = String::from_utf8(config.clone())
        .unwrap()
        .replace("\"use_dora\": false", "\"use_dora\": true");
    out.push(case(
        "adapter_dir",
        "the saved adapter with \"use_dora\": true in adapter_config.json",
        join2(dora.as_bytes(), &weights),
    ));
    let rank = String::from_utf8(config.clone())
        .unwrap()
        .replace("\"r\": 2", "\"r\": 4");
    out.push(case(
        "adapter_dir",
        "the saved adapter with r = 4 in its config (its tensors are rank 2)",
        join2(rank.as_bytes(), &weights),
    ));
    let (config, weights) = samples::tiny_llama();
    let wide = String::from_utf8(config.clone())
        .unwrap()
        .replace("\"hidden_size\": 8", "\"hidden_size\": 16");
    out.push(case(
        "base_model",
        "the tiny Llama with hidden_size 16 in config.json (its tensors are 8 wide)",
        join2(wide.as_bytes(), &weights),
    ));
    let (config, weights) = samples::tiny_gpt2();
    let deep = String::from_utf8(config)
        .unwrap()
        .replace("\"n_layer\": 1", "\"n_layer\": 2147483647");
    out.push(case(
        "base_model",
        "the tiny GPT-2 with n_layer = 2147483647 in config.json",
        join2(deep.as_bytes(), &weights),
    ));
    let many = String::from_utf8(samples::tiny_llama().0).unwrap().replace(
        "\"num_hidden_layers\": 1",
        "\"num_hidden_layers\": 2147483647",
    );
    out.push(case(
        "base_model",
        "the tiny Llama with num_hidden_layers = 2147483647 in config.json",
        join2(many.as_bytes(), &samples::tiny_llama().1),
    ));

    // ---- configs, tokenizers, job files, datasets
    out.push(case(
        "model_config",
        "{\"model_type\":\"t5\"}",
        br#"{"model_type":"t5"}"#.to_vec(),
    ));
    out.push(case(
        "model_config",
        "the Llama fixture config with num_attention_heads = 0",
        String::from_utf8(samples::fixture(
            "trainer/tests/fixtures/llama/model/config.json",
        ))
        .unwrap()
        .replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 0")
        .into_bytes(),
    ));
    out.push(case(
        "model_config",
        "bytes ff fe (not UTF-8)",
        vec![0xff, 0xfe],
    ));
    out.push(case(
        "model_config",
        "100 000 nested JSON objects ({\"a\":{\"a\":...}})",
        nested_objects(100_000).into_bytes(),
    ));
    out.push(case("tokenizer", "{}", b"{}".to_vec()));
    out.push(case(
        "tokenizer",
        "{\"decoder\": {\"type\": \"Fuse\\u0001\"}} with a raw 0x01 byte in the string (my reduction of the fuzzer's crash)",
        b"{\"decoder\": {\"type\": \"Fuse\x01\"}}".to_vec(),
    ));
    out.push(case(
        "tokenizer",
        "the fuzzer's crash input (fuzz/artifacts/tokenizer/crash-705c7a63...): the Llama fixture's tokenizer.json mutated",
        std::fs::read(samples::root().join("artifacts/tokenizer/crash-705c7a639fd0da8cf16d1737692f4ee90f3b1919"))
            .unwrap_or_default(),
    ));
    out.push(case(
        "tokenizer",
        "100 000 nested JSON objects ({\"a\":{\"a\":...}})",
        nested_objects(100_000).into_bytes(),
    ));
    out.push(case(
        "job_file",
        "the example job file with the key lora.rank misspelt rnak",
        String::from_utf8(samples::fixture("examples/job.toml"))
            .unwrap()
            .replace("rank = 8", "rnak = 8")
            .into_bytes(),
    ));
    out.push(case(
        "job_file",
        "the example job file with rounds.timeout_secs = 18446744073709551615",
        String::from_utf8(samples::fixture("examples/job.toml"))
            .unwrap()
            .replace("timeout_secs = 300", "timeout_secs = 18446744073709551615")
            .into_bytes(),
    ));
    out.push(case(
        "job_file",
        "a TOML table nested 100 000 levels deep (a = {a = {...}})",
        format!("x = {}1{}", "{a = ".repeat(100_000), "}".repeat(100_000)).into_bytes(),
    ));
    out.push(case(
        "dataset",
        ".jsonl whose second line is not JSON",
        [&[0u8][..], b"{\"text\": \"ok\"}\n{text: nope}\n"].concat(),
    ));
    out.push(case(
        "dataset",
        ".txt with byte ff in line 2",
        [&[1u8][..], b"fine\n\xffbad\n"].concat(),
    ));
    out.push(case("dataset", "an empty .jsonl", vec![0]));
    let _ = fz::TARGETS;
    out
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let cases = cases();
    if let [_, flag, index] = args.as_slice()
        && flag == "--case"
    {
        let case = &cases[index.parse::<usize>().expect("a case number")];
        match (fz::target(case.target).run)(&case.bytes) {
            Ok(s) => println!("accepted: {s}"),
            Err(e) => println!("{e}"),
        }
        return;
    }
    let exe = std::env::current_exe().expect("this program's path");
    println!("| decoder (fuzz target) | bad input | size | what it gets |");
    println!("| --- | --- | ---: | --- |");
    for (i, case) in cases.iter().enumerate() {
        let output = Command::new(&exe)
            .args(["--case", &i.to_string()])
            .output()
            .expect("the child runs");
        let answer = if output.status.success() {
            String::from_utf8_lossy(&output.stdout).trim().to_owned()
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let last = stderr
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.starts_with("note:"))
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
            format!("**process died ({})**: {last}", output.status)
        };
        let answer = answer.replace('|', "\\|").replace('\n', " ");
        let shown = if answer.chars().count() > 300 {
            format!("{}…", answer.chars().take(300).collect::<String>())
        } else {
            answer
        };
        println!(
            "| `{}` | {} | {} | {} |",
            case.target,
            case.input.replace('|', "\\|"),
            case.bytes.len(),
            shown
        );
    }
}
