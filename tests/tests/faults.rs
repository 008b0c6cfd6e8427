//! Churn and crashes (issue 8, points 3 and 4), with separate processes on 127.0.0.1.
//!
//! One coordinator and four volunteers run a job of 5 rounds of 4 leases. First half of the
//! volunteers are SIGKILLed while they hold leases of the same round, one more leaves with
//! Ctrl-C (giving its lease back), and three new ones join.
//! Then come 20 SIGKILLs at random moments of rounds 1 to 4 (seeded): the coordinator,
//! restarted on its data dir and port, or a volunteer, restarted on its own data dir or
//! replaced by a new one. After each kill every blob in the dead process's store must verify;
//! after a coordinator restart no job, version or accepted delta may be missing, and a
//! volunteer restarted on its data dir must be the same peer. The job must complete with every
//! round merged from a full quorum (no shard lost), and every blob of every data dir must
//! verify. The test prints the share of the tokens volunteers trained that made it into
//! merged versions.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::Value;
use swarmtune_protocol::BlobStore;
use swarmtune_tests::{Net, Proc, START, child_entry, state, tcp_port, versions, write_job};

child_entry!();

const INNER_STEPS: u64 = 20;
const BATCH: u64 = 4;
const SEQ_LEN: u64 = 32;
const QUORUM: u64 = 4;
const ROUNDS: u64 = 5;

const JOB: &str = r#"
module = "shout"
base = "builtin"
[dataset]
path = "shout.jsonl"
seq_len = 32
seqs_per_shard = 16
eval_fraction = 0.1
shard_seed = 1
[lora]
rank = 4
alpha = 8.0
target_modules = ["q_proj", "v_proj"]
[inner]
inner_steps = 20
batch_size = 4
micro_batch = 4
learning_rate = 2e-3
commit_every = 5
[outer]
learning_rate = 1.0
momentum = 0.0
aggregation = "mean"
[rounds]
count = 5
quorum = 4
timeout_secs = 900
[verification]
challenge_probability = 0.5
probation_leases = 1
[gate]
# Every merged round is published: the gate is not what this test is about, and a round of
# this small job may do slightly worse than the one before.
max_eval_loss_regression = 10.0
"#;

/// SIGKILLs after the churn.
const KILLS: usize = 20;

/// Every blob in the store under `dir` (a data dir) verifies; returns how many there are.
fn verify_blobs(dir: &Path) -> usize {
    let store = BlobStore::open(dir.join("blobs"), 1 << 40).expect("open a blob store");
    let ids = store.list().expect("list the blobs");
    for id in &ids {
        store
            .verify(id)
            .unwrap_or_else(|e| panic!("blob {id} in {} does not verify: {e}", dir.display()));
    }
    ids.len()
}

/// Nothing the coordinator had before a crash is missing after it: the job, its versions,
/// and the accepted deltas of an open round (or a later round).
fn nothing_lost(before: &Value, after: &Value) {
    let (b, a) = (&before["summary"], &after["summary"]);
    assert_eq!(a["job"], b["job"], "the job is there: {after:#}");
    let (old, new) = (versions(before), versions(after));
    assert!(
        new.len() >= old.len() && new[..old.len()] == old[..],
        "versions lost: before {old:#?}, after {new:#?}"
    );
    let round = |s: &Value| s["round"].as_u64().unwrap_or(0);
    let accepted = |s: &Value| s["round_accepted_deltas"].as_u64().unwrap_or(0);
    assert!(
        round(a) > round(b) || state(after) != "running" || accepted(a) >= accepted(b),
        "accepted deltas lost: before {b:#}, after {a:#}"
    );
}

/// The steps one volunteer process trained, lease by lease, from its stdout (`lease N: step
/// S/T, ...`): the furthest step it reported of each lease.
fn steps_trained(lines: &[String]) -> BTreeMap<u64, u64> {
    let mut leases: BTreeMap<u64, u64> = BTreeMap::new();
    for line in lines {
        let Some((lease, rest)) = line
            .strip_prefix("lease ")
            .and_then(|l| l.split_once(": step "))
        else {
            continue;
        };
        let (Ok(lease), Some(Ok(step))) = (
            lease.parse::<u64>(),
            rest.split('/').next().map(str::parse::<u64>),
        ) else {
            continue;
        };
        let best = leases.entry(lease).or_default();
        *best = (*best).max(step);
    }
    leases
}

#[test]
fn churn_and_twenty_random_crashes_lose_nothing() {
    let net = Net::new();
    let (mut coordinator, addr) = net.coordinator("/ip4/127.0.0.1/tcp/0");
    let port = tcp_port(&addr);
    let mut started = 0;
    let mut volunteer = |net: &Net, n: Option<usize>| {
        let n = n.unwrap_or_else(|| {
            started += 1;
            started
        });
        let (p, peer) = net.volunteer(n, &addr);
        (p, peer, n)
    };
    let mut volunteers: Vec<(Proc, String, usize)> =
        (0..4).map(|_| volunteer(&net, None)).collect();
    let job_file = write_job(net.dir.path(), JOB);
    let job = net.submit(&addr, &job_file);
    // Steps trained, one entry per volunteer process and lease (a lease trained again by a
    // restarted volunteer counts twice).
    let mut trained: Vec<u64> = Vec::new();

    // Churn: half the volunteers die holding leases of the same round; new ones join.
    let busy = net.wait_for(&addr, &job, "two leases of one round out", START * 3, |s| {
        let round = s["summary"]["round"].as_u64();
        s["active_peers"]
            .as_array()
            .is_some_and(|a| a.iter().filter(|p| p["round"].as_u64() == round).count() >= 2)
    });
    let round = busy["summary"]["round"].as_u64();
    let holders: Vec<String> = busy["active_peers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["round"].as_u64() == round)
        .filter_map(|p| p["peer"].as_str().map(str::to_owned))
        .take(2)
        .collect();
    for peer in &holders {
        let at = volunteers
            .iter()
            .position(|(_, p, _)| p == peer)
            .expect("the lease holder is one of ours");
        let (p, _, _) = volunteers.remove(at);
        trained.extend(steps_trained(&p.kill_collect()).into_values());
    }
    eprintln!("churn: killed {holders:?} mid-round {round:?}");
    // One more leaves as a person would, with Ctrl-C (twice: the second stops the wait for
    // the verdicts of deltas it delivered). It gives back the lease it held, so no unit waits
    // for a lease to lapse, and exits cleanly.
    let (leaving, peer, _) = volunteers.remove(0);
    leaving.interrupt();
    std::thread::sleep(Duration::from_secs(2));
    leaving.interrupt();
    let (code, out) = leaving.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "a volunteer left with Ctrl-C: {out}");
    trained
        .extend(steps_trained(&out.lines().map(str::to_owned).collect::<Vec<_>>()).into_values());
    let after = net.status(&addr, &job);
    assert!(
        !after["active_peers"]
            .as_array()
            .is_some_and(|a| a.iter().any(|p| p["peer"] == peer.as_str())),
        "the volunteer that left still holds a lease: {after:#}"
    );
    eprintln!("churn: {peer} left with Ctrl-C");
    for _ in 0..3 {
        let v = volunteer(&net, None);
        volunteers.push(v);
    }

    // Crashes: 20 SIGKILLs at random moments.
    let mut rng = rand::rngs::StdRng::seed_from_u64(20);
    let (mut coordinator_kills, mut blobs_checked) = (0, 0);
    for kill in 0..KILLS {
        // Spread over rounds 1 to 4: a few kills at random moments of each.
        let target = 1 + (kill * 4 / KILLS) as u64;
        net.wait_for(&addr, &job, "the next round", START * 3, |s| {
            s["summary"]["round"].as_u64() >= Some(target) || state(s) != "running"
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(300..3000)));
        if rng.random_bool(0.4) {
            let before = net.status(&addr, &job);
            coordinator.kill();
            blobs_checked += verify_blobs(Path::new(&net.path("coordinator")));
            let (again, at) = net.coordinator(&format!("/ip4/127.0.0.1/tcp/{port}"));
            assert_eq!(
                at, addr,
                "the coordinator came back as itself, where it was"
            );
            coordinator = again;
            let after = net.status(&addr, &job);
            nothing_lost(&before, &after);
            coordinator_kills += 1;
            eprintln!(
                "kill {kill}: the coordinator, in round {}",
                before["summary"]["round"]
            );
        } else {
            let at = rng.random_range(0..volunteers.len());
            let (p, peer, n) = volunteers.remove(at);
            trained.extend(steps_trained(&p.kill_collect()).into_values());
            blobs_checked += verify_blobs(Path::new(&net.path(&format!("volunteer-{n}"))));
            // Back on its own data dir (same identity) or replaced by a newcomer.
            let back = rng.random_bool(0.5).then_some(n);
            eprintln!(
                "kill {kill}: volunteer {n}, {}",
                if back.is_some() {
                    "restarted"
                } else {
                    "replaced"
                }
            );
            let v = volunteer(&net, back);
            if back.is_some() {
                assert_eq!(
                    v.1, peer,
                    "a volunteer restarted on its data dir is the same peer"
                );
            }
            volunteers.push(v);
        }
    }

    let done = net.wait_for(&addr, &job, "the job to finish", START * 8, |s| {
        state(s) == "completed" || state(s) == "failed"
    });
    assert_eq!(state(&done), "completed", "{done:#}");
    let all = versions(&done);
    assert_eq!(
        done["summary"]["rounds_merged"].as_u64(),
        Some(ROUNDS),
        "{done:#}"
    );
    assert_eq!(
        all.len() as u64,
        ROUNDS + 1,
        "a version per round: {done:#}"
    );
    // No shard lost: every round merged a full quorum of leases.
    let lease_tokens = INNER_STEPS * BATCH * SEQ_LEN;
    for v in all.iter().skip(1) {
        assert_eq!(v["tokens"].as_u64(), Some(QUORUM * lease_tokens), "{v}");
    }
    let loss = |v: &Value| v["metrics"]["eval_loss"].as_f64().unwrap();
    assert!(loss(all.last().unwrap()) < loss(&all[0]), "{all:#?}");

    coordinator.kill();
    for (p, _, _) in volunteers {
        trained.extend(steps_trained(&p.kill_collect()).into_values());
    }
    // Every blob of every data dir verifies: the coordinator's, the owner's, every volunteer's.
    for entry in std::fs::read_dir(net.dir.path()).unwrap() {
        let dir = entry.unwrap().path();
        if dir.join("blobs").is_dir() {
            blobs_checked += verify_blobs(&dir);
        }
    }
    let merged: u64 = all.iter().filter_map(|v| v["tokens"].as_u64()).sum();
    let trained_tokens: u64 = trained.iter().sum::<u64>() * BATCH * SEQ_LEN;
    assert!(
        merged <= trained_tokens,
        "merged {merged} tokens, more than the {trained_tokens} trained"
    );
    eprintln!(
        "{KILLS} kills ({coordinator_kills} of the coordinator), {} leases trained (by process), \
         {trained_tokens} tokens trained, {merged} merged: {:.1}% of the training made it \
         into versions; {blobs_checked} blob checks passed",
        trained.len(),
        100.0 * merged as f64 / trained_tokens as f64
    );
    assert!(
        coordinator_kills >= 3,
        "the seed kills the coordinator a few times"
    );
}
