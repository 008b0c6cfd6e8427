//! The delta codec: how a volunteer's pseudo-gradient (LoRA `start − end`) is compressed into
//! bytes for the wire and decoded, defensively, on the other side.
//!
//! The container is a plain safetensors file, so any language can read it. Its `__metadata__`
//! holds `format` = `swarmtune-delta`, `version` = `1` and `encoding`, and each delta tensor
//! `NAME` is stored as:
//!
//! | encoding       | stored tensors                                                        |
//! |----------------|-----------------------------------------------------------------------|
//! | `f32`          | `NAME` (F32)                                                          |
//! | `f16`          | `NAME` (F16)                                                          |
//! | `int8-rowwise` | `NAME.q` (I8, same shape) + `NAME.scale` (F32, one per row)           |
//! | `topk`         | `NAME.idx` (U32 `[k]`) + `NAME.val` (F32 `[k]`) + metadata `shape.NAME` |
//!
//! Rows are every dimension but the last folded together; a row's scale is `max|row| / 127`
//! and a value decodes as `q · scale`. Top-k keeps the `k = ceil(fraction · n)` values of
//! largest magnitude of each tensor (ties go to the lower index), with strictly increasing
//! indices, and records the dense shape as `shape.NAME` = `"8,64"`.
//!
//! The encoder writes the container itself (rather than through `safetensors::serialize`,
//! whose metadata is a `HashMap`) so that the same delta always gives the same bytes, and hence
//! the same payload hash. The decoder reads it with the safetensors crate's validating parser.
//!
//! A merge holds a round's deltas all at once, so [`decode_packed`] validates a delta as
//! [`decode`] does but leaves its int8 values in their bytes, a quarter of their `f32` size;
//! the aggregation reads them a block at a time ([`PackedDelta::read`]).

use std::collections::{BTreeMap, HashMap};

use safetensors::{Dtype, SafeTensors, tensor::TensorInfo};

use crate::checkpoint::{RawTensor, safetensors_image};
use crate::simd::{Kernel, vectorized};
use crate::tensors::{HostTensor, NamedTensors, same_layout};

const FORMAT: &str = "swarmtune-delta";
const VERSION: &str = "1";
const SHAPE_PREFIX: &str = "shape.";
/// The safetensors header key reserved for metadata; no tensor may take that name.
const METADATA_KEY: &str = "__metadata__";
/// Length of the little-endian header size that opens a safetensors file.
const HEADER_LEN_BYTES: usize = 8;

/// How the values of a delta are represented on the wire.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DeltaEncoding {
    /// Every value as `f32`: lossless.
    F32,
    /// Every value as IEEE half precision: relative error at most 2^-11 in the normal range.
    F16,
    /// Symmetric int8 with one `f32` scale per row: absolute error at most half a scale.
    Int8RowWise,
    /// Only the `ceil(fraction · n)` largest-magnitude values of each tensor, exact.
    TopK {
        /// Share of each tensor's values that is kept, in `(0, 1]`.
        fraction: f32,
    },
}

impl DeltaEncoding {
    /// The name written to the container's `encoding` metadata.
    pub fn name(&self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Int8RowWise => "int8-rowwise",
            Self::TopK { .. } => "topk",
        }
    }
}

/// Bounds a decoder enforces on untrusted bytes before doing work proportional to them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted encoded size, in bytes.
    pub max_bytes: usize,
    /// Largest accepted number of delta tensors.
    pub max_tensors: usize,
    /// Largest accepted number of dense values over all tensors (what decoding allocates).
    pub max_elements: usize,
}

impl Default for DecodeLimits {
    /// 256 MiB, 4096 tensors, 64 Mi values (256 MiB of decoded `f32`).
    fn default() -> Self {
        Self {
            max_bytes: 256 << 20,
            max_tensors: 4096,
            max_elements: 64 << 20,
        }
    }
}

/// Why a delta could not be encoded or decoded.
#[derive(thiserror::Error, Debug)]
pub enum DeltaError {
    /// The encoded delta is larger than the decoder accepts.
    #[error("delta is {len} bytes, more than the limit of {max}")]
    TooLarge {
        /// Size of the input.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not a well-formed safetensors file.
    #[error("not a valid safetensors container: {0}")]
    Container(#[from] safetensors::SafeTensorError),
    /// A required metadata entry is missing or has the wrong value.
    #[error("metadata `{key}`: {problem}")]
    Metadata {
        /// The metadata key.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The container uses an encoding this build does not know.
    #[error("unknown delta encoding `{0}`")]
    UnknownEncoding(String),
    /// The container uses a format version this build does not know.
    #[error("unknown delta format version `{0}` (this build reads version {VERSION})")]
    UnknownVersion(String),
    /// One tensor is malformed.
    #[error("tensor `{name}`: {problem}")]
    Tensor {
        /// The delta tensor's name.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// More tensors than the decoder accepts.
    #[error("delta has {count} tensors, more than the limit of {max}")]
    TooManyTensors {
        /// Number of tensors in the input.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// More dense values than the decoder accepts.
    #[error("delta has more than {max} values (limit reached at tensor `{name}`)")]
    TooManyElements {
        /// The tensor at which the running total passed the limit.
        name: String,
        /// The limit.
        max: usize,
    },
    /// A top-k fraction outside `(0, 1]`.
    #[error("top-k fraction {0} is not in (0, 1]")]
    InvalidFraction(f32),
    /// The error-feedback residual does not match the delta's names and shapes.
    #[error("top-k residual does not have the delta's tensor names and shapes")]
    ResidualLayout,
}

fn tensor_error(name: &str, problem: impl Into<String>) -> DeltaError {
    DeltaError::Tensor {
        name: name.to_owned(),
        problem: problem.into(),
    }
}

/// Encodes a delta; fails on non-finite values, inconsistent tensors or a bad top-k fraction.
pub fn encode(delta: &NamedTensors, encoding: DeltaEncoding) -> Result<Vec<u8>, DeltaError> {
    encode_with_selection(delta, encoding).map(|(bytes, _)| bytes)
}

/// Top-k with error feedback: encodes the top-k of `delta + residual` and leaves in `residual`
/// what was not sent, so over many rounds nothing is lost. An empty residual counts as zeros;
/// on error the residual is left unchanged.
pub fn encode_topk_with_feedback(
    delta: &NamedTensors,
    residual: &mut NamedTensors,
    fraction: f32,
) -> Result<Vec<u8>, DeltaError> {
    if !residual.is_empty() && !same_layout(delta, residual) {
        return Err(DeltaError::ResidualLayout);
    }
    let mut sum = delta.clone();
    for (total, carried) in sum.values_mut().zip(residual.values()) {
        if total.data.len() != carried.data.len() {
            return Err(DeltaError::ResidualLayout);
        }
        for (t, &c) in total.data.iter_mut().zip(&carried.data) {
            *t += c;
        }
    }
    let (bytes, selections) = encode_with_selection(&sum, DeltaEncoding::TopK { fraction })?;
    for (tensor, kept) in sum.values_mut().zip(&selections) {
        for &i in kept {
            if let Some(v) = tensor.data.get_mut(i as usize) {
                *v = 0.0;
            }
        }
    }
    *residual = sum;
    Ok(bytes)
}

/// Decodes and validates an encoded delta without panicking or allocating beyond `limits`.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<NamedTensors, DeltaError> {
    decode_packed(bytes, limits).map(PackedDelta::into_tensors)
}

/// Validates an encoded delta exactly as [`decode`] does, but leaves int8 values in `bytes`
/// instead of expanding them to `f32`: a merge of many deltas then holds about their encoded
/// size in memory, and reads the values a block at a time ([`PackedDelta::read`]).
pub fn decode_packed<B: AsRef<[u8]>>(
    bytes: B,
    limits: &DecodeLimits,
) -> Result<PackedDelta<B>, DeltaError> {
    let (encoding, tensors) = parse(bytes.as_ref(), limits)?;
    let len = tensors.last().map_or(0, |t| t.start + t.len);
    Ok(PackedDelta {
        bytes,
        encoding,
        tensors,
        len,
    })
}

/// A validated delta whose int8 values are still the bytes they arrived as (other encodings
/// are held decoded). Its values, flattened in canonical order (tensors by name, each
/// row-major), read bit for bit as [`decode`] gives them.
#[derive(Clone)]
pub struct PackedDelta<B = Vec<u8>> {
    bytes: B,
    encoding: &'static str,
    tensors: Vec<PackedTensor>,
    len: usize,
}

/// One tensor of a [`PackedDelta`]: where its values start in the flattened delta, and where
/// they are.
#[derive(Clone, Debug)]
struct PackedTensor {
    name: String,
    shape: Vec<usize>,
    start: usize,
    len: usize,
    values: PackedValues,
}

#[derive(Clone, Debug)]
enum PackedValues {
    /// `int8-rowwise`: `q` is the range of the container holding one `i8` per value and
    /// `scales` the one holding a little-endian `f32` per row (both checked, neither copied);
    /// a value is `q · scale` of its row, rows being `cols` long.
    Int8 {
        q: std::ops::Range<usize>,
        scales: std::ops::Range<usize>,
        cols: usize,
    },
    /// Every other encoding, decoded.
    Dense(Vec<f32>),
}

impl<B> std::fmt::Debug for PackedDelta<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedDelta")
            .field("encoding", &self.encoding)
            .field("tensors", &self.tensors.len())
            .field("len", &self.len)
            .finish()
    }
}

impl<B: AsRef<[u8]>> PackedDelta<B> {
    /// The encoding named in the container's metadata (`int8-rowwise`, …).
    pub fn encoding(&self) -> &'static str {
        self.encoding
    }

    /// Number of values over all tensors.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the delta holds no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Gives the encoded bytes back.
    pub fn into_bytes(self) -> B {
        self.bytes
    }

    /// Tensor names and shapes, in canonical order.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.tensors
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
    }

    /// Writes values `start .. start + out.len()` of the flattened delta into `out`.
    ///
    /// # Panics
    /// If the range goes past [`len`](Self::len) (a caller's bug, never the peer's).
    pub fn read(&self, start: usize, out: &mut [f32]) {
        // The last tensor starting at or before `start` (empty tensors are stepped over).
        let tensor = self
            .tensors
            .partition_point(|t| t.start <= start)
            .saturating_sub(1);
        self.read_from(tensor, start, out);
    }

    /// [`read`](Self::read), told which tensor (by its position in canonical order) holds value
    /// `start`: many deltas of one layout are read at the same places, so the search is made
    /// once for all of them.
    ///
    /// # Panics
    /// If the range goes past [`len`](Self::len) or `tensor` does not hold `start`.
    pub fn read_from(&self, tensor: usize, start: usize, out: &mut [f32]) {
        assert!(
            start
                .checked_add(out.len())
                .is_some_and(|end| end <= self.len),
            "read of {} values at {start} from a delta of {}",
            out.len(),
            self.len
        );
        if out.is_empty() {
            return;
        }
        let data = self.bytes.as_ref();
        let mut k = tensor;
        assert!(
            self.tensors
                .get(k)
                .is_some_and(|t| t.start <= start && start < t.start + t.len),
            "tensor {k} does not hold value {start}"
        );
        let (mut position, mut written) = (start, 0);
        while written < out.len() {
            let t = &self.tensors[k];
            let offset = position - t.start;
            let take = (t.len - offset).min(out.len() - written);
            t.read(data, offset, &mut out[written..written + take]);
            written += take;
            position += take;
            k += 1;
        }
    }

    /// `‖delta‖²`: for decoded encodings exactly what [`crate::tensors::squared_norm`] gives;
    /// for int8 the exact `Σ_rows scale² · Σ q²` (integer sums, one rounding per row), within
    /// a relative 2⁻²³ of the sum over the decoded `f32` values, at a fraction of the cost.
    pub fn squared_norm(&self) -> f64 {
        let data = self.bytes.as_ref();
        let mut total = 0.0;
        for t in &self.tensors {
            match &t.values {
                // One running sum over all tensors, as `tensors::squared_norm` takes it.
                PackedValues::Dense(values) => {
                    total = values
                        .iter()
                        .fold(total, |sum, &v| sum + f64::from(v) * f64::from(v));
                }
                PackedValues::Int8 { q, scales, cols } => {
                    total = vectorized(RowSquares {
                        q: &data[q.clone()],
                        scales: &data[scales.clone()],
                        cols: *cols,
                        total,
                    });
                }
            }
        }
        total
    }

    /// The first value that is not finite, as (tensor, index in it, value). Decoding refuses
    /// non-finite parts, but an int8 value `q · scale` can still overflow from finite ones.
    pub fn first_non_finite(&self) -> Option<(&str, usize, f32)> {
        let data = self.bytes.as_ref();
        for t in &self.tensors {
            let found = match &t.values {
                PackedValues::Dense(values) => values
                    .iter()
                    .position(|v| !v.is_finite())
                    .map(|i| (i, values[i])),
                PackedValues::Int8 { q, scales, cols } => data[scales.clone()]
                    .chunks_exact(4)
                    .map(f32_at)
                    .enumerate()
                    // 127 · scale bounds the row; only a row that overflows is scanned.
                    .filter(|(_, s)| !(127.0 * s).is_finite())
                    .find_map(|(r, s)| {
                        let row = &data[q.start + r * cols..q.start + (r + 1) * cols];
                        row.iter()
                            .map(|&b| f32::from(b as i8) * s)
                            .enumerate()
                            .find(|(_, v)| !v.is_finite())
                            .map(|(c, v)| (r * cols + c, v))
                    }),
            };
            if let Some((i, v)) = found {
                return Some((&t.name, i, v));
            }
        }
        None
    }

    /// The decoded tensors, as [`decode`] gives them.
    pub fn into_tensors(self) -> NamedTensors {
        let data = self.bytes.as_ref();
        self.tensors
            .into_iter()
            .map(|t| {
                let values = match t.values {
                    PackedValues::Dense(values) => values,
                    PackedValues::Int8 { .. } => {
                        let mut values = vec![0.0; t.len];
                        t.read(data, 0, &mut values);
                        values
                    }
                };
                (t.name, dense(t.shape, values))
            })
            .collect()
    }
}

impl PackedTensor {
    /// Writes this tensor's values `offset .. offset + out.len()` into `out`.
    fn read(&self, data: &[u8], offset: usize, out: &mut [f32]) {
        match &self.values {
            PackedValues::Dense(values) => out.copy_from_slice(&values[offset..offset + out.len()]),
            PackedValues::Int8 { .. } if out.is_empty() => {}
            PackedValues::Int8 { q, scales, cols } => vectorized(Dequantize {
                q: &data[q.start + offset..q.start + offset + out.len()],
                scales: &data[scales.clone()],
                cols: *cols,
                offset,
                out,
            }),
        }
    }
}

/// Int8 values `offset ..` of a tensor (`q` starts there) to `f32`: `q · scale` of their row
/// (`scales` holds the tensor's row scales as little-endian `f32`).
struct Dequantize<'a> {
    q: &'a [u8],
    scales: &'a [u8],
    cols: usize,
    offset: usize,
    out: &'a mut [f32],
}

impl Kernel for Dequantize<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let Self {
            q,
            scales,
            cols,
            offset,
            out,
        } = self;
        let dequantize = |out: &mut [f32], q: &[u8], scale: &[u8]| {
            let scale = f32_at(scale);
            for (v, &b) in out.iter_mut().zip(q) {
                *v = f32::from(b as i8) * scale;
            }
        };
        // The rest of the first row, then whole rows.
        let row = offset / cols;
        let head = (cols - offset % cols).min(out.len());
        let (out_head, out) = out.split_at_mut(head);
        let (q_head, q) = q.split_at(head);
        let (scale_head, scales) = scales[4 * row..].split_at(4);
        dequantize(out_head, q_head, scale_head);
        let rows = out.chunks_mut(cols).zip(q.chunks(cols));
        for ((out, q), scale) in rows.zip(scales.chunks_exact(4)) {
            dequantize(out, q, scale);
        }
    }
}

/// `total + Σ_rows scale² · Σ q²` over a tensor's int8 rows (`scales` as in [`Dequantize`]).
struct RowSquares<'a> {
    q: &'a [u8],
    scales: &'a [u8],
    cols: usize,
    total: f64,
}

impl Kernel for RowSquares<'_> {
    type Output = f64;

    #[inline(always)]
    fn run(self) -> f64 {
        if self.cols == 0 {
            return self.total;
        }
        let rows = self
            .q
            .chunks_exact(self.cols)
            .zip(self.scales.chunks_exact(4));
        rows.fold(self.total, |sum, (row, scale)| {
            let scale = f64::from(f32_at(scale));
            sum + scale * scale * sum_of_squares(row) as f64
        })
    }
}

/// `Σ q²` of a row of int8 values, in integers (vectorized; no overflow for any row length).
#[inline(always)]
fn sum_of_squares(row: &[u8]) -> u64 {
    let squares = |chunk: &[u8]| {
        chunk
            .iter()
            .map(|&b| {
                let v = i32::from(b as i8);
                v * v
            })
            .sum::<i32>() as u64
    };
    // 127² · 2^16 < 2^31, so the sum of up to 2^16 squares fits an i32.
    if row.len() <= 1 << 16 {
        squares(row)
    } else {
        row.chunks(1 << 16).map(squares).sum()
    }
}

/// Parses and validates the container: the encoding's name and the tensors, int8 ones left as
/// ranges of `bytes`.
fn parse(
    bytes: &[u8],
    limits: &DecodeLimits,
) -> Result<(&'static str, Vec<PackedTensor>), DeltaError> {
    if bytes.len() > limits.max_bytes {
        return Err(DeltaError::TooLarge {
            len: bytes.len(),
            max: limits.max_bytes,
        });
    }
    // The parser checks that the offsets tile the data exactly and that shapes match sizes.
    let (header_len, header) = SafeTensors::read_metadata(bytes)?;
    let base = HEADER_LEN_BYTES.saturating_add(header_len);
    let data = bytes.get(base..).unwrap_or_default();
    let empty = Default::default();
    let metadata = header.metadata().as_ref().unwrap_or(&empty);
    let meta = |key: &str| metadata.get(key).map(String::as_str);
    if meta("format") != Some(FORMAT) {
        return Err(DeltaError::Metadata {
            key: "format".into(),
            problem: format!("expected `{FORMAT}`, found {:?}", meta("format")),
        });
    }
    match meta("version") {
        Some(VERSION) => {}
        other => return Err(DeltaError::UnknownVersion(other.unwrap_or("").to_owned())),
    }
    let stored: BTreeMap<String, &TensorInfo> = header.tensors().into_iter().collect();
    let mut reader = Reader {
        data,
        base,
        limits,
        elements: 0,
    };
    let (encoding, tensors) = match meta("encoding") {
        Some("f32") => (
            DeltaEncoding::F32,
            decode_plain(&mut reader, &stored, Dtype::F32)?,
        ),
        Some("f16") => (
            DeltaEncoding::F16,
            decode_plain(&mut reader, &stored, Dtype::F16)?,
        ),
        Some("int8-rowwise") => (
            DeltaEncoding::Int8RowWise,
            decode_int8(&mut reader, &stored)?,
        ),
        Some("topk") => (
            DeltaEncoding::TopK { fraction: 1.0 },
            decode_topk(&mut reader, &stored, metadata)?,
        ),
        other => return Err(DeltaError::UnknownEncoding(other.unwrap_or("").to_owned())),
    };
    let mut start = 0;
    let tensors = tensors
        .into_iter()
        .map(|(name, shape, len, values)| {
            let t = PackedTensor {
                name,
                shape,
                start,
                len,
                values,
            };
            start += len;
            t
        })
        .collect();
    Ok((encoding.name(), tensors))
}

/// A decoded tensor: name, shape, value count and values.
type Parsed = (String, Vec<usize>, usize, PackedValues);

/// `f32` or `f16`: every tensor stored densely under its own name.
fn decode_plain(
    reader: &mut Reader,
    stored: &BTreeMap<String, &TensorInfo>,
    dtype: Dtype,
) -> Result<Vec<Parsed>, DeltaError> {
    reader.check_count(stored.len())?;
    let mut out = Vec::with_capacity(stored.len());
    for (name, info) in stored {
        let n = reader.reserve(name, &info.shape)?;
        let values = if dtype == Dtype::F32 {
            reader.f32s(name, info)?
        } else {
            reader.f16s(name, info)?
        };
        check_finite(name, &values)?;
        out.push((
            name.clone(),
            info.shape.clone(),
            n,
            PackedValues::Dense(values),
        ));
    }
    Ok(out)
}

/// `int8-rowwise`: `NAME.q` and `NAME.scale`, one non-negative finite scale per row. The `q`
/// bytes are checked where they lie and not copied.
fn decode_int8(
    reader: &mut Reader,
    stored: &BTreeMap<String, &TensorInfo>,
) -> Result<Vec<Parsed>, DeltaError> {
    let pairs = pair_up(stored, ".q", ".scale")?;
    reader.check_count(pairs.len())?;
    let mut out = Vec::with_capacity(pairs.len());
    for (name, (q, scale)) in pairs {
        let n = reader.reserve(&name, &q.shape)?;
        let rows = checked_product(&q.shape[..q.shape.len().saturating_sub(1)])
            .ok_or_else(|| tensor_error(&name, "shape overflows"))?;
        if scale.shape != [rows] {
            return Err(tensor_error(
                &name,
                format!("scale shape {:?}, expected [{rows}]", scale.shape),
            ));
        }
        let scales = reader.range(&name, scale, Dtype::F32)?;
        let mut values = reader.whole(&scales).chunks_exact(4).map(f32_at);
        if let Some(bad) = values.find(|s| !s.is_finite() || *s < 0.0) {
            return Err(tensor_error(&name, format!("invalid row scale {bad}")));
        }
        let quantized = reader.range(&name, q, Dtype::I8)?;
        if reader.whole(&quantized).contains(&(i8::MIN as u8)) {
            return Err(tensor_error(&name, "quantized value -128 is outside ±127"));
        }
        let cols = q.shape.last().copied().unwrap_or(1);
        out.push((
            name,
            q.shape.clone(),
            n,
            PackedValues::Int8 {
                q: quantized,
                scales,
                cols,
            },
        ));
    }
    Ok(out)
}

/// `topk`: `NAME.idx` and `NAME.val` scattered into zeros of the shape in `shape.NAME`.
fn decode_topk(
    reader: &mut Reader,
    stored: &BTreeMap<String, &TensorInfo>,
    metadata: &HashMap<String, String>,
) -> Result<Vec<Parsed>, DeltaError> {
    let pairs = pair_up(stored, ".idx", ".val")?;
    reader.check_count(pairs.len())?;
    if let Some(orphan) = metadata
        .keys()
        .filter_map(|k| k.strip_prefix(SHAPE_PREFIX))
        .find(|name| !pairs.contains_key(*name))
    {
        return Err(tensor_error(orphan, "shape in metadata but no tensors"));
    }
    let mut out = Vec::with_capacity(pairs.len());
    for (name, (idx, val)) in pairs {
        let key = format!("{SHAPE_PREFIX}{name}");
        let shape = parse_shape(metadata.get(&key).ok_or_else(|| DeltaError::Metadata {
            key: key.clone(),
            problem: "missing".into(),
        })?)
        .ok_or_else(|| DeltaError::Metadata {
            key: key.clone(),
            problem: "not a comma-separated list of dimensions".into(),
        })?;
        let n = reader.reserve(&name, &shape)?;
        let k_ok = matches!(
            (idx.shape.as_slice(), val.shape.as_slice()),
            ([a], [b]) if a == b && *a <= n
        );
        if !k_ok {
            return Err(tensor_error(
                &name,
                format!(
                    "idx shape {:?} and val shape {:?} are not both [k] with k ≤ {n}",
                    idx.shape, val.shape
                ),
            ));
        }
        let indices = reader.u32s(&name, idx)?;
        let kept = reader.f32s(&name, val)?;
        check_finite(&name, &kept)?;
        let mut values = vec![0.0; n];
        let mut previous: Option<usize> = None;
        for (&i, &v) in indices.iter().zip(&kept) {
            let i = i as usize;
            if previous.is_some_and(|p| i <= p) {
                return Err(tensor_error(&name, "indices are not strictly increasing"));
            }
            let slot = values
                .get_mut(i)
                .ok_or_else(|| tensor_error(&name, format!("index {i} out of range {n}")))?;
            *slot = v;
            previous = Some(i);
        }
        out.push((name, shape, n, PackedValues::Dense(values)));
    }
    Ok(out)
}

/// Element types the codec stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Elem {
    F32,
    F16,
    I8,
    U32,
}

impl Elem {
    fn dtype(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::I8 => Dtype::I8,
            Self::U32 => Dtype::U32,
        }
    }
}

/// One tensor as it is written into the container.
struct Stored {
    name: String,
    elem: Elem,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Encodes, also returning for top-k the kept indices of each tensor in canonical order.
fn encode_with_selection(
    delta: &NamedTensors,
    encoding: DeltaEncoding,
) -> Result<(Vec<u8>, Vec<Vec<u32>>), DeltaError> {
    if let DeltaEncoding::TopK { fraction } = encoding
        && !(fraction > 0.0 && fraction <= 1.0)
    {
        return Err(DeltaError::InvalidFraction(fraction));
    }
    let mut metadata = BTreeMap::from([
        ("format".to_owned(), FORMAT.to_owned()),
        ("version".to_owned(), VERSION.to_owned()),
        ("encoding".to_owned(), encoding.name().to_owned()),
    ]);
    let mut stored = Vec::new();
    let mut selections = Vec::new();
    for (name, tensor) in delta {
        if name == METADATA_KEY {
            return Err(tensor_error(name, "name is reserved by safetensors"));
        }
        if checked_product(&tensor.shape) != Some(tensor.data.len()) {
            return Err(tensor_error(
                name,
                format!(
                    "shape {:?} does not hold {} values",
                    tensor.shape,
                    tensor.data.len()
                ),
            ));
        }
        check_finite(name, &tensor.data)?;
        match encoding {
            DeltaEncoding::F32 => stored.push(Stored {
                name: name.clone(),
                elem: Elem::F32,
                shape: tensor.shape.clone(),
                bytes: f32_bytes(&tensor.data),
            }),
            DeltaEncoding::F16 => {
                let mut bytes = Vec::with_capacity(tensor.data.len() * 2);
                for (i, &v) in tensor.data.iter().enumerate() {
                    let h = half::f16::from_f32(v);
                    if !h.is_finite() {
                        return Err(tensor_error(
                            name,
                            format!("value {v} at {i} overflows f16"),
                        ));
                    }
                    bytes.extend(h.to_le_bytes());
                }
                stored.push(Stored {
                    name: name.clone(),
                    elem: Elem::F16,
                    shape: tensor.shape.clone(),
                    bytes,
                });
            }
            DeltaEncoding::Int8RowWise => {
                let (rows, cols) = tensor.rows_cols();
                let mut scales = Vec::with_capacity(rows);
                let mut quantized = Vec::with_capacity(tensor.data.len());
                if cols > 0 {
                    for row in tensor.data.chunks_exact(cols) {
                        let scale = row.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
                        scales.push(scale);
                        quantized.extend(row.iter().map(|&v| {
                            let q = if scale > 0.0 {
                                (v / scale).round()
                            } else {
                                0.0
                            };
                            q.clamp(-127.0, 127.0) as i8 as u8
                        }));
                    }
                } else {
                    scales.resize(rows, 0.0);
                }
                stored.push(Stored {
                    name: format!("{name}.q"),
                    elem: Elem::I8,
                    shape: tensor.shape.clone(),
                    bytes: quantized,
                });
                stored.push(Stored {
                    name: format!("{name}.scale"),
                    elem: Elem::F32,
                    shape: vec![rows],
                    bytes: f32_bytes(&scales),
                });
            }
            DeltaEncoding::TopK { fraction } => {
                let n = tensor.data.len();
                if u32::try_from(n).is_err() {
                    return Err(tensor_error(name, "too many values for u32 indices"));
                }
                let kept = top_k_indices(&tensor.data, top_k_count(fraction, n));
                let values: Vec<f32> = kept.iter().map(|&i| tensor.data[i as usize]).collect();
                stored.push(Stored {
                    name: format!("{name}.idx"),
                    elem: Elem::U32,
                    shape: vec![kept.len()],
                    bytes: kept.iter().flat_map(|i| i.to_le_bytes()).collect(),
                });
                stored.push(Stored {
                    name: format!("{name}.val"),
                    elem: Elem::F32,
                    shape: vec![values.len()],
                    bytes: f32_bytes(&values),
                });
                let dims: Vec<String> = tensor.shape.iter().map(usize::to_string).collect();
                metadata.insert(format!("{SHAPE_PREFIX}{name}"), dims.join(","));
                selections.push(kept);
            }
        }
    }
    Ok((write_container(stored, metadata), selections))
}

/// `k = ceil(fraction · n)`, clamped to `n`. The product is taken in `f64` and shrunk by a
/// relative 2^-23 first, so that an `f32` fraction stored slightly above its decimal value
/// (0.1 is 0.10000000149) gives 10 of 100 and not 11.
fn top_k_count(fraction: f32, n: usize) -> usize {
    let exact = f64::from(fraction) * n as f64;
    ((exact * (1.0 - f64::from(f32::EPSILON))).ceil() as usize).min(n)
}

/// Indices of the `k` largest magnitudes, ties to the lower index, in increasing order.
fn top_k_indices(values: &[f32], k: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..values.len() as u32).collect();
    if k < order.len() {
        let magnitude = |i: u32| values[i as usize].abs();
        order.select_nth_unstable_by(k, |&a, &b| {
            magnitude(b).total_cmp(&magnitude(a)).then(a.cmp(&b))
        });
        order.truncate(k);
    }
    order.sort_unstable();
    order
}

/// Writes the container through the crate's one deterministic safetensors writer.
fn write_container(stored: Vec<Stored>, metadata: BTreeMap<String, String>) -> Vec<u8> {
    let raw = stored
        .into_iter()
        .map(|t| RawTensor {
            name: t.name,
            dtype: t.elem.dtype(),
            shape: t.shape,
            bytes: t.bytes,
        })
        .collect();
    safetensors_image(raw, &metadata)
}

/// Reads typed values out of the validated data section, counting dense values against the
/// limits before anything proportional to them is allocated.
struct Reader<'a> {
    /// The data section, which starts `base` bytes into the container.
    data: &'a [u8],
    base: usize,
    limits: &'a DecodeLimits,
    elements: usize,
}

impl Reader<'_> {
    fn check_count(&self, count: usize) -> Result<(), DeltaError> {
        if count > self.limits.max_tensors {
            return Err(DeltaError::TooManyTensors {
                count,
                max: self.limits.max_tensors,
            });
        }
        Ok(())
    }

    /// Adds a dense tensor of `shape` to the running total; returns its value count.
    fn reserve(&mut self, name: &str, shape: &[usize]) -> Result<usize, DeltaError> {
        let too_many = || DeltaError::TooManyElements {
            name: name.to_owned(),
            max: self.limits.max_elements,
        };
        let n = checked_product(shape).ok_or_else(too_many)?;
        self.elements = self
            .elements
            .checked_add(n)
            .filter(|&total| total <= self.limits.max_elements)
            .ok_or_else(too_many)?;
        Ok(n)
    }

    fn bytes(&self, name: &str, info: &TensorInfo, dtype: Dtype) -> Result<&[u8], DeltaError> {
        if info.dtype != dtype {
            return Err(tensor_error(
                name,
                format!("dtype {:?}, expected {dtype:?}", info.dtype),
            ));
        }
        let (start, end) = info.data_offsets;
        self.data
            .get(start..end)
            .ok_or_else(|| tensor_error(name, "data offsets outside the file"))
    }

    fn f32s(&self, name: &str, info: &TensorInfo) -> Result<Vec<f32>, DeltaError> {
        let bytes = self.bytes(name, info, Dtype::F32)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    fn f16s(&self, name: &str, info: &TensorInfo) -> Result<Vec<f32>, DeltaError> {
        let bytes = self.bytes(name, info, Dtype::F16)?;
        Ok(bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect())
    }

    /// Where a tensor's bytes lie in the whole container, after checking its dtype.
    fn range(
        &self,
        name: &str,
        info: &TensorInfo,
        dtype: Dtype,
    ) -> Result<std::ops::Range<usize>, DeltaError> {
        self.bytes(name, info, dtype)?;
        let (start, end) = info.data_offsets;
        Ok(self.base + start..self.base + end)
    }

    /// The bytes of a range given by [`Reader::range`].
    fn whole(&self, range: &std::ops::Range<usize>) -> &[u8] {
        &self.data[range.start - self.base..range.end - self.base]
    }

    fn u32s(&self, name: &str, info: &TensorInfo) -> Result<Vec<u32>, DeltaError> {
        let bytes = self.bytes(name, info, Dtype::U32)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}

/// Groups stored tensors `NAME{first}` and `NAME{second}` by `NAME`; anything else is an error.
fn pair_up<'a>(
    stored: &BTreeMap<String, &'a TensorInfo>,
    first: &str,
    second: &str,
) -> Result<BTreeMap<String, (&'a TensorInfo, &'a TensorInfo)>, DeltaError> {
    let mut halves: BTreeMap<&str, (Option<&TensorInfo>, Option<&TensorInfo>)> = BTreeMap::new();
    for (stored_name, &info) in stored {
        if let Some(name) = stored_name.strip_suffix(first) {
            halves.entry(name).or_default().0 = Some(info);
        } else if let Some(name) = stored_name.strip_suffix(second) {
            halves.entry(name).or_default().1 = Some(info);
        } else {
            return Err(tensor_error(
                stored_name,
                format!("stored name ends in neither `{first}` nor `{second}`"),
            ));
        }
    }
    halves
        .into_iter()
        .map(|(name, halves)| match halves {
            (Some(a), Some(b)) => Ok((name.to_owned(), (a, b))),
            (None, _) => Err(tensor_error(name, format!("`{name}{first}` is missing"))),
            (_, None) => Err(tensor_error(name, format!("`{name}{second}` is missing"))),
        })
        .collect()
}

/// Parses `"8,64"` into `[8, 64]` (`""` is a scalar); `None` if malformed or overflowing.
fn parse_shape(text: &str) -> Option<Vec<usize>> {
    let shape = if text.is_empty() {
        Vec::new()
    } else {
        text.split(',')
            .map(|d| d.parse().ok())
            .collect::<Option<Vec<usize>>>()?
    };
    checked_product(&shape).map(|_| shape)
}

/// Product of dimensions, left to right like `Iterator::product`, or `None` on overflow.
fn checked_product(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

fn check_finite(name: &str, values: &[f32]) -> Result<(), DeltaError> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(tensor_error(
            name,
            format!("non-finite value {} at {i}", values[i]),
        )),
        None => Ok(()),
    }
}

/// The little-endian `f32` in four bytes.
#[inline(always)]
fn f32_at(bytes: &[u8]) -> f32 {
    f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A tensor whose value count was already checked against its shape.
fn dense(shape: Vec<usize>, data: Vec<f32>) -> HostTensor {
    HostTensor { shape, data }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// A delta shaped like two LoRA factors of one projection, values in [-scale, scale].
    fn sample_delta(seed: u64, scale: f32) -> NamedTensors {
        let mut rng = StdRng::seed_from_u64(seed);
        let prefix = "base_model.model.model.layers.0.self_attn.q_proj";
        [("lora_A", vec![8, 64]), ("lora_B", vec![64, 8])]
            .into_iter()
            .map(|(part, shape)| {
                let n = shape.iter().product();
                let data = (0..n)
                    .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
                    .collect();
                (
                    format!("{prefix}.{part}.weight"),
                    HostTensor { shape, data },
                )
            })
            .collect()
    }

    fn decode_default(bytes: &[u8]) -> Result<NamedTensors, DeltaError> {
        decode(bytes, &DecodeLimits::default())
    }

    fn all_encodings() -> [DeltaEncoding; 4] {
        [
            DeltaEncoding::F32,
            DeltaEncoding::F16,
            DeltaEncoding::Int8RowWise,
            DeltaEncoding::TopK { fraction: 0.1 },
        ]
    }

    /// Every range of a packed delta reads the bits `decode` gives, across tensor and row
    /// boundaries, in every encoding; the packed norm is the decoded one's (within 2^-22 for
    /// int8).
    #[test]
    fn packed_reads_are_the_decoded_values() {
        let mut delta = sample_delta(20, 0.5);
        delta.insert("empty".into(), HostTensor::zeros(vec![0, 3]));
        delta.insert(
            "z.scalar".into(),
            HostTensor::new(vec![], vec![-2.5]).unwrap(),
        );
        for encoding in all_encodings() {
            let bytes = encode(&delta, encoding).unwrap();
            let decoded = decode_default(&bytes).unwrap();
            let flat: Vec<f32> = decoded.values().flat_map(|t| t.data.clone()).collect();
            let packed = decode_packed(bytes.as_slice(), &DecodeLimits::default()).unwrap();
            assert_eq!(packed.len(), flat.len());
            assert_eq!(packed.encoding(), encoding.name());
            let names: Vec<&str> = packed.tensors().map(|(name, _)| name).collect();
            assert_eq!(
                names,
                decoded.keys().map(String::as_str).collect::<Vec<_>>()
            );
            let mut rng = StdRng::seed_from_u64(21);
            for _ in 0..200 {
                let start = rng.random_range(0..=flat.len());
                let len = rng.random_range(0..=flat.len() - start);
                let mut out = vec![f32::NAN; len];
                packed.read(start, &mut out);
                let want = &flat[start..start + len];
                assert!(
                    out.iter()
                        .zip(want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{encoding:?} {start}+{len}"
                );
            }
            let exact = crate::tensors::squared_norm(&decoded);
            if encoding == DeltaEncoding::Int8RowWise {
                // A decoded value is `q · scale` rounded to f32: 2^-24 relative, 2^-23 squared.
                let relative = (packed.squared_norm() - exact).abs() / exact;
                assert!(relative <= 2.0 * f64::from(f32::EPSILON), "{relative}");
            } else {
                assert_eq!(packed.squared_norm(), exact, "{encoding:?}");
            }
            assert!(packed.first_non_finite().is_none());
            assert_eq!(packed.clone().into_tensors(), decoded);
            assert_eq!(packed.into_bytes(), bytes.as_slice());
        }
    }

    /// Finite int8 parts whose product overflows are found, at their index.
    #[test]
    fn packed_int8_overflow_is_found() {
        let bytes = write_container(
            vec![
                stored("w.q", Elem::I8, vec![2, 2], vec![1, 2, 3, 127]),
                stored(
                    "w.scale",
                    Elem::F32,
                    vec![2],
                    f32_bytes(&[1.0, f32::MAX / 100.0]),
                ),
            ],
            metadata("int8-rowwise", &[]),
        );
        let packed = decode_packed(bytes, &DecodeLimits::default()).unwrap();
        assert_eq!(packed.first_non_finite(), Some(("w", 3, f32::INFINITY)));
    }

    #[test]
    fn f32_round_trip_is_exact_and_deterministic() {
        let delta = sample_delta(1, 0.01);
        let bytes = encode(&delta, DeltaEncoding::F32).unwrap();
        assert_eq!(decode_default(&bytes).unwrap(), delta);
        assert_eq!(encode(&delta, DeltaEncoding::F32).unwrap(), bytes);
    }

    #[test]
    fn container_is_plain_safetensors() {
        let delta = sample_delta(2, 1.0);
        let bytes = encode(&delta, DeltaEncoding::Int8RowWise).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
        let q = file.tensor(&format!("{name}.q")).unwrap();
        assert_eq!((q.dtype(), q.shape()), (Dtype::I8, &[8, 64][..]));
        let scale = file.tensor(&format!("{name}.scale")).unwrap();
        assert_eq!((scale.dtype(), scale.shape()), (Dtype::F32, &[8][..]));
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().as_ref().unwrap();
        assert_eq!(meta["format"], "swarmtune-delta");
        assert_eq!(meta["version"], "1");
        assert_eq!(meta["encoding"], "int8-rowwise");
    }

    #[test]
    fn f16_relative_error_is_at_most_2_pow_minus_11() {
        // Magnitudes in [1e-3, 10], well inside f16's normal range [6.1e-5, 65504].
        let mut delta = sample_delta(3, 10.0);
        for v in delta.values_mut().flat_map(|t| t.data.iter_mut()) {
            if v.abs() < 1e-3 {
                *v = 1e-3;
            }
        }
        let decoded = decode_default(&encode(&delta, DeltaEncoding::F16).unwrap()).unwrap();
        let bound = 2f32.powi(-11);
        for (a, b) in delta.values().zip(decoded.values()) {
            assert_eq!(a.shape, b.shape);
            for (&x, &y) in a.data.iter().zip(&b.data) {
                assert!((x - y).abs() <= bound * x.abs(), "{x} decoded as {y}");
            }
        }
    }

    #[test]
    fn f16_refuses_values_beyond_its_range() {
        let mut delta = sample_delta(4, 1.0);
        delta.values_mut().next().unwrap().data[3] = 1e6;
        assert!(matches!(
            encode(&delta, DeltaEncoding::F16),
            Err(DeltaError::Tensor { .. })
        ));
    }

    #[test]
    fn int8_absolute_error_is_at_most_half_a_row_scale() {
        let mut delta = sample_delta(5, 0.05);
        // A zero row must survive as zeros with scale 0.
        let first = delta.values_mut().next().unwrap();
        first.data[..64].fill(0.0);
        let decoded = decode_default(&encode(&delta, DeltaEncoding::Int8RowWise).unwrap()).unwrap();
        for (a, b) in delta.values().zip(decoded.values()) {
            let (_, cols) = a.rows_cols();
            for (row, back) in a.data.chunks(cols).zip(b.data.chunks(cols)) {
                let scale = row.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
                // scale/2 from rounding, plus 1e-5·scale for the f32 rounding of q·scale.
                let bound = scale * (0.5 + 1e-5);
                for (&x, &y) in row.iter().zip(back) {
                    assert!((x - y).abs() <= bound, "{x} decoded as {y}, scale {scale}");
                }
            }
        }
        assert!(
            decoded.values().next().unwrap().data[..64]
                .iter()
                .all(|&v| v == 0.0)
        );
    }

    #[test]
    fn topk_keeps_the_largest_values_exactly_and_zeroes_the_rest() {
        let delta = sample_delta(6, 1.0);
        let decoded =
            decode_default(&encode(&delta, DeltaEncoding::TopK { fraction: 0.1 }).unwrap())
                .unwrap();
        for (a, b) in delta.values().zip(decoded.values()) {
            assert_eq!(a.shape, b.shape);
            let k = (0.1f64 * a.len() as f64).ceil() as usize; // 512 values -> 52
            assert_eq!(k, 52);
            let kept: Vec<usize> = (0..a.len()).filter(|&i| b.data[i] != 0.0).collect();
            assert_eq!(kept.len(), k);
            let smallest_kept = kept
                .iter()
                .map(|&i| a.data[i].abs())
                .fold(f32::MAX, f32::min);
            for i in 0..a.len() {
                if kept.contains(&i) {
                    assert_eq!(a.data[i], b.data[i]);
                } else {
                    assert!(a.data[i].abs() <= smallest_kept);
                }
            }
        }
    }

    #[test]
    fn topk_count_and_ties() {
        assert_eq!(top_k_count(0.1, 100), 10);
        assert_eq!(top_k_count(0.35, 20), 7);
        assert_eq!(top_k_count(0.5, 3), 2);
        assert_eq!(top_k_count(1.0, 7), 7);
        assert_eq!(top_k_count(1e-9, 7), 1);
        assert_eq!(top_k_indices(&[1.0, -3.0, 3.0, 2.0, -3.0], 2), vec![1, 2]);
        assert_eq!(top_k_indices(&[0.0; 5], 3), vec![0, 1, 2]);
        for fraction in [0.0, -0.5, 1.5, f32::NAN] {
            assert!(matches!(
                encode(&sample_delta(7, 1.0), DeltaEncoding::TopK { fraction }),
                Err(DeltaError::InvalidFraction(_))
            ));
        }
    }

    #[test]
    fn error_feedback_loses_nothing() {
        let rounds = 20;
        let mut residual = NamedTensors::new();
        let mut sent_total: Option<NamedTensors> = None;
        let mut delta_total: Option<NamedTensors> = None;
        let add = |total: &mut Option<NamedTensors>, x: &NamedTensors| match total {
            None => *total = Some(x.clone()),
            Some(t) => {
                for (a, b) in t.values_mut().zip(x.values()) {
                    a.data.iter_mut().zip(&b.data).for_each(|(a, b)| *a += b);
                }
            }
        };
        for round in 0..rounds {
            let delta = sample_delta(100 + round, 0.01);
            let bytes = encode_topk_with_feedback(&delta, &mut residual, 0.05).unwrap();
            add(&mut sent_total, &decode_default(&bytes).unwrap());
            add(&mut delta_total, &delta);
        }
        let mut reconstructed = sent_total.unwrap();
        for (a, b) in reconstructed.values_mut().zip(residual.values()) {
            a.data.iter_mut().zip(&b.data).for_each(|(a, b)| *a += b);
        }
        // Σ sent + residual = Σ deltas up to f32 rounding of the running sums (20 adds of
        // values ≤ 0.01 each: 1e-6 is ~100 ulps of the largest partial sum).
        let expected = delta_total.unwrap();
        for (a, b) in reconstructed.values().zip(expected.values()) {
            for (&x, &y) in a.data.iter().zip(&b.data) {
                assert!((x - y).abs() <= 1e-6, "{x} vs {y}");
            }
        }
        // And the residual really holds something back (the test could not pass vacuously).
        assert!(crate::tensors::norm(&residual) > 0.01);
    }

    #[test]
    fn error_feedback_refuses_a_mismatched_residual() {
        let delta = sample_delta(8, 1.0);
        let mut residual = sample_delta(9, 1.0);
        residual.pop_first();
        let before = residual.clone();
        assert!(matches!(
            encode_topk_with_feedback(&delta, &mut residual, 0.1),
            Err(DeltaError::ResidualLayout)
        ));
        assert_eq!(residual, before);
    }

    #[test]
    fn every_truncation_is_refused() {
        for encoding in all_encodings() {
            let bytes = encode(&sample_delta(10, 1.0), encoding).unwrap();
            for len in 0..bytes.len() {
                assert!(
                    decode_default(&bytes[..len]).is_err(),
                    "{encoding:?} prefix {len}"
                );
            }
        }
    }

    #[test]
    fn random_mutations_never_panic() {
        let mut rng = StdRng::seed_from_u64(11);
        let mut accepted = 0;
        for encoding in all_encodings() {
            let bytes = encode(&sample_delta(12, 1.0), encoding).unwrap();
            for _ in 0..1500 {
                let mut mutated = bytes.clone();
                for _ in 0..rng.random_range(1..=4) {
                    // Half of the flips land in the header, where the parser is exercised.
                    let limit = if rng.random() { 200 } else { mutated.len() };
                    let at = rng.random_range(0..limit.min(mutated.len()));
                    mutated[at] ^= 1 << rng.random_range(0..8);
                }
                if decode_default(&mutated).is_ok() {
                    accepted += 1;
                }
            }
        }
        // Flips in the data section can decode to other valid values; flips in the header
        // mostly cannot. Either way: no panic, and some of both outcomes.
        assert!(accepted > 0 && accepted < 6000, "{accepted}");
    }

    fn stored(name: &str, elem: Elem, shape: Vec<usize>, bytes: Vec<u8>) -> Stored {
        Stored {
            name: name.into(),
            elem,
            shape,
            bytes,
        }
    }

    fn metadata(encoding: &str, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
        [
            ("format", FORMAT),
            ("version", VERSION),
            ("encoding", encoding),
        ]
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn topk_file(shape: &str, idx: &[u32], val: &[f32]) -> Vec<u8> {
        write_container(
            vec![
                stored(
                    "w.idx",
                    Elem::U32,
                    vec![idx.len()],
                    idx.iter().flat_map(|i| i.to_le_bytes()).collect(),
                ),
                stored("w.val", Elem::F32, vec![val.len()], f32_bytes(val)),
            ],
            metadata("topk", &[("shape.w", shape)]),
        )
    }

    #[test]
    fn handmade_topk_file_decodes() {
        let out = decode_default(&topk_file("2,3", &[1, 5], &[0.5, -2.0])).unwrap();
        assert_eq!(
            out["w"],
            HostTensor::new(vec![2, 3], vec![0.0, 0.5, 0.0, 0.0, 0.0, -2.0]).unwrap()
        );
    }

    #[test]
    fn huge_declared_tensor_is_refused_before_allocation() {
        // 10^12 dense values (4 TB) from a 1-value file: refused by the element limit, not OOM.
        let bytes = topk_file("1000000,1000000", &[7], &[1.0]);
        assert!(matches!(
            decode_default(&bytes),
            Err(DeltaError::TooManyElements { .. })
        ));
        // A dimension product that overflows usize.
        let bytes = topk_file("18446744073709551615,2", &[7], &[1.0]);
        assert!(decode_default(&bytes).is_err());
        // A stored tensor whose header claims far more data than the file holds.
        let mut header = serde_json::Map::new();
        header.insert(
            METADATA_KEY.into(),
            serde_json::json!({"format": FORMAT, "version": "1", "encoding": "f32"}),
        );
        header.insert("w".into(), serde_json::json!({"dtype": "F32", "shape": [1usize << 40], "data_offsets": [0usize, 4usize << 40]}));
        let text = serde_json::Value::Object(header).to_string();
        let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
        bytes.extend(text.as_bytes());
        assert!(matches!(
            decode_default(&bytes),
            Err(DeltaError::Container(_))
        ));
        // A header length far beyond the input.
        let mut bytes = u64::MAX.to_le_bytes().to_vec();
        bytes.extend(b"{}");
        assert!(matches!(
            decode_default(&bytes),
            Err(DeltaError::Container(_))
        ));
    }

    #[test]
    fn limits_are_enforced() {
        let delta = sample_delta(13, 1.0);
        let bytes = encode(&delta, DeltaEncoding::F32).unwrap();
        let limits = DecodeLimits {
            max_bytes: bytes.len() - 1,
            ..DecodeLimits::default()
        };
        assert!(matches!(
            decode(&bytes, &limits),
            Err(DeltaError::TooLarge { .. })
        ));
        let limits = DecodeLimits {
            max_tensors: 1,
            ..DecodeLimits::default()
        };
        assert!(matches!(
            decode(&bytes, &limits),
            Err(DeltaError::TooManyTensors { count: 2, max: 1 })
        ));
        let limits = DecodeLimits {
            max_elements: 1023,
            ..DecodeLimits::default()
        };
        assert!(matches!(
            decode(&bytes, &limits),
            Err(DeltaError::TooManyElements { .. })
        ));
        let limits = DecodeLimits {
            max_elements: 1024,
            ..DecodeLimits::default()
        };
        assert!(decode(&bytes, &limits).is_ok());
    }

    #[test]
    fn unknown_encoding_version_or_format_is_refused() {
        let one = || vec![stored("w", Elem::F32, vec![1], f32_bytes(&[1.0]))];
        let bytes = write_container(one(), metadata("zstd", &[]));
        assert!(
            matches!(decode_default(&bytes), Err(DeltaError::UnknownEncoding(e)) if e == "zstd")
        );
        let mut meta = metadata("f32", &[]);
        meta.insert("version".into(), "2".into());
        assert!(matches!(
            decode_default(&write_container(one(), meta)),
            Err(DeltaError::UnknownVersion(_))
        ));
        let mut meta = metadata("f32", &[]);
        meta.remove("format");
        assert!(matches!(
            decode_default(&write_container(one(), meta)),
            Err(DeltaError::Metadata { .. })
        ));
        // Right encoding name, wrong dtype.
        let bytes = write_container(one(), metadata("f16", &[]));
        assert!(matches!(
            decode_default(&bytes),
            Err(DeltaError::Tensor { .. })
        ));
    }

    #[test]
    fn bad_topk_indices_are_refused() {
        let tensor_error =
            |bytes: Vec<u8>| matches!(decode_default(&bytes), Err(DeltaError::Tensor { .. }));
        assert!(
            tensor_error(topk_file("4", &[4], &[1.0])),
            "index out of range"
        );
        assert!(
            tensor_error(topk_file("4", &[2, 1], &[1.0, 1.0])),
            "decreasing"
        );
        assert!(
            tensor_error(topk_file("4", &[1, 1], &[1.0, 1.0])),
            "repeated"
        );
        assert!(
            tensor_error(topk_file("4", &[0, 1], &[1.0])),
            "idx and val lengths differ"
        );
        assert!(tensor_error(topk_file("2", &[0, 1, 2], &[1.0; 3])), "k > n");
        assert!(tensor_error(topk_file("4", &[0], &[f32::NAN])), "NaN value");
        // Tensors without a recorded shape, and a shape without tensors.
        let meta = metadata("topk", &[("shape.v", "4")]);
        let bytes = write_container(
            vec![
                stored("w.idx", Elem::U32, vec![0], vec![]),
                stored("w.val", Elem::F32, vec![0], vec![]),
            ],
            meta,
        );
        assert!(decode_default(&bytes).is_err());
    }

    #[test]
    fn bad_int8_scales_are_refused() {
        let file = |scale: f32, q: i8| {
            write_container(
                vec![
                    stored("w.q", Elem::I8, vec![1, 2], vec![q as u8, 1]),
                    stored("w.scale", Elem::F32, vec![1], f32_bytes(&[scale])),
                ],
                metadata("int8-rowwise", &[]),
            )
        };
        assert!(decode_default(&file(0.5, 3)).is_ok());
        for scale in [f32::NAN, f32::INFINITY, -1.0] {
            assert!(
                matches!(
                    decode_default(&file(scale, 3)),
                    Err(DeltaError::Tensor { .. })
                ),
                "{scale}"
            );
        }
        assert!(decode_default(&file(0.5, i8::MIN)).is_err());
        // A q tensor without its scale.
        let bytes = write_container(
            vec![stored("w.q", Elem::I8, vec![2], vec![1, 2])],
            metadata("int8-rowwise", &[]),
        );
        assert!(matches!(
            decode_default(&bytes),
            Err(DeltaError::Tensor { .. })
        ));
    }

    #[test]
    fn non_finite_values_are_refused() {
        let mut delta = sample_delta(14, 1.0);
        delta.values_mut().next().unwrap().data[0] = f32::NAN;
        for encoding in all_encodings() {
            assert!(matches!(
                encode(&delta, encoding),
                Err(DeltaError::Tensor { .. })
            ));
        }
        let bytes = write_container(
            vec![stored("w", Elem::F32, vec![1], f32_bytes(&[f32::INFINITY]))],
            metadata("f32", &[]),
        );
        assert!(matches!(
            decode_default(&bytes),
            Err(DeltaError::Tensor { .. })
        ));
    }

    #[test]
    fn empty_and_degenerate_tensors_round_trip() {
        let delta: NamedTensors = [
            ("empty".to_owned(), HostTensor::zeros(vec![3, 0])),
            // 127 has scale 1, so it is exact in int8 too.
            (
                "scalar".to_owned(),
                HostTensor::new(vec![], vec![127.0]).unwrap(),
            ),
        ]
        .into();
        for encoding in all_encodings() {
            let decoded = decode_default(&encode(&delta, encoding).unwrap()).unwrap();
            assert_eq!(decoded, delta, "{encoding:?}");
        }
    }
}
