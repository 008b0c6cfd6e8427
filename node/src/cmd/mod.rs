//! One module per subcommand; `run` dispatches.

mod bench;
pub mod client;
mod generate;
mod inspect;
pub mod network;
mod pretrain;

use std::time::Duration;

use crate::cli::{BenchCommand, Cli, Command, DemoArgs, InspectCommand};

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo(args) => demo(args),
        Command::Node(args) => network::node(args),
        Command::Coordinator(args) => network::coordinator(args),
        Command::Id(args) => network::id(args),
        Command::Submit(args) => client::submit(args),
        Command::Status(args) => client::status(args),
        Command::Pull(args) => client::pull(args),
        Command::Inspect(InspectCommand::Logits(args)) => inspect::logits(args),
        Command::Inspect(InspectCommand::Grads(args)) => inspect::grads(args),
        Command::Generate(args) => generate::run(args),
        Command::Pretrain(args) => pretrain::run(args),
        Command::Bench(BenchCommand::Skill(args)) => bench::skill(args),
        Command::Bench(BenchCommand::Train(args)) => bench::train(args),
        Command::Bench(BenchCommand::Net(args)) => bench::net(args),
        Command::Bench(BenchCommand::Merge(args)) => bench::merge(args),
        Command::Bench(BenchCommand::Adversary(args)) => bench::adversary(args),
        Command::Bench(BenchCommand::Verification(args)) => bench::verification(args),
    }
}

/// `swarmtune demo`.
fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let temp;
    let dir = match &args.keep {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_owned()
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let config = crate::demo::DemoConfig {
        dir: dir.clone(),
        volunteers: args.volunteers.max(1),
        rounds: args.rounds,
        inner_steps: args.inner_steps,
        // The volunteers share this machine's cores.
        threads_per_volunteer: (threads / args.volunteers.max(1)).max(1),
        show: true,
        timeout: Duration::from_secs(3600),
    };
    println!(
        "swarmtune demo: a coordinator and {} volunteers on 127.0.0.1 teach the built-in base \
         to shout (examples/job.toml)",
        config.volunteers
    );
    let report = network::runtime()?.block_on(crate::demo::run(&config))?;
    crate::demo::print_report(&report);
    if args.keep.is_some() {
        println!(
            "kept in {}: data dirs, the log (demo.log), the loss plot (loss.svg) and the module \
             (module/, a PEFT adapter dir)",
            dir.display()
        );
    }
    Ok(())
}

/// `dir`, or the built-in base unpacked into a directory of its own under the system's temp
/// directory (named by its weights' hash, so each version is written once).
pub fn model_dir(dir: Option<&std::path::Path>) -> anyhow::Result<std::path::PathBuf> {
    if let Some(dir) = dir {
        return Ok(dir.to_owned());
    }
    let hash = swarmtune_trainer::builtin::base::weights_hash().to_hex();
    let dir = std::env::temp_dir().join(format!("swarmtune-builtin-base-{}", &hash[..16]));
    std::fs::create_dir_all(&dir)?;
    swarmtune_trainer::builtin::base::write_to(&dir)?;
    Ok(dir)
}
