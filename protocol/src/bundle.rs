//! Bundles (blob.proto): a directory named by one ContentId, how a base model travels. The
//! bundle blob is the canonical encoding of a `Bundle` message listing the files, each of
//! them a blob of its own, so a bundle's id is the same on every peer that holds the same
//! directory.
//!
//! A bundle comes from peers: its paths are checked before any file is written (relative,
//! no `.` or `..`, no empty component), its size is capped, and every file is verified
//! against its id as it is copied out of the store.

use std::path::{Component, Path, PathBuf};

use prost::Message;

use crate::blob_store::{BlobError, BlobStore};
use crate::content::ContentId;
use crate::v1;

/// The largest bundle blob (blob.proto).
pub const MAX_BUNDLE_BYTES: usize = 1 << 20;
/// The most files a bundle lists.
pub const MAX_BUNDLE_FILES: usize = 256;
const MAX_PATH_BYTES: usize = 256;

/// Why a bundle could not be made, read or written out.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The store failed, or a file did not verify.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// Reading the local directory failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The bundle blob is not a valid bundle.
    #[error("bundle {id} is invalid: {reason}")]
    Invalid {
        /// The bundle.
        id: ContentId,
        /// What is wrong.
        reason: String,
    },
}

/// Stores every regular file of `dir` (not descending into subdirectories, not following
/// symbolic links) and then the bundle listing them; returns the bundle's id.
pub fn put_dir(store: &BlobStore, dir: &Path) -> Result<ContentId, BundleError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| BundleError::Io { path, source }
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let kind = entry.file_type().map_err(io(&entry.path()))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !kind.is_file() || name.starts_with('.') {
            continue;
        }
        let id = store.put_file(entry.path())?;
        files.push(v1::BundleFile {
            path: name,
            id: Some(id.to_proto()),
            size_bytes: store.size(&id)?,
        });
    }
    files.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    let bundle = v1::Bundle {
        protocol_version: crate::PROTOCOL_VERSION,
        files,
    };
    let bytes = bundle.encode_to_vec();
    let id = ContentId::of(&bytes);
    check(&bundle, id)?;
    Ok(store.put_bytes(&bytes)?)
}

/// Reads and checks bundle `id` from the store.
pub fn read(store: &BlobStore, id: &ContentId) -> Result<v1::Bundle, BundleError> {
    let invalid = |reason: String| BundleError::Invalid { id: *id, reason };
    let size = store.size(id)?;
    if size > MAX_BUNDLE_BYTES as u64 {
        return Err(invalid(format!(
            "{size} bytes, over the limit of {MAX_BUNDLE_BYTES}"
        )));
    }
    let bytes = store.read(id)?;
    let bundle = v1::Bundle::decode(bytes.as_slice()).map_err(|e| invalid(e.to_string()))?;
    check(&bundle, *id)?;
    Ok(bundle)
}

/// The files of `bundle` as (path, id, size), checked.
pub fn files(
    bundle: &v1::Bundle,
    id: ContentId,
) -> Result<Vec<(String, ContentId, u64)>, BundleError> {
    check(bundle, id)?;
    bundle
        .files
        .iter()
        .map(|f| {
            let file =
                f.id.as_ref()
                    .and_then(|c| ContentId::try_from(c).ok())
                    .ok_or_else(|| BundleError::Invalid {
                        id,
                        reason: format!("{} has no valid id", f.path),
                    })?;
            Ok((f.path.clone(), file, f.size_bytes))
        })
        .collect()
}

/// Writes the files of bundle `id` (all of which must be in the store) into `dir`, each
/// verified as it is copied, and returns `dir`. Files already there with the right size and
/// hash are left alone.
pub fn write_dir<'d>(
    store: &BlobStore,
    id: &ContentId,
    dir: &'d Path,
) -> Result<&'d Path, BundleError> {
    let bundle = read(store, id)?;
    std::fs::create_dir_all(dir).map_err(|source| BundleError::Io {
        path: dir.to_owned(),
        source,
    })?;
    for (path, file, _) in files(&bundle, *id)? {
        let target = dir.join(&path);
        if std::fs::read(&target)
            .map(|bytes| ContentId::of(&bytes) == file)
            .unwrap_or(false)
        {
            continue;
        }
        let bytes = store.read(&file)?;
        let io = |source| BundleError::Io {
            path: target.clone(),
            source,
        };
        let parent = target.parent().unwrap_or(dir);
        std::fs::create_dir_all(parent).map_err(io)?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = parent.join(format!(".{name}.part"));
        std::fs::write(&tmp, &bytes).map_err(io)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
        std::fs::rename(&tmp, &target).map_err(io)?;
    }
    Ok(dir)
}

fn check(bundle: &v1::Bundle, id: ContentId) -> Result<(), BundleError> {
    let invalid = |reason: String| Err(BundleError::Invalid { id, reason });
    if bundle.protocol_version != crate::PROTOCOL_VERSION {
        return invalid(format!(
            "protocol version {}, this peer speaks {}",
            bundle.protocol_version,
            crate::PROTOCOL_VERSION
        ));
    }
    if bundle.files.is_empty() || bundle.files.len() > MAX_BUNDLE_FILES {
        return invalid(format!(
            "{} files; a bundle holds 1 to {MAX_BUNDLE_FILES}",
            bundle.files.len()
        ));
    }
    for pair in bundle.files.windows(2) {
        if pair[0].path.as_bytes() >= pair[1].path.as_bytes() {
            return invalid(format!(
                "files not sorted or duplicated at {:?}",
                pair[1].path
            ));
        }
    }
    for file in &bundle.files {
        if let Err(reason) = check_path(&file.path) {
            return invalid(reason);
        }
    }
    Ok(())
}

/// A bundle path: relative, `/`-separated, 1 to 256 bytes, no empty, `.` or `..` component.
fn check_path(path: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("path {path:?} {why}"));
    if path.is_empty() || path.len() > MAX_PATH_BYTES {
        return bad("must be 1 to 256 bytes");
    }
    if path.contains('\\') || path.contains('\0') {
        return bad("holds a backslash or a NUL");
    }
    for part in path.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return bad("has an empty, `.` or `..` component");
        }
    }
    if Path::new(path)
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
    {
        return bad("is not relative");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &tempfile::TempDir) -> BlobStore {
        BlobStore::open(dir.path().join("blobs"), 1 << 30).unwrap()
    }

    #[test]
    fn a_directory_round_trips_and_its_id_depends_only_on_its_files() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("model");
        std::fs::create_dir_all(model.join("sub")).unwrap();
        std::fs::write(model.join("config.json"), b"{}").unwrap();
        std::fs::write(model.join("model.safetensors"), vec![7u8; 5000]).unwrap();
        std::fs::write(model.join("sub/ignored"), b"x").unwrap();
        let a = put_dir(&store(&tmp), &model).unwrap();

        let other = tempfile::tempdir().unwrap();
        let copy = other.path().join("elsewhere");
        std::fs::create_dir_all(&copy).unwrap();
        std::fs::write(copy.join("model.safetensors"), vec![7u8; 5000]).unwrap();
        std::fs::write(copy.join("config.json"), b"{}").unwrap();
        let other_store = store(&other);
        assert_eq!(
            put_dir(&other_store, &copy).unwrap(),
            a,
            "same files, same id"
        );

        let out = other.path().join("out");
        write_dir(&other_store, &a, &out).unwrap();
        assert_eq!(
            std::fs::read(out.join("model.safetensors")).unwrap(),
            vec![7u8; 5000]
        );
        assert_eq!(std::fs::read(out.join("config.json")).unwrap(), b"{}");
        assert!(!out.join("sub").exists());
        let names: Vec<String> = read(&other_store, &a)
            .unwrap()
            .files
            .into_iter()
            .map(|f| f.path)
            .collect();
        assert_eq!(names, ["config.json", "model.safetensors"]);
    }

    #[test]
    fn hostile_bundles_are_refused_before_anything_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let store = store(&tmp);
        let file = store.put_bytes(b"payload").unwrap();
        let entry = |path: &str| v1::BundleFile {
            path: path.into(),
            id: Some(file.to_proto()),
            size_bytes: 7,
        };
        let cases: Vec<(Vec<v1::BundleFile>, &str)> = vec![
            (vec![entry("../escape")], "component"),
            (vec![entry("/etc/passwd")], "component"),
            (vec![entry("a//b")], "component"),
            (vec![entry("./a")], "component"),
            (vec![entry("a\\..\\b")], "backslash"),
            (vec![entry("b"), entry("a")], "sorted"),
            (vec![entry("a"), entry("a")], "sorted"),
            (vec![], "files"),
            (vec![entry(&"x".repeat(257))], "256 bytes"),
        ];
        let out = tmp.path().join("out");
        for (files, why) in cases {
            let bytes = v1::Bundle {
                protocol_version: crate::PROTOCOL_VERSION,
                files,
            }
            .encode_to_vec();
            let id = store.put_bytes(&bytes).unwrap();
            let err = write_dir(&store, &id, &out).unwrap_err().to_string();
            assert!(err.contains(why), "{why}: {err}");
        }
        assert!(!out.exists(), "nothing was written");
        let garbage = store.put_bytes(b"\xff\xff\xff").unwrap();
        assert!(matches!(
            read(&store, &garbage),
            Err(BundleError::Invalid { .. })
        ));
    }
}
