//! A node's identity: the Ed25519 libp2p keypair kept in its data directory. Its PeerId names
//! the node on the network and its key signs what the node authors (see `signed`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use libp2p_identity::{KeyType, Keypair, PeerId};

/// The key file inside a data directory.
pub const KEY_FILE: &str = "identity.key";

/// The largest key file read: an Ed25519 keypair in libp2p's protobuf encoding is 68 bytes.
const MAX_KEY_FILE_BYTES: u64 = 1024;

/// Why a node's identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the key file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The key file is not a libp2p Ed25519 keypair.
    #[error("{path} is not a swarmtune node key ({reason}); move it away to create a new identity")]
    BadKeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl IdentityError {
    fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// The node's keypair from `data_dir`, created on first use (mode 0600, written to a temporary
/// file, synced and renamed, so a crash never leaves half a key).
pub fn load_or_create(data_dir: &Path) -> Result<Keypair, IdentityError> {
    let path = data_dir.join(KEY_FILE);
    match File::open(&path) {
        Ok(file) => load(&path, file),
        Err(e) if e.kind() == io::ErrorKind::NotFound => create(data_dir, &path),
        Err(e) => Err(IdentityError::io(&path, e)),
    }
}

/// The PeerId of a keypair, as the rest of the network sees it.
pub fn peer_id(keypair: &Keypair) -> PeerId {
    keypair.public().to_peer_id()
}

fn load(path: &Path, file: File) -> Result<Keypair, IdentityError> {
    restrict_permissions(path, &file)?;
    let mut bytes = Vec::new();
    file.take(MAX_KEY_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| IdentityError::io(path, e))?;
    let bad = |reason: String| IdentityError::BadKeyFile {
        path: path.to_owned(),
        reason,
    };
    if bytes.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(bad(format!("larger than {MAX_KEY_FILE_BYTES} bytes")));
    }
    let keypair = Keypair::from_protobuf_encoding(&bytes).map_err(|e| bad(e.to_string()))?;
    if keypair.key_type() != KeyType::Ed25519 {
        return Err(bad(format!(
            "a {:?} key; only Ed25519 is used",
            keypair.key_type()
        )));
    }
    Ok(keypair)
}

fn create(data_dir: &Path, path: &Path) -> Result<Keypair, IdentityError> {
    fs::create_dir_all(data_dir).map_err(|e| IdentityError::io(data_dir, e))?;
    let keypair = Keypair::generate_ed25519();
    let bytes = keypair
        .to_protobuf_encoding()
        .map_err(|e| IdentityError::BadKeyFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    let tmp = data_dir.join(format!("{KEY_FILE}.tmp"));
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp).map_err(|e| IdentityError::io(&tmp, e))?;
    // `mode` applies only when the file is created; a stale temp file keeps its old mode.
    restrict_permissions(&tmp, &file)?;
    file.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| IdentityError::io(&tmp, e))?;
    drop(file);
    // Two nodes starting on one data dir at once: the first key to land wins, both use it.
    match fs::hard_link(&tmp, path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let _ = fs::remove_file(&tmp);
            let file = File::open(path).map_err(|e| IdentityError::io(path, e))?;
            return load(path, file);
        }
        Err(e) => return Err(IdentityError::io(path, e)),
    }
    let _ = fs::remove_file(&tmp);
    sync_dir(data_dir)?;
    tracing::info!(peer_id = %peer_id(&keypair), path = %path.display(), "created a new node identity");
    Ok(keypair)
}

/// Makes the key readable by its owner only; a key others could read is repaired, with a
/// warning, rather than refused, so a volunteer's node still starts.
fn restrict_permissions(path: &Path, file: &File) -> Result<(), IdentityError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file
            .metadata()
            .map_err(|e| IdentityError::io(path, e))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "the node key was readable by others; setting its mode to 600"
            );
            file.set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(|e| IdentityError::io(path, e))?;
        }
    }
    #[cfg(not(unix))]
    let _ = (path, file);
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), IdentityError> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| IdentityError::io(dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_created_once_with_mode_0600_and_then_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("node");
        let first = load_or_create(&data).unwrap();
        let again = load_or_create(&data).unwrap();
        assert_eq!(peer_id(&first), peer_id(&again));
        assert_eq!(first.key_type(), KeyType::Ed25519);
        assert!(!data.join(format!("{KEY_FILE}.tmp")).exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(data.join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Another data dir is another node.
        let other = load_or_create(&dir.path().join("other")).unwrap();
        assert_ne!(peer_id(&first), peer_id(&other));
    }

    #[cfg(unix)]
    #[test]
    fn a_key_readable_by_others_is_restricted_on_load() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let id = peer_id(&load_or_create(dir.path()).unwrap());
        let path = dir.path().join(KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(peer_id(&load_or_create(dir.path()).unwrap()), id);
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_damaged_key_file_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        fs::write(&path, b"not a key").unwrap();
        let err = load_or_create(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(KEY_FILE) && err.contains("not a swarmtune node key"),
            "{err}"
        );
        fs::write(&path, vec![0u8; 4096]).unwrap();
        let err = load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.contains("larger than"), "{err}");
    }
}
