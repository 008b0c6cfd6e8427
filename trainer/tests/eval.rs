//! Evaluation on a real tiny model: training on a split lowers the held-out loss, and the
//! exact-match scorer reads greedy answers.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use swarmtune_trainer::data::{Example, ShardPlan, build_shards, load_tokenizer_with_hash};
use swarmtune_trainer::device::{DeviceKind, ThreadPool};
use swarmtune_trainer::eval::{Answer, answers, eval_loss, exact_match};
use swarmtune_trainer::lora::{Adapter, DeviceLora, LoraConfig};
use swarmtune_trainer::model::{CausalLm, ForwardOptions};
use swarmtune_trainer::train::{LeaseData, LocalTrainer, Provenance, TrainSpec};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/model")
}

#[test]
fn training_lowers_the_held_out_loss() {
    let (tokenizer, hash) = load_tokenizer_with_hash(model_dir().join("tokenizer.json")).unwrap();
    let examples: Vec<Example> = (0..80)
        .map(|i| Example::PromptCompletion {
            prompt: format!("{} and {} make", i % 9, i / 9),
            completion: format!(" {}", i % 9 + i / 9),
        })
        .collect();
    let plan = ShardPlan {
        seq_len: 16,
        seqs_per_shard: 32,
        eval_fraction: 0.2,
        seed: 3,
    };
    let data = build_shards(&examples, &tokenizer, hash, Some(2), 0, &plan).unwrap();
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec![
            "q_proj".into(),
            "v_proj".into(),
            "up_proj".into(),
            "down_proj".into(),
        ],
    };
    let pool = ThreadPool::new(2).unwrap();
    pool.install(|| {
        let device = DeviceKind::Cpu.device().unwrap();
        let base = CausalLm::load(&model_dir(), &device).unwrap();
        let model = base.to_autodiff();
        let trainer = LocalTrainer::new(&model, lora.clone(), Provenance::here("flex", 2)).unwrap();
        let start = Adapter::init(lora.clone(), trainer.sites(), 1);
        let spec = TrainSpec {
            inner_steps: 30,
            batch_size: 8,
            micro_batch: 8,
            learning_rate: 5e-3,
            ..TrainSpec::default()
        };
        let lease = LeaseData::new(&data.train, 384).unwrap();
        let out = trainer
            .train(&start, &lease, &spec, &mut |_| {}, &AtomicBool::new(false))
            .unwrap();
        let trained = Adapter {
            config: lora.clone(),
            tensors: out.end_state.params,
        };
        let sites = base.lora_sites(&lora);
        let eval = std::slice::from_ref(&data.eval);
        let before = eval_loss(&base, ForwardOptions::default(), eval, 8).unwrap();
        let device_lora = DeviceLora::new(&trained, &sites, &device, false, 0).unwrap();
        let after = eval_loss(
            &base,
            ForwardOptions {
                lora: Some(&device_lora),
            },
            eval,
            8,
        )
        .unwrap();
        assert!(
            after.loss < before.loss,
            "held-out loss {} -> {}",
            before.loss,
            after.loss
        );
        assert!((after.perplexity - after.loss.exp()).abs() < 1e-9);
        assert_eq!(before.target_tokens, data.stats.eval_target_tokens);

        // Greedy answers exist for every held-out prompt, and the score is their exact share.
        let got = answers(
            &base,
            ForwardOptions {
                lora: Some(&device_lora),
            },
            &tokenizer,
            &data.eval_examples,
            Some(2),
            2,
        )
        .unwrap();
        assert_eq!(got.len(), data.eval_examples.len());
        let share = exact_match(&got);
        assert!((0.0..=1.0).contains(&share));
    });
}

#[test]
fn exact_match_ignores_surrounding_whitespace_only() {
    let a = |expected: &str, produced: &str| Answer {
        prompt: "p".into(),
        expected: expected.into(),
        produced: produced.into(),
    };
    let answers = [
        a(" 12", "12"),
        a("12", "12 "),
        a("12", "13"),
        a("12", "1 2"),
    ];
    assert_eq!(exact_match(&answers), 0.5);
    assert_eq!(exact_match(&[]), 0.0);
}
