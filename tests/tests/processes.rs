//! Separate processes on 127.0.0.1, started as a user would start them: one coordinator and
//! three volunteers with temporary data dirs, `submit`, `status --json` and `pull`. Along the
//! way a volunteer is SIGKILLed mid-lease and a new one joins (churn), and the coordinator is
//! SIGKILLed mid-round and restarted on the same data dir and port. The job finishes with
//! every round merged from a full quorum, every version published before the crash intact,
//! and the pulled adapter reproduces the coordinator's eval loss when loaded in the trainer.

use std::path::Path;

use serde_json::Value;
use swarmtune_tests::{
    COMMAND, Net, Proc, START, child_entry, run_ok, spawn, state, tcp_port, versions, write_job,
};
use swarmtune_trainer::data::{ShardPlan, build_shards, load_tokenizer_with_hash, read_dataset};
use swarmtune_trainer::lora::{Adapter, DeviceLora};
use swarmtune_trainer::model::{CausalLm, ForwardOptions};

child_entry!();

const JOB: &str = r#"
module = "shout"
base = "builtin"
[dataset]
path = "shout.jsonl"
seq_len = 64
seqs_per_shard = 32
eval_fraction = 0.1
shard_seed = 1
[lora]
rank = 8
alpha = 16.0
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
[inner]
inner_steps = 24
batch_size = 8
micro_batch = 8
learning_rate = 2e-3
commit_every = 8
[outer]
# Plain averaging (FedAvg): this test is about processes, not about tuning the outer step.
learning_rate = 1.0
momentum = 0.0
aggregation = "mean"
[rounds]
count = 4
quorum = 3
timeout_secs = 600
[verification]
challenge_probability = 0.5
probation_leases = 1
"#;

#[test]
fn separate_processes_survive_churn_and_a_coordinator_crash() {
    let net = Net::new();

    let (coordinator, addr) = net.coordinator("/ip4/127.0.0.1/tcp/0");
    let port = tcp_port(&addr);
    let mut volunteers: Vec<(Proc, String)> = (1..=3).map(|n| net.volunteer(n, &addr)).collect();

    // A bad job file is refused before anything is sent, with exit code 2 and the key named.
    let bad = net.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "module = \"shout\"\nbase = \"builtin\"\n[lora]\nrnak = 8\n",
    )
    .unwrap();
    let (code, _) = spawn(
        "bad submit",
        &["submit", bad.to_str().unwrap(), "--coordinator", &addr],
        &net.log,
    )
    .finish(COMMAND);
    assert_eq!(code, 2);

    let job_file = write_job(net.dir.path(), JOB);
    let job = net.submit(&addr, &job_file);

    // Churn: kill a volunteer while it holds a lease of round 2 (fetching or training it),
    // start a new one.
    let busy = net.wait_for(&addr, &job, "a lease of round 2 out", START * 3, |s| {
        s["summary"]["round"].as_u64() == Some(2)
            && s["active_peers"]
                .as_array()
                .is_some_and(|a| a.iter().any(|p| p["round"].as_u64() == Some(2)))
    });
    let victim = busy["active_peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["round"].as_u64() == Some(2))
        .unwrap()["peer"]
        .as_str()
        .unwrap()
        .to_owned();
    let at = volunteers
        .iter()
        .position(|(_, peer)| *peer == victim)
        .expect("the busy peer is one of ours");
    let (killed, _) = volunteers.remove(at);
    killed.kill();
    volunteers.push(net.volunteer(4, &addr));

    // Crash: kill the coordinator mid-round once two rounds are merged, restart it.
    let before = net.wait_for(&addr, &job, "two merged rounds", START * 5, |s| {
        versions(s).len() >= 3 && s["summary"]["active_leases"].as_u64() >= Some(1)
    });
    coordinator.kill();
    let (_coordinator, again) = net.coordinator(&format!("/ip4/127.0.0.1/tcp/{port}"));
    assert_eq!(
        again, addr,
        "the restarted coordinator is the same peer at the same address"
    );
    let after = net.status(&addr, &job);
    assert_eq!(
        versions(&after)[..versions(&before).len()],
        versions(&before)[..],
        "versions published before the crash are intact"
    );

    let done = net.wait_for(&addr, &job, "the job to finish", START * 8, |s| {
        state(s) == "completed" || state(s) == "failed"
    });
    assert_eq!(state(&done), "completed", "{done:#}");
    assert_eq!(done["summary"]["rounds_merged"].as_u64(), Some(4));
    let all = versions(&done);
    assert_eq!(all[..versions(&before).len()], versions(&before)[..]);
    // No shard left untrained: every round merged a full quorum of leases (3 × 24 steps × 8
    // sequences × 64 tokens), the killed volunteer's lease went back to the pool and was
    // trained by someone else. Which peers trained them is up to timing: on a loaded machine
    // the first volunteer to connect may train all three leases of a round one after another.
    for v in all.iter().skip(1) {
        assert_eq!(v["tokens"].as_u64(), Some(3 * 24 * 8 * 64), "{v}");
        assert!(
            v["contributors"]
                .as_u64()
                .is_some_and(|c| (1..=3).contains(&c)),
            "{v}"
        );
    }
    let first = all[0]["metrics"]["eval_loss"].as_f64().unwrap();
    let last = all.last().unwrap()["metrics"]["eval_loss"]
        .as_f64()
        .unwrap();
    assert!(
        last < first,
        "the module did not improve: {first} -> {last}"
    );

    // The module user pulls it; the adapter loads in the trainer and gives the coordinator's
    // eval loss on the job's held-out split, rebuilt here from the same file and settings.
    let out_dir = net.dir.path().join("pulled");
    run_ok(
        &[
            "pull",
            "shout",
            "--out",
            out_dir.to_str().unwrap(),
            "--coordinator",
            &addr,
            "--data-dir",
            &net.path("user"),
            "--merged",
        ],
        &net.log,
        COMMAND,
    );
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["version"], all.last().unwrap()["version"]);
    // --merged: base + adapter as a checkpoint the trainer (and transformers) loads.
    let merged = out_dir.join("merged");
    assert!(merged.join("config.json").is_file() && merged.join("tokenizer.json").is_file());
    let device = swarmtune_trainer::device::DeviceKind::Cpu.device().unwrap();
    CausalLm::load(&merged, &device).unwrap();
    let expected = manifest["metrics"]["eval_loss"].as_f64().unwrap();
    assert_eq!(expected, last);
    let reproduced = eval_loss(&out_dir, &net.dir.path().join("shout.jsonl"));
    assert!(
        (reproduced - expected).abs() <= 1e-5 * expected.abs(),
        "the pulled adapter gives eval loss {reproduced}, the coordinator reported {expected}"
    );
    drop(volunteers);
}

/// The pulled adapter's loss on the held-out split the coordinator cut from `dataset`.
fn eval_loss(adapter_dir: &Path, dataset: &Path) -> f64 {
    let base_dir = tempfile::tempdir().unwrap();
    swarmtune_trainer::builtin::base::write_to(base_dir.path()).unwrap();
    let device = swarmtune_trainer::device::DeviceKind::Cpu.device().unwrap();
    let model = CausalLm::load(base_dir.path(), &device).unwrap();
    let (tokenizer, hash) =
        load_tokenizer_with_hash(base_dir.path().join("tokenizer.json")).unwrap();
    let eos = model.config().eos_token_id();
    let examples = read_dataset(dataset).unwrap();
    let plan = ShardPlan {
        seq_len: 64,
        seqs_per_shard: 32,
        eval_fraction: 0.1,
        seed: 1,
    };
    let shards = build_shards(&examples, &tokenizer, hash, eos, eos.unwrap_or(0), &plan).unwrap();
    let adapter = Adapter::load(adapter_dir).unwrap();
    let lora = DeviceLora::new(
        &adapter,
        &model.lora_sites(&adapter.config),
        &device,
        false,
        0,
    )
    .unwrap();
    swarmtune_trainer::eval::eval_loss(
        &model,
        ForwardOptions { lora: Some(&lora) },
        std::slice::from_ref(&shards.eval),
        16,
    )
    .unwrap()
    .loss
}
