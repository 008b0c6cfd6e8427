//! The content-addressed blob store: every blob a peer holds (base model files, datasets,
//! shards, adapters, deltas) in a file named by its `ContentId`, and the resumable chunked
//! downloads that fill it (the fetch steps of `blob.proto`).
//!
//! Layout under the store's root:
//!
//! ```text
//! blobs/ab/cd/abcd…         a blob, named by its 64 hex digits, fanned out by its first two bytes
//! blobs/ab/cd/abcd….chunks  the blob's chunk hashes, cached so serving a manifest reads nothing else
//! tmp/                      files being written, each locked by its writer while it is alive
//! partial/abcd….part        a download in progress, as long as the whole blob
//! partial/abcd….done        which chunks of that download are durably written
//! pins/abcd…                one empty file per pinned blob: gc keeps these blobs
//! quarantine/abcd…          blobs that failed verification, kept for a look until the next gc
//! ```
//!
//! Crash safety rests on one rule: a file appears under `blobs/` (and a record under
//! `partial/`) only by renaming a fully written and synced temp file, after which the directory
//! is synced. A writer killed at any moment leaves at most a temp file, which `gc` removes once
//! no live writer holds its lock.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use blake3::hazmat::{
    HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};
use tempfile::NamedTempFile;
use tracing::debug;

use crate::content::{ContentId, ContentIdError};
use crate::v1;

/// Bytes per chunk in the v1 blob protocol (1 MiB); every chunk but the last is this long.
pub const CHUNK_SIZE: u64 = 1 << 20;

/// The largest blob the v1 wire contract allows (`BlobManifest.size_bytes`: 16 GiB).
pub const MAX_WIRE_BLOB_BYTES: u64 = 16 << 30;

/// Streaming buffer: large enough for BLAKE3's SIMD to pay off, small enough to never matter.
const IO_BUFFER_BYTES: usize = 256 << 10;

const BLOBS_DIR: &str = "blobs";
const TMP_DIR: &str = "tmp";
const PARTIAL_DIR: &str = "partial";
const PINS_DIR: &str = "pins";
const QUARANTINE_DIR: &str = "quarantine";

/// First bytes of a partial download's record; a record without them is not trusted.
const PART_RECORD_MAGIC: &[u8; 8] = b"STPART\0\x01";

/// Why a blob store operation failed; every message names the path, blob or limit involved.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The file system refused an operation on `path`.
    #[error("I/O error at {path}: {source}")]
    Io {
        /// The file or directory operated on.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
    /// The reader handed to `put_reader` failed.
    #[error("could not read the blob being stored: {0}")]
    Source(#[source] io::Error),
    /// A blob is larger than the store (or the wire contract) allows.
    #[error("a blob of at least {size} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// The blob's size, or as much of it as was seen before stopping.
        size: u64,
        /// The limit it broke.
        limit: u64,
    },
    /// The store does not hold the blob.
    #[error("blob {0} is not in the store")]
    NotFound(ContentId),
    /// A stored blob's bytes no longer hash to its id; it was moved aside so it can be fetched again.
    #[error(
        "blob {id} at {path} does not match its hash; it was moved to {moved_to} and must be fetched again"
    )]
    Corrupt {
        /// The blob.
        id: ContentId,
        /// Where it was stored.
        path: PathBuf,
        /// Where the bad bytes are now.
        moved_to: PathBuf,
    },
    /// A manifest is malformed or inconsistent; its provider should be blamed.
    #[error(transparent)]
    InvalidManifest(#[from] ManifestError),
    /// A chunk index past the blob's last chunk.
    #[error("blob {id} has {count} chunks; there is no chunk {index}")]
    NoSuchChunk {
        /// The blob.
        id: ContentId,
        /// The index asked for.
        index: u32,
        /// How many chunks the blob has.
        count: u64,
    },
    /// A downloaded chunk does not match the manifest; its provider should be blamed.
    #[error("chunk {index} of blob {id} was refused: {reason}")]
    BadChunk {
        /// The blob.
        id: ContentId,
        /// The chunk's index.
        index: u32,
        /// What was wrong with it.
        reason: BadChunkReason,
    },
    /// `finish` was called before every chunk was written.
    #[error("the download of blob {id} is incomplete: {missing} of {count} chunks are missing")]
    Incomplete {
        /// The blob.
        id: ContentId,
        /// Chunks still missing.
        missing: usize,
        /// Chunks in all.
        count: u64,
    },
    /// Chunks of a download changed on this disk after they were written and checked; they
    /// are marked missing again. Not the provider's fault.
    #[error(
        "{damaged} chunks of the download of blob {id} changed on disk after they were written; they must be fetched again"
    )]
    PartialDamaged {
        /// The blob.
        id: ContentId,
        /// How many chunks were damaged.
        damaged: usize,
    },
    /// Another `PartialBlob` (in this process or another) is writing the same download.
    #[error("blob {id} is already being downloaded into {path}")]
    DownloadBusy {
        /// The blob.
        id: ContentId,
        /// The locked partial file.
        path: PathBuf,
    },
}

/// What was wrong with a chunk a provider sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadChunkReason {
    /// The chunk is not as long as the manifest says.
    #[error("it has {got} bytes where the manifest says {expected}")]
    WrongLength {
        /// The length the manifest implies.
        expected: u64,
        /// The length received.
        got: u64,
    },
    /// The chunk's BLAKE3 is not the manifest's hash for it.
    #[error("its BLAKE3 is not the manifest's hash for it")]
    WrongHash,
}

/// Why a `BlobManifest` (from a peer, or built by hand) cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The wire message has no `id`.
    #[error("the blob manifest has no id")]
    MissingId,
    /// The wire message's `id` is not 32 bytes.
    #[error("the blob manifest's id is invalid: {0}")]
    Id(#[from] ContentIdError),
    /// The wire message's `chunk_size` is not the v1 chunk size.
    #[error("the manifest of blob {id} has chunks of {got} bytes; v1 chunks are 1048576 bytes")]
    ChunkSize {
        /// The blob.
        id: ContentId,
        /// The chunk size it claimed.
        got: u32,
    },
    /// The blob is larger than the limit for it.
    #[error("the manifest of blob {id} says {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// The blob.
        id: ContentId,
        /// The size it claimed.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The wire message's `chunk_hashes` is not a whole number of 32-byte hashes.
    #[error(
        "the manifest of blob {id} has {len} bytes of chunk hashes, not a whole number of 32-byte hashes"
    )]
    HashBytes {
        /// The blob.
        id: ContentId,
        /// The length of `chunk_hashes`.
        len: usize,
    },
    /// The number of chunk hashes does not fit the size.
    #[error(
        "the manifest of blob {id} lists {got} chunk hashes, but {size} bytes make {expected} chunks"
    )]
    HashCount {
        /// The blob.
        id: ContentId,
        /// The size it claimed.
        size: u64,
        /// Chunks that size makes.
        expected: u64,
        /// Hashes it listed.
        got: usize,
    },
    /// The chunk hashes must make the blob's id: the root of the BLAKE3 tree over them (for a
    /// blob of one chunk, that chunk's hash).
    #[error("the chunk hashes of the manifest of blob {id} do not make the blob's id")]
    HashesAreNotId {
        /// The blob.
        id: ContentId,
    },
    /// A size-0 manifest for an id that is not the empty blob's.
    #[error("the manifest of blob {id} says it is empty, but the empty blob's id is {empty}")]
    NotTheEmptyBlob {
        /// The blob.
        id: ContentId,
        /// The id of the empty blob.
        empty: ContentId,
    },
}

/// How a blob is cut into chunks and what each chunk hashes to (`BlobManifest` on the wire).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkManifest {
    /// The blob.
    pub id: ContentId,
    /// The blob's size in bytes.
    pub size: u64,
    /// Every chunk's hash ([`chunk_hash`]), in chunk order.
    pub chunk_hashes: Vec<[u8; 32]>,
}

impl ChunkManifest {
    /// The manifest of bytes held in memory.
    pub fn for_bytes(data: &[u8]) -> Self {
        let mut hasher = ChunkHasher::new();
        hasher.update(data);
        hasher.finish()
    }

    /// How many chunks the blob has: ceil(size / CHUNK_SIZE), none for the empty blob.
    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(CHUNK_SIZE)
    }

    /// The bytes of the blob that chunk `index` covers, or `None` past the last chunk.
    pub fn chunk_range(&self, index: u32) -> Option<Range<u64>> {
        chunk_range(self.size, index)
    }

    /// Checks what a fetcher must check before trusting a manifest (blob.proto, step 1): the
    /// size within `max_blob_bytes` and the wire limit, one hash per chunk, and that the
    /// hashes make the id ([`tree_root`]). A manifest that passes vouches for the whole blob:
    /// chunks that match it are the blob, with no pass over the whole at the end.
    pub fn validate(&self, max_blob_bytes: u64) -> Result<(), ManifestError> {
        let id = self.id;
        let limit = max_blob_bytes.min(MAX_WIRE_BLOB_BYTES);
        if self.size > limit {
            return Err(ManifestError::TooLarge {
                id,
                size: self.size,
                limit,
            });
        }
        let expected = self.chunk_count();
        if self.chunk_hashes.len() as u64 != expected {
            return Err(ManifestError::HashCount {
                id,
                size: self.size,
                expected,
                got: self.chunk_hashes.len(),
            });
        }
        let empty = ContentId::of(&[]);
        if self.chunk_hashes.is_empty() && id != empty {
            return Err(ManifestError::NotTheEmptyBlob { id, empty });
        }
        if &tree_root(&self.chunk_hashes, self.size) != id.as_bytes() {
            return Err(ManifestError::HashesAreNotId { id });
        }
        Ok(())
    }

    /// Whether `data` is chunk `index` of this blob (its length, then its hash).
    fn check_chunk(&self, index: u32, data: &[u8]) -> Result<(), BadChunkReason> {
        let Some(range) = self.chunk_range(index) else {
            return Err(BadChunkReason::WrongHash);
        };
        let expected = range.end - range.start;
        if data.len() as u64 != expected {
            return Err(BadChunkReason::WrongLength {
                expected,
                got: data.len() as u64,
            });
        }
        if chunk_hash(index, self.chunk_count(), data) != self.chunk_hashes[index as usize] {
            return Err(BadChunkReason::WrongHash);
        }
        Ok(())
    }

    /// The wire form.
    pub fn to_proto(&self) -> v1::BlobManifest {
        v1::BlobManifest {
            id: Some(self.id.to_proto()),
            size_bytes: self.size,
            chunk_size: CHUNK_SIZE as u32,
            chunk_hashes: self.chunk_hashes.as_flattened().to_vec(),
        }
    }
}

impl TryFrom<&v1::BlobManifest> for ChunkManifest {
    type Error = ManifestError;

    /// Decodes and validates against the wire limit; check the limit for the kind of blob
    /// with `validate` afterwards.
    fn try_from(proto: &v1::BlobManifest) -> Result<Self, ManifestError> {
        let id = ContentId::try_from(proto.id.as_ref().ok_or(ManifestError::MissingId)?)?;
        if u64::from(proto.chunk_size) != CHUNK_SIZE {
            return Err(ManifestError::ChunkSize {
                id,
                got: proto.chunk_size,
            });
        }
        let (hashes, rest) = proto.chunk_hashes.as_chunks::<32>();
        if !rest.is_empty() {
            return Err(ManifestError::HashBytes {
                id,
                len: proto.chunk_hashes.len(),
            });
        }
        if proto.size_bytes > MAX_WIRE_BLOB_BYTES {
            return Err(ManifestError::TooLarge {
                id,
                size: proto.size_bytes,
                limit: MAX_WIRE_BLOB_BYTES,
            });
        }
        // The count is checked before the hashes are copied, so a lying manifest costs nothing.
        let expected = proto.size_bytes.div_ceil(CHUNK_SIZE);
        if hashes.len() as u64 != expected {
            return Err(ManifestError::HashCount {
                id,
                size: proto.size_bytes,
                expected,
                got: hashes.len(),
            });
        }
        let manifest = Self {
            id,
            size: proto.size_bytes,
            chunk_hashes: hashes.to_vec(),
        };
        manifest.validate(MAX_WIRE_BLOB_BYTES)?;
        Ok(manifest)
    }
}

/// What `BlobStore::gc` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Unpinned blobs removed.
    pub blobs_removed: usize,
    /// Temp files left by writers that died.
    pub temp_files_removed: usize,
    /// Quarantined blobs removed.
    pub quarantined_removed: usize,
    /// Bytes freed by all of these.
    pub bytes_freed: u64,
}

/// Blobs on disk, named by their content id, with a size cap per blob (see the module doc for
/// the layout). Cheap to clone; clones share the directory.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
    max_blob_bytes: u64,
}

impl BlobStore {
    /// Opens (creating if needed) the store under `root`, refusing blobs over `max_blob_bytes`.
    pub fn open(root: impl Into<PathBuf>, max_blob_bytes: u64) -> Result<Self, BlobError> {
        let store = Self {
            root: root.into(),
            max_blob_bytes,
        };
        for dir in [BLOBS_DIR, TMP_DIR, PARTIAL_DIR, PINS_DIR, QUARANTINE_DIR] {
            let path = store.root.join(dir);
            fs::create_dir_all(&path).at(&path)?;
        }
        Ok(store)
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The largest blob this store accepts.
    pub fn max_blob_bytes(&self) -> u64 {
        self.max_blob_bytes
    }

    /// Where blob `id` lives (whether or not it is there). Read it through `open_verified`
    /// unless something else checks its hash.
    pub fn blob_path(&self, id: &ContentId) -> PathBuf {
        let hex = id.to_string();
        self.root
            .join(BLOBS_DIR)
            .join(&hex[..2])
            .join(&hex[2..4])
            .join(hex)
    }

    /// Stores `data` and returns its id.
    pub fn put_bytes(&self, data: &[u8]) -> Result<ContentId, BlobError> {
        self.check_size(data.len() as u64)?;
        self.put_stream(data, BlobError::Source)
    }

    /// Stores what `reader` yields, hashing it as it streams to disk, and returns its id. Stops
    /// with `TooLarge` as soon as the stream passes the store's cap.
    pub fn put_reader(&self, reader: impl Read) -> Result<ContentId, BlobError> {
        self.put_stream(reader, BlobError::Source)
    }

    /// Stores a copy of the file at `path` and returns its id.
    pub fn put_file(&self, path: impl AsRef<Path>) -> Result<ContentId, BlobError> {
        let path = path.as_ref();
        let file = File::open(path).at(path)?;
        self.check_size(file.metadata().at(path)?.len())?;
        self.put_stream(file, |source| BlobError::Io {
            path: path.to_owned(),
            source,
        })
    }

    /// Whether the store holds blob `id` (unverified: reading it checks it).
    pub fn contains(&self, id: &ContentId) -> bool {
        self.blob_path(id).is_file()
    }

    /// The size of blob `id` in bytes.
    pub fn size(&self, id: &ContentId) -> Result<u64, BlobError> {
        let path = self.blob_path(id);
        match fs::metadata(&path) {
            Ok(meta) => Ok(meta.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(BlobError::NotFound(*id)),
            Err(source) => Err(BlobError::Io { path, source }),
        }
    }

    /// The whole of blob `id`, verified against its id. Use `open_verified` for blobs too big
    /// to hold in memory; this refuses blobs over the store's cap.
    pub fn read(&self, id: &ContentId) -> Result<Vec<u8>, BlobError> {
        let mut reader = self.open_verified(id)?;
        let limit = self.max_blob_bytes;
        let size = reader.size();
        self.check_size(size)?;
        // The cap bounds the allocation; a file that grows while being read is stopped at it.
        let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        let mut buf = vec![0; IO_BUFFER_BYTES];
        loop {
            let n = reader.read_verified(&mut buf)?;
            if n == 0 {
                return Ok(data);
            }
            if (data.len() + n) as u64 > limit {
                return Err(BlobError::TooLarge {
                    size: (data.len() + n) as u64,
                    limit,
                });
            }
            data.extend_from_slice(&buf[..n]);
        }
    }

    /// Opens blob `id` for streaming; the read that reaches its end fails if the bytes do not
    /// hash to `id` (and the blob is quarantined).
    pub fn open_verified(&self, id: &ContentId) -> Result<VerifiedReader, BlobError> {
        let path = self.blob_path(id);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(BlobError::NotFound(*id)),
            Err(source) => return Err(BlobError::Io { path, source }),
        };
        let size = file.metadata().at(&path)?.len();
        Ok(VerifiedReader {
            store: self.clone(),
            id: *id,
            path,
            file,
            size,
            hasher: blake3::Hasher::new(),
            state: ReadState::Reading,
        })
    }

    /// Reads blob `id` through with a bounded buffer and checks its hash; returns its size. A
    /// blob that fails is quarantined and the error says so.
    pub fn verify(&self, id: &ContentId) -> Result<u64, BlobError> {
        let mut reader = self.open_verified(id)?;
        let mut buf = vec![0; IO_BUFFER_BYTES];
        let mut total = 0;
        loop {
            match reader.read_verified(&mut buf)? {
                0 => return Ok(total),
                n => total += n as u64,
            }
        }
    }

    /// Chunk `index` of blob `id`, for serving a `GetChunk`; checked against the blob's chunk
    /// hashes so this peer never serves a chunk it would itself refuse.
    pub fn read_chunk(&self, id: &ContentId, index: u32) -> Result<Vec<u8>, BlobError> {
        let size = self.size(id)?;
        let count = size.div_ceil(CHUNK_SIZE);
        let range = chunk_range(size, index).ok_or(BlobError::NoSuchChunk {
            id: *id,
            index,
            count,
        })?;
        // Only this chunk's 32 bytes of the cache are read, not the whole list (512 KiB for a
        // 16 GiB blob): a wrong or stale cache shows up as a mismatch below all the same.
        let expected = match self.cached_chunk_hash(id, size, index)? {
            Some(hash) => hash,
            None => self.chunk_manifest(id)?.chunk_hashes[index as usize],
        };
        let data = self.read_range(id, range)?;
        let hash = chunk_hash(index, count, &data);
        if hash == expected {
            return Ok(data);
        }
        // The blob or its cached hashes changed on disk. Recomputing the hashes reads the whole
        // blob, which tells which one: a bad blob is quarantined, a bad cache is rewritten.
        let cache = self.chunks_path(id);
        remove_if_present(&cache)?;
        let fresh = self.chunk_manifest(id)?;
        if fresh.chunk_hashes[index as usize] == hash {
            Ok(data)
        } else {
            Err(self.quarantine(id))
        }
    }

    /// Chunk `index`'s hash from the cache next to blob `id`, if the cache fits a blob of
    /// `size` bytes.
    fn cached_chunk_hash(
        &self,
        id: &ContentId,
        size: u64,
        index: u32,
    ) -> Result<Option<[u8; 32]>, BlobError> {
        let path = self.chunks_path(id);
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(BlobError::Io { path, source }),
        };
        if file.metadata().at(&path)?.len() != size.div_ceil(CHUNK_SIZE) * 32 {
            return Ok(None);
        }
        let mut hash = [0; 32];
        file.seek(SeekFrom::Start(u64::from(index) * 32))
            .at(&path)?;
        file.read_exact(&mut hash).at(&path)?;
        Ok(Some(hash))
    }

    /// How blob `id` is chunked, with every chunk's hash: read from the cache next to the
    /// blob, or computed in one streaming pass that also verifies the blob.
    pub fn chunk_manifest(&self, id: &ContentId) -> Result<ChunkManifest, BlobError> {
        let size = self.size(id)?;
        if let Some(manifest) = self.cached_manifest(id, size)? {
            return Ok(manifest);
        }
        let mut reader = self.open_verified(id)?;
        let mut hasher = ChunkHasher::new();
        let mut buf = vec![0; IO_BUFFER_BYTES];
        loop {
            match reader.read_verified(&mut buf)? {
                0 => break,
                n => hasher.update(&buf[..n]),
            }
        }
        let manifest = hasher.finish();
        self.cache_chunk_hashes(&manifest);
        Ok(manifest)
    }

    /// Keeps blob `id` through `gc`, across restarts. Pinning a blob not yet stored is allowed
    /// (pin before fetching so a concurrent gc cannot take it).
    pub fn pin(&self, id: &ContentId) -> Result<(), BlobError> {
        let path = self.pin_path(id);
        File::create(&path)
            .and_then(|file| file.sync_all())
            .at(&path)?;
        sync_dir(&self.root.join(PINS_DIR))
    }

    /// Lets `gc` remove blob `id` again; returns whether it was pinned.
    pub fn unpin(&self, id: &ContentId) -> Result<bool, BlobError> {
        let removed = remove_if_present(&self.pin_path(id))?;
        if removed {
            sync_dir(&self.root.join(PINS_DIR))?;
        }
        Ok(removed)
    }

    /// Whether blob `id` is pinned.
    pub fn is_pinned(&self, id: &ContentId) -> bool {
        self.pin_path(id).is_file()
    }

    /// Every pinned id, sorted.
    pub fn pinned(&self) -> Result<Vec<ContentId>, BlobError> {
        let mut ids: Vec<_> = dir_entries(&self.root.join(PINS_DIR))?
            .iter()
            .filter_map(|path| id_named(path))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Every stored blob, sorted (unverified: `verify` checks one).
    pub fn list(&self) -> Result<Vec<ContentId>, BlobError> {
        let mut ids: Vec<_> = self
            .fanout_files()?
            .iter()
            .filter_map(|path| self.blob_at(path))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Removes blob `id` whether pinned or not; returns whether it was there.
    pub fn remove(&self, id: &ContentId) -> Result<bool, BlobError> {
        remove_if_present(&self.chunks_path(id))?;
        remove_if_present(&self.blob_path(id))
    }

    /// Removes every unpinned blob, the temp files of writers that died, orphaned chunk
    /// caches and the quarantine. Partial downloads are left to be resumed.
    pub fn gc(&self) -> Result<GcReport, BlobError> {
        let pinned: HashSet<ContentId> = self.pinned()?.into_iter().collect();
        let mut report = GcReport::default();
        let files = self.fanout_files()?;
        for path in &files {
            let Some(id) = self.blob_at(path) else {
                continue;
            };
            if pinned.contains(&id) {
                continue;
            }
            let size = fs::metadata(path).map(|meta| meta.len()).unwrap_or(0);
            if self.remove(&id)? {
                report.blobs_removed += 1;
                report.bytes_freed += size;
            }
        }
        for path in &files {
            // Hashes cached for a blob that is gone (e.g. one moved to quarantine).
            let orphan = path
                .to_str()
                .and_then(|p| p.strip_suffix(".chunks"))
                .and_then(|blob| self.blob_at(Path::new(blob)))
                .is_some_and(|id| !self.contains(&id));
            if orphan {
                report.bytes_freed += remove_counting_bytes(path)?;
            }
        }
        for path in dir_entries(&self.root.join(TMP_DIR))? {
            // A live writer holds its temp file locked; only the dead writers' files are free.
            let Ok(file) = File::open(&path) else {
                continue;
            };
            if file.try_lock().is_ok() {
                report.bytes_freed += remove_counting_bytes(&path)?;
                report.temp_files_removed += 1;
            }
        }
        for path in dir_entries(&self.root.join(QUARANTINE_DIR))? {
            report.bytes_freed += remove_counting_bytes(&path)?;
            report.quarantined_removed += 1;
        }
        Ok(report)
    }

    /// Starts, or resumes, downloading the blob `manifest` describes, after checking the
    /// manifest against the store's cap. Progress survives a crash or a dropped `PartialBlob`.
    pub fn partial(&self, manifest: &ChunkManifest) -> Result<PartialBlob, BlobError> {
        manifest.validate(self.max_blob_bytes)?;
        let id = manifest.id;
        let dir = self.root.join(PARTIAL_DIR);
        let part_path = dir.join(format!("{id}.part"));
        let record_path = dir.join(format!("{id}.done"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part_path)
            .at(&part_path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(BlobError::DownloadBusy {
                    id,
                    path: part_path,
                });
            }
            Err(fs::TryLockError::Error(source)) => {
                return Err(BlobError::Io {
                    path: part_path,
                    source,
                });
            }
        }
        let digest = manifest_digest(manifest);
        let count = manifest.chunk_count() as usize;
        let resumable = file.metadata().at(&part_path)?.len() == manifest.size;
        let record = if resumable {
            read_record(&record_path, &digest, count)?
        } else {
            None
        };
        let done = match record {
            Some(done) => done,
            None => {
                // Nothing to resume: a record made for another manifest vouches for other bytes.
                remove_if_present(&record_path)?;
                file.set_len(manifest.size).at(&part_path)?;
                file.sync_all().at(&part_path)?;
                sync_dir(&dir)?;
                vec![false; count]
            }
        };
        Ok(PartialBlob {
            store: self.clone(),
            manifest: manifest.clone(),
            digest,
            direct: DirectWriter::open(&part_path),
            file,
            part_path,
            record_path,
            resumed: (0..count as u32).filter(|&i| done[i as usize]).collect(),
            done,
            staged: Vec::new(),
        })
    }

    fn check_size(&self, size: u64) -> Result<(), BlobError> {
        if size > self.max_blob_bytes {
            return Err(BlobError::TooLarge {
                size,
                limit: self.max_blob_bytes,
            });
        }
        Ok(())
    }

    /// The one write path into `blobs/`: stream to a locked temp file, hashing on the way,
    /// sync it, rename it into place, sync the directory, then cache the chunk hashes.
    fn put_stream(
        &self,
        mut reader: impl Read,
        read_error: impl Fn(io::Error) -> BlobError,
    ) -> Result<ContentId, BlobError> {
        let mut temp = self.temp_file()?;
        let mut hasher = ChunkHasher::new();
        let mut buf = vec![0; IO_BUFFER_BYTES];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(e)),
            };
            // Checked before writing, so the temp file never holds more than the cap.
            self.check_size(hasher.size + n as u64)?;
            hasher.update(&buf[..n]);
            temp.write_all(&buf[..n]).at(temp.path())?;
        }
        let manifest = hasher.finish();
        temp.as_file().sync_all().at(temp.path())?;
        let path = self.blob_path(&manifest.id);
        self.create_fanout_dirs(&path)?;
        persist(temp, &path)?;
        sync_dir(parent(&path))?;
        self.cache_chunk_hashes(&manifest);
        Ok(manifest.id)
    }

    /// A new file in `tmp/`, locked so that `gc` leaves it alone while this writer lives; it is
    /// deleted when dropped unless persisted. (A gc that slips in between creating and locking
    /// makes this write fail; it cannot make it store wrong bytes.)
    fn temp_file(&self) -> Result<NamedTempFile, BlobError> {
        let dir = self.root.join(TMP_DIR);
        let temp = NamedTempFile::new_in(&dir).at(&dir)?;
        temp.as_file()
            .try_lock()
            .map_err(io::Error::from)
            .at(temp.path())?;
        Ok(temp)
    }

    /// Saves a blob's chunk hashes next to it. Best effort: the blob is what was promised, and
    /// a missing cache is rebuilt (by reading the blob) the next time it is needed.
    fn cache_chunk_hashes(&self, manifest: &ChunkManifest) {
        let hashes = manifest.chunk_hashes.as_flattened();
        let _ = self.write_atomic(&self.chunks_path(&manifest.id), hashes);
    }

    /// Replaces `path` with `bytes` atomically and durably.
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), BlobError> {
        let mut temp = self.temp_file()?;
        temp.write_all(bytes).at(temp.path())?;
        temp.as_file().sync_all().at(temp.path())?;
        persist(temp, path)?;
        sync_dir(parent(path))
    }

    /// Creates `blobs/ab/cd/` for `blob_path`; new directory entries are durable only once the
    /// directories holding them are synced.
    fn create_fanout_dirs(&self, blob_path: &Path) -> Result<(), BlobError> {
        let leaf = parent(blob_path);
        if leaf.is_dir() {
            return Ok(());
        }
        fs::create_dir_all(leaf).at(leaf)?;
        let middle = parent(leaf);
        sync_dir(middle)?;
        sync_dir(parent(middle))
    }

    fn chunks_path(&self, id: &ContentId) -> PathBuf {
        let mut path = self.blob_path(id).into_os_string();
        path.push(".chunks");
        path.into()
    }

    fn pin_path(&self, id: &ContentId) -> PathBuf {
        self.root.join(PINS_DIR).join(id.to_string())
    }

    /// The id of the blob at `path`, if `path` is where that blob belongs.
    fn blob_at(&self, path: &Path) -> Option<ContentId> {
        id_named(path).filter(|id| self.blob_path(id) == path)
    }

    /// Every file two levels under `blobs/`.
    fn fanout_files(&self) -> Result<Vec<PathBuf>, BlobError> {
        let mut files = Vec::new();
        for first in dir_entries(&self.root.join(BLOBS_DIR))? {
            if !first.is_dir() {
                continue;
            }
            for second in dir_entries(&first)? {
                if second.is_dir() {
                    files.extend(dir_entries(&second)?.into_iter().filter(|p| p.is_file()));
                }
            }
        }
        Ok(files)
    }

    /// The cached chunk hashes of blob `id`, if the cache fits a blob of `size` bytes.
    fn cached_manifest(
        &self,
        id: &ContentId,
        size: u64,
    ) -> Result<Option<ChunkManifest>, BlobError> {
        let path = self.chunks_path(id);
        let expected_len = size.div_ceil(CHUNK_SIZE) * 32;
        match fs::metadata(&path) {
            Ok(meta) if meta.len() == expected_len => {}
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(BlobError::Io { path, source }),
        }
        let bytes = fs::read(&path).at(&path)?;
        let (hashes, rest) = bytes.as_chunks::<32>();
        let manifest = ChunkManifest {
            id: *id,
            size,
            chunk_hashes: hashes.to_vec(),
        };
        let usable = rest.is_empty() && manifest.validate(u64::MAX).is_ok();
        Ok(usable.then_some(manifest))
    }

    /// The bytes of blob `id` in `range` (at most one chunk, so the allocation is bounded).
    fn read_range(&self, id: &ContentId, range: Range<u64>) -> Result<Vec<u8>, BlobError> {
        let path = self.blob_path(id);
        let mut file = File::open(&path).at(&path)?;
        let len = range.end - range.start;
        // Read into spare capacity: zeroing a buffer only to overwrite it costs a pass.
        let mut data = Vec::with_capacity(len as usize);
        file.seek(SeekFrom::Start(range.start)).at(&path)?;
        file.take(len).read_to_end(&mut data).at(&path)?;
        if data.len() as u64 != len {
            return Err(BlobError::Io {
                path,
                source: io::ErrorKind::UnexpectedEof.into(),
            });
        }
        Ok(data)
    }

    /// Moves blob `id` out of `blobs/` because its bytes are wrong, so it reads as absent and
    /// gets fetched again; returns the error to report.
    fn quarantine(&self, id: &ContentId) -> BlobError {
        let path = self.blob_path(id);
        let moved_to = self.root.join(QUARANTINE_DIR).join(id.to_string());
        // The cached hashes may be what is wrong; they are rebuilt whenever the blob returns.
        let _ = fs::remove_file(self.chunks_path(id));
        match fs::rename(&path, &moved_to) {
            Err(source) if source.kind() != io::ErrorKind::NotFound => {
                BlobError::Io { path, source }
            }
            // Moved, or not found because another reader of the same bad blob moved it first.
            _ => BlobError::Corrupt {
                id: *id,
                path,
                moved_to,
            },
        }
    }
}

/// Where a `VerifiedReader` is in its blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Reading,
    Verified,
    Failed,
}

/// A stored blob opened for streaming: hashes what it reads, and the read that reaches the end
/// fails (quarantining the blob) if the bytes do not hash to the id. A caller that reads to
/// the end never finishes on corrupt data unawares.
#[derive(Debug)]
pub struct VerifiedReader {
    store: BlobStore,
    id: ContentId,
    path: PathBuf,
    file: File,
    size: u64,
    hasher: blake3::Hasher,
    state: ReadState,
}

impl VerifiedReader {
    /// The blob being read.
    pub fn id(&self) -> ContentId {
        self.id
    }

    /// The blob's size on disk when it was opened.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn read_verified(&mut self, buf: &mut [u8]) -> Result<usize, BlobError> {
        match self.state {
            ReadState::Verified => return Ok(0),
            ReadState::Failed => return Err(self.corrupt()),
            ReadState::Reading if buf.is_empty() => return Ok(0),
            ReadState::Reading => {}
        }
        let n = loop {
            match self.file.read(buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(BlobError::Io {
                        path: self.path.clone(),
                        source,
                    });
                }
            }
        };
        if n > 0 {
            self.hasher.update(&buf[..n]);
            return Ok(n);
        }
        if ContentId::from(self.hasher.finalize()) == self.id {
            self.state = ReadState::Verified;
            Ok(0)
        } else {
            self.state = ReadState::Failed;
            Err(self.store.quarantine(&self.id))
        }
    }

    fn corrupt(&self) -> BlobError {
        BlobError::Corrupt {
            id: self.id,
            path: self.path.clone(),
            moved_to: self
                .store
                .root
                .join(QUARANTINE_DIR)
                .join(self.id.to_string()),
        }
    }
}

impl Read for VerifiedReader {
    /// Fails with `InvalidData` (wrapping `BlobError::Corrupt`) at the end of a corrupt blob.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_verified(buf).map_err(|err| {
            let kind = match &err {
                BlobError::Io { source, .. } => source.kind(),
                _ => io::ErrorKind::InvalidData,
            };
            io::Error::new(kind, err)
        })
    }
}

/// Writes whole chunks of a download with `O_DIRECT` (Linux), from one reused buffer aligned
/// for it. A download is written once and not read back soon, so it has no business in the
/// page cache: going past it spares the copy into freshly allocated cache pages (on the VMs
/// this was measured on, the largest single cost of a fetch) and leaves the cache to what the
/// machine is using. Durability is unchanged: `commit` still syncs the file before it records
/// a chunk done. Where `O_DIRECT` is not allowed (tmpfs, some network file systems) or not
/// available, `open` gives `None` and the chunks go through the page cache.
#[derive(Debug)]
struct DirectWriter {
    #[cfg(target_os = "linux")]
    file: File,
    #[cfg(target_os = "linux")]
    buffer: Vec<u8>,
}

impl DirectWriter {
    /// Offsets, lengths and the buffer's address must be multiples of the device's logical
    /// block size; 4 KiB is one for every device in use (and `CHUNK_SIZE` a multiple of it).
    #[cfg(target_os = "linux")]
    const ALIGN: usize = 4096;

    #[cfg(target_os = "linux")]
    fn open(path: &Path) -> Option<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()?;
        Some(Self {
            file,
            buffer: vec![0; CHUNK_SIZE as usize + Self::ALIGN],
        })
    }

    #[cfg(not(target_os = "linux"))]
    fn open(_: &Path) -> Option<Self> {
        None
    }

    /// Writes `data` at `offset` if both are aligned for direct I/O (a whole chunk); `false`
    /// (nothing written) for a short final chunk, which goes through the page cache.
    #[cfg(target_os = "linux")]
    fn write(&mut self, data: &[u8], offset: u64) -> io::Result<bool> {
        use std::os::unix::fs::FileExt;
        if !data.len().is_multiple_of(Self::ALIGN) || !offset.is_multiple_of(Self::ALIGN as u64) {
            return Ok(false);
        }
        let start = self.buffer.as_ptr().align_offset(Self::ALIGN);
        let Some(aligned) = self.buffer.get_mut(start..start + data.len()) else {
            return Ok(false);
        };
        aligned.copy_from_slice(data);
        self.file.write_all_at(aligned, offset)?;
        Ok(true)
    }

    #[cfg(not(target_os = "linux"))]
    fn write(&mut self, _: &[u8], _: u64) -> io::Result<bool> {
        Ok(false)
    }
}

/// A download in progress: chunks are checked against the manifest, written in place in any
/// order and recorded as done only once durable, so it can resume after a crash or a dropped
/// connection. Holds a lock so two downloads of one blob cannot interleave.
#[derive(Debug)]
pub struct PartialBlob {
    store: BlobStore,
    manifest: ChunkManifest,
    digest: [u8; 32],
    file: File,
    /// Whole chunks are written through this handle, past the page cache, where the file
    /// system allows it.
    direct: Option<DirectWriter>,
    part_path: PathBuf,
    record_path: PathBuf,
    done: Vec<bool>,
    /// Chunks written but not yet synced and recorded.
    staged: Vec<u32>,
    /// Chunks that were already done when the download was opened: written by an earlier
    /// process, so checked again before the blob is installed.
    resumed: Vec<u32>,
}

impl PartialBlob {
    /// The manifest being downloaded.
    pub fn manifest(&self) -> &ChunkManifest {
        &self.manifest
    }

    /// Indices of the chunks not yet durably written (staged ones until their commit), ascending.
    pub fn missing_chunks(&self) -> Vec<u32> {
        (0..self.done.len() as u32)
            .filter(|&index| !self.done[index as usize])
            .collect()
    }

    /// Bytes of the blob durably written so far, for progress reports.
    pub fn bytes_done(&self) -> u64 {
        (0..self.done.len() as u32)
            .filter(|&index| self.done[index as usize])
            .filter_map(|index| self.manifest.chunk_range(index))
            .map(|range| range.end - range.start)
            .sum()
    }

    /// Checks chunk `index` against the manifest (length, then BLAKE3) and, if it is good,
    /// writes it durably and records it done. A bad chunk is `BlobError::BadChunk` and
    /// changes nothing; writing a chunk already done again is a no-op.
    pub fn write_chunk(&mut self, index: u32, data: &[u8]) -> Result<(), BlobError> {
        self.stage_chunk(index, data)?;
        self.commit().map(drop)
    }

    /// Checks chunk `index` as `write_chunk` does and writes it in place, without syncing or
    /// recording it: it counts as done only after the next `commit`, so one sync can cover
    /// many chunks. Staging a chunk already done or staged again is a no-op.
    pub fn stage_chunk(&mut self, index: u32, data: &[u8]) -> Result<(), BlobError> {
        let id = self.manifest.id;
        let range = self
            .manifest
            .chunk_range(index)
            .ok_or(BlobError::NoSuchChunk {
                id,
                index,
                count: self.manifest.chunk_count(),
            })?;
        self.manifest
            .check_chunk(index, data)
            .map_err(|reason| BlobError::BadChunk { id, index, reason })?;
        if self.done[index as usize] || self.staged.contains(&index) {
            return Ok(());
        }
        let path = &self.part_path;
        let written_directly = match &mut self.direct {
            Some(direct) => match direct.write(data, range.start) {
                Ok(written) => written,
                Err(e) => {
                    // Not for this file system after all: the page cache it is.
                    debug!(path = %path.display(), error = %e, "direct writes refused");
                    self.direct = None;
                    false
                }
            },
            None => false,
        };
        if !written_directly {
            self.file.seek(SeekFrom::Start(range.start)).at(path)?;
            self.file.write_all(data).at(path)?;
        }
        self.staged.push(index);
        Ok(())
    }

    /// Makes the staged chunks durable (one sync of the data, then the record) and returns
    /// how many there were. If it fails they are dropped, not recorded, and must be written
    /// again.
    pub fn commit(&mut self) -> Result<usize, BlobError> {
        if self.staged.is_empty() {
            return Ok(0);
        }
        let staged = std::mem::take(&mut self.staged);
        // The record may only vouch for bytes that would survive a crash.
        self.file.sync_data().at(&self.part_path)?;
        for &index in &staged {
            self.done[index as usize] = true;
        }
        if let Err(err) = self.save_record() {
            for &index in &staged {
                self.done[index as usize] = false;
            }
            return Err(err);
        }
        Ok(staged.len())
    }

    /// Moves the finished download into the store. The manifest was checked against the id
    /// when the download began, and every chunk this `PartialBlob` wrote was checked against
    /// the manifest before it was written, so those bytes are the blob. Chunks a download
    /// resumed from disk (written by an earlier process, perhaps one that crashed) are read
    /// back and checked once more; any that changed on this disk are
    /// `BlobError::PartialDamaged` and marked missing again.
    pub fn finish(mut self) -> Result<ContentId, BlobError> {
        let id = self.manifest.id;
        self.commit()?;
        let missing = self.missing_chunks().len();
        if missing > 0 {
            return Err(BlobError::Incomplete {
                id,
                missing,
                count: self.manifest.chunk_count(),
            });
        }
        let path = self.part_path.clone();
        // A file that grew behind our back is cut back to size.
        self.file.set_len(self.manifest.size).at(&path)?;
        let damaged = self.damaged_resumed_chunks()?;
        if !damaged.is_empty() {
            for &i in &damaged {
                self.done[i as usize] = false;
            }
            self.resumed.retain(|i| !damaged.contains(i));
            self.save_record()?;
            return Err(BlobError::PartialDamaged {
                id,
                damaged: damaged.len(),
            });
        }
        self.file.sync_all().at(&path)?;
        self.install()
    }

    /// The chunks found done on disk when the download was opened that no longer match the
    /// manifest.
    fn damaged_resumed_chunks(&mut self) -> Result<Vec<u32>, BlobError> {
        let mut damaged = Vec::new();
        let mut buf = Vec::new();
        for &index in &self.resumed {
            let Some(range) = self.manifest.chunk_range(index) else {
                continue;
            };
            buf.clear();
            self.file
                .seek(SeekFrom::Start(range.start))
                .at(&self.part_path)?;
            (&self.file)
                .take(range.end - range.start)
                .read_to_end(&mut buf)
                .at(&self.part_path)?;
            if self.manifest.check_chunk(index, &buf).is_err() {
                damaged.push(index);
            }
        }
        Ok(damaged)
    }

    /// Moves the synced, verified download into the store.
    fn install(self) -> Result<ContentId, BlobError> {
        let id = self.manifest.id;
        let path = &self.part_path;
        let blob_path = self.store.blob_path(&id);
        self.store.create_fanout_dirs(&blob_path)?;
        fs::rename(path, &blob_path).at(&blob_path)?;
        sync_dir(parent(&blob_path))?;
        remove_if_present(&self.record_path)?;
        sync_dir(parent(path))?;
        self.store.cache_chunk_hashes(&self.manifest);
        Ok(id)
    }

    /// Gives the download up and deletes what it wrote.
    pub fn discard(self) -> Result<(), BlobError> {
        self.delete_files()
    }

    fn delete_files(&self) -> Result<(), BlobError> {
        remove_if_present(&self.record_path)?;
        remove_if_present(&self.part_path)?;
        sync_dir(parent(&self.part_path))
    }

    /// Replaces the record: magic, the manifest's digest, then one bit per chunk.
    fn save_record(&self) -> Result<(), BlobError> {
        let mut record = Vec::with_capacity(40 + self.done.len().div_ceil(8));
        record.extend_from_slice(PART_RECORD_MAGIC);
        record.extend_from_slice(&self.digest);
        let mut bits = vec![0u8; self.done.len().div_ceil(8)];
        for (i, _) in self.done.iter().enumerate().filter(|(_, done)| **done) {
            bits[i / 8] |= 1 << (i % 8);
        }
        record.extend_from_slice(&bits);
        self.store.write_atomic(&self.record_path, &record)
    }
}

/// Which chunks a record says are done, or `None` if it is absent or was made for another
/// manifest (then nothing in it can be trusted).
fn read_record(
    path: &Path,
    digest: &[u8; 32],
    count: usize,
) -> Result<Option<Vec<bool>>, BlobError> {
    let expected_len = 40 + count.div_ceil(8);
    match fs::metadata(path) {
        // Checked before reading, so a damaged record cannot make us allocate much.
        Ok(meta) if meta.len() == expected_len as u64 => {}
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(BlobError::Io {
                path: path.to_owned(),
                source,
            });
        }
    }
    let record = fs::read(path).at(path)?;
    if record.len() != expected_len || &record[..8] != PART_RECORD_MAGIC || &record[8..40] != digest
    {
        return Ok(None);
    }
    let bits = &record[40..];
    Ok(Some(
        (0..count)
            .map(|i| bits[i / 8] & (1 << (i % 8)) != 0)
            .collect(),
    ))
}

/// Binds a partial download's record to the exact manifest it was checked against.
fn manifest_digest(manifest: &ChunkManifest) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key("swarmtune 2025 partial blob record v1");
    hasher.update(manifest.id.as_bytes());
    hasher.update(&manifest.size.to_le_bytes());
    hasher.update(manifest.chunk_hashes.as_flattened());
    *hasher.finalize().as_bytes()
}

/// The bytes chunk `index` of a blob of `size` bytes covers, or `None` past the last chunk.
fn chunk_range(size: u64, index: u32) -> Option<Range<u64>> {
    // Cannot overflow: u32::MAX · 2^20 < 2^52.
    let start = u64::from(index) * CHUNK_SIZE;
    (start < size).then(|| start..(start + CHUNK_SIZE).min(size))
}

/// The hash a manifest lists for chunk `index` of a blob of `count` chunks: the BLAKE3
/// chaining value of the chunk's subtree (chunks are 1 MiB, a power of two, so each is a
/// subtree of the blob's BLAKE3 tree); for a blob of one chunk, the blob's BLAKE3 itself.
/// Checking a chunk this way costs what hashing it costs, and [`tree_root`] joins the chunk
/// hashes into the blob's id.
fn chunk_hash(index: u32, count: u64, data: &[u8]) -> [u8; 32] {
    if count == 1 {
        return *blake3::hash(data).as_bytes();
    }
    blake3::Hasher::new()
        .set_input_offset(u64::from(index) * CHUNK_SIZE)
        .update(data)
        .finalize_non_root()
}

/// The BLAKE3 of a blob of `size` bytes whose chunk hashes are `hashes` (as [`chunk_hash`]
/// makes them): the root of the tree over them, which is the blob's id when the hashes are
/// true. `hashes` must hold `ceil(size / CHUNK_SIZE)` entries (`ChunkManifest::validate`
/// checks the count first).
fn tree_root(hashes: &[[u8; 32]], size: u64) -> [u8; 32] {
    match hashes {
        [] => *blake3::hash(&[]).as_bytes(),
        [only] => *only,
        _ => *join_subtrees(hashes, size, true).as_bytes(),
    }
}

/// Joins the chunk hashes of `len` bytes as BLAKE3 does: the left subtree takes the largest
/// power of two of chunks that leaves the right one something (always whole 1 MiB chunks,
/// as `len` is over one chunk here).
fn join_subtrees(hashes: &[[u8; 32]], len: u64, root: bool) -> blake3::Hash {
    let left_len = left_subtree_len(len);
    let split = ((left_len / CHUNK_SIZE) as usize).clamp(1, hashes.len() - 1);
    let (left, right) = hashes.split_at(split);
    let child = |hashes: &[[u8; 32]], len: u64| match hashes {
        [one] => *one,
        _ => *join_subtrees(hashes, len, false).as_bytes(),
    };
    let (left, right) = (child(left, left_len), child(right, len - left_len));
    if root {
        merge_subtrees_root(&left, &right, Mode::Hash)
    } else {
        blake3::Hash::from(merge_subtrees_non_root(&left, &right, Mode::Hash))
    }
}

/// Hashes a blob as it streams past: its chunk hashes, and from them its id, in one pass.
struct ChunkHasher {
    /// The chunk being hashed.
    chunk: blake3::Hasher,
    in_chunk: u64,
    size: u64,
    /// The hashes of the chunks before it, which are not the last, so not the root.
    chunk_hashes: Vec<[u8; 32]>,
}

impl ChunkHasher {
    fn new() -> Self {
        Self {
            chunk: blake3::Hasher::new(),
            in_chunk: 0,
            size: 0,
            chunk_hashes: Vec::new(),
        }
    }

    fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.in_chunk == CHUNK_SIZE {
                // A full chunk with more to come: not the whole blob, so a chaining value.
                self.chunk_hashes.push(self.chunk.finalize_non_root());
                self.chunk = blake3::Hasher::new();
                self.chunk.set_input_offset(self.size);
                self.in_chunk = 0;
            }
            let take = (CHUNK_SIZE - self.in_chunk).min(bytes.len() as u64) as usize;
            self.chunk.update(&bytes[..take]);
            self.in_chunk += take as u64;
            self.size += take as u64;
            bytes = &bytes[take..];
        }
    }

    fn finish(mut self) -> ChunkManifest {
        if self.in_chunk > 0 {
            self.chunk_hashes.push(if self.chunk_hashes.is_empty() {
                *self.chunk.finalize().as_bytes()
            } else {
                self.chunk.finalize_non_root()
            });
        }
        ChunkManifest {
            id: ContentId::from(blake3::Hash::from(tree_root(&self.chunk_hashes, self.size))),
            size: self.size,
            chunk_hashes: self.chunk_hashes,
        }
    }
}

/// Attaches the path to an I/O error, so every message says where.
trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T, BlobError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T, BlobError> {
        self.map_err(|source| BlobError::Io {
            path: path.to_owned(),
            source,
        })
    }
}

fn persist(temp: NamedTempFile, path: &Path) -> Result<(), BlobError> {
    temp.persist(path).map_err(|e| BlobError::Io {
        path: path.to_owned(),
        source: e.error,
    })?;
    Ok(())
}

/// Makes the entries of `dir` (files created, renamed or removed in it) durable.
fn sync_dir(dir: &Path) -> Result<(), BlobError> {
    // Only Unix can open and sync a directory; elsewhere renames are as durable as they get.
    #[cfg(unix)]
    File::open(dir).and_then(|d| d.sync_all()).at(dir)?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The directory holding `path`; every path here is built under the store's root.
fn parent(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

/// Removes a file; returns whether it was there.
fn remove_if_present(path: &Path) -> Result<bool, BlobError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(BlobError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Removes a file; returns how many bytes it held.
fn remove_counting_bytes(path: &Path) -> Result<u64, BlobError> {
    let size = fs::metadata(path).map(|meta| meta.len()).unwrap_or(0);
    Ok(if remove_if_present(path)? { size } else { 0 })
}

/// The paths in `dir`.
fn dir_entries(dir: &Path) -> Result<Vec<PathBuf>, BlobError> {
    fs::read_dir(dir)
        .at(dir)?
        .map(|entry| entry.map(|e| e.path()).at(dir))
        .collect()
}

/// The id a file is named after: exactly 64 lowercase hex digits, as the store writes them.
fn id_named(path: &Path) -> Option<ContentId> {
    let name = path.file_name()?.to_str()?;
    let id: ContentId = name.parse().ok()?;
    (id.to_string() == name).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    /// Deterministic bytes that differ from chunk to chunk (BLAKE3 in XOF mode).
    fn bytes(len: usize, seed: &str) -> Vec<u8> {
        let mut out = vec![0; len];
        blake3::Hasher::new()
            .update(seed.as_bytes())
            .finalize_xof()
            .fill(&mut out);
        out
    }

    fn store(dir: &tempfile::TempDir, max: u64) -> BlobStore {
        BlobStore::open(dir.path().join("store"), max).unwrap()
    }

    fn files_in(dir: &Path) -> Vec<PathBuf> {
        dir_entries(dir).unwrap()
    }

    /// The chunk indices in a fixed order that is far from ascending.
    fn scrambled(count: u32) -> Vec<u32> {
        let mut order: Vec<u32> = (0..count).collect();
        order.sort_by_key(|i| *blake3::hash(&i.to_le_bytes()).as_bytes());
        order
    }

    fn flip_byte(path: &Path, offset: u64) {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut byte = [0];
        file.seek(SeekFrom::Start(offset)).unwrap();
        file.read_exact(&mut byte).unwrap();
        file.seek(SeekFrom::Start(offset)).unwrap();
        file.write_all(&[byte[0] ^ 0x01]).unwrap();
    }

    #[test]
    fn a_blob_round_trips_and_lives_at_its_fanned_out_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, 1 << 30);
        let data = b"hello, swarm".to_vec();
        let id = store.put_bytes(&data).unwrap();
        assert_eq!(id, ContentId::of(&data));
        let hex = id.to_string();
        let expected = store
            .root()
            .join("blobs")
            .join(&hex[..2])
            .join(&hex[2..4])
            .join(&hex);
        assert_eq!(store.blob_path(&id), expected);
        assert_eq!(fs::read(&expected).unwrap(), data);
        assert!(store.contains(&id));
        assert_eq!(store.size(&id).unwrap(), data.len() as u64);
        assert_eq!(store.read(&id).unwrap(), data);
        // The same bytes by every route are the same one blob.
        let source = dir.path().join("source");
        fs::write(&source, &data).unwrap();
        assert_eq!(store.put_file(&source).unwrap(), id);
        assert_eq!(store.put_reader(&data[..]).unwrap(), id);
        assert_eq!(store.list().unwrap(), vec![id]);
        assert!(files_in(&store.root().join("tmp")).is_empty());
        // Absent blobs are a clear error, not an empty read.
        let absent = ContentId::of(b"absent");
        assert!(!store.contains(&absent));
        let err = store.read(&absent).unwrap_err();
        assert!(matches!(err, BlobError::NotFound(got) if got == absent));
        assert!(err.to_string().contains(&absent.to_string()));
    }

    #[test]
    fn the_empty_blob_is_a_blob_of_no_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, 1 << 30);
        let id = store.put_bytes(&[]).unwrap();
        assert_eq!(store.read(&id).unwrap(), Vec::<u8>::new());
        let manifest = store.chunk_manifest(&id).unwrap();
        assert_eq!((manifest.size, manifest.chunk_count()), (0, 0));
        assert!(manifest.chunk_hashes.is_empty());
        manifest.validate(0).unwrap();
        let other = tempfile::tempdir().unwrap();
        let partial = self::store(&other, 1 << 30).partial(&manifest).unwrap();
        assert!(partial.missing_chunks().is_empty());
        assert_eq!(partial.finish().unwrap(), id);
    }

    #[test]
    fn a_multi_chunk_blob_streams_verifies_and_serves_its_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, 1 << 30);
        let data = bytes(3 * MIB + MIB / 2, "multi");
        let id = store.put_reader(&data[..]).unwrap();
        assert_eq!(store.verify(&id).unwrap(), data.len() as u64);
        let mut streamed = Vec::new();
        store
            .open_verified(&id)
            .unwrap()
            .read_to_end(&mut streamed)
            .unwrap();
        assert_eq!(streamed, data);

        let manifest = store.chunk_manifest(&id).unwrap();
        assert_eq!(manifest, ChunkManifest::for_bytes(&data));
        assert_eq!(manifest.chunk_count(), 4);
        manifest.validate(1 << 30).unwrap();
        for index in 0..4u32 {
            let start = index as usize * MIB;
            let end = (start + MIB).min(data.len());
            assert_eq!(store.read_chunk(&id, index).unwrap(), &data[start..end]);
        }
        assert_eq!(store.read_chunk(&id, 3).unwrap().len(), MIB / 2);
        assert!(matches!(
            store.read_chunk(&id, 4),
            Err(BlobError::NoSuchChunk {
                index: 4,
                count: 4,
                ..
            })
        ));
        // Without its cache the manifest is recomputed from the blob, to the same hashes.
        fs::remove_file(store.chunks_path(&id)).unwrap();
        assert_eq!(store.chunk_manifest(&id).unwrap(), manifest);
        assert!(store.chunks_path(&id).is_file());
    }

    #[test]
    fn a_corrupt_blob_fails_to_read_and_is_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, 1 << 30);
        let data = bytes(2 * MIB + 7, "corrupt");
        let id = store.put_bytes(&data).unwrap();
        flip_byte(&store.blob_path(&id), MIB as u64 + 3);

        let err = store.read(&id).unwrap_err();
        let BlobError::Corrupt {
            id: bad, moved_to, ..
        } = &err
        else {
            panic!("expected Corrupt, got {err:?}");
        };
        assert_eq!(*bad, id);
        assert!(err.to_string().contains(&id.to_string()), "{err}");
        assert!(!store.contains(&id));
        assert!(store.list().unwrap().is_empty());
        assert!(moved_to.is_file());
        // Refetching it makes it whole again, and gc clears the quarantine.
        assert_eq!(store.put_bytes(&data).unwrap(), id);
        assert_eq!(store.read(&id).unwrap(), data);
        let report = store.gc().unwrap();
        assert_eq!(report.quarantined_removed, 1);
        assert!(files_in(&store.root().join("quarantine")).is_empty());
    }

    #[test]
    fn corruption_is_caught_by_verify_streaming_reads_and_chunk_serving() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, 1 << 30);
        let data = bytes(2 * MIB + 7, "corrupt");

        let id = store.put_bytes(&data).unwrap();
        flip_byte(&store.blob_path(&id), 5);
        assert!(matches!(store.verify(&id), Err(BlobError::Corrupt { .. })));
        assert!(!store.contains(&id));

        store.put_bytes(&data).unwrap();
        flip_byte(&store.blob_path(&id), 5);
        let mut sink = Vec::new();
        let err = store
            .open_verified(&id)
            .unwrap()
            .read_to_end(&mut sink)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains(&id.to_string()), "{err}");
        assert!(!store.contains(&id));

        // A chunk that no longer matches its cached hash is never served.
        store.put_bytes(&data).unwrap();
        flip_byte(&store.blob_path(&id), MIB as u64 + 1);
        assert_eq!(store.read_chunk(&id, 0).unwrap(), &data[..MIB]);
        assert!(matches!(
            store.read_chunk(&id, 1),
            Err(BlobError::Corrupt { .. })
        ));
        assert!(!store.contains(&id));
    }

    #[test]
    fn a_damaged_chunk_cache_is_rebuilt_not_blamed_on_the_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, 1 << 30);
        let data = bytes(2 * MIB, "cache");
        let id = store.put_bytes(&data).unwrap();
        flip_byte(&store.chunks_path(&id), 40);
        assert_eq!(store.read_chunk(&id, 1).unwrap(), &data[MIB..]);
        assert!(store.contains(&id));
        assert_eq!(
            store.chunk_manifest(&id).unwrap(),
            ChunkManifest::for_bytes(&data)
        );
    }

    #[test]
    fn blobs_over_the_cap_are_refused_while_streaming() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, 1000);
        assert!(store.put_bytes(&[7; 1000]).is_ok());
        let err = store.put_bytes(&[7; 1001]).unwrap_err();
        assert!(matches!(
            err,
            BlobError::TooLarge {
                size: 1001,
                limit: 1000
            }
        ));
        assert!(err.to_string().contains("1000"), "{err}");
        // A reader with no known length is stopped as it passes the cap, and leaves nothing.
        let endless = io::repeat(1).take(1 << 30);
        assert!(matches!(
            store.put_reader(endless),
            Err(BlobError::TooLarge { limit: 1000, .. })
        ));
        assert_eq!(store.list().unwrap(), vec![ContentId::of(&[7; 1000])]);
        assert!(files_in(&store.root().join("tmp")).is_empty());
        // A download is refused before anything is written.
        let big = ChunkManifest::for_bytes(&[1; 1001]);
        assert!(matches!(
            store.partial(&big),
            Err(BlobError::InvalidManifest(ManifestError::TooLarge {
                size: 1001,
                ..
            }))
        ));
        assert!(files_in(&store.root().join("partial")).is_empty());
    }

    #[test]
    fn gc_removes_unpinned_blobs_and_pins_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, 1 << 30);
        let kept = store.put_bytes(b"kept").unwrap();
        let dropped = store.put_bytes(b"dropped!").unwrap();
        let also_dropped = store.put_bytes(b"also dropped").unwrap();
        let not_yet_fetched = ContentId::of(b"later");
        store.pin(&kept).unwrap();
        store.pin(&not_yet_fetched).unwrap();

        let store = BlobStore::open(store.root(), 1 << 30).unwrap();
        assert!(store.is_pinned(&kept));
        assert!(!store.is_pinned(&dropped));
        let report = store.gc().unwrap();
        assert_eq!(report.blobs_removed, 2);
        assert_eq!(report.bytes_freed, 8 + 12);
        assert_eq!(store.list().unwrap(), vec![kept]);
        assert!(!store.contains(&also_dropped));
        // The removed blobs' chunk caches went with them.
        assert_eq!(store.fanout_files().unwrap().len(), 2);

        assert!(store.unpin(&kept).unwrap());
        assert!(!store.unpin(&kept).unwrap());
        let mut pinned = vec![not_yet_fetched];
        pinned.sort();
        assert_eq!(store.pinned().unwrap(), pinned);
        assert_eq!(store.gc().unwrap().blobs_removed, 1);
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn gc_removes_dead_writers_temp_files_but_not_live_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, 1 << 30);
        let tmp = store.root().join("tmp");
        fs::write(tmp.join("dead-writer"), [0; 100]).unwrap();
        let live = store.temp_file().unwrap();
        let id = store.put_bytes(b"orphaned cache").unwrap();
        fs::remove_file(store.blob_path(&id)).unwrap();
        store.pin(&id).unwrap();

        let report = store.gc().unwrap();
        assert_eq!(report.temp_files_removed, 1);
        assert!(!tmp.join("dead-writer").exists());
        assert!(
            live.path().exists(),
            "a live writer's temp file was removed"
        );
        assert!(!store.chunks_path(&id).exists());
        assert_eq!(report.bytes_freed, 100 + 32);
        drop(live);
    }

    #[test]
    fn a_download_in_random_order_resumes_after_being_dropped() {
        let data = bytes(5 * MIB + 12_345, "download");
        let manifest = ChunkManifest::for_bytes(&data);
        let chunk = |i: u32| &data[i as usize * MIB..((i as usize + 1) * MIB).min(data.len())];
        let order = scrambled(manifest.chunk_count() as u32);
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, 1 << 30);

        let mut partial = store.partial(&manifest).unwrap();
        assert_eq!(partial.missing_chunks(), vec![0, 1, 2, 3, 4, 5]);
        for &i in &order[..3] {
            partial.write_chunk(i, chunk(i)).unwrap();
        }
        let written: u64 = order[..3].iter().map(|&i| chunk(i).len() as u64).sum();
        assert_eq!(partial.bytes_done(), written);
        drop(partial);

        // A new process (a new store handle) picks up where the dropped one stopped.
        let store = BlobStore::open(store.root(), 1 << 30).unwrap();
        let mut partial = store.partial(&manifest).unwrap();
        let mut rest = order[3..].to_vec();
        rest.sort();
        assert_eq!(partial.missing_chunks(), rest);
        assert_eq!(partial.bytes_done(), written);
        for &i in &order[3..] {
            partial.write_chunk(i, chunk(i)).unwrap();
        }
        assert!(partial.missing_chunks().is_empty());
        assert_eq!(partial.finish().unwrap(), manifest.id);
        assert_eq!(store.read(&manifest.id).unwrap(), data);
        assert_eq!(store.chunk_manifest(&manifest.id).unwrap(), manifest);
        assert!(files_in(&store.root().join("partial")).is_empty());
    }

    #[test]
    fn staged_chunks_count_only_once_committed() {
        let data = bytes(4 * MIB, "staged");
        let manifest = ChunkManifest::for_bytes(&data);
        let chunk = |i: u32| &data[i as usize * MIB..(i as usize + 1) * MIB];
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, 1 << 30);

        let mut partial = store.partial(&manifest).unwrap();
        partial.stage_chunk(2, chunk(2)).unwrap();
        partial.stage_chunk(0, chunk(0)).unwrap();
        partial.stage_chunk(0, chunk(0)).unwrap();
        assert!(matches!(
            partial.stage_chunk(1, chunk(3)),
            Err(BlobError::BadChunk { index: 1, .. })
        ));
        assert_eq!(
            partial.missing_chunks(),
            vec![0, 1, 2, 3],
            "not durable yet"
        );
        assert_eq!(partial.commit().unwrap(), 2);
        assert_eq!(partial.commit().unwrap(), 0);
        assert_eq!(partial.missing_chunks(), vec![1, 3]);
        // Staged and never committed: as if never written, after a restart.
        partial.stage_chunk(1, chunk(1)).unwrap();
        drop(partial);

        let store = BlobStore::open(store.root(), 1 << 30).unwrap();
        let mut partial = store.partial(&manifest).unwrap();
        assert_eq!(partial.missing_chunks(), vec![1, 3]);
        partial.stage_chunk(1, chunk(1)).unwrap();
        partial.stage_chunk(3, chunk(3)).unwrap();
        // Finishing commits what is staged.
        assert_eq!(partial.finish().unwrap(), manifest.id);
        assert_eq!(store.read(&manifest.id).unwrap(), data);
    }

    #[test]
    fn finishing_early_says_how_much_is_missing() {
        let data = bytes(2 * MIB + 1, "early");
        let manifest = ChunkManifest::for_bytes(&data);
        let dir = tempfile::tempdir().unwrap();
        let mut partial = store(&dir, 1 << 30).partial(&manifest).unwrap();
        partial.write_chunk(2, &data[2 * MIB..]).unwrap();
        assert!(matches!(
            partial.finish(),
            Err(BlobError::Incomplete {
                missing: 2,
                count: 3,
                ..
            })
        ));
    }

    #[test]
    fn a_bad_chunk_is_refused_and_changes_nothing() {
        let data = bytes(2 * MIB + 10, "bad chunk");
        let manifest = ChunkManifest::for_bytes(&data);
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, 1 << 30);
        let mut partial = store.partial(&manifest).unwrap();

        let mut forged = data[MIB..2 * MIB].to_vec();
        forged[77] ^= 0xff;
        let err = partial.write_chunk(1, &forged).unwrap_err();
        assert!(
            matches!(
                err,
                BlobError::BadChunk {
                    index: 1,
                    reason: BadChunkReason::WrongHash,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains(&manifest.id.to_string()), "{err}");
        let err = partial
            .write_chunk(2, &data[2 * MIB..2 * MIB + 9])
            .unwrap_err();
        assert!(matches!(
            err,
            BlobError::BadChunk {
                index: 2,
                reason: BadChunkReason::WrongLength {
                    expected: 10,
                    got: 9
                },
                ..
            }
        ));
        assert!(matches!(
            partial.write_chunk(3, &[]),
            Err(BlobError::NoSuchChunk {
                index: 3,
                count: 3,
                ..
            })
        ));
        assert_eq!(partial.missing_chunks(), vec![0, 1, 2]);

        // The good chunk is taken afterwards; a forged copy of a done chunk is still refused.
        partial.write_chunk(1, &data[MIB..2 * MIB]).unwrap();
        partial.write_chunk(1, &data[MIB..2 * MIB]).unwrap();
        assert!(partial.write_chunk(1, &forged).is_err());
        assert_eq!(partial.missing_chunks(), vec![0, 2]);
    }

    #[test]
    fn chunk_hashes_make_the_blobs_blake3_for_every_shape_of_tree() {
        // Sizes around the boundaries of the tree: one chunk, powers of two of chunks, one
        // byte either side, and uneven counts whose right subtrees nest.
        let sizes = [
            0,
            1,
            MIB - 1,
            MIB,
            MIB + 1,
            2 * MIB,
            2 * MIB + 1,
            3 * MIB,
            4 * MIB - 1,
            4 * MIB,
            5 * MIB + 12_345,
            7 * MIB,
            8 * MIB + 1,
            11 * MIB + 3,
        ];
        for size in sizes {
            let data = bytes(size, &format!("tree {size}"));
            let manifest = ChunkManifest::for_bytes(&data);
            assert_eq!(manifest.id, ContentId::of(&data), "size {size}");
            assert_eq!(manifest.chunk_count(), size.div_ceil(MIB) as u64);
            manifest.validate(1 << 30).unwrap();
            for i in 0..manifest.chunk_count() as u32 {
                let range = manifest.chunk_range(i).unwrap();
                let chunk = &data[range.start as usize..range.end as usize];
                assert_eq!(
                    chunk_hash(i, manifest.chunk_count(), chunk),
                    manifest.chunk_hashes[i as usize],
                    "size {size}, chunk {i}"
                );
            }
        }
    }

    #[test]
    fn a_chunk_cache_of_plain_chunk_hashes_is_replaced_not_served() {
        // What `/swarmtune/blob/1` cached next to a blob: the plain BLAKE3 of each chunk.
        let data = bytes(3 * MIB + 5, "old cache");
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, 1 << 30);
        let id = store.put_bytes(&data).unwrap();
        let old: Vec<u8> = data
            .chunks(MIB)
            .flat_map(|c| *blake3::hash(c).as_bytes())
            .collect();
        fs::write(store.chunks_path(&id), &old).unwrap();
        // A chunk is still served (the stale cache is found out and rebuilt, not blamed on the
        // blob), and the manifest served is the tree's.
        assert_eq!(store.read_chunk(&id, 1).unwrap(), &data[MIB..2 * MIB]);
        fs::write(store.chunks_path(&id), &old).unwrap();
        let manifest = store.chunk_manifest(&id).unwrap();
        assert_eq!(manifest, ChunkManifest::for_bytes(&data));
        assert_ne!(fs::read(store.chunks_path(&id)).unwrap(), old);
        assert_eq!(store.verify(&id).unwrap(), data.len() as u64);
    }

    #[test]
    fn a_manifest_that_lies_about_the_id_is_refused_before_anything_is_fetched() {
        let data = bytes(3 * MIB, "what the provider has");
        let claimed = ContentId::of(b"what we asked for");
        let mut manifest = ChunkManifest::for_bytes(&data);
        manifest.id = claimed;
        assert!(matches!(
            manifest.validate(1 << 30),
            Err(ManifestError::HashesAreNotId { id }) if id == claimed
        ));
        // One chunk hash swapped for another blob's: the tree no longer makes the id.
        let mut swapped = ChunkManifest::for_bytes(&data);
        swapped.chunk_hashes[1] =
            ChunkManifest::for_bytes(&bytes(3 * MIB, "other")).chunk_hashes[1];
        assert!(matches!(
            swapped.validate(1 << 30),
            Err(ManifestError::HashesAreNotId { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, 1 << 30);
        assert!(matches!(
            store.partial(&manifest),
            Err(BlobError::InvalidManifest(
                ManifestError::HashesAreNotId { .. }
            ))
        ));
        assert!(files_in(&store.root().join("partial")).is_empty());
    }

    #[test]
    fn a_resumed_chunk_damaged_on_disk_is_fetched_again_not_blamed_on_the_manifest() {
        let data = bytes(3 * MIB, "damaged");
        let manifest = ChunkManifest::for_bytes(&data);
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, 1 << 30);
        let mut partial = store.partial(&manifest).unwrap();
        for i in 0..3u32 {
            let start = i as usize * MIB;
            partial.write_chunk(i, &data[start..start + MIB]).unwrap();
        }
        // The process stops before finishing; chunk 2 rots on disk meanwhile.
        let part_path = partial.part_path.clone();
        drop(partial);
        flip_byte(&part_path, 2 * MIB as u64 + 9);
        let partial = store.partial(&manifest).unwrap();
        assert!(partial.missing_chunks().is_empty());
        assert!(matches!(
            partial.finish(),
            Err(BlobError::PartialDamaged { damaged: 1, .. })
        ));
        let mut partial = store.partial(&manifest).unwrap();
        assert_eq!(partial.missing_chunks(), vec![2]);
        partial.write_chunk(2, &data[2 * MIB..]).unwrap();
        assert_eq!(partial.finish().unwrap(), manifest.id);
        assert_eq!(store.verify(&manifest.id).unwrap(), data.len() as u64);
    }

    #[test]
    fn chunks_written_past_the_page_cache_and_through_it_make_the_same_blob() {
        // Whole chunks go through O_DIRECT where the file system allows it, the short last
        // one through the page cache; a download resumed by another PartialBlob mixes both.
        let data = bytes(4 * MIB + 777, "direct");
        let manifest = ChunkManifest::for_bytes(&data);
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, 1 << 30);
        let chunk = |i: u32| {
            let r = manifest.chunk_range(i).unwrap();
            &data[r.start as usize..r.end as usize]
        };
        let mut partial = store.partial(&manifest).unwrap();
        let direct_allowed = DirectWriter::open(&partial.part_path).is_some();
        for i in [4, 1, 3] {
            partial.write_chunk(i, chunk(i)).unwrap();
        }
        // Where this file system takes O_DIRECT, no write was refused and fell back.
        assert_eq!(partial.direct.is_some(), direct_allowed);
        drop(partial);
        let mut partial = store.partial(&manifest).unwrap();
        assert_eq!(partial.missing_chunks(), vec![0, 2]);
        for i in [2, 0] {
            partial.stage_chunk(i, chunk(i)).unwrap();
        }
        assert_eq!(partial.finish().unwrap(), manifest.id);
        assert_eq!(store.read(&manifest.id).unwrap(), data);
    }

    #[test]
    fn one_download_of_a_blob_at_a_time_and_progress_survives_a_drop() {
        let data = bytes(2 * MIB, "busy");
        let manifest = ChunkManifest::for_bytes(&data);
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir, 1 << 30);
        let mut partial = store.partial(&manifest).unwrap();
        assert!(matches!(
            store.partial(&manifest),
            Err(BlobError::DownloadBusy { .. })
        ));
        partial.write_chunk(0, &data[..MIB]).unwrap();
        drop(partial);

        // Another manifest for the same id cannot exist: its hashes would not make the id.
        let mut other = manifest.clone();
        other.chunk_hashes[1] = [9; 32];
        assert!(matches!(
            store.partial(&other),
            Err(BlobError::InvalidManifest(
                ManifestError::HashesAreNotId { .. }
            ))
        ));
        assert_eq!(store.partial(&manifest).unwrap().missing_chunks(), vec![1]);
    }

    #[test]
    fn inconsistent_manifests_are_refused() {
        let one = ChunkManifest::for_bytes(b"one chunk");
        one.validate(100).unwrap();
        let mut wrong_id = one.clone();
        wrong_id.id = ContentId::of(b"something else");
        assert!(matches!(
            wrong_id.validate(100),
            Err(ManifestError::HashesAreNotId { .. })
        ));
        let mut short = ChunkManifest::for_bytes(&bytes(2 * MIB, "two"));
        short.chunk_hashes.pop();
        assert!(matches!(
            short.validate(1 << 30),
            Err(ManifestError::HashCount {
                expected: 2,
                got: 1,
                ..
            })
        ));
        let mut not_empty = ChunkManifest::for_bytes(&[]);
        not_empty.id = one.id;
        assert!(matches!(
            not_empty.validate(100),
            Err(ManifestError::NotTheEmptyBlob { .. })
        ));
        let huge = ChunkManifest {
            id: one.id,
            size: u64::MAX,
            chunk_hashes: Vec::new(),
        };
        assert!(matches!(
            huge.validate(u64::MAX),
            Err(ManifestError::TooLarge {
                limit: MAX_WIRE_BLOB_BYTES,
                ..
            })
        ));
    }

    #[test]
    fn the_wire_manifest_round_trips_and_bad_ones_are_errors_not_panics() {
        let manifest = ChunkManifest::for_bytes(&bytes(2 * MIB + 1, "wire"));
        let proto = manifest.to_proto();
        assert_eq!(proto.chunk_size, 1 << 20);
        assert_eq!(proto.chunk_hashes.len(), 3 * 32);
        assert_eq!(ChunkManifest::try_from(&proto).unwrap(), manifest);

        let broken = |edit: &dyn Fn(&mut v1::BlobManifest)| {
            let mut bad = proto.clone();
            edit(&mut bad);
            ChunkManifest::try_from(&bad).unwrap_err()
        };
        assert!(matches!(broken(&|m| m.id = None), ManifestError::MissingId));
        assert!(matches!(
            broken(&|m| m.id = Some(v1::ContentId {
                blake3: vec![1; 31]
            })),
            ManifestError::Id(ContentIdError::Length { len: 31 })
        ));
        assert!(matches!(
            broken(&|m| m.chunk_size = 4096),
            ManifestError::ChunkSize { got: 4096, .. }
        ));
        assert!(matches!(
            broken(&|m| m.chunk_hashes.push(0)),
            ManifestError::HashBytes { len: 97, .. }
        ));
        assert!(matches!(
            broken(&|m| m.size_bytes = u64::MAX),
            ManifestError::TooLarge { .. }
        ));
        assert!(matches!(
            broken(&|m| m.size_bytes = 5 * MIB as u64),
            ManifestError::HashCount {
                expected: 5,
                got: 3,
                ..
            }
        ));
        let err = broken(&|m| m.chunk_size = 0).to_string();
        assert!(
            err.contains("1048576") && err.contains(&manifest.id.to_string()),
            "{err}"
        );
    }
}
