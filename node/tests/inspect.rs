//! The `inspect` subcommands, run as a user runs them, reproduce the transformers reference.

use std::path::{Path, PathBuf};
use std::process::Command;

use swarmtune_trainer::checkpoint::read_safetensors;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../trainer/tests/fixtures")
        .join(name)
}

fn swarmtune() -> Command {
    Command::new(env!("CARGO_BIN_EXE_swarmtune"))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs `swarmtune inspect WHAT` on a fixture with its adapter and returns what it wrote.
fn inspect(
    what: &str,
    fixture_name: &str,
    extra: &[&str],
) -> swarmtune_trainer::tensors::NamedTensors {
    let dir = fixture(fixture_name);
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("out.safetensors");
    let status = swarmtune()
        .args(["inspect", what])
        .args(extra)
        .arg("--model")
        .arg(dir.join("model"))
        .arg("--adapter")
        .arg(dir.join("adapter"))
        .arg("--ids")
        .arg(dir.join("inputs.safetensors"))
        .arg("--out")
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    read_safetensors(&path).unwrap().0
}

#[test]
fn inspect_logits_writes_the_reference_logits() {
    let got = inspect("logits", "qwen2", &["--threads", "2"]);
    let want = read_safetensors(&fixture("qwen2").join("expected_logits_with_adapter.safetensors"))
        .unwrap()
        .0;
    assert_eq!(got["logits"].shape, want["logits"].shape);
    assert!(max_diff(&got["logits"].data, &want["logits"].data) < 1e-4);
}

#[test]
fn inspect_grads_writes_every_lora_gradient_and_the_loss() {
    let got = inspect("grads", "gpt2", &["--device", "ndarray"]);
    let want = read_safetensors(&fixture("gpt2").join("expected_lora_grads.safetensors"))
        .unwrap()
        .0;
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (name, w) in &want {
        let scale = w.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(max_diff(&got[name].data, &w.data) <= 1e-4 * scale, "{name}");
    }
}

#[test]
fn bad_input_is_a_clear_error_not_a_panic() {
    let dir = fixture("llama");
    let out = tempfile::tempdir().unwrap();
    let output = swarmtune()
        .args(["inspect", "logits", "--model"])
        .arg(dir.join("adapter")) // not a model directory
        .arg("--ids")
        .arg(dir.join("inputs.safetensors"))
        .arg("--out")
        .arg(out.path().join("x.safetensors"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("config.json"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let output = swarmtune()
        .args(["generate", "--device", "tpu", "--prompt", "x", "--model"])
        .arg(dir.join("model"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown device"));
}

#[test]
fn generate_streams_a_continuation() {
    let dir = fixture("llama");
    let output = swarmtune()
        .args([
            "generate",
            "--max-new-tokens",
            "8",
            "--prompt",
            "hello",
            "--model",
        ])
        .arg(dir.join("model"))
        .arg("--adapter")
        .arg(dir.join("adapter"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.starts_with("hello") && stdout.len() > "hello\n".len(),
        "{stdout:?}"
    );
}
