//! `swarmtune`: see the library (`swarmtune_node`) for the commands.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    swarmtune_node::main_with(std::env::args_os())
}
