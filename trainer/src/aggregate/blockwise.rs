//! The aggregation rules of [`super`], computed a block of coordinates at a time, so that a
//! merge of N deltas holds the N deltas as they arrived (int8 values stay in their bytes, see
//! [`PackedDelta`]) plus a few buffers the size of one delta, instead of N `f32` copies.
//!
//! For each block, every delta's values for it are read into a scratch buffer (N × block
//! values, sized for the cache) and each rule is applied per coordinate: the mean is a
//! weighted sum vectorized across coordinates; the trimmed mean and the median find their
//! order statistics by a bitwise binary search over the values' 32-bit sort keys, one
//! vectorized counting pass over the N keys per bit (33 passes: time linear in N, and no
//! branch to mispredict, which is what a selection per coordinate mostly spends its time on);
//! up to 64 deltas a sort of the keys is cheaper. Centered clipping needs each delta's
//! distance from the current center over all coordinates, so it is one pass for the median
//! (which also sums those distances) and one per iteration (which also sums the distances
//! for the next). The loops are compiled for the CPU's vector width ([`crate::simd`]).
//!
//! Results are those of [`super`]'s functions bit for bit (same operations on the same values
//! in the same order), except centered clipping, whose distances are summed block by block
//! rather than in one running sum (a relative difference of order 1e-16 in a distance). The
//! coordinates are split into a fixed number of segments that run in parallel on rayon's
//! pool; the split does not depend on the thread count, so neither do the results.

use rayon::prelude::*;

use super::{AggregateError, AggregationRule, token_shares, trim_count};
use crate::delta::PackedDelta;
use crate::simd::{Kernel, vectorized};
use crate::tensors::{HostTensor, NamedTensors};

/// Parallel tasks the coordinates are split into (whatever the number of threads).
const SEGMENTS: usize = 64;
/// Values of the scratch buffer (N deltas × block coordinates) for rules that sum across
/// deltas coordinate by coordinate (vectorized along each delta's row): 4 MiB of `f32`, so
/// each delta is read in long runs.
const STREAMING_SCRATCH: usize = 1 << 20;
/// The same for rules that rank per coordinate: 1 MiB, so that the values of eight
/// coordinates (a block apart from delta to delta) lie on few pages, while each delta is
/// still read in runs long enough for the prefetcher (measured: 256 KiB and 4 MiB are slower).
const SELECTING_SCRATCH: usize = 1 << 18;
/// Bounds on the coordinates per block.
const MIN_BLOCK: usize = 16;
const MAX_BLOCK: usize = 4096;
/// Up to this many deltas, [`RankSearch`] sorts each coordinate's keys instead.
const SORTED_BELOW: usize = 64;
/// Coordinates whose keys are gathered together (see [`RankSearch`]): a delta's values for
/// them are 32 bytes, half a cache line.
const LANES: usize = 8;
/// Coordinates whose trimmed sums are taken together (see [`SurvivorSums`]): four `f64` fill
/// an AVX2 register, and with eight the running sums no longer fit in the registers.
const SUM_LANES: usize = 4;

/// A delta the blockwise rules can read: its layout, and its values flattened in canonical
/// order (tensors by name, each row-major).
pub trait DeltaValues: Sync {
    /// Each tensor's name, shape and number of values, in canonical order.
    fn layout(&self) -> Vec<(&str, &[usize], usize)>;
    /// Writes values `start .. start + out.len()` of the flattened delta into `out`; value
    /// `start` lies in tensor number `tensor` of the layout (a hint that spares a search).
    fn read(&self, tensor: usize, start: usize, out: &mut [f32]);
}

impl<B: AsRef<[u8]> + Sync> DeltaValues for PackedDelta<B> {
    fn layout(&self) -> Vec<(&str, &[usize], usize)> {
        self.tensors()
            .map(|(name, shape)| (name, shape, shape.iter().product()))
            .collect()
    }

    fn read(&self, tensor: usize, start: usize, out: &mut [f32]) {
        self.read_from(tensor, start, out);
    }
}

impl DeltaValues for NamedTensors {
    fn layout(&self) -> Vec<(&str, &[usize], usize)> {
        self.iter()
            .map(|(name, t)| (name.as_str(), t.shape.as_slice(), t.data.len()))
            .collect()
    }

    fn read(&self, _: usize, start: usize, out: &mut [f32]) {
        let (mut skip, mut written) = (start, 0);
        for t in self.values() {
            if written == out.len() {
                break;
            }
            if skip >= t.data.len() {
                skip -= t.data.len();
                continue;
            }
            let take = (t.data.len() - skip).min(out.len() - written);
            out[written..written + take].copy_from_slice(&t.data[skip..skip + take]);
            written += take;
            skip = 0;
        }
        assert_eq!(written, out.len(), "read past the end of the tensors");
    }
}

/// One volunteer's delta and the number of tokens it was trained on (its weight).
#[derive(Clone, Copy)]
pub struct StreamedDelta<'a> {
    /// The pseudo-gradient, `start − end` of the LoRA tensors.
    pub delta: &'a dyn DeltaValues,
    /// Tokens trained on; must be positive.
    pub tokens: u64,
}

/// Aggregates with `rule`, as [`super::aggregate`] does.
pub fn aggregate(
    rule: AggregationRule,
    deltas: &[StreamedDelta],
) -> Result<NamedTensors, AggregateError> {
    match rule {
        AggregationRule::Mean => token_weighted_mean(deltas),
        AggregationRule::TrimmedMean { trim_fraction } => trimmed_mean(deltas, trim_fraction),
        AggregationRule::CenteredClipping { tau, iterations } => {
            centered_clipping(deltas, tau, iterations)
        }
    }
}

/// [`super::token_weighted_mean`].
pub fn token_weighted_mean(deltas: &[StreamedDelta]) -> Result<NamedTensors, AggregateError> {
    let layout = check_layout(deltas)?;
    let weights = token_shares(deltas.iter().map(|d| d.tokens))?;
    let mut out = vec![0.0; layout.len];
    blocks(
        deltas,
        &layout,
        STREAMING_SCRATCH,
        &mut out,
        |work, _, len, out| {
            let weights = &weights;
            vectorized(WeightedSums { work, len, weights });
            for (o, &sum) in out.iter_mut().zip(&work.acc) {
                *o = sum as f32;
            }
        },
    );
    Ok(layout.tensors(out))
}

/// [`super::trimmed_mean`].
pub fn trimmed_mean(
    deltas: &[StreamedDelta],
    trim_fraction: f32,
) -> Result<NamedTensors, AggregateError> {
    if !(0.0..0.5).contains(&trim_fraction) {
        return Err(AggregateError::InvalidTrim(trim_fraction));
    }
    let layout = check_layout(deltas)?;
    let weights = token_shares(deltas.iter().map(|d| d.tokens))?;
    let trim = trim_count(trim_fraction, deltas.len());
    let mut out = vec![0.0; layout.len];
    if trim == 0 {
        // Every value survives: the weighted sum over the sum of the weights, both in delta
        // order, as the plain function computes them.
        let total: f64 = weights.iter().sum();
        blocks(
            deltas,
            &layout,
            STREAMING_SCRATCH,
            &mut out,
            |work, _, len, out| {
                let weights = &weights;
                vectorized(WeightedSums { work, len, weights });
                for (o, &sum) in out.iter_mut().zip(&work.acc) {
                    *o = (sum / total) as f32;
                }
            },
        );
    } else {
        blocks(
            deltas,
            &layout,
            SELECTING_SCRATCH,
            &mut out,
            |work, _, len, out| {
                survivor_ranks(work, len, trim);
                let weights = &weights;
                vectorized(SurvivorSums { work, len, weights });
                for ((o, &sum), &weight) in out.iter_mut().zip(&work.acc).zip(&work.weight) {
                    *o = (sum / weight) as f32;
                }
            },
        );
    }
    Ok(layout.tensors(out))
}

/// [`super::coordinate_median`].
pub fn coordinate_median(deltas: &[StreamedDelta]) -> Result<NamedTensors, AggregateError> {
    let layout = check_layout(deltas)?;
    let (median, _) = median_and_distances(deltas, &layout, false);
    Ok(layout.tensors(median))
}

/// [`super::centered_clipping`] starting from [`coordinate_median`], as [`super::aggregate`]
/// does it: `v ← v + Σ w_i · clip(x_i − v, tau)`, `iterations` times.
pub fn centered_clipping(
    deltas: &[StreamedDelta],
    tau: f64,
    iterations: usize,
) -> Result<NamedTensors, AggregateError> {
    let layout = check_layout(deltas)?;
    if !(tau.is_finite() && tau > 0.0) {
        return Err(AggregateError::InvalidTau(tau));
    }
    let weights = token_shares(deltas.iter().map(|d| d.tokens))?;
    let (mut center, mut squared_distances) = median_and_distances(deltas, &layout, iterations > 0);
    for iteration in 0..iterations {
        // Each delta's step weight: its token share times its clipping factor.
        let step_weights: Vec<f64> = squared_distances
            .iter()
            .zip(&weights)
            .map(|(&d2, &w)| {
                let distance = d2.sqrt();
                if distance > tau {
                    w * tau / distance
                } else {
                    w
                }
            })
            .collect();
        let last = iteration + 1 == iterations;
        let mut next = vec![0.0; layout.len];
        squared_distances = blocks(
            deltas,
            &layout,
            STREAMING_SCRATCH,
            &mut next,
            |work, start, len, out| {
                let current = &center[start..start + len];
                let weights = &step_weights;
                vectorized(WeightedSteps {
                    work: &mut *work,
                    len,
                    weights,
                    current,
                });
                for ((o, &step), &v) in out.iter_mut().zip(&work.acc).zip(current) {
                    *o = (f64::from(v) + step) as f32;
                }
                if !last {
                    vectorized(SquaredDistances { work, len, v: out });
                }
            },
        );
        center = next;
    }
    Ok(layout.tensors(center))
}

/// The coordinate-wise median, and (when asked) each delta's squared distance from it.
fn median_and_distances(
    deltas: &[StreamedDelta],
    layout: &Layout,
    with_distances: bool,
) -> (Vec<f32>, Vec<f64>) {
    let mut median = vec![0.0; layout.len];
    let squared_distances = blocks(
        deltas,
        layout,
        SELECTING_SCRATCH,
        &mut median,
        |work, _, len, out| {
            let n = work.values.len() / len;
            // The middle value, or the two middle ones: ranks n/2 and (n − 1)/2.
            let ranks = [(n / 2) as u32, ((n - 1) / 2) as u32];
            for (first, out) in (0..len).step_by(LANES).zip(out.chunks_mut(LANES)) {
                let values = &work.values;
                let keys = &mut work.lane_keys;
                let found = vectorized(RankSearch {
                    values,
                    len,
                    first,
                    keys,
                    ranks,
                });
                for (l, o) in out.iter_mut().enumerate() {
                    let upper = f64::from(from_rank_key(found.value[0][l]));
                    let lower = f64::from(from_rank_key(found.value[1][l]));
                    *o = if n % 2 == 1 {
                        upper
                    } else {
                        (lower + upper) / 2.0
                    } as f32;
                }
            }
            if with_distances {
                vectorized(SquaredDistances { work, len, v: out });
            }
        },
    );
    (median, squared_distances)
}

/// The layout all deltas share: names, shapes and value counts, where each tensor starts in
/// the flattened delta, and the total number of values.
struct Layout {
    tensors: Vec<(String, Vec<usize>, usize)>,
    starts: Vec<usize>,
    len: usize,
}

impl Layout {
    /// The tensor holding value `start`: the last one starting at or before it (empty tensors
    /// are stepped over).
    fn tensor_at(&self, start: usize) -> usize {
        self.starts
            .partition_point(|&s| s <= start)
            .saturating_sub(1)
    }

    /// Cuts flattened values back into tensors.
    fn tensors(&self, values: Vec<f32>) -> NamedTensors {
        let mut values = values.into_iter();
        self.tensors
            .iter()
            .map(|(name, shape, n)| {
                let data = values.by_ref().take(*n).collect();
                (
                    name.clone(),
                    HostTensor {
                        shape: shape.clone(),
                        data,
                    },
                )
            })
            .collect()
    }
}

/// The first delta's layout, after checking that its value counts match its shapes and that
/// every other delta has the same names, shapes and counts.
fn check_layout(deltas: &[StreamedDelta]) -> Result<Layout, AggregateError> {
    let first = deltas.first().ok_or(AggregateError::Empty)?.delta.layout();
    let consistent = first
        .iter()
        .all(|(_, shape, n)| shape.iter().try_fold(1usize, |p, &d| p.checked_mul(d)) == Some(*n));
    if !consistent {
        return Err(AggregateError::Layout { index: 0 });
    }
    if let Some(index) = deltas.iter().position(|d| d.delta.layout() != first) {
        return Err(AggregateError::Layout { index });
    }
    let starts = first
        .iter()
        .scan(0, |start, (_, _, n)| {
            let this = *start;
            *start += n;
            Some(this)
        })
        .collect();
    Ok(Layout {
        len: first.iter().map(|(_, _, n)| n).sum(),
        starts,
        tensors: first
            .into_iter()
            .map(|(name, shape, n)| (name.to_owned(), shape.to_vec(), n))
            .collect(),
    })
}

/// Buffers of one parallel task, reused from block to block.
#[derive(Default)]
struct Work {
    /// The block's values, delta-major: delta `i`'s are at `i·len .. (i+1)·len`.
    values: Vec<f32>,
    /// Per coordinate of the block: a running sum.
    acc: Vec<f64>,
    /// The [`rank_key`]s of [`LANES`] coordinates' values, coordinate by coordinate.
    lane_keys: Vec<i32>,
    /// Per coordinate of the block, for a trimmed mean: the keys of the values ranked `trim`
    /// and `n − 1 − trim`; how many values equal to the first are dropped (the earliest ones);
    /// and how many equal to the second may come before one that still survives.
    low: Vec<i32>,
    high: Vec<i32>,
    skip_low: Vec<i32>,
    keep_high: Vec<i32>,
    /// Per coordinate of the block: the surviving weight.
    weight: Vec<f64>,
    /// Per delta: the sum of squared differences over this segment's coordinates.
    partials: Vec<f64>,
}

/// Runs `block(work, start, len, out)` for every block of `len` coordinates from `start`, with
/// `work.values` holding every delta's values for it (about `scratch` values in all) and `out`
/// the block's part of `out`.
/// Returns per delta the sum of `work.partials` over the segments, in segment order.
fn blocks(
    deltas: &[StreamedDelta],
    layout: &Layout,
    scratch: usize,
    out: &mut [f32],
    block: impl Fn(&mut Work, usize, usize, &mut [f32]) + Sync,
) -> Vec<f64> {
    let n = deltas.len();
    let block_len = (scratch / n.max(1)).clamp(MIN_BLOCK, MAX_BLOCK);
    let segment_len = out.len().div_ceil(SEGMENTS).max(1);
    let per_segment: Vec<Vec<f64>> = out
        .par_chunks_mut(segment_len)
        .enumerate()
        .map_init(Work::default, |work, (k, segment)| {
            work.partials.clear();
            work.partials.resize(n, 0.0);
            for (b, out) in segment.chunks_mut(block_len).enumerate() {
                let start = k * segment_len + b * block_len;
                let len = out.len();
                let tensor = layout.tensor_at(start);
                work.values.resize(n * len, 0.0);
                for (d, values) in deltas.iter().zip(work.values.chunks_exact_mut(len)) {
                    d.delta.read(tensor, start, values);
                }
                block(work, start, len, out);
            }
            work.partials.clone()
        })
        .collect();
    let mut totals = vec![0.0; n];
    for partials in &per_segment {
        for (total, &p) in totals.iter_mut().zip(partials) {
            *total += p;
        }
    }
    totals
}

/// `work.acc[j] = Σ_i w_i · x_ij` over the block, summed in delta order from `-0.0` as
/// `Iterator::sum` does, so each coordinate gets the bits of the plain mean.
struct WeightedSums<'a> {
    work: &'a mut Work,
    len: usize,
    weights: &'a [f64],
}

impl Kernel for WeightedSums<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let Work { values, acc, .. } = self.work;
        acc.clear();
        acc.resize(self.len, -0.0);
        for (x, &w) in values.chunks_exact(self.len).zip(self.weights) {
            for (a, &x) in acc.iter_mut().zip(x) {
                *a += w * f64::from(x);
            }
        }
    }
}

/// `work.acc[j] = Σ_i c_i · (x_ij − v_j)`, in delta order from `-0.0`: a centered clipping
/// step, as the plain function sums it.
struct WeightedSteps<'a> {
    work: &'a mut Work,
    len: usize,
    weights: &'a [f64],
    current: &'a [f32],
}

impl Kernel for WeightedSteps<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let Work { values, acc, .. } = self.work;
        acc.clear();
        acc.resize(self.len, -0.0);
        for (x, &c) in values.chunks_exact(self.len).zip(self.weights) {
            for ((a, &x), &v) in acc.iter_mut().zip(x).zip(self.current) {
                *a += c * (f64::from(x) - f64::from(v));
            }
        }
    }
}

/// Adds each delta's `Σ_j (x_ij − v_j)²` over the block to `work.partials`, in eight lanes
/// (vectorized; the order is fixed, so the sum is too).
struct SquaredDistances<'a> {
    work: &'a mut Work,
    len: usize,
    v: &'a [f32],
}

impl Kernel for SquaredDistances<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let Work {
            values, partials, ..
        } = self.work;
        let (v_chunks, v_rest) = self.v.as_chunks::<8>();
        for (x, partial) in values.chunks_exact(self.len).zip(partials) {
            let mut lanes = [0.0f64; 8];
            let (x_chunks, x_rest) = x.as_chunks::<8>();
            for (x, v) in x_chunks.iter().zip(v_chunks) {
                for k in 0..8 {
                    let d = f64::from(x[k]) - f64::from(v[k]);
                    lanes[k] += d * d;
                }
            }
            for (&x, &v) in x_rest.iter().zip(v_rest) {
                let d = f64::from(x) - f64::from(v);
                lanes[0] += d * d;
            }
            *partial += lanes.iter().sum::<f64>();
        }
    }
}

/// The survivors of a trimmed mean (see [`super::trimmed_mean`]), for `trim ≥ 1`: per
/// coordinate, the values ranked `trim ..= n − 1 − trim` by (value, delta index). Ranks
/// `trim` and `n − 1 − trim` by value alone are found by [`RankSearch`]; among values equal
/// to the first, the earliest deltas are the ones dropped, and among values equal to the
/// second, the earliest are the ones kept ([`SurvivorSums`] counts them).
fn survivor_ranks(work: &mut Work, len: usize, trim: usize) {
    let n = work.values.len() / len;
    let ranks = [trim as u32, (n - 1 - trim) as u32];
    work.low.clear();
    work.high.clear();
    work.skip_low.clear();
    work.keep_high.clear();
    for first in (0..len).step_by(LANES) {
        let found = vectorized(RankSearch {
            values: &work.values,
            len,
            first,
            keys: &mut work.lane_keys,
            ranks,
        });
        for l in 0..LANES.min(len - first) {
            work.low.push(found.value[0][l]);
            work.high.push(found.value[1][l]);
            // Rank of the k-th value equal to `low` (from 0): below + k; it survives from
            // rank `trim` on. Equal to `high`: it survives up to rank `n − 1 − trim`.
            work.skip_low.push(trim as i32 - found.below[0][l]);
            work.keep_high
                .push((n - 1 - trim) as i32 - found.below[1][l]);
        }
    }
}

/// Per lane (coordinate), the values of ranks `ranks[0]` and `ranks[1]` (from 0, in
/// [`f32::total_cmp`] order) as [`rank_key`]s, and how many values are below each.
struct Ranked {
    value: [[i32; LANES]; 2],
    below: [[i32; LANES]; 2],
}

/// Finds [`Ranked`] for the block's coordinates `first ..` (up to [`LANES`] of them). Their
/// keys are copied out coordinate by coordinate (each delta's values for them are one cache
/// line); then, per coordinate, the value of rank `r` is the largest key `v` with at most `r`
/// keys below it, built bit by bit from the top with one counting pass over the N keys per bit
/// (33 vectorized passes, no branches).
struct RankSearch<'a> {
    values: &'a [f32],
    len: usize,
    first: usize,
    keys: &'a mut Vec<i32>,
    ranks: [u32; 2],
}

impl Kernel for RankSearch<'_> {
    type Output = Ranked;

    #[inline(always)]
    fn run(self) -> Ranked {
        let Self {
            values,
            len,
            first,
            keys,
            ranks,
        } = self;
        let n = values.len() / len;
        let width = LANES.min(len - first);
        keys.resize(LANES * n, 0);
        for (i, row) in values.chunks_exact(len).enumerate() {
            for (l, &x) in row[first..first + width].iter().enumerate() {
                keys[l * n + i] = rank_key(x);
            }
        }
        // Built in the unsigned order of `key ^ i32::MIN`, so that the search starts from 0.
        const SIGN: u32 = 1 << 31;
        let mut ranked = Ranked {
            value: [[0; LANES]; 2],
            below: [[0; LANES]; 2],
        };
        if n <= SORTED_BELOW {
            // Few values: sorting them costs less than 33 short passes.
            for (l, keys) in keys.chunks_exact_mut(n).take(width).enumerate() {
                keys.sort_unstable();
                for t in 0..2 {
                    let value = keys[ranks[t] as usize];
                    ranked.value[t][l] = value;
                    ranked.below[t][l] = keys.partition_point(|&k| k < value) as i32;
                }
            }
            return ranked;
        }
        // Bit by bit, every coordinate in turn: their passes are independent, so the processor
        // overlaps one's count with the end of another's.
        let mut found = [[0u32; 2]; LANES];
        for b in (0..32).rev() {
            let bit = 1u32 << b;
            for (found, keys) in found.iter_mut().zip(keys.chunks_exact(n)).take(width) {
                let candidate = [
                    ((found[0] | bit) ^ SIGN) as i32,
                    ((found[1] | bit) ^ SIGN) as i32,
                ];
                let below = count_below(keys, candidate);
                for t in 0..2 {
                    // Without a branch: the bit is a coin toss, and mispredicting it cost
                    // more than the count.
                    found[t] |= bit * u32::from(below[t] as u32 <= ranks[t]);
                }
            }
        }
        for (l, (found, keys)) in found
            .iter()
            .zip(keys.chunks_exact(n))
            .take(width)
            .enumerate()
        {
            let value = [(found[0] ^ SIGN) as i32, (found[1] ^ SIGN) as i32];
            let below = count_below(keys, value);
            for t in 0..2 {
                ranked.value[t][l] = value[t];
                ranked.below[t][l] = below[t];
            }
        }
        ranked
    }
}

/// How many keys are below each of two bounds (a vectorized integer reduction).
#[inline(always)]
fn count_below(keys: &[i32], bounds: [i32; 2]) -> [i32; 2] {
    // Two plain counters: folded as one `[i32; 2]`, the pair is packed into a scalar register.
    let (mut first, mut second) = (0i32, 0i32);
    for &key in keys {
        first += i32::from(key < bounds[0]);
        second += i32::from(key < bounds[1]);
    }
    [first, second]
}

/// Per coordinate, the survivors' weight (`work.weight`) and weighted sum (`work.acc`), each
/// summed in delta order from `-0.0` like the plain function's, with `-0.0` (which changes
/// nothing) added for a value that does not survive: branch-free and vectorized across
/// [`SUM_LANES`] coordinates, whose running sums and counts stay in registers through the
/// deltas.
struct SurvivorSums<'a> {
    work: &'a mut Work,
    len: usize,
    weights: &'a [f64],
}

impl Kernel for SurvivorSums<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let len = self.len;
        let Work {
            values,
            acc,
            weight,
            low,
            high,
            skip_low,
            keep_high,
            ..
        } = self.work;
        acc.clear();
        acc.resize(len, -0.0);
        weight.clear();
        weight.resize(len, -0.0);
        let full = len / SUM_LANES;
        for (c, (((low, high), skip), keep)) in low
            .as_chunks::<SUM_LANES>()
            .0
            .iter()
            .zip(high.as_chunks::<SUM_LANES>().0)
            .zip(skip_low.as_chunks::<SUM_LANES>().0)
            .zip(keep_high.as_chunks::<SUM_LANES>().0)
            .enumerate()
        {
            let (mut sum, mut total) = ([-0.0f64; SUM_LANES], [-0.0f64; SUM_LANES]);
            let (mut seen_low, mut seen_high) = ([0i32; SUM_LANES], [0i32; SUM_LANES]);
            for (row, &w) in values.chunks_exact(len).zip(self.weights) {
                let x = &row.as_chunks::<SUM_LANES>().0[c];
                for l in 0..SUM_LANES {
                    let key = rank_key(x[l]);
                    let (at_low, at_high) = (key == low[l], key == high[l]);
                    let survives = ((key > low[l]) | (at_low & (seen_low[l] >= skip[l])))
                        & ((key < high[l]) | (at_high & (seen_high[l] <= keep[l])));
                    seen_low[l] += i32::from(at_low);
                    seen_high[l] += i32::from(at_high);
                    total[l] += if survives { w } else { -0.0 };
                    sum[l] += if survives { w * f64::from(x[l]) } else { -0.0 };
                }
            }
            acc[c * SUM_LANES..(c + 1) * SUM_LANES].copy_from_slice(&sum);
            weight[c * SUM_LANES..(c + 1) * SUM_LANES].copy_from_slice(&total);
        }
        // The block's last few coordinates, one at a time.
        for j in full * SUM_LANES..len {
            let column = values[j..].iter().step_by(len);
            let bounds = [low[j], high[j], skip_low[j], keep_high[j]];
            (acc[j], weight[j]) = survivor_sum(column, self.weights, bounds);
        }
    }
}

/// One coordinate's survivor sum and weight, for [`SurvivorSums`]; `bounds` are its low and
/// high keys, how many equal to low to skip and how many equal to high to keep.
#[inline(always)]
fn survivor_sum<'a>(
    column: impl Iterator<Item = &'a f32>,
    weights: &[f64],
    [low, high, skip_low, keep_high]: [i32; 4],
) -> (f64, f64) {
    let (mut sum, mut total) = (-0.0, -0.0);
    let (mut seen_low, mut seen_high) = (0, 0);
    for (&x, &w) in column.zip(weights) {
        let key = rank_key(x);
        let (at_low, at_high) = (key == low, key == high);
        let survives = ((key > low) | (at_low & (seen_low >= skip_low)))
            & ((key < high) | (at_high & (seen_high <= keep_high)));
        seen_low += i32::from(at_low);
        seen_high += i32::from(at_high);
        total += if survives { w } else { -0.0 };
        sum += if survives { w * f64::from(x) } else { -0.0 };
    }
    (sum, total)
}

/// A signed integer that orders as [`f32::total_cmp`] does (its own trick: negatives get
/// every bit but the sign flipped).
#[inline(always)]
fn rank_key(x: f32) -> i32 {
    let bits = x.to_bits() as i32;
    bits ^ (((bits >> 31) as u32) >> 1) as i32
}

/// The inverse of [`rank_key`] (the same flip).
#[inline(always)]
fn from_rank_key(key: i32) -> f32 {
    f32::from_bits((key ^ (((key >> 31) as u32) >> 1) as i32) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{self as plain, WeightedDelta};
    use crate::delta::{self, DecodeLimits, DeltaEncoding};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// A LoRA-shaped delta (three tensors, 484 values, rows of 4 to 40) with values of about
    /// `scale`, some exact zeros, negative zeros and repeated values so ties are exercised.
    fn random_delta(rng: &mut StdRng, scale: f32) -> NamedTensors {
        [
            ("a.lora_A.weight", vec![4, 40]),
            ("a.lora_B.weight", vec![40, 4]),
            ("b.lora_A.weight", vec![41, 4]),
        ]
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            let data = (0..n)
                .map(|_| match rng.random_range(0..20) {
                    0 => 0.0,
                    1 => -0.0,
                    2 => scale / 2.0,
                    _ => (rng.random::<f32>() * 2.0 - 1.0) * scale,
                })
                .collect();
            (name.to_owned(), HostTensor { shape, data })
        })
        .collect()
    }

    fn streamed<'a>(deltas: &'a [impl DeltaValues], tokens: &[u64]) -> Vec<StreamedDelta<'a>> {
        deltas
            .iter()
            .zip(tokens)
            .map(|(delta, &tokens)| StreamedDelta {
                delta: delta as &dyn DeltaValues,
                tokens,
            })
            .collect()
    }

    fn weighted<'a>(deltas: &'a [NamedTensors], tokens: &[u64]) -> Vec<WeightedDelta<'a>> {
        deltas
            .iter()
            .zip(tokens)
            .map(|(delta, &tokens)| WeightedDelta { delta, tokens })
            .collect()
    }

    fn rules() -> [AggregationRule; 5] {
        [
            AggregationRule::Mean,
            AggregationRule::TrimmedMean { trim_fraction: 0.0 },
            AggregationRule::TrimmedMean { trim_fraction: 0.2 },
            AggregationRule::TrimmedMean {
                trim_fraction: 0.45,
            },
            AggregationRule::CenteredClipping {
                tau: 0.5,
                iterations: 3,
            },
        ]
    }

    fn max_difference(a: &NamedTensors, b: &NamedTensors) -> f32 {
        assert!(crate::tensors::same_layout(a, b));
        a.values()
            .zip(b.values())
            .flat_map(|(x, y)| x.data.iter().zip(&y.data))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Int8 deltas, packed and decoded: every rule gives the plain function's result for
    /// 1 to 40 deltas, bit for bit (within 1e-6 for centered clipping, whose distances are
    /// summed in another order), and the median too.
    #[test]
    fn packed_int8_deltas_give_the_plain_results() {
        let mut rng = StdRng::seed_from_u64(1);
        // Up to 64 deltas a coordinate's keys are sorted; from 65 they are searched.
        for n in [1, 2, 3, 4, 5, 7, 10, 40, 64, 65, 130] {
            let encoded: Vec<Vec<u8>> = (0..n)
                .map(|_| {
                    let d = random_delta(&mut rng, 1.0);
                    delta::encode(&d, DeltaEncoding::Int8RowWise).unwrap()
                })
                .collect();
            let limits = DecodeLimits::default();
            let packed: Vec<_> = encoded
                .iter()
                .map(|b| delta::decode_packed(b.as_slice(), &limits).unwrap())
                .collect();
            let decoded: Vec<_> = encoded
                .iter()
                .map(|b| delta::decode(b, &limits).unwrap())
                .collect();
            let tokens: Vec<u64> = (0..n).map(|_| rng.random_range(1..5000)).collect();
            let (fast, reference) = (streamed(&packed, &tokens), weighted(&decoded, &tokens));
            for rule in rules() {
                let got = aggregate(rule, &fast).unwrap();
                let want = plain::aggregate(rule, &reference).unwrap();
                if matches!(rule, AggregationRule::CenteredClipping { .. }) {
                    let diff = max_difference(&got, &want);
                    assert!(diff <= 1e-6, "{rule:?}, {n} deltas: {diff}");
                } else {
                    assert_eq!(got, want, "{rule:?}, {n} deltas");
                }
            }
            assert_eq!(
                coordinate_median(&fast).unwrap(),
                plain::coordinate_median(&reference).unwrap(),
                "median, {n} deltas"
            );
        }
    }

    /// The same on `f32` tensors read directly, with values of very different sizes.
    #[test]
    fn plain_tensors_give_the_plain_results() {
        let mut rng = StdRng::seed_from_u64(2);
        let deltas: Vec<_> = (0..9)
            .map(|i| random_delta(&mut rng, 10f32.powi(i - 4)))
            .collect();
        let tokens = [5, 1, 9, 2, 2, 8, 100, 3, 1];
        let (fast, reference) = (streamed(&deltas, &tokens), weighted(&deltas, &tokens));
        for rule in rules() {
            let got = aggregate(rule, &fast).unwrap();
            let want = plain::aggregate(rule, &reference).unwrap();
            let diff = max_difference(&got, &want);
            assert!(diff <= 1e-6, "{rule:?}: {diff}");
            if !matches!(rule, AggregationRule::CenteredClipping { .. }) {
                assert_eq!(got, want, "{rule:?}");
            }
        }
    }

    /// Values from {-1, -0, 0, 1, 2} only, so the trimmed ranks fall inside runs of equal
    /// values: which of the equal values survive (the plain function's tie order, by delta)
    /// decides the weighted result.
    #[test]
    fn ties_at_the_trim_boundaries_follow_delta_order() {
        let mut rng = StdRng::seed_from_u64(6);
        let choices = [-1.0, -0.0, 0.0, 1.0, 2.0];
        for n in (3..=13).chain([64, 65, 66, 99, 100]) {
            let deltas: Vec<NamedTensors> = (0..n)
                .map(|_| {
                    let data = (0..50).map(|_| choices[rng.random_range(0..5)]).collect();
                    [("w".to_owned(), HostTensor::new(vec![5, 10], data).unwrap())].into()
                })
                .collect();
            let tokens: Vec<u64> = (0..n).map(|_| rng.random_range(1..100)).collect();
            let (fast, reference) = (streamed(&deltas, &tokens), weighted(&deltas, &tokens));
            for trim_fraction in [0.1, 0.2, 0.3, 0.45] {
                assert_eq!(
                    trimmed_mean(&fast, trim_fraction).unwrap(),
                    plain::trimmed_mean(&reference, trim_fraction).unwrap(),
                    "{n} deltas, trim {trim_fraction}"
                );
            }
            assert_eq!(
                coordinate_median(&fast).unwrap(),
                plain::coordinate_median(&reference).unwrap(),
                "{n} deltas"
            );
        }
    }

    /// Int8 deltas of 330,000 values: segments of several blocks, blocks across tensors.
    #[test]
    fn large_deltas_cross_blocks_and_segments() {
        let mut rng = StdRng::seed_from_u64(5);
        let layout = [
            ("a", vec![8, 20_000]),
            ("b", vec![20_000, 8]),
            ("c", vec![10_000]),
        ];
        for n in [3, 6] {
            let encoded: Vec<Vec<u8>> = (0..n)
                .map(|_| {
                    let d: NamedTensors = layout
                        .iter()
                        .map(|(name, shape)| {
                            let len = shape.iter().product();
                            let data = (0..len).map(|_| rng.random::<f32>() - 0.5).collect();
                            (
                                name.to_string(),
                                HostTensor::new(shape.clone(), data).unwrap(),
                            )
                        })
                        .collect();
                    delta::encode(&d, DeltaEncoding::Int8RowWise).unwrap()
                })
                .collect();
            let limits = DecodeLimits::default();
            let decoded: Vec<_> = encoded
                .iter()
                .map(|b| delta::decode(b, &limits).unwrap())
                .collect();
            let packed: Vec<_> = encoded
                .into_iter()
                .map(|b| delta::decode_packed(b, &limits).unwrap())
                .collect();
            let tokens: Vec<u64> = (1..=n).collect();
            let (fast, reference) = (streamed(&packed, &tokens), weighted(&decoded, &tokens));
            for rule in rules() {
                let got = aggregate(rule, &fast).unwrap();
                let want = plain::aggregate(rule, &reference).unwrap();
                let diff = max_difference(&got, &want);
                assert!(diff <= 1e-6, "{rule:?}, {n} deltas: {diff}");
                if !matches!(rule, AggregationRule::CenteredClipping { .. }) {
                    assert_eq!(got, want, "{rule:?}, {n} deltas");
                }
            }
        }
    }

    /// One delta in eleven is ×1000 on every value: the trimmed mean and the median stay
    /// within the honest deltas' range, where the plain mean is thrown far outside it.
    #[test]
    fn one_outlier_moves_the_robust_rules_only_a_little() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut deltas: Vec<_> = (0..11).map(|_| random_delta(&mut rng, 1.0)).collect();
        for t in deltas[4].values_mut() {
            t.data.iter_mut().for_each(|v| *v = 1000.0 * *v + 500.0);
        }
        let tokens = [1000; 11];
        let inputs = streamed(&deltas, &tokens);
        let honest_bound = |out: &NamedTensors| {
            out.values()
                .flat_map(|t| t.data.iter())
                .fold(0.0f32, |m, v| m.max(v.abs()))
        };
        let trimmed = trimmed_mean(&inputs, 0.1).unwrap();
        let median = coordinate_median(&inputs).unwrap();
        let mean = token_weighted_mean(&inputs).unwrap();
        assert!(honest_bound(&trimmed) <= 1.0, "{}", honest_bound(&trimmed));
        assert!(honest_bound(&median) <= 1.0, "{}", honest_bound(&median));
        assert!(honest_bound(&mean) >= 40.0, "{}", honest_bound(&mean));
    }

    /// The same inputs give the same bits on 1 and 3 threads, and in repeated runs.
    #[test]
    fn results_do_not_depend_on_threads() {
        let mut rng = StdRng::seed_from_u64(4);
        let deltas: Vec<_> = (0..25).map(|_| random_delta(&mut rng, 1.0)).collect();
        let tokens: Vec<u64> = (1..=25).collect();
        let inputs = streamed(&deltas, &tokens);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                rules()
                    .into_iter()
                    .map(|rule| aggregate(rule, &inputs).unwrap())
                    .collect::<Vec<_>>()
            })
        };
        let one = run(1);
        assert_eq!(one, run(3));
        assert_eq!(one, run(3));
    }

    #[test]
    fn rank_keys_order_as_total_cmp() {
        let values = [
            f32::NEG_INFINITY,
            -1e30,
            -1.0,
            -f32::MIN_POSITIVE,
            -0.0,
            0.0,
            1e-45,
            2.5,
            f32::MAX,
            f32::INFINITY,
        ];
        for pair in values.windows(2) {
            assert!(rank_key(pair[0]) < rank_key(pair[1]), "{pair:?}");
        }
        for v in values {
            assert_eq!(from_rank_key(rank_key(v)).to_bits(), v.to_bits());
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let one: NamedTensors = [("w".to_owned(), HostTensor::zeros(vec![2]))].into();
        let other: NamedTensors = [("v".to_owned(), HostTensor::zeros(vec![2]))].into();
        let mismatched = [one.clone(), other];
        assert!(matches!(
            token_weighted_mean(&streamed(&mismatched, &[1, 1])),
            Err(AggregateError::Layout { index: 1 })
        ));
        let mut inconsistent = one.clone();
        inconsistent.get_mut("w").unwrap().data.push(1.0);
        assert!(matches!(
            coordinate_median(&streamed(&[inconsistent], &[1])),
            Err(AggregateError::Layout { index: 0 })
        ));
        assert!(matches!(
            token_weighted_mean(&[]),
            Err(AggregateError::Empty)
        ));
        let two = [one.clone(), one];
        assert!(matches!(
            trimmed_mean(&streamed(&two, &[1, 0]), 0.1),
            Err(AggregateError::ZeroTokens { index: 1 })
        ));
        assert!(matches!(
            trimmed_mean(&streamed(&two, &[1, 1]), 0.5),
            Err(AggregateError::InvalidTrim(_))
        ));
        assert!(matches!(
            centered_clipping(&streamed(&two, &[1, 1]), f64::NAN, 1),
            Err(AggregateError::InvalidTau(_))
        ));
    }
}
