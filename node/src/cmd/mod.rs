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
    }
}
