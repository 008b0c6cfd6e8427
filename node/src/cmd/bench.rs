//! `swarmtune bench`: measurements that print a table, for the README.

use indicatif::{ProgressBar, ProgressStyle};
use swarmtune_trainer::builtin::skill::{self, SkillRun};
use swarmtune_trainer::device::ThreadPool;
use swarmtune_trainer::train::TrainSpec;

use crate::cli::{
    BenchAdversaryArgs, BenchMergeArgs, BenchNetArgs, BenchSkillArgs, BenchTrainArgs,
    BenchVerificationArgs,
};

/// `swarmtune bench skill`.
pub fn skill(args: BenchSkillArgs) -> anyhow::Result<()> {
    let pool = ThreadPool::new(args.compute.threads)?;
    let device = args.compute.device.device()?;
    let run = SkillRun {
        spec: TrainSpec {
            inner_steps: args.steps,
            ..SkillRun::default().spec
        },
        skill: args.skill,
        ..SkillRun::default()
    };
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} steps  {msg}")?
            .progress_chars("=> "),
    );
    let model = super::model_dir(args.model.as_deref())?;
    let report = pool.install(|| {
        skill::run(&model, &device, &run, &mut |p| {
            bar.set_position(p.step as u64);
            bar.set_message(format!("loss {:.3}", p.loss));
        })
    })?;
    bar.finish_and_clear();
    println!("{:<40} {:<28} {:<28}", "held-out prompt", "base", "module");
    for (base, module) in report.answers.iter().take(8) {
        println!(
            "{:<40} {:<28} {:<28}",
            base.prompt,
            base.produced.trim(),
            module.produced.trim()
        );
    }
    println!();
    println!(
        "| | exact match on {} held-out prompts |",
        report.answers.len()
    );
    println!("|---|---:|");
    println!("| base | {:.0}% |", 100.0 * report.base_exact_match);
    println!(
        "| base + module ({} steps, {:.0} s on {} threads, {}) | {:.0}% |",
        report.steps,
        report.train_seconds,
        pool.threads(),
        args.compute.device,
        100.0 * report.module_exact_match
    );
    if let Some(out) = &args.out {
        report.module.save(out, None, false)?;
        println!("wrote the module to {}", out.display());
    }
    Ok(())
}

/// `swarmtune bench train`.
pub fn train(args: BenchTrainArgs) -> anyhow::Result<()> {
    let pool = ThreadPool::new(args.compute.threads)?;
    let device = args.compute.device.device()?;
    let bench = swarmtune_trainer::bench::TrainBench {
        shape: args.shape,
        seq: args.seq,
        batch: args.batch,
        rank: args.rank,
        steps: args.steps,
    };
    let backend = args.compute.device.backend_name();
    let r = pool.install(|| {
        swarmtune_trainer::bench::train_bench(&bench, &device, backend, pool.threads())
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "| shape | backend | threads | seq × batch | rank | step ms | fwd / bwd / opt ms | tokens/s | peak RSS |"
    );
    println!("|---|---|---:|---|---:|---:|---|---:|---:|");
    println!(
        "| {} | {} | {} | {} × {} | {} | {:.0} | {:.0} / {:.0} / {:.0} | {:.1} | {:.0} MiB |",
        r.shape,
        r.backend,
        r.threads,
        r.seq,
        r.batch,
        r.rank,
        r.step_ms,
        r.forward_ms,
        r.backward_ms,
        r.optimizer_ms,
        r.tokens_per_s,
        r.peak_rss_bytes as f64 / (1 << 20) as f64
    );
    Ok(())
}

/// `swarmtune bench net`.
pub fn net(args: BenchNetArgs) -> anyhow::Result<()> {
    use swarmtune_protocol::net::bench::{self, NetBenchConfig};
    let config = NetBenchConfig {
        blob_bytes: args.size_mib << 20,
        max_fetchers: args.fetchers,
        gossip_nodes: args.gossip_nodes,
        gossip_messages: args.gossip_messages,
        repeats: args.repeats,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let json = args.json;
    let r = runtime
        .block_on(bench::run(&config, &mut |what| {
            if !json {
                eprintln!("measuring {what} ...");
            }
        }))
        .map_err(|e| anyhow::anyhow!("bench net: {e}"))?;
    let mib = |b: f64| b / f64::from(1u32 << 20);
    if json {
        let transfers: Vec<_> = r
            .transfers
            .iter()
            .map(|t| {
                serde_json::json!({
                    "fetchers": t.fetchers,
                    "seconds": t.seconds,
                    "bytes_per_s": t.bytes_per_s,
                    "runs_bytes_per_s": t.runs_bytes_per_s,
                    "ratio_to_plain_tcp": t.bytes_per_s / r.plain_tcp_bytes_per_s,
                    "ratio_to_plain_tcp_memory": t.bytes_per_s / r.plain_tcp_memory_bytes_per_s,
                })
            })
            .collect();
        let out = serde_json::json!({
            "blob_bytes": r.blob_bytes,
            "plain_tcp_bytes_per_s": r.plain_tcp_bytes_per_s,
            "plain_tcp_memory_bytes_per_s": r.plain_tcp_memory_bytes_per_s,
            "plain_tcp_memory_runs": r.plain_tcp_memory_runs,
            "plain_tcp_growing_runs": r.plain_tcp_growing_runs,
            "transfers": transfers,
            "gossip_nodes": r.gossip_nodes,
            "gossip_delivered": r.gossip_delivered,
            "gossip_latency_ms": {"p50": r.gossip_latency_ms[0], "p95": r.gossip_latency_ms[1], "max": r.gossip_latency_ms[2]},
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "blob of {} MiB on 127.0.0.1; each figure is the best of {} runs",
        r.blob_bytes >> 20,
        config.repeats
    );
    // Both yardsticks, so neither flatters: the file copy lands the bytes on disk as a fetch
    // does; memory to memory is the socket alone (the goal: a fetch at 1/3 of it).
    let file = r.plain_tcp_bytes_per_s;
    let memory = r.plain_tcp_memory_bytes_per_s;
    let runs = |all: &[f64]| {
        all.iter()
            .map(|b| format!("{:.0}", mib(*b)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "| path | fetchers | seconds | MiB/s (sum) | vs TCP file copy | vs TCP memory | every run, MiB/s |"
    );
    println!("|---|---|---|---|---|---|---|");
    let plain_s = r.blob_bytes as f64 / file;
    println!(
        "| plain TCP copy, file to synced file | 1 | {plain_s:.3} | {:.0} | 1.00 | {:.2} | |",
        mib(file),
        file / memory
    );
    println!(
        "| plain TCP, memory to memory (no disk) | 1 | {:.3} | {:.0} | {:.2} | 1.00 | {} |",
        r.blob_bytes as f64 / memory,
        mib(memory),
        memory / file,
        runs(&r.plain_tcp_memory_runs)
    );
    let growing = r
        .plain_tcp_growing_runs
        .iter()
        .copied()
        .fold(0f64, f64::max);
    println!(
        "| plain TCP, memory to a growing Vec (the earlier yardstick) | 1 | {:.3} | {:.0} | {:.2} | {:.2} | {} |",
        r.blob_bytes as f64 / growing,
        mib(growing),
        growing / file,
        growing / memory,
        runs(&r.plain_tcp_growing_runs)
    );
    for t in &r.transfers {
        println!(
            "| swarmtune blob fetch (noise, yamux, verified 1 MiB chunks, blob store) | {} | {:.3} | {:.0} | {:.2} | {:.2} | {} |",
            t.fetchers,
            t.seconds,
            mib(t.bytes_per_s),
            t.bytes_per_s / file,
            t.bytes_per_s / memory,
            runs(&t.runs_bytes_per_s)
        );
    }
    println!(
        "gossipsub, {} nodes: {:.1}% delivered; latency p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms",
        r.gossip_nodes,
        100.0 * r.gossip_delivered,
        r.gossip_latency_ms[0],
        r.gossip_latency_ms[1],
        r.gossip_latency_ms[2]
    );
    Ok(())
}

/// `swarmtune bench merge`.
pub fn merge(args: BenchMergeArgs) -> anyhow::Result<()> {
    use swarmtune_coordinator::merge::bench::{self, MergeBench};
    let pool = ThreadPool::new(args.threads)?;
    let config = MergeBench {
        counts: args.deltas,
        rules: args.rules,
        rank: args.rank,
    };
    let json = args.json;
    let r = pool.install(|| {
        bench::run(&config, &mut |what| {
            if !json {
                eprintln!("measuring {what} ...");
            }
        })
    })?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    println!(
        "{}: {} parameters, {:.2} MiB per int8 delta; {} threads",
        r.module,
        r.parameters,
        mib(r.bytes_per_delta),
        r.threads
    );
    println!(
        "| rule | N | delta MiB | verify ms (BLAKE3 alone) | aggregate ms | total ms | read-from-memory ms | ratio | peak RSS |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in &r.rows {
        println!(
            "| {} | {} | {:.0} | {:.0} ({:.0}) | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} MiB |",
            row.rule,
            row.deltas,
            mib(row.delta_bytes),
            row.verify_ms,
            row.hash_ms,
            row.aggregate_ms,
            row.total_ms,
            row.yardstick_ms,
            row.ratio,
            mib(row.peak_rss_bytes)
        );
    }
    Ok(())
}

/// `swarmtune bench adversary`.
pub fn adversary(args: BenchAdversaryArgs) -> anyhow::Result<()> {
    use swarmtune_coordinator::adversary::{self, Sweep};
    let sweep = Sweep {
        volunteers: args.volunteers,
        percents: args.percents,
        rounds: args.rounds,
        quorum: args.quorum.unwrap_or(args.volunteers as u32),
        max_delta_norm: args.max_delta_norm,
        patient: !args.impatient,
    };
    let temp;
    let dir = match args.dir {
        Some(dir) => dir,
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let rows = adversary::run_sweep(&sweep, &dir, &mut |line| eprintln!("{line}"))?;
    println!(
        "{} volunteers, {} rounds of {} units, delta norm bound {}, {} attackers",
        sweep.volunteers,
        sweep.rounds,
        sweep.quorum,
        sweep.max_delta_norm,
        if sweep.patient {
            "patient"
        } else {
            "impatient"
        }
    );
    println!("{}", adversary::summary_table(&rows));
    println!("{}", adversary::attacker_table(&rows));
    Ok(())
}

/// `swarmtune bench verification`.
pub fn verification(args: BenchVerificationArgs) -> anyhow::Result<()> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    print!(
        "{}",
        swarmtune_coordinator::adversary::economics::report(&mut rng)
    );
    Ok(())
}
