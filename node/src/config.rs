//! Settings: the data dir, its `config.toml`, and the flags that override it.
//!
//! Every command that touches the network or keeps state takes `--data-dir` (default
//! `$SWARMTUNE_HOME`, else `~/.swarmtune`) and `--config` (default `DATA_DIR/config.toml`,
//! read when present). A flag given on the command line wins over the file.
//!
//! ```toml
//! listen = ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"]
//! bootstrap = ["/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW..."]
//! coordinator = "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW..."
//! device = "cpu"
//! threads = 0
//! max_memory_gb = 8.0
//! mdns = true
//! ```

use std::path::{Path, PathBuf};

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use libp2p_identity::PeerId;
use serde::Deserialize;
use swarmtune_trainer::device::DeviceKind;

use crate::InputError;

/// `config.toml`: every key optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Addresses to listen on.
    #[serde(default)]
    pub listen: Vec<String>,
    /// Peers to join the swarm through.
    #[serde(default)]
    pub bootstrap: Vec<String>,
    /// The coordinator `submit`, `status` and `pull` talk to.
    pub coordinator: Option<String>,
    /// cpu, ndarray or gpu.
    pub device: Option<String>,
    /// Math threads (0: one per core).
    pub threads: Option<usize>,
    /// Memory training may use, in GB.
    pub max_memory_gb: Option<f64>,
    /// Discover peers on the LAN.
    pub mdns: Option<bool>,
}

/// The data dir: `flag`, else `$SWARMTUNE_HOME`, else `~/.swarmtune`.
pub fn data_dir(flag: Option<&Path>) -> Result<PathBuf, InputError> {
    if let Some(dir) = flag {
        return Ok(dir.to_owned());
    }
    if let Some(dir) = std::env::var_os("SWARMTUNE_HOME") {
        return Ok(PathBuf::from(dir));
    }
    std::env::home_dir()
        .map(|home| home.join(".swarmtune"))
        .ok_or_else(|| InputError::new("no home directory: pass --data-dir or set SWARMTUNE_HOME"))
}

/// Reads `path` (given with `--config`: it must exist) or `DATA_DIR/config.toml` (if there).
pub fn load(explicit: Option<&Path>, data_dir: &Path) -> Result<FileConfig, InputError> {
    let path = match explicit {
        Some(path) => path.to_owned(),
        None => {
            let path = data_dir.join("config.toml");
            if !path.exists() {
                return Ok(FileConfig::default());
            }
            path
        }
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| InputError::new(format!("cannot read {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| InputError::new(format!("{}: {e}", path.display())))
}

/// Parses a multiaddr, naming the flag or key it came from.
pub fn multiaddr(text: &str, what: &str) -> Result<Multiaddr, InputError> {
    text.parse()
        .map_err(|e| InputError::new(format!("{what}: {text:?} is not a multiaddr: {e}")))
}

/// A peer's address that ends in `/p2p/PEERID`, split into both.
pub fn peer_addr(text: &str, what: &str) -> Result<(PeerId, Multiaddr), InputError> {
    let addr = multiaddr(text, what)?;
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => Ok((peer, addr)),
        _ => Err(InputError::new(format!(
            "{what}: {text} must end in /p2p/PEERID (the coordinator prints its full addresses \
             at start)"
        ))),
    }
}

/// The device: the flag, else the file's, else cpu.
pub fn device(flag: Option<DeviceKind>, file: &FileConfig) -> Result<DeviceKind, InputError> {
    match (flag, &file.device) {
        (Some(d), _) => Ok(d),
        (None, Some(name)) => name
            .parse()
            .map_err(|e| InputError::new(format!("config device: {e}"))),
        (None, None) => Ok(DeviceKind::Cpu),
    }
}

/// The coordinator for client commands: the flag, else the file's.
pub fn coordinator(
    flag: Option<&str>,
    file: &FileConfig,
) -> Result<(PeerId, Multiaddr), InputError> {
    match flag.or(file.coordinator.as_deref()) {
        Some(text) => peer_addr(text, "--coordinator"),
        None => Err(InputError::new(
            "which coordinator? pass --coordinator MULTIADDR (ending in /p2p/PEERID) or set \
             `coordinator` in the data dir's config.toml",
        )),
    }
}
