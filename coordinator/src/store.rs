//! The coordinator's state on disk: one redb file, tables of byte keys and codec-encoded
//! records. Every change the coordinator makes runs in one write transaction
//! ([`Store::write`]): it commits whole, with redb's immediate durability, or not at all, so a
//! `kill -9` at any moment leaves the state of the last committed change.
//!
//! Keys are bytes so that one set of helpers serves every table: numbers are big-endian (the
//! keys of a table sort as the numbers do), composite keys are their parts concatenated.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{self, CodecError};

/// A table of the store.
#[derive(Clone, Copy)]
pub struct Table(TableDefinition<'static, &'static [u8], &'static [u8]>);

/// Counters and settings, by name.
pub const META: Table = Table(TableDefinition::new("meta"));
/// Jobs by id (32 bytes).
pub const JOBS: Table = Table(TableDefinition::new("jobs"));
/// Leases by id (u64).
pub const LEASES: Table = Table(TableDefinition::new("leases"));
/// Delivered deltas by lease id (u64).
pub const DELTAS: Table = Table(TableDefinition::new("deltas"));
/// Verdicts by lease id (u64).
pub const VERDICTS: Table = Table(TableDefinition::new("verdicts"));
/// Reputations by PeerId bytes.
pub const REPUTATIONS: Table = Table(TableDefinition::new("reputations"));
/// Modules by name.
pub const MODULES: Table = Table(TableDefinition::new("modules"));
/// Module versions by (name, version): [`version_key`].
pub const VERSIONS: Table = Table(TableDefinition::new("versions"));

const ALL: [Table; 8] = [
    META,
    JOBS,
    LEASES,
    DELTAS,
    VERDICTS,
    REPUTATIONS,
    MODULES,
    VERSIONS,
];

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed (disk, lock, damaged file).
    #[error("the coordinator database {path} failed: {message}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// redb's reason.
        message: String,
    },
    /// A record did not encode or decode.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// The coordinator's database.
#[derive(Debug)]
pub struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    /// Opens the database at `path`, creating it (and its tables) if it does not exist. A
    /// second coordinator on the same file is refused (redb locks it).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_owned();
        let db = Database::create(&path).map_err(|e| db_error(&path, e))?;
        let store = Self { db, path };
        store.write(|w| {
            for table in ALL {
                w.txn.open_table(table.0).map_err(|e| db_error(w.path, e))?;
            }
            Ok::<_, StoreError>(())
        })?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `change` in one write transaction, committed (durably) only if it returns `Ok`.
    pub fn write<R, E: From<StoreError>>(
        &self,
        change: impl FnOnce(&Write<'_>) -> Result<R, E>,
    ) -> Result<R, E> {
        let txn = self.db.begin_write().map_err(|e| db_error(&self.path, e))?;
        let out = change(&Write {
            txn: &txn,
            path: &self.path,
        })?;
        txn.commit().map_err(|e| db_error(&self.path, e))?;
        Ok(out)
    }

    /// Runs `query` on a snapshot of the committed state.
    pub fn read<R, E: From<StoreError>>(
        &self,
        query: impl FnOnce(&Read<'_>) -> Result<R, E>,
    ) -> Result<R, E> {
        let txn = self.db.begin_read().map_err(|e| db_error(&self.path, e))?;
        query(&Read {
            txn,
            path: &self.path,
        })
    }
}

/// A write transaction in progress: reads see its own writes.
pub struct Write<'s> {
    txn: &'s redb::WriteTransaction,
    path: &'s Path,
}

/// A read-only snapshot.
pub struct Read<'s> {
    txn: redb::ReadTransaction,
    path: &'s Path,
}

impl Write<'_> {
    /// The record under `key`, if any.
    pub fn get<V: DeserializeOwned>(
        &self,
        table: Table,
        key: &[u8],
    ) -> Result<Option<V>, StoreError> {
        let t = self
            .txn
            .open_table(table.0)
            .map_err(|e| db_error(self.path, e))?;
        get(&t, key, self.path)
    }

    /// Every record whose key starts with `prefix`, in key order.
    pub fn scan<V: DeserializeOwned>(
        &self,
        table: Table,
        prefix: &[u8],
    ) -> Result<Vec<(Vec<u8>, V)>, StoreError> {
        let t = self
            .txn
            .open_table(table.0)
            .map_err(|e| db_error(self.path, e))?;
        scan(&t, prefix, self.path)
    }

    /// Stores `value` under `key`, replacing what was there.
    pub fn put<V: Serialize>(&self, table: Table, key: &[u8], value: &V) -> Result<(), StoreError> {
        let bytes = codec::encode(value)?;
        let mut t = self
            .txn
            .open_table(table.0)
            .map_err(|e| db_error(self.path, e))?;
        t.insert(key, bytes.as_slice())
            .map_err(|e| db_error(self.path, e))?;
        Ok(())
    }

    /// Removes the record under `key`; true if there was one.
    pub fn remove(&self, table: Table, key: &[u8]) -> Result<bool, StoreError> {
        let mut t = self
            .txn
            .open_table(table.0)
            .map_err(|e| db_error(self.path, e))?;
        let removed = t.remove(key).map_err(|e| db_error(self.path, e))?.is_some();
        Ok(removed)
    }

    /// The next value of the counter `name`, from 1 (never reused: it is part of this
    /// transaction).
    pub fn next_id(&self, name: &str) -> Result<u64, StoreError> {
        let key = format!("counter/{name}");
        let next = self.get::<u64>(META, key.as_bytes())?.unwrap_or(0) + 1;
        self.put(META, key.as_bytes(), &next)?;
        Ok(next)
    }
}

impl Read<'_> {
    /// The record under `key`, if any.
    pub fn get<V: DeserializeOwned>(
        &self,
        table: Table,
        key: &[u8],
    ) -> Result<Option<V>, StoreError> {
        let t = self
            .txn
            .open_table(table.0)
            .map_err(|e| db_error(self.path, e))?;
        get(&t, key, self.path)
    }

    /// Every record whose key starts with `prefix`, in key order.
    pub fn scan<V: DeserializeOwned>(
        &self,
        table: Table,
        prefix: &[u8],
    ) -> Result<Vec<(Vec<u8>, V)>, StoreError> {
        let t = self
            .txn
            .open_table(table.0)
            .map_err(|e| db_error(self.path, e))?;
        scan(&t, prefix, self.path)
    }
}

fn get<V: DeserializeOwned>(
    t: &impl ReadableTable<&'static [u8], &'static [u8]>,
    key: &[u8],
    path: &Path,
) -> Result<Option<V>, StoreError> {
    match t.get(key).map_err(|e| db_error(path, e))? {
        Some(guard) => Ok(Some(codec::decode(guard.value())?)),
        None => Ok(None),
    }
}

fn scan<V: DeserializeOwned>(
    t: &impl ReadableTable<&'static [u8], &'static [u8]>,
    prefix: &[u8],
    path: &Path,
) -> Result<Vec<(Vec<u8>, V)>, StoreError> {
    let mut out = Vec::new();
    for entry in t.range(prefix..).map_err(|e| db_error(path, e))? {
        let (k, v) = entry.map_err(|e| db_error(path, e))?;
        if !k.value().starts_with(prefix) {
            break;
        }
        out.push((k.value().to_vec(), codec::decode(v.value())?));
    }
    Ok(out)
}

fn db_error(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Db {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// The key of a number: big-endian, so keys sort as numbers.
pub fn u64_key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

/// The key of a module version: the name, a 0 byte (names never hold one), the version.
pub fn version_key(module: &str, version: u64) -> Vec<u8> {
    let mut key = module_prefix(module);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

/// The prefix of every version key of `module`.
pub fn module_prefix(module: &str) -> Vec<u8> {
    let mut key = module.as_bytes().to_vec();
    key.push(0);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_commit_whole_or_not_at_all_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coordinator.redb");
        {
            let store = Store::open(&path).unwrap();
            store
                .write(|w| {
                    w.put(LEASES, &u64_key(2), &"two".to_string())?;
                    w.put(LEASES, &u64_key(10), &"ten".to_string())?;
                    assert_eq!(w.next_id("lease")?, 1);
                    assert_eq!(w.next_id("lease")?, 2);
                    Ok::<_, StoreError>(())
                })
                .unwrap();
            // A change that fails half-way leaves nothing behind, not even its counter.
            let failed: Result<(), StoreError> = store.write(|w| {
                w.put(LEASES, &u64_key(3), &"three".to_string())?;
                w.next_id("lease")?;
                Err(StoreError::Db {
                    path: PathBuf::new(),
                    message: "stop".into(),
                })
            });
            assert!(failed.is_err());
        }
        let store = Store::open(&path).unwrap();
        store
            .read(|r| {
                assert_eq!(r.get::<String>(LEASES, &u64_key(3))?, None);
                let all: Vec<(Vec<u8>, String)> = r.scan(LEASES, &[])?;
                let values: Vec<&str> = all.iter().map(|(_, v)| v.as_str()).collect();
                assert_eq!(values, ["two", "ten"], "keys sort as numbers");
                Ok::<_, StoreError>(())
            })
            .unwrap();
        store
            .write(|w| {
                assert_eq!(w.next_id("lease")?, 3, "ids are never reused");
                w.put(VERSIONS, &version_key("shout", 1), &1u8)?;
                w.put(VERSIONS, &version_key("shout", 2), &2u8)?;
                w.put(VERSIONS, &version_key("shouts", 1), &3u8)?;
                let shout: Vec<(Vec<u8>, u8)> = w.scan(VERSIONS, &module_prefix("shout"))?;
                assert_eq!(shout.iter().map(|(_, v)| *v).collect::<Vec<_>>(), [1, 2]);
                assert!(w.remove(VERSIONS, &version_key("shout", 2))?);
                assert!(!w.remove(VERSIONS, &version_key("shout", 2))?);
                Ok::<_, StoreError>(())
            })
            .unwrap();
    }

    #[test]
    fn a_damaged_record_is_an_error_naming_its_type() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("c.redb")).unwrap();
        store
            .write(|w| w.put(JOBS, b"job", &"not a number".to_string()))
            .unwrap();
        let err = store
            .read(|r| r.get::<(u64, u64)>(JOBS, b"job"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("damaged"), "{err}");
    }
}
