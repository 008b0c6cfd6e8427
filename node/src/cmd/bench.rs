//! `swarmtune bench`: measurements that print a table, for the README.

use indicatif::{ProgressBar, ProgressStyle};
use swarmtune_trainer::builtin::skill::{self, SkillRun};
use swarmtune_trainer::device::ThreadPool;
use swarmtune_trainer::train::TrainSpec;

use crate::cli::{BenchSkillArgs, BenchTrainArgs};

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
    let report = pool.install(|| {
        skill::run(&args.model, &device, &run, &mut |p| {
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
