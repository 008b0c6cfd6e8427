//! Safetensors I/O: reading a Hugging Face checkpoint (one `model.safetensors` or shards listed
//! in `model.safetensors.index.json`) into host tensors, and writing tensors back atomically.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::error::{Result, TrainerError};
use crate::tensors::{HostTensor, NamedTensors};

/// The tensors of a checkpoint, converted to `f32`, taken out one by one as the model is built.
pub struct Checkpoint {
    location: String,
    tensors: HashMap<String, HostTensor>,
}

impl Checkpoint {
    /// Opens the weights of the Hugging Face directory `dir`: `model.safetensors`, or the shards
    /// named by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            shard_files(dir, &index)?
        } else {
            return Err(TrainerError::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json in this directory",
                ),
            ));
        };
        let mut tensors = HashMap::new();
        for file in &files {
            for (name, t) in read_safetensors(file)?.0 {
                tensors.insert(name, t);
            }
        }
        Ok(Self {
            location: dir.display().to_string(),
            tensors,
        })
    }

    /// All remaining tensors, by name.
    pub fn into_tensors(self) -> NamedTensors {
        self.tensors.into_iter().collect()
    }

    /// A checkpoint made of tensors already in memory (tests, merged exports).
    pub fn from_tensors(location: impl Into<String>, tensors: NamedTensors) -> Self {
        Self {
            location: location.into(),
            tensors: tensors.into_iter().collect(),
        }
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Takes the tensor `name`, checking that its shape is `expected`.
    pub fn take(&mut self, name: &str, expected: &[usize]) -> Result<HostTensor> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| TrainerError::MissingTensor {
                name: name.to_owned(),
                location: self.location.clone(),
            })?;
        if t.shape != expected {
            return Err(TrainerError::ShapeMismatch {
                name: name.to_owned(),
                found: t.shape,
                expected: expected.to_vec(),
            });
        }
        Ok(t)
    }

    /// Takes the first of `names` that exists (checkpoints differ in prefixes), checking its
    /// shape; returns the name found with the tensor.
    pub fn take_first(
        &mut self,
        names: &[String],
        expected: &[usize],
    ) -> Result<(String, HostTensor)> {
        match names.iter().find(|n| self.tensors.contains_key(n.as_str())) {
            Some(name) => Ok((name.clone(), self.take(name, expected)?)),
            None => Err(TrainerError::MissingTensor {
                name: names.first().cloned().unwrap_or_default(),
                location: self.location.clone(),
            }),
        }
    }
}

/// Every tensor of the checkpoint in `dir` (single file or sharded) as `f32`, by name.
pub fn read_checkpoint_tensors(dir: &Path) -> Result<NamedTensors> {
    Ok(Checkpoint::open(dir)?.into_tensors())
}

fn shard_files(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| TrainerError::io(index, e))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| TrainerError::config(index, format!("not valid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| TrainerError::config(index, "no \"weight_map\" object"))?;
    let mut seen = HashSet::new();
    let mut files = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            TrainerError::config(
                index,
                format!("weight_map entry {tensor:?} is not a file name"),
            )
        })?;
        // The index comes from the internet: never let it point outside the directory.
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(TrainerError::config(
                index,
                format!("shard name {file:?} is not a plain file name"),
            ));
        }
        if seen.insert(file.to_owned()) {
            files.push(dir.join(file));
        }
    }
    files.sort();
    Ok(files)
}

/// Reads every tensor of a safetensors file as `f32`, with the file's metadata.
pub fn read_safetensors(path: &Path) -> Result<(NamedTensors, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| TrainerError::io(path, e))?;
    safetensors_from_bytes(&bytes, path)
}

/// Reads every tensor of a safetensors image in memory as `f32`, with its metadata; `origin`
/// names it in errors.
pub fn safetensors_from_bytes(
    bytes: &[u8],
    origin: &Path,
) -> Result<(NamedTensors, HashMap<String, String>)> {
    parse_safetensors(bytes).map_err(|reason| match reason {
        ParseError::Format(reason) => TrainerError::Safetensors {
            path: origin.to_owned(),
            reason,
        },
        ParseError::Dtype { name, dtype } => TrainerError::UnsupportedDtype { name, dtype },
    })
}

/// Reads `input_ids` (I64 or I32, `[batch, seq]`) from a safetensors file.
pub fn read_input_ids(path: &Path) -> Result<crate::model::TokenBatch> {
    let bytes = std::fs::read(path).map_err(|e| TrainerError::io(path, e))?;
    let bad = |reason: String| TrainerError::Safetensors {
        path: path.to_owned(),
        reason,
    };
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let view = st
        .tensor("input_ids")
        .map_err(|_| bad("no tensor named input_ids".into()))?;
    let [batch, seq] = view.shape() else {
        return Err(bad(format!(
            "input_ids must be [batch, seq], found {:?}",
            view.shape()
        )));
    };
    let ids: Vec<i64> = match view.dtype() {
        Dtype::I64 => view
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        Dtype::I32 => view
            .data()
            .chunks_exact(4)
            .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        other => {
            return Err(bad(format!(
                "input_ids must be I64 or I32, found {other:?}"
            )));
        }
    };
    let ids = ids
        .into_iter()
        .map(|i| u32::try_from(i).map_err(|_| bad(format!("token id {i} is not a valid id"))))
        .collect::<Result<Vec<_>>>()?;
    crate::model::TokenBatch::new(ids, *batch, *seq)
}

enum ParseError {
    Format(String),
    Dtype { name: String, dtype: String },
}

fn parse_safetensors(bytes: &[u8]) -> Result<(NamedTensors, HashMap<String, String>), ParseError> {
    let (_, meta) =
        SafeTensors::read_metadata(bytes).map_err(|e| ParseError::Format(e.to_string()))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(bytes).map_err(|e| ParseError::Format(e.to_string()))?;
    let mut out = NamedTensors::new();
    for (name, view) in st.iter() {
        let data = to_f32(view.dtype(), view.data()).ok_or_else(|| ParseError::Dtype {
            name: name.to_owned(),
            dtype: format!("{:?}", view.dtype()),
        })?;
        out.insert(
            name.to_owned(),
            HostTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok((out, metadata))
}

fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    match dtype {
        Dtype::F32 => Some(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Dtype::F16 => Some(
            bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        Dtype::BF16 => Some(
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        _ => None,
    }
}

/// One tensor's raw little-endian bytes, ready to be written into a safetensors image.
pub struct RawTensor {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// `shape.product() × dtype.size()` bytes.
    pub bytes: Vec<u8>,
}

/// The one safetensors writer of the project. Unlike `safetensors::serialize`, whose metadata
/// is a `HashMap` written in random order, it gives the same bytes for the same input, so a
/// content id of an adapter or a delta is a function of its tensors. Layout as the crate writes
/// it: header keys sorted, data widest dtype first then by name, header padded to 8 bytes.
pub fn safetensors_image(
    mut tensors: Vec<RawTensor>,
    metadata: &BTreeMap<String, String>,
) -> Vec<u8> {
    tensors.sort_by(|a, b| {
        b.dtype
            .bitsize()
            .cmp(&a.dtype.bitsize())
            .then_with(|| a.name.cmp(&b.name))
    });
    // serde_json's map is ordered by key unless `preserve_order` is on, which this crate never enables.
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let meta = metadata
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())));
        header.insert(
            "__metadata__".into(),
            serde_json::Value::Object(meta.collect()),
        );
    }
    let mut offset = 0usize;
    for t in &tensors {
        let end = offset + t.bytes.len();
        header.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": format!("{:?}", t.dtype),
                "shape": t.shape,
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut header_bytes = serde_json::Value::Object(header).to_string().into_bytes();
    header_bytes.resize(header_bytes.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + header_bytes.len() + offset);
    out.extend((header_bytes.len() as u64).to_le_bytes());
    out.extend(header_bytes);
    for t in tensors {
        out.extend(t.bytes);
    }
    out
}

/// Serializes tensors as an `F32` safetensors image with the given metadata.
pub fn safetensors_bytes(tensors: &NamedTensors, metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let raw = tensors
        .iter()
        .map(|(name, t)| RawTensor {
            name: name.clone(),
            dtype: Dtype::F32,
            shape: t.shape.clone(),
            bytes: t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        })
        .collect();
    safetensors_image(raw, metadata)
}

/// Writes tensors to `path` as an `F32` safetensors file, atomically (see [`write_atomic`]).
pub fn write_safetensors(
    path: &Path,
    tensors: &NamedTensors,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    write_atomic(path, &safetensors_bytes(tensors, metadata))
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one, never a
/// torn one: a temporary file in the same directory, fsynced, then renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let io = |e| TrainerError::io(path, e);
    std::fs::create_dir_all(dir).map_err(io)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{file_name}.tmp{}", std::process::id()));
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Ok(d) = std::fs::File::open(dir) {
        // Persist the rename itself; not every platform can fsync a directory, hence no `?`.
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharded_checkpoint_loads_like_a_single_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = NamedTensors::new();
        a.insert(
            "x".into(),
            HostTensor::new(vec![2], vec![1.0, 2.0]).unwrap(),
        );
        let mut b = NamedTensors::new();
        b.insert("y".into(), HostTensor::new(vec![1, 1], vec![3.0]).unwrap());
        write_safetensors(
            &dir.path().join("model-00001-of-00002.safetensors"),
            &a,
            &BTreeMap::new(),
        )
        .unwrap();
        write_safetensors(
            &dir.path().join("model-00002-of-00002.safetensors"),
            &b,
            &BTreeMap::new(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"metadata":{},"weight_map":{"x":"model-00001-of-00002.safetensors","y":"model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let mut ck = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ck.take("y", &[1, 1]).unwrap().data, vec![3.0]);
        let err = ck.take("x", &[3]).unwrap_err().to_string();
        assert!(err.contains("[2]") && err.contains("[3]"), "{err}");
        let err = ck.take("z", &[1]).unwrap_err().to_string();
        assert!(err.contains("\"z\""), "{err}");
    }

    #[test]
    fn index_cannot_escape_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"weight_map":{"x":"../../etc/passwd"}}"#,
        )
        .unwrap();
        assert!(Checkpoint::open(dir.path()).is_err());
    }

    #[test]
    fn garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header").unwrap();
        assert!(Checkpoint::open(dir.path()).is_err());
    }
}
