//! `swarmtune`: the one program volunteers, job owners and module users run, as a library so
//! that the end-to-end tests and the demo run exactly what the binary runs.
//!
//! - [`cli`]: every subcommand and flag; [`cmd`]: one module per subcommand.
//! - [`volunteer`]: `swarmtune node`, the volunteer runtime.
//! - [`client`]: what `submit`, `status` and `pull` ask a coordinator.
//! - [`demo`]: the whole network on loopback.
//! - [`config`], [`net`], [`models`]: settings, swarms, base models.
//!
//! Exit codes scripts can rely on: 0 success; 1 failure; 2 a bad command line, job file or
//! config; 3 the coordinator could not be reached. Logs follow `RUST_LOG` (default: `info` for
//! `node` and `coordinator`, `warn` for the one-shot commands).

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

pub mod cli;
pub mod client;
pub mod cmd;
pub mod config;
pub mod demo;
pub mod models;
pub mod net;
pub mod plot;
pub mod volunteer;

/// Input a user gave that cannot be used (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InputError(String);

impl InputError {
    /// An error with this message, which says what is wrong and what is allowed.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// A peer that could not be reached (exit code 3).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(pub String);

/// Exit code for a bad command line, job file or config.
pub const EXIT_INPUT: u8 = 2;
/// Exit code for a coordinator that could not be reached.
pub const EXIT_UNREACHABLE: u8 = 3;

/// Runs the program with these arguments (the first is the program's name).
pub fn main_with(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    ExitCode::from(run(args))
}

/// [`main_with`], returning the exit code as a number.
pub fn run(args: impl IntoIterator<Item = OsString>) -> u8 {
    let cli = match cli::Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_INPUT } else { 0 };
        }
    };
    let filter = |level: &str| {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level))
    };
    // A second call (tests running several commands in one process) keeps the first.
    match &cli.command {
        // The demo draws progress bars: its log goes to DIR/demo.log with --keep, and only
        // warnings reach the terminal otherwise.
        cli::Command::Demo(cli::DemoArgs {
            keep: Some(dir), ..
        }) => match std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::File::create(dir.join("demo.log")))
        {
            Ok(file) => {
                let _ = tracing_subscriber::fmt()
                    .with_env_filter(filter("info"))
                    .with_ansi(false)
                    .with_writer(std::sync::Mutex::new(file))
                    .try_init();
            }
            Err(e) => {
                eprintln!(
                    "error: cannot write {}: {e}",
                    dir.join("demo.log").display()
                );
                return 1;
            }
        },
        cli::Command::Demo(_) => {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter("warn"))
                .with_writer(std::io::stderr)
                .try_init();
        }
        command => {
            // Long-running peers log what they do; one-shot commands print their answer.
            let level = match command {
                cli::Command::Node(_) | cli::Command::Coordinator(_) => "info",
                _ => "warn",
            };
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter(level))
                .with_writer(std::io::stderr)
                .try_init();
        }
    }
    match cmd::run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            exit_code(&e)
        }
    }
}

fn exit_code(e: &anyhow::Error) -> u8 {
    if e.chain().any(|c| c.is::<InputError>()) {
        EXIT_INPUT
    } else if e.chain().any(|c| c.is::<Unreachable>()) {
        EXIT_UNREACHABLE
    } else {
        1
    }
}
