//! `swarmtune pretrain RECIPE.toml --out DIR`: pretrain a base from scratch with a progress bar.

use std::sync::atomic::AtomicBool;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use swarmtune_trainer::device::ThreadPool;
use swarmtune_trainer::pretrain::{PretrainProgress, Recipe, pretrain};

use crate::cli::PretrainArgs;

/// Runs `swarmtune pretrain`.
pub fn run(args: PretrainArgs) -> anyhow::Result<()> {
    let recipe = Recipe::from_file(&args.recipe)?;
    let pool = ThreadPool::new(args.compute.threads)?;
    let device = args.compute.device.device()?;
    let bar = ProgressBar::new(recipe.train.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} steps  {msg}  (eta {eta})",
        )
        .context("progress bar template")?
        .progress_chars("=> "),
    );
    let mut last_eval = None;
    let report = pool.install(|| {
        pretrain(
            &recipe,
            &device,
            args.compute.device.backend_name(),
            pool.threads(),
            &args.out,
            &mut |p| match p {
                PretrainProgress::Step { step, loss, .. } => {
                    bar.set_position(step as u64);
                    let eval = last_eval.map_or(String::new(), |e: f64| format!("  eval {e:.3}"));
                    bar.set_message(format!("loss {loss:.3}{eval}"));
                }
                PretrainProgress::Resumed(step) => {
                    bar.println(format!("continuing the run in {} from step {step}", args.out.display()));
                    bar.set_position(step as u64);
                }
                PretrainProgress::Eval(point) => {
                    last_eval = Some(point.eval_loss);
                    // Without a terminal the bar is hidden; a log gets one line per eval.
                    if bar.is_hidden() {
                        eprintln!(
                            "step {}/{}: train loss {:.4}, held-out loss {:.4}, copy exact match {:.0}%",
                            point.step,
                            recipe.train.steps,
                            point.train_loss,
                            point.eval_loss,
                            100.0 * point.copy_exact_match
                        );
                    }
                }
            },
            &AtomicBool::new(false),
        )
    })?;
    bar.finish();
    let last = report.evals.last().map_or(f64::NAN, |e| e.eval_loss);
    println!(
        "pretrained {} parameters on {} tokens in {:.0} s ({} threads): held-out loss {last:.4}; wrote {}",
        report.parameters,
        report.tokens,
        report.seconds,
        report.threads,
        args.out.display()
    );
    Ok(())
}
