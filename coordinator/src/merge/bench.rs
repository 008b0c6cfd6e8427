//! `swarmtune bench merge`: what a round's merge costs the coordinator, for N int8 deltas of a
//! module of about 5M LoRA parameters (SmolLM2-135M's shape, rank 16 on all seven linear
//! layers of every block). Each delta is verified as the engine verifies a blob
//! ([`verify::open_delta`]: BLAKE3 against its content id, decoded within the lease's limits,
//! the adapter's layout, finite values; then [`verify::check_packed_norm`]), and the lot is
//! merged by [`super::merge`] (the job's rule, then the outer step), the code `close_round`
//! runs. The yardstick, timed in the same run, is reading the same bytes from memory.

use std::hint::black_box;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::Serialize;
use swarmtune_protocol::v1;
use swarmtune_trainer::bench::peak_rss_bytes;
use swarmtune_trainer::delta::{self, DeltaEncoding};
use swarmtune_trainer::tensors::{HostTensor, NamedTensors};

use super::{Contribution, merge};
use crate::verify;

/// SmolLM2-135M: hidden size, key/value width (3 heads of 64), MLP width, blocks.
const HIDDEN: usize = 576;
const KV: usize = 192;
const INTERMEDIATE: usize = 1536;
const LAYERS: usize = 30;
/// Scale of the common direction and of each volunteer's own noise, per value.
const SIGNAL: f32 = 1e-3;
const NOISE: f32 = 1e-3;

/// What to measure.
#[derive(Clone, Debug)]
pub struct MergeBench {
    /// Numbers of deltas, measured in this order (the deltas of a smaller count are reused).
    pub counts: Vec<usize>,
    /// Rules measured at each count.
    pub rules: Vec<BenchRule>,
    /// LoRA rank (16 gives 4.9M parameters).
    pub rank: usize,
}

/// An aggregation rule, with the settings of `examples/job.toml` where it has them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchRule {
    /// Token-weighted mean.
    Mean,
    /// Trimmed mean dropping 20% at each end: the default rule of a job.
    TrimmedMean,
    /// Coordinate-wise median.
    Median,
    /// Centered clipping around the median, tau 1, 3 iterations.
    CenteredClipping,
}

impl std::str::FromStr for BenchRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mean" => Ok(Self::Mean),
            "trimmed-mean" => Ok(Self::TrimmedMean),
            "median" => Ok(Self::Median),
            "centered-clipping" => Ok(Self::CenteredClipping),
            other => Err(format!(
                "unknown rule {other:?}: use mean, trimmed-mean, median or centered-clipping"
            )),
        }
    }
}

impl BenchRule {
    /// The name as a job file writes it, with its settings.
    pub fn label(self) -> &'static str {
        match self {
            Self::Mean => "mean",
            Self::TrimmedMean => "trimmed-mean 0.2",
            Self::Median => "median",
            Self::CenteredClipping => "centered-clipping τ 1, 3 iterations",
        }
    }

    /// The job's outer settings for this rule (learning rate and momentum of the example).
    fn outer(self) -> v1::OuterSettings {
        use v1::AggregationRule as R;
        let base = v1::OuterSettings {
            learning_rate: 0.7,
            momentum: 0.9,
            ..Default::default()
        };
        match self {
            Self::Mean => v1::OuterSettings {
                aggregation: R::Mean as i32,
                ..base
            },
            Self::TrimmedMean => v1::OuterSettings {
                aggregation: R::TrimmedMean as i32,
                trim_fraction: 0.2,
                ..base
            },
            Self::Median => v1::OuterSettings {
                aggregation: R::Median as i32,
                ..base
            },
            // An honest delta lies about NOISE/√3 · √params ≈ 1.3 from the median.
            Self::CenteredClipping => v1::OuterSettings {
                aggregation: R::CenteredClipping as i32,
                clip_tau: 1.0,
                clip_iterations: 3,
                ..base
            },
        }
    }
}

/// One measured merge.
#[derive(Clone, Debug, Serialize)]
pub struct MergeBenchRow {
    /// The rule and its settings.
    pub rule: String,
    /// Number of deltas.
    pub deltas: usize,
    /// Their encoded size, in bytes, all together.
    pub delta_bytes: u64,
    /// Verifying every delta, milliseconds.
    pub verify_ms: f64,
    /// Of which hashing alone (BLAKE3 of every blob, measured separately), milliseconds.
    pub hash_ms: f64,
    /// The merge (aggregation and outer step), milliseconds.
    pub aggregate_ms: f64,
    /// Verify plus merge, milliseconds.
    pub total_ms: f64,
    /// Reading the same bytes from memory (the fastest of three), milliseconds.
    pub yardstick_ms: f64,
    /// `total_ms / yardstick_ms`.
    pub ratio: f64,
    /// The process's peak resident memory during this merge, bytes (0 where unknown).
    pub peak_rss_bytes: u64,
}

/// The whole run; `--json` prints it as one object.
#[derive(Clone, Debug, Serialize)]
pub struct MergeBenchReport {
    /// The module's shape.
    pub module: String,
    /// LoRA parameters of the module.
    pub parameters: usize,
    /// Encoded size of one delta, bytes.
    pub bytes_per_delta: u64,
    /// Threads of the pool the run used.
    pub threads: usize,
    /// One row per count and rule.
    pub rows: Vec<MergeBenchRow>,
}

/// Why the benchmark stopped.
#[derive(Debug, thiserror::Error)]
pub enum MergeBenchError {
    /// Nothing to measure.
    #[error("give at least one delta count (each ≥ 1) and one rule")]
    Nothing,
    /// A generated delta did not pass verification or the merge failed: a bug.
    #[error("{0}")]
    Failed(String),
}

/// Runs the benchmark on the current rayon pool, reporting progress through `progress`.
pub fn run(
    b: &MergeBench,
    progress: &mut dyn FnMut(&str),
) -> Result<MergeBenchReport, MergeBenchError> {
    if b.counts.is_empty() || b.counts.contains(&0) || b.rules.is_empty() || b.rank == 0 {
        return Err(MergeBenchError::Nothing);
    }
    let layout = module_layout(b.rank);
    let parameters = layout.values().map(|t| t.len()).sum();
    let truth = random_tensors(&layout, u64::MAX, SIGNAL);
    let policy = v1::VerificationPolicy {
        max_delta_norm: 100.0,
        ..Default::default()
    };
    let lease = v1::Lease {
        max_delta_bytes: 64 << 20,
        delta_encoding: v1::DeltaEncoding::Int8Rowwise as i32,
        ..Default::default()
    };
    let mut blobs: Vec<Vec<u8>> = Vec::new();
    let mut rows = Vec::new();
    for &n in &b.counts {
        if blobs.len() < n {
            progress(&format!("encoding {} more deltas", n - blobs.len()));
            let more: Result<Vec<Vec<u8>>, MergeBenchError> = (blobs.len()..n)
                .into_par_iter()
                .map(|i| volunteer_delta(&truth, i as u64))
                .collect();
            blobs.extend(more?);
        }
        let envelopes: Vec<v1::DeltaEnvelope> =
            blobs[..n].iter().map(|bytes| envelope(bytes)).collect();
        for &rule in &b.rules {
            progress(&format!("{n} deltas, {}", rule.label()));
            reset_peak_rss();
            let yardstick_ms = (0..3)
                .map(|_| timed(|| black_box(read_all(&blobs[..n]))).0)
                .fold(f64::INFINITY, f64::min);
            let hash_ms = timed(|| {
                blobs[..n]
                    .par_iter()
                    .map(|b| blake3::hash(b))
                    .for_each(|h| {
                        black_box(h);
                    })
            })
            .0;

            let (verify_ms, opened) = timed(|| {
                blobs
                    .drain(..n)
                    .collect::<Vec<_>>()
                    .into_par_iter()
                    .zip(&envelopes)
                    .enumerate()
                    .map(|(i, (bytes, env))| {
                        let delta = verify::open_delta(bytes, env, &lease, &layout)
                            .map_err(|r| MergeBenchError::Failed(format!("delta {i}: {r}")))?;
                        verify::check_packed_norm(&delta, &policy)
                            .map_err(|r| MergeBenchError::Failed(format!("delta {i}: {r}")))?;
                        // The example job's lease (25 steps of 16 × 64 tokens), with weights
                        // that differ from delta to delta.
                        Ok(Contribution {
                            lease_id: i as u64,
                            peer: (i as u64).to_le_bytes().to_vec(),
                            tokens: 25 * 16 * 64,
                            target_tokens: 10_000 + 7 * i as u64,
                            delta,
                        })
                    })
                    .collect::<Result<Vec<_>, MergeBenchError>>()
            });
            let mut contributions = opened?;
            let (aggregate_ms, merged) = timed(|| {
                merge(
                    &layout,
                    NamedTensors::new(),
                    &mut contributions,
                    &rule.outer(),
                )
            });
            let merged = merged.map_err(|e| MergeBenchError::Failed(e.to_string()))?;
            black_box(merged);
            let peak = peak_rss_bytes();
            // The blobs go back, in their order, for the next rule and count.
            let returned: Vec<Vec<u8>> = contributions
                .into_iter()
                .map(|c| c.delta.into_bytes())
                .collect();
            blobs.splice(..0, returned);

            let total_ms = verify_ms + aggregate_ms;
            rows.push(MergeBenchRow {
                rule: rule.label().to_owned(),
                deltas: n,
                delta_bytes: blobs[..n].iter().map(|b| b.len() as u64).sum(),
                verify_ms,
                hash_ms,
                aggregate_ms,
                total_ms,
                yardstick_ms,
                ratio: total_ms / yardstick_ms,
                peak_rss_bytes: peak,
            });
        }
    }
    Ok(MergeBenchReport {
        module: format!(
            "SmolLM2-135M shape, LoRA rank {} on q, k, v, o, gate, up, down of {LAYERS} blocks",
            b.rank
        ),
        parameters,
        bytes_per_delta: blobs.first().map_or(0, |b| b.len() as u64),
        threads: rayon::current_num_threads(),
        rows,
    })
}

/// Zeros in the adapter's layout: PEFT names, `lora_A` `[rank, in]` and `lora_B` `[out, rank]`.
fn module_layout(rank: usize) -> NamedTensors {
    let projections = [
        ("self_attn.q_proj", HIDDEN, HIDDEN),
        ("self_attn.k_proj", HIDDEN, KV),
        ("self_attn.v_proj", HIDDEN, KV),
        ("self_attn.o_proj", HIDDEN, HIDDEN),
        ("mlp.gate_proj", HIDDEN, INTERMEDIATE),
        ("mlp.up_proj", HIDDEN, INTERMEDIATE),
        ("mlp.down_proj", INTERMEDIATE, HIDDEN),
    ];
    let mut layout = NamedTensors::new();
    for layer in 0..LAYERS {
        for (name, fan_in, fan_out) in projections {
            let prefix = format!("base_model.model.model.layers.{layer}.{name}");
            layout.insert(
                format!("{prefix}.lora_A.weight"),
                HostTensor::zeros(vec![rank, fan_in]),
            );
            layout.insert(
                format!("{prefix}.lora_B.weight"),
                HostTensor::zeros(vec![fan_out, rank]),
            );
        }
    }
    layout
}

/// Values uniform in `[-scale, scale]` in the layout of `layout`, from `seed`.
fn random_tensors(layout: &NamedTensors, seed: u64, scale: f32) -> NamedTensors {
    let mut rng = StdRng::seed_from_u64(seed);
    layout
        .iter()
        .map(|(name, t)| {
            let data = (0..t.len())
                .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
                .collect();
            (
                name.clone(),
                HostTensor {
                    shape: t.shape.clone(),
                    data,
                },
            )
        })
        .collect()
}

/// Volunteer `i`'s encoded delta: the common direction plus noise of its own.
fn volunteer_delta(truth: &NamedTensors, i: u64) -> Result<Vec<u8>, MergeBenchError> {
    let mut delta = random_tensors(truth, i, NOISE);
    for (d, t) in delta.values_mut().zip(truth.values()) {
        d.data.iter_mut().zip(&t.data).for_each(|(d, t)| *d += t);
    }
    delta::encode(&delta, DeltaEncoding::Int8RowWise)
        .map_err(|e| MergeBenchError::Failed(e.to_string()))
}

/// The envelope fields `open_delta` checks the blob against.
fn envelope(bytes: &[u8]) -> v1::DeltaEnvelope {
    v1::DeltaEnvelope {
        delta: Some(v1::ContentId {
            blake3: blake3::hash(bytes).as_bytes().to_vec(),
        }),
        delta_bytes: bytes.len() as u64,
        ..Default::default()
    }
}

/// The yardstick: every byte read from memory once, as little-endian `u64` words summed, on
/// the same threads as the merge.
fn read_all(blobs: &[Vec<u8>]) -> u64 {
    blobs
        .par_iter()
        .map(|bytes| {
            let (words, rest) = bytes.as_chunks::<8>();
            let sum = words
                .iter()
                .fold(0u64, |s, w| s.wrapping_add(u64::from_le_bytes(*w)));
            rest.iter().fold(sum, |s, &b| s.wrapping_add(u64::from(b)))
        })
        .reduce(|| 0, u64::wrapping_add)
}

/// Milliseconds `f` took, and what it returned.
fn timed<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let clock = Instant::now();
    let out = f();
    (clock.elapsed().as_secs_f64() * 1e3, out)
}

/// Restarts the kernel's peak-RSS count (`VmHWM`) from the current RSS, where Linux allows
/// it, so each row's peak is its own.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_run_verifies_merges_and_reports_every_row() {
        let bench = MergeBench {
            counts: vec![2, 5],
            rules: vec![BenchRule::TrimmedMean, BenchRule::CenteredClipping],
            rank: 1,
        };
        let report = run(&bench, &mut |_| {}).unwrap();
        // Rank 1: 30 blocks × (in + out summed over the seven projections).
        assert_eq!(
            report.parameters,
            LAYERS * (5 * HIDDEN + INTERMEDIATE + 4 * HIDDEN + 2 * KV + 2 * INTERMEDIATE)
        );
        assert_eq!(report.rows.len(), 4);
        for row in &report.rows {
            assert_eq!(row.delta_bytes, row.deltas as u64 * report.bytes_per_delta);
            assert!(row.total_ms >= row.aggregate_ms && row.yardstick_ms > 0.0);
        }
        assert_eq!(
            (report.rows[3].deltas, report.rows[3].rule.as_str()),
            (5, BenchRule::CenteredClipping.label())
        );
    }
}
