//! Compiles the wire contract in `proto/` with protox (pure Rust, no system `protoc`) and
//! generates the Rust types with prost.

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new("../proto");
    let dir = root.join("swarmtune/v1");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "proto"));
    files.sort();
    let descriptors = protox::compile(&files, [root])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
