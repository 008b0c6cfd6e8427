//! A writer killed in the middle of storing a blob leaves no corrupt blob (issue 5, point 3).
//! The test runs its own binary again as a slow writer and kills it with SIGKILL at several
//! points of the write, then checks what the store holds. Unix only: it needs SIGKILL.

#![cfg(unix)]

use std::io::{self, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use swarmtune_protocol::blob_store::{BlobStore, GcReport};
use swarmtune_protocol::content::ContentId;

/// Set in the child: the store root it writes to. Its absence makes the test the parent.
const WRITER_ROOT_ENV: &str = "SWARMTUNE_TEST_SLOW_WRITER_ROOT";
/// This test's name, for the child's `--exact` filter.
const TEST_NAME: &str = "a_writer_killed_mid_write_leaves_no_corrupt_blob";
const BLOB_BYTES: u64 = 24 << 20;
const MAX_BLOB_BYTES: u64 = 1 << 30;

/// The blob the writer stores: deterministic bytes, so the parent knows its id.
fn blob_source() -> impl Read {
    blake3::Hasher::new()
        .update(b"a blob written by a writer that gets killed")
        .finalize_xof()
        .take(BLOB_BYTES)
}

/// Hands out 64 KiB every 2 ms, so the whole write takes most of a second and there is time
/// to kill the writer halfway.
struct SlowReader<R>(R);

impl<R: Read> Read for SlowReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        std::thread::sleep(Duration::from_millis(2));
        let len = buf.len().min(64 << 10);
        self.0.read(&mut buf[..len])
    }
}

/// Bytes in the store's temp files: how far the writer has got.
fn temp_bytes(root: &Path) -> u64 {
    std::fs::read_dir(root.join("tmp"))
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok()?.metadata().ok())
                .map(|meta| meta.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Starts a writer storing the blob under `root`, kills it once `temp_bytes` reaches
/// `kill_at` (or the blob is already in place), and says whether it was still running then.
fn kill_writer_at(root: &Path, kill_at: u64, expected: &ContentId) -> bool {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(WRITER_ROOT_ENV, root)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let blob = BlobStore::open(root, MAX_BLOB_BYTES)
        .unwrap()
        .blob_path(expected);
    let deadline = Instant::now() + Duration::from_secs(120);
    while temp_bytes(root) < kill_at && !blob.exists() {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the writer made no progress");
        std::thread::sleep(Duration::from_micros(200));
    }
    let running = child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    let status = child.wait().unwrap();
    if running {
        assert_eq!(status.signal(), Some(9), "the writer was not killed");
    }
    running
}

/// What every kill must leave: no blob, or the one blob and whole; then gc leaves no temp file.
fn assert_store_is_sound(root: &Path, expected: &ContentId) -> GcReport {
    let store = BlobStore::open(root, MAX_BLOB_BYTES).unwrap();
    let listed = store.list().unwrap();
    assert!(
        listed.is_empty() || listed == [*expected],
        "the store holds {listed:?}"
    );
    for id in &listed {
        assert_eq!(store.verify(id).unwrap(), BLOB_BYTES);
    }
    let report = store.gc().unwrap();
    assert_eq!(temp_bytes(root), 0, "gc left temp files");
    assert!(store.list().unwrap().is_empty());
    report
}

#[test]
fn a_writer_killed_mid_write_leaves_no_corrupt_blob() {
    if let Some(root) = std::env::var_os(WRITER_ROOT_ENV) {
        let store = BlobStore::open(root, MAX_BLOB_BYTES).unwrap();
        store.put_reader(SlowReader(blob_source())).unwrap();
        return;
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(blob_source()).unwrap();
    let expected = ContentId::from(hasher.finalize());

    // Halfway through the stream: the kill certainly lands mid-write.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("halfway");
    assert!(kill_writer_at(&root, BLOB_BYTES / 3, &expected));
    let left = temp_bytes(&root);
    assert!(
        (BLOB_BYTES / 3..BLOB_BYTES).contains(&left),
        "the writer should have died with part of the blob in a temp file, not {left} bytes"
    );
    let report = assert_store_is_sound(&root, &expected);
    assert_eq!(report.temp_files_removed, 1);
    assert_eq!(report.blobs_removed, 0);

    // At the end of the stream, while syncing and renaming, or just after: which of these a
    // kill lands in depends on timing, and every outcome must leave the whole blob or none.
    for (round, kill_at) in [BLOB_BYTES - (64 << 10), BLOB_BYTES]
        .into_iter()
        .enumerate()
    {
        let root = dir.path().join(format!("late-{round}"));
        let killed = kill_writer_at(&root, kill_at, &expected);
        let report = assert_store_is_sound(&root, &expected);
        eprintln!("kill at {kill_at} bytes: writer still running {killed}, then {report:?}");
    }
}
