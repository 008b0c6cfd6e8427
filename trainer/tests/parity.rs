//! Parity with transformers + PEFT: the reference fixtures in `tests/fixtures` (see its README)
//! hold logits and LoRA gradients computed in PyTorch for three tiny models. Our loader must
//! reproduce them to 1e-4 on every CPU backend.

use std::path::{Path, PathBuf};

use swarmtune_trainer::checkpoint::{read_input_ids, read_safetensors};
use swarmtune_trainer::device::DeviceKind;
use swarmtune_trainer::lora::{Adapter, DeviceLora};
use swarmtune_trainer::model::{CausalLm, ForwardOptions, TokenBatch, download};
use swarmtune_trainer::tensors::HostTensor;
use swarmtune_trainer::train::{LocalTrainer, Provenance};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn inputs(dir: &Path) -> TokenBatch {
    read_input_ids(&dir.join("inputs.safetensors")).unwrap()
}

fn expected(dir: &Path, file: &str) -> std::collections::BTreeMap<String, HostTensor> {
    read_safetensors(&dir.join(file)).unwrap().0
}

fn max_abs_diff(a: &HostTensor, b: &HostTensor) -> f32 {
    assert_eq!(a.shape, b.shape);
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check_logits(name: &str, kind: DeviceKind) {
    let dir = fixture(name);
    let device = kind.device().unwrap();
    let model = CausalLm::load(&dir.join("model"), &device).unwrap();
    let batch = inputs(&dir);

    let logits = download(model.logits(&batch, ForwardOptions::default()).unwrap()).unwrap();
    let want = &expected(&dir, "expected_logits.safetensors")["logits"];
    let diff = max_abs_diff(&logits, want);
    assert!(
        diff < 1e-4,
        "{name} on {kind}: base logits differ by {diff}"
    );

    let adapter = Adapter::load(&dir.join("adapter")).unwrap();
    let sites = model.lora_sites(&adapter.config);
    let lora = DeviceLora::new(&adapter, &sites, &device, false, 0).unwrap();
    let logits = download(
        model
            .logits(&batch, ForwardOptions { lora: Some(&lora) })
            .unwrap(),
    )
    .unwrap();
    let want = &expected(&dir, "expected_logits_with_adapter.safetensors")["logits"];
    let diff = max_abs_diff(&logits, want);
    assert!(
        diff < 1e-4,
        "{name} on {kind}: adapter logits differ by {diff}"
    );
}

fn check_grads(name: &str, kind: DeviceKind) {
    let dir = fixture(name);
    let model = CausalLm::load(&dir.join("model"), &kind.device().unwrap())
        .unwrap()
        .to_autodiff();
    let adapter = Adapter::load(&dir.join("adapter")).unwrap();
    let trainer = LocalTrainer::new(
        &model,
        adapter.config.clone(),
        Provenance::here(kind.backend_name(), 1),
    )
    .unwrap();
    let (loss, _, grads) = trainer
        .loss_and_grads(&adapter.tensors, &inputs(&dir), None, 0)
        .unwrap();
    let want = expected(&dir, "expected_lora_grads.safetensors");
    assert!(
        (loss - want["loss"].data[0]).abs() < 1e-4,
        "{name}: loss {loss} vs {}",
        want["loss"].data[0]
    );
    assert_eq!(grads.len() + 1, want.len(), "{name}: gradient tensor count");
    for (tensor_name, g) in &grads {
        let w = &want[tensor_name];
        let scale = w.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(g, w);
        assert!(
            diff <= 1e-4 * scale,
            "{name} on {kind}: {tensor_name} differs by {diff} (max abs {scale})"
        );
    }
}

#[test]
fn llama_logits_match_transformers() {
    check_logits("llama", DeviceKind::Cpu);
}

#[test]
fn qwen2_logits_match_transformers() {
    check_logits("qwen2", DeviceKind::Cpu);
}

#[test]
fn gpt2_logits_match_transformers() {
    check_logits("gpt2", DeviceKind::Cpu);
}

#[test]
fn llama_lora_grads_match_peft() {
    check_grads("llama", DeviceKind::Cpu);
}

#[test]
fn qwen2_lora_grads_match_peft() {
    check_grads("qwen2", DeviceKind::Cpu);
}

#[test]
fn gpt2_lora_grads_match_peft() {
    check_grads("gpt2", DeviceKind::Cpu);
}

#[test]
fn ndarray_backend_matches_too() {
    for name in ["llama", "qwen2", "gpt2"] {
        check_logits(name, DeviceKind::Ndarray);
        check_grads(name, DeviceKind::Ndarray);
    }
}

#[test]
fn merged_checkpoint_equals_model_plus_adapter() {
    for name in ["llama", "qwen2", "gpt2"] {
        let dir = fixture(name);
        let out = tempfile::tempdir().unwrap();
        let adapter = Adapter::load(&dir.join("adapter")).unwrap();
        swarmtune_trainer::lora::merge_into_base(&dir.join("model"), &adapter, out.path()).unwrap();
        let device = DeviceKind::Cpu.device().unwrap();
        let merged = CausalLm::load(out.path(), &device).unwrap();
        let logits = download(
            merged
                .logits(&inputs(&dir), ForwardOptions::default())
                .unwrap(),
        )
        .unwrap();
        let want = &expected(&dir, "expected_logits_with_adapter.safetensors")["logits"];
        let diff = max_abs_diff(&logits, want);
        assert!(diff < 1e-4, "{name}: merged logits differ by {diff}");
    }
}

#[test]
fn kv_cache_generation_matches_the_full_forward() {
    use swarmtune_trainer::model::KvCache;
    for name in ["llama", "gpt2"] {
        let dir = fixture(name);
        let device = DeviceKind::Cpu.device().unwrap();
        let model = CausalLm::load(&dir.join("model"), &device).unwrap();
        let batch = inputs(&dir);
        let first = TokenBatch::new(batch.ids[..batch.seq].to_vec(), 1, batch.seq).unwrap();
        let full = download(model.logits(&first, ForwardOptions::default()).unwrap()).unwrap();
        let vocab = full.shape[2];
        // Feed the prompt in two pieces, then one token at a time.
        let mut cache = KvCache::new(model.config().num_layers());
        let split = 5;
        let mut rows = Vec::new();
        let head = TokenBatch::new(first.ids[..split].to_vec(), 1, split).unwrap();
        rows.extend(
            download(
                model.head(
                    model
                        .hidden(&head, ForwardOptions::default(), Some(&mut cache))
                        .unwrap(),
                ),
            )
            .unwrap()
            .data,
        );
        for &token in &first.ids[split..] {
            let one = TokenBatch::new(vec![token], 1, 1).unwrap();
            rows.extend(
                download(
                    model.head(
                        model
                            .hidden(&one, ForwardOptions::default(), Some(&mut cache))
                            .unwrap(),
                    ),
                )
                .unwrap()
                .data,
            );
        }
        assert_eq!(rows.len(), batch.seq * vocab);
        let diff = rows
            .iter()
            .zip(&full.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "{name}: cached logits differ by {diff}");
    }
}

/// A config.json that claims 2^31 − 1 layers (found by fuzzing: the loaders used to reserve
/// that many layers up front and aborted the process) is refused with an error naming the
/// first missing tensor.
#[test]
fn a_config_with_a_huge_layer_count_is_refused_not_an_abort() {
    let device = DeviceKind::Cpu.device().unwrap();
    for (name, key) in [("gpt2", "n_layer"), ("llama", "num_hidden_layers")] {
        let dir = tempfile::tempdir().unwrap();
        let model = fixture(name).join("model");
        for file in ["model.safetensors", "tokenizer.json"] {
            std::fs::copy(model.join(file), dir.path().join(file)).unwrap();
        }
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
        config[key] = serde_json::json!(i32::MAX);
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let err = match CausalLm::load(dir.path(), &device) {
            Ok(_) => panic!("{name}: a {} layer model loaded from 2 layers", i32::MAX),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(".2."), "{name}: {err}");
    }
}
