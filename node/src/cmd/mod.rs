//! One module per subcommand; `run` dispatches.

mod bench;
mod generate;
mod inspect;
mod pretrain;

use crate::cli::{BenchCommand, Cli, Command, InspectCommand};

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect(InspectCommand::Logits(args)) => inspect::logits(args),
        Command::Inspect(InspectCommand::Grads(args)) => inspect::grads(args),
        Command::Generate(args) => generate::run(args),
        Command::Pretrain(args) => pretrain::run(args),
        Command::Bench(BenchCommand::Skill(args)) => bench::skill(args),
        Command::Bench(BenchCommand::Train(args)) => bench::train(args),
        Command::Bench(BenchCommand::Net(args)) => bench::net(args),
        Command::Bench(BenchCommand::Merge(args)) => bench::merge(args),
    }
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
