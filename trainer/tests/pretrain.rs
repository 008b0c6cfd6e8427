//! Pretraining end to end on a tiny recipe: the loss falls, the result is a Hugging Face
//! directory that loads back, and full-weight gradients match finite differences.

use std::sync::atomic::AtomicBool;

use swarmtune_trainer::builtin::corpus;
use swarmtune_trainer::device::DeviceKind;
use swarmtune_trainer::model::{CausalLm, ForwardOptions, TokenBatch};
use swarmtune_trainer::pretrain::{Recipe, byte_level_tokenizer, pretrain};

const TINY: &str = r#"
[model]
hidden_size = 32
num_hidden_layers = 1
num_attention_heads = 4
num_key_value_heads = 2
intermediate_size = 64
max_position_embeddings = 64
rope_theta = 10000.0

[corpus]
seed = 1
documents = 400
eval_fraction = 0.05

[train]
steps = 40
batch_size = 8
seq_len = 32
learning_rate = 1e-2
min_learning_rate = 1e-3
warmup_steps = 5
weight_decay = 0.1
max_grad_norm = 1.0
seed = 2
eval_every = 20
"#;

#[test]
fn a_tiny_pretraining_run_learns_and_saves_a_loadable_model() {
    let recipe: Recipe = toml::from_str(TINY).unwrap();
    let out = tempfile::tempdir().unwrap();
    let device = DeviceKind::Cpu.device().unwrap();
    let report = pretrain(
        &recipe,
        &device,
        "flex",
        1,
        out.path(),
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(report.evals.len(), 2);
    let (first, last) = (&report.evals[0], &report.evals[1]);
    // A byte-level model starts near ln(257) ≈ 5.55 and must have learned something.
    assert!(last.eval_loss < 3.5, "eval loss {}", last.eval_loss);
    assert!(last.eval_loss < first.eval_loss);
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "pretrain_report.json",
    ] {
        assert!(out.path().join(file).is_file(), "{file}");
    }
    // The directory loads like any Hugging Face checkpoint and gives the same eval loss.
    let model = CausalLm::load(out.path(), &device).unwrap();
    let tokenizer = byte_level_tokenizer().unwrap();
    let text = &corpus::documents(9, 1)[0];
    let ids: Vec<u32> = tokenizer.encode(text.as_str(), false).unwrap().get_ids()[..16].to_vec();
    let batch = TokenBatch::new(ids, 1, 16).unwrap();
    let (loss, _) = model
        .next_token_loss(&batch, None, ForwardOptions::default())
        .unwrap();
    assert!(loss.into_scalar::<f32>() < 4.5);
}

/// A run stopped part-way (a crash, Ctrl-C) continues from its last evaluation when started
/// again on the same directory, and ends with the same weights, bit for bit, as a run that was
/// never stopped. Another recipe on that directory is refused instead of overwriting it.
#[test]
fn an_interrupted_pretraining_run_resumes_to_the_same_weights() {
    use swarmtune_trainer::pretrain::PretrainProgress;
    let recipe: Recipe = toml::from_str(TINY).unwrap();
    let device = DeviceKind::Cpu.device().unwrap();
    let run = |dir: &std::path::Path, stop_after: Option<usize>| {
        let cancel = AtomicBool::new(false);
        let mut resumed = None;
        let result = pretrain(
            &recipe,
            &device,
            "flex",
            1,
            dir,
            &mut |p| match p {
                PretrainProgress::Step { step, .. } if Some(step) == stop_after => {
                    cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                PretrainProgress::Resumed(step) => resumed = Some(step),
                _ => {}
            },
            &cancel,
        );
        (result, resumed)
    };
    let weights = |dir: &std::path::Path| std::fs::read(dir.join("model.safetensors")).unwrap();

    let straight = tempfile::tempdir().unwrap();
    let (report, resumed) = run(straight.path(), None);
    let report = report.unwrap();
    assert_eq!(resumed, None);

    let broken = tempfile::tempdir().unwrap();
    let (stopped, _) = run(broken.path(), Some(27));
    assert!(stopped.is_err(), "the run was cancelled");
    let (again, resumed) = run(broken.path(), None);
    let again = again.unwrap();
    assert_eq!(resumed, Some(20), "continues from the last evaluation");
    assert_eq!(weights(broken.path()), weights(straight.path()));
    assert_eq!(again.evals, report.evals);

    // Finished: running it again says so instead of training on.
    let (done, _) = run(broken.path(), None);
    assert!(done.unwrap_err().to_string().contains("raise train.steps"));
    // Another recipe does not overwrite the run.
    let mut other = recipe.clone();
    other.train.learning_rate *= 2.0;
    let err = pretrain(
        &other,
        &device,
        "flex",
        1,
        broken.path(),
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .unwrap_err();
    assert!(err.to_string().contains("another recipe"), "{err}");
}

#[test]
fn full_weight_gradients_match_finite_differences() {
    use swarmtune_trainer::checkpoint::{Checkpoint, read_checkpoint_tensors};
    use swarmtune_trainer::config::ModelConfig;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/model");
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = read_checkpoint_tensors(&dir).unwrap();
    let device = DeviceKind::Cpu.device().unwrap();
    let batch = TokenBatch::new((0..24).map(|i| (i * 7 % 384) as u32).collect(), 2, 12).unwrap();
    let loss_of = |w: &swarmtune_trainer::tensors::NamedTensors| -> f64 {
        let m = CausalLm::from_checkpoint(
            config.clone(),
            Checkpoint::from_tensors("w", w.clone()),
            &device,
        )
        .unwrap();
        let (loss, _) = m
            .next_token_loss(&batch, None, ForwardOptions::default())
            .unwrap();
        f64::from(loss.into_scalar::<f32>())
    };
    let model = CausalLm::from_checkpoint(
        config.clone(),
        Checkpoint::from_tensors("w", weights.clone()),
        &device,
    )
    .unwrap()
    .to_trainable();
    let (loss, _) = model
        .next_token_loss(&batch, None, ForwardOptions::default())
        .unwrap();
    let grads = model.weight_grads(&loss.backward()).unwrap();
    assert_eq!(grads.len(), weights.len(), "every weight gets a gradient");
    // A transposed matrix, a norm, the embedding and the untied head, at a few coordinates.
    let probes = [
        ("model.layers.0.self_attn.q_proj.weight", 5),
        ("model.layers.1.self_attn.k_proj.weight", 11),
        ("model.layers.0.self_attn.k_proj.weight", 40),
        ("model.layers.0.self_attn.v_proj.weight", 9),
        ("model.layers.1.self_attn.o_proj.weight", 21),
        ("model.layers.0.mlp.gate_proj.weight", 13),
        ("model.layers.1.mlp.up_proj.weight", 17),
        ("model.layers.1.mlp.down_proj.weight", 77),
        ("model.layers.0.input_layernorm.weight", 3),
        ("model.embed_tokens.weight", 7 * 64 + 2),
        ("lm_head.weight", 14 * 64 + 9),
    ];
    for (name, i) in probes {
        let eps = 1e-2f32;
        let mut plus = weights.clone();
        plus.get_mut(name).unwrap().data[i] += eps;
        let mut minus = weights.clone();
        minus.get_mut(name).unwrap().data[i] -= eps;
        let numeric = (loss_of(&plus) - loss_of(&minus)) / (2.0 * f64::from(eps));
        let analytic = f64::from(grads[name].data[i]);
        assert!(
            analytic.abs() > 1e-5,
            "{name}[{i}] has no gradient to check"
        );
        assert!(
            (numeric - analytic).abs() <= 2e-2 * analytic.abs() + 3e-4,
            "{name}[{i}]: analytic {analytic}, numeric {numeric}"
        );
    }
}

/// A token's logits depend only on the tokens before it in its own sequence: not on later
/// tokens, not on the other sequences of the batch. Checked on every form the model takes
/// (inference, LoRA training with fused projections, full-weight pretraining), because a mask
/// or position that leaks lets training cheat and never learn to look back.
#[test]
fn logits_are_causal_and_independent_of_the_rest_of_the_batch() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/model");
    let device = DeviceKind::Cpu.device().unwrap();
    let base = CausalLm::load(&dir, &device).unwrap();
    let seq = 12;
    let a: Vec<u32> = (0..seq).map(|i| (i * 7 % 384) as u32).collect();
    let b: Vec<u32> = (0..seq).map(|i| (i * 13 % 384 + 5) as u32).collect();
    let mut a_changed = a.clone();
    a_changed[8] = 99;
    for (form, model) in [
        ("inference", CausalLm::load(&dir, &device).unwrap()),
        ("autodiff", base.to_autodiff()),
        ("trainable", base.to_trainable()),
    ] {
        let logits = |ids: Vec<u32>, batch: usize| -> Vec<f32> {
            let t = model
                .logits(
                    &TokenBatch::new(ids, batch, seq).unwrap(),
                    ForwardOptions::default(),
                )
                .unwrap();
            swarmtune_trainer::model::download(t).unwrap().data
        };
        let alone = logits(a.clone(), 1);
        let vocab = alone.len() / seq;
        let paired = logits([b.clone(), a.clone()].concat(), 2);
        let second = &paired[seq * vocab..];
        for (i, (x, y)) in alone.iter().zip(second).enumerate() {
            assert!(
                (x - y).abs() < 1e-4,
                "{form}: position {} differs in a batch",
                i / vocab
            );
        }
        let changed = logits(a_changed.clone(), 1);
        for p in 0..seq {
            let moved = (p * vocab..(p + 1) * vocab)
                .map(|i| (alone[i] - changed[i]).abs())
                .fold(0f32, f32::max);
            if p < 8 {
                assert!(
                    moved < 1e-4,
                    "{form}: position {p} saw a later token ({moved})"
                );
            } else {
                assert!(
                    moved > 1e-3,
                    "{form}: position {p} ignored an earlier token ({moved})"
                );
            }
        }
    }
}
