//! Host-side tensors: the common currency between the burn model, the delta codec, the
//! aggregation math and the safetensors files. Everything that is hashed, compared, sent or
//! merged lives here as plain `f32` in row-major order, so it is backend independent and its
//! bytes are canonical.

use std::collections::BTreeMap;

/// A dense `f32` tensor in host memory, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values in row-major order.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// A tensor from its shape and values; `None` if the lengths disagree.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Option<Self> {
        (shape.iter().product::<usize>() == data.len()).then_some(Self { shape, data })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self {
            shape,
            data: vec![0.0; n],
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Rows and columns when the tensor is seen as a matrix: the last dimension is the row
    /// length, every other dimension is folded into the row count (a vector is one row).
    pub fn rows_cols(&self) -> (usize, usize) {
        match self.shape.split_last() {
            None => (1, 1),
            Some((&cols, rest)) => (rest.iter().product(), cols),
        }
    }
}

/// Tensors by name, ordered by name: that order is the canonical order used for hashing,
/// encoding and every loop that must give the same bits on every machine.
pub type NamedTensors = BTreeMap<String, HostTensor>;

/// Sum of squares of every value of every tensor, accumulated in `f64` in canonical order.
pub fn squared_norm(tensors: &NamedTensors) -> f64 {
    tensors
        .values()
        .flat_map(|t| t.data.iter())
        .map(|&v| f64::from(v) * f64::from(v))
        .sum()
}

/// Euclidean norm over all tensors.
pub fn norm(tensors: &NamedTensors) -> f64 {
    squared_norm(tensors).sqrt()
}

/// True when both maps have the same names and each pair has the same shape.
pub fn same_layout(a: &NamedTensors, b: &NamedTensors) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b.iter())
            .all(|((na, ta), (nb, tb))| na == nb && ta.shape == tb.shape)
}

/// Feeds every tensor into a blake3 hasher in canonical order: name, shape, then the values as
/// little-endian `f32`. Two maps hash equal exactly when they are bitwise equal.
pub fn hash_into(hasher: &mut blake3::Hasher, tensors: &NamedTensors) {
    hasher.update(&(tensors.len() as u64).to_le_bytes());
    for (name, t) in tensors {
        hasher.update(&(name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update(&(t.shape.len() as u64).to_le_bytes());
        for &d in &t.shape {
            hasher.update(&(d as u64).to_le_bytes());
        }
        hasher.update(bytemuck::cast_slice(&t.data));
    }
}

/// The blake3 hash of a map of tensors (see [`hash_into`]).
pub fn hash(tensors: &NamedTensors) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    hash_into(&mut hasher, tensors);
    hasher.finalize()
}
