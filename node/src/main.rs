//! `swarmtune`: see the library (`swarmtune_node`) for the commands.

fn main() -> std::process::ExitCode {
    swarmtune_node::main_with(std::env::args_os())
}
