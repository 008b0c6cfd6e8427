//! The inner loop of a lease on a real (tiny) model: it learns, it is bitwise reproducible on
//! one backend and thread count, and a committed segment replays to the committed hash.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use swarmtune_trainer::data::{Example, Shard, ShardPlan, build_shards, load_tokenizer_with_hash};
use swarmtune_trainer::device::{DeviceKind, ThreadPool};
use swarmtune_trainer::error::TrainerError;
use swarmtune_trainer::lora::{Adapter, LoraConfig};
use swarmtune_trainer::model::CausalLm;
use swarmtune_trainer::tensors;
use swarmtune_trainer::train::{
    LeaseData, LocalTrainer, LoraState, Provenance, TrainOutcome, TrainSpec,
};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/model")
}

/// A small arithmetic dataset in the fixture's tokenizer.
fn shards() -> Vec<Shard> {
    let (tokenizer, hash) = load_tokenizer_with_hash(model_dir().join("tokenizer.json")).unwrap();
    let examples: Vec<Example> = (0..64)
        .map(|i| Example::PromptCompletion {
            prompt: format!("{} plus {} is", i % 8, i / 8),
            completion: format!(" {}", i % 8 + i / 8),
        })
        .collect();
    let plan = ShardPlan {
        seq_len: 24,
        seqs_per_shard: 16,
        eval_fraction: 0.0,
        seed: 1,
    };
    build_shards(&examples, &tokenizer, hash, Some(2), 0, &plan)
        .unwrap()
        .train
}

fn spec() -> TrainSpec {
    TrainSpec {
        inner_steps: 6,
        batch_size: 4,
        micro_batch: 4,
        learning_rate: 1e-2,
        seed: 7,
        commit_every: 2,
        ..TrainSpec::default()
    }
}

fn lora() -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.1,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
    }
}

/// Runs `f` with a trainer for `lora` on the fixture model, a fresh adapter and the lease data,
/// inside a pool of `threads` math threads.
fn with_lease<R: Send>(
    kind: DeviceKind,
    threads: usize,
    lora: LoraConfig,
    f: impl FnOnce(&LocalTrainer<'_>, &LeaseData<'_>, &Adapter) -> R + Send,
) -> R {
    ThreadPool::new(threads).unwrap().install(|| {
        let model = CausalLm::load(&model_dir(), &kind.device().unwrap())
            .unwrap()
            .to_autodiff();
        let provenance = Provenance::here(kind.backend_name(), threads);
        let trainer = LocalTrainer::new(&model, lora.clone(), provenance).unwrap();
        let start = Adapter::init(lora, trainer.sites(), 42);
        let shards = shards();
        let data = LeaseData::new(&shards, 384).unwrap();
        f(&trainer, &data, &start)
    })
}

fn train(
    trainer: &LocalTrainer<'_>,
    data: &LeaseData<'_>,
    start: &Adapter,
    spec: &TrainSpec,
) -> TrainOutcome {
    trainer
        .train(start, data, spec, &mut |_| {}, &AtomicBool::new(false))
        .unwrap()
}

fn run(kind: DeviceKind, threads: usize, spec: &TrainSpec) -> (TrainOutcome, Adapter) {
    with_lease(kind, threads, lora(), |trainer, data, start| {
        (train(trainer, data, start, spec), start.clone())
    })
}

#[test]
fn a_lease_lowers_the_loss_and_reports_its_work() {
    let (out, start) = run(DeviceKind::Cpu, 2, &spec());
    assert!(
        out.stats.loss_after < out.stats.loss_before,
        "loss {} -> {}",
        out.stats.loss_before,
        out.stats.loss_after
    );
    assert_eq!(out.stats.steps, 6);
    assert_eq!(out.stats.tokens, 6 * 4 * 24);
    assert!(out.stats.target_tokens > 0 && out.stats.target_tokens < out.stats.tokens);
    // The delta is start − end (up to the rounding of one subtraction).
    let rebuilt = swarmtune_trainer::train::subtract(&start.tensors, &out.delta);
    let worst = rebuilt
        .iter()
        .flat_map(|(n, t)| t.data.iter().zip(&out.end_state.params[n].data))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-6, "start − delta differs from end by {worst}");
    assert!(tensors::norm(&out.delta) > 0.0);
    // Commitments at steps 0, 2, 4, 6.
    let steps: Vec<u64> = out.commitments.iter().map(|c| c.step).collect();
    assert_eq!(steps, vec![0, 2, 4, 6]);
    assert_eq!(out.provenance.backend, "flex");
}

#[test]
fn same_inputs_give_bitwise_identical_deltas() {
    for kind in [DeviceKind::Cpu, DeviceKind::Ndarray] {
        let (a, _) = run(kind, 2, &spec());
        let (b, _) = run(kind, 2, &spec());
        assert_eq!(tensors::hash(&a.delta), tensors::hash(&b.delta), "{kind}");
        assert_eq!(a.commitments, b.commitments, "{kind}");
    }
    // The thread count does not change the bits: every kernel sums in a fixed order.
    let (one, _) = run(DeviceKind::Cpu, 1, &spec());
    let (two, _) = run(DeviceKind::Cpu, 2, &spec());
    assert_eq!(tensors::hash(&one.delta), tensors::hash(&two.delta));
    assert_eq!(one.commitments, two.commitments);
    // A different seed is a different lease.
    let (a, _) = run(DeviceKind::Cpu, 2, &spec());
    let (c, _) = run(DeviceKind::Cpu, 2, &TrainSpec { seed: 8, ..spec() });
    assert_ne!(tensors::hash(&a.delta), tensors::hash(&c.delta));
}

#[test]
fn a_committed_segment_replays_to_the_committed_hash() {
    let (out, _) = run(DeviceKind::Cpu, 2, &spec());
    with_lease(DeviceKind::Cpu, 2, lora(), |trainer, data, _| {
        // The volunteer exports its state at step 2; the verifier decodes it, checks it against
        // the commitment, replays steps 2..4 and compares with the commitment at step 4.
        let bytes = out.snapshots[1].to_bytes().unwrap();
        let layout = &out.end_state.params;
        let claimed = LoraState::from_bytes(&bytes, layout, 1 << 26).unwrap();
        assert_eq!(claimed.hash().as_bytes(), &out.commitments[1].state_hash);
        let end = trainer
            .replay_segment(claimed.clone(), data, &spec(), 4)
            .unwrap();
        assert_eq!(end.hash().as_bytes(), &out.commitments[2].state_hash);

        // A state that differs in one value no longer matches its commitment, and the
        // segment replayed from it ends elsewhere.
        let mut forged = claimed;
        let first = forged.params.values_mut().next().unwrap();
        first.data[0] += 1e-3;
        assert_ne!(forged.hash().as_bytes(), &out.commitments[1].state_hash);
        let end = trainer.replay_segment(forged, data, &spec(), 4).unwrap();
        assert_ne!(end.hash().as_bytes(), &out.commitments[2].state_hash);

        // Bytes that do not fit the layout are refused, not trained on.
        assert!(LoraState::from_bytes(&bytes[..bytes.len() - 1], layout, 1 << 26).is_err());
        assert!(LoraState::from_bytes(&bytes, layout, 100).is_err());
    });
}

#[test]
fn gradient_accumulation_matches_the_full_batch() {
    let no_dropout = |micro_batch| TrainSpec {
        micro_batch,
        inner_steps: 2,
        ..spec()
    };
    let lora_no_dropout = LoraConfig {
        dropout: 0.0,
        ..lora()
    };
    with_lease(
        DeviceKind::Cpu,
        2,
        lora_no_dropout,
        |trainer, data, start| {
            let full = train(trainer, data, start, &no_dropout(4));
            let accumulated = train(trainer, data, start, &no_dropout(1));
            for (name, a) in &full.delta {
                let b = &accumulated.delta[name];
                let scale = a.data.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = a
                    .data
                    .iter()
                    .zip(&b.data)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(
                    diff <= 1e-3 * scale.max(1e-6),
                    "{name}: {diff} vs scale {scale}"
                );
            }
        },
    );
}

#[test]
fn progress_is_reported_and_cancellation_stops_the_lease() {
    with_lease(DeviceKind::Cpu, 2, lora(), |trainer, data, start| {
        let cancel = AtomicBool::new(false);
        let mut seen = Vec::new();
        let result = trainer.train(
            start,
            data,
            &spec(),
            &mut |p| {
                seen.push(p.step);
                if p.step == 3 {
                    cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            },
            &cancel,
        );
        assert!(matches!(result, Err(TrainerError::Cancelled)));
        assert_eq!(seen, vec![1, 2, 3]);
    });
}
