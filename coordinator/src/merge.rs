//! A round's merge (issue 6, point 4): the verified deltas, in lease order, aggregated by the
//! job's rule (token-weighted; robust rules so a minority of bad deltas cannot steer it), the
//! DiLoCo outer step with Nesterov momentum, and the benchmark gate that decides whether the
//! result becomes a new module version. The math is the trainer's; this module applies the
//! job's settings to it.
//!
//! The deltas stay packed as they arrived (int8: one byte a value) and are aggregated a block
//! of coordinates at a time ([`blockwise`]), so a merge of N deltas needs about N encoded
//! deltas of memory, not N `f32` copies. [`bench`] measures it (`swarmtune bench merge`).

pub mod bench;

use swarmtune_protocol::v1;
use swarmtune_trainer::aggregate::blockwise::{self, StreamedDelta};
use swarmtune_trainer::aggregate::{AggregateError, AggregationRule, OuterOptimizer};
use swarmtune_trainer::delta::PackedDelta;
use swarmtune_trainer::tensors::NamedTensors;

/// One verified delta of the round.
#[derive(Clone, Debug)]
pub struct Contribution {
    /// Its lease (the merge takes deltas in lease order, so a merge is reproducible).
    pub lease_id: u64,
    /// Its volunteer (PeerId bytes).
    pub peer: Vec<u8>,
    /// Tokens fed through the model (`DeltaEnvelope.tokens`), for the contributors list.
    pub tokens: u64,
    /// Tokens in the loss (`DeltaEnvelope.target_tokens`): its weight.
    pub target_tokens: u64,
    /// The verified delta, `start − end`, still packed (see [`crate::verify::open_delta`]).
    pub delta: PackedDelta,
}

/// What a merge produced.
#[derive(Clone, Debug, PartialEq)]
pub struct Merged {
    /// The candidate adapter tensors.
    pub params: NamedTensors,
    /// The outer optimizer's momentum after the step, to persist.
    pub momentum: NamedTensors,
    /// The aggregated pseudo-gradient's Euclidean norm.
    pub update_norm: f64,
}

/// Why a merge could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// The job's outer settings are not usable (validation should have refused them).
    #[error("the job's outer settings: {0}")]
    Settings(String),
    /// The math refused the inputs.
    #[error(transparent)]
    Aggregate(#[from] AggregateError),
}

/// The trainer's rule for the job's `OuterSettings` (`None` for the median, which the
/// trainer offers as a function of its own).
pub fn rule(outer: &v1::OuterSettings) -> Result<Option<AggregationRule>, MergeError> {
    use v1::AggregationRule as R;
    match outer.aggregation() {
        R::Mean => Ok(Some(AggregationRule::Mean)),
        R::TrimmedMean => Ok(Some(AggregationRule::TrimmedMean {
            trim_fraction: outer.trim_fraction,
        })),
        R::Median => Ok(None),
        R::CenteredClipping => Ok(Some(AggregationRule::CenteredClipping {
            tau: outer.clip_tau,
            iterations: outer.clip_iterations as usize,
        })),
        R::Unspecified => Err(MergeError::Settings("no aggregation rule".into())),
    }
}

/// Aggregates `contributions` (sorted here by lease id) by the job's rule and takes the outer
/// step from `start` with the persisted `momentum` (empty for the first merge).
pub fn merge(
    start: &NamedTensors,
    momentum: NamedTensors,
    contributions: &mut [Contribution],
    outer: &v1::OuterSettings,
) -> Result<Merged, MergeError> {
    contributions.sort_by_key(|c| c.lease_id);
    let weighted: Vec<StreamedDelta<'_>> = contributions
        .iter()
        .map(|c| StreamedDelta {
            delta: &c.delta,
            tokens: c.target_tokens,
        })
        .collect();
    let update = match rule(outer)? {
        Some(rule) => blockwise::aggregate(rule, &weighted)?,
        None => blockwise::coordinate_median(&weighted)?,
    };
    let mut optimizer =
        OuterOptimizer::from_state(outer.learning_rate, outer.momentum, true, momentum)?;
    let params = optimizer.step(start, &update)?;
    Ok(Merged {
        params,
        momentum: optimizer.momentum_buffer().clone(),
        update_norm: swarmtune_trainer::tensors::norm(&update),
    })
}

/// The benchmark gate: a merge is published only if its eval loss is at most the current
/// version's plus the job's allowance.
pub fn passes_gate(
    candidate_loss: f64,
    current_loss: f64,
    gate: Option<&v1::BenchmarkGate>,
) -> bool {
    let allowance = gate.map_or(0.0, |g| g.max_eval_loss_regression);
    candidate_loss.is_finite() && candidate_loss <= current_loss + allowance
}

/// The contributors of a merge for its manifest: one entry per volunteer, largest token
/// count first (ties by PeerId bytes), at most 1024.
pub fn contributors(contributions: &[Contribution]) -> Vec<v1::Contributor> {
    let mut by_peer: std::collections::BTreeMap<&[u8], (u64, u32)> = Default::default();
    for c in contributions {
        let entry = by_peer.entry(&c.peer).or_default();
        entry.0 += c.tokens;
        entry.1 += 1;
    }
    let mut out: Vec<v1::Contributor> = by_peer
        .into_iter()
        .map(|(peer, (tokens, deltas))| v1::Contributor {
            peer_id: peer.to_vec(),
            tokens,
            deltas,
        })
        .collect();
    out.sort_by(|a, b| b.tokens.cmp(&a.tokens).then(a.peer_id.cmp(&b.peer_id)));
    out.truncate(1024);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use swarmtune_trainer::delta::{self, DecodeLimits, DeltaEncoding};
    use swarmtune_trainer::tensors::HostTensor;

    fn tensors(values: &[f32]) -> NamedTensors {
        NamedTensors::from([(
            "w".to_string(),
            HostTensor {
                shape: vec![values.len()],
                data: values.to_vec(),
            },
        )])
    }

    fn contribution(lease_id: u64, peer: u8, values: &[f32]) -> Contribution {
        let bytes = delta::encode(&tensors(values), DeltaEncoding::F32).unwrap();
        Contribution {
            lease_id,
            peer: vec![peer],
            tokens: 100,
            target_tokens: 90,
            delta: delta::decode_packed(bytes, &DecodeLimits::default()).unwrap(),
        }
    }

    fn outer(rule: v1::AggregationRule, trim: f32) -> v1::OuterSettings {
        v1::OuterSettings {
            learning_rate: 1.0,
            momentum: 0.0,
            aggregation: rule as i32,
            trim_fraction: trim,
            ..Default::default()
        }
    }

    #[test]
    fn a_trimmed_mean_merge_ignores_one_wild_delta_in_five() {
        let start = tensors(&[1.0, 1.0]);
        let mut honest: Vec<Contribution> = (0..4)
            .map(|i| contribution(i, i as u8, &[0.1, -0.1]))
            .collect();
        honest.push(contribution(9, 9, &[100.0, 100.0]));
        let merged = merge(
            &start,
            NamedTensors::new(),
            &mut honest,
            &outer(v1::AggregationRule::TrimmedMean, 0.2),
        )
        .unwrap();
        assert_eq!(merged.params["w"].data, vec![0.9, 1.1]);

        // The plain mean is pulled far away by the same delta.
        let mean = merge(
            &start,
            NamedTensors::new(),
            &mut honest,
            &outer(v1::AggregationRule::Mean, 0.0),
        )
        .unwrap();
        assert!(mean.params["w"].data[0] < -15.0);
    }

    #[test]
    fn momentum_carries_into_the_next_merge_and_the_gate_decides() {
        let start = tensors(&[0.0]);
        let settings = v1::OuterSettings {
            momentum: 0.5,
            ..outer(v1::AggregationRule::Median, 0.0)
        };
        let first = merge(
            &start,
            NamedTensors::new(),
            &mut [contribution(1, 1, &[1.0])],
            &settings,
        )
        .unwrap();
        // Nesterov: u = g + mu * m = 1 + 0.5 = 1.5.
        assert_eq!(first.params["w"].data, vec![-1.5]);
        let second = merge(
            &first.params,
            first.momentum.clone(),
            &mut [contribution(2, 1, &[1.0])],
            &settings,
        )
        .unwrap();
        // m = 0.5 * 1 + 1 = 1.5; u = 1 + 0.75 = 1.75.
        assert_eq!(second.params["w"].data, vec![-3.25]);

        assert!(passes_gate(2.0, 2.0, None));
        assert!(!passes_gate(2.01, 2.0, None));
        let lenient = v1::BenchmarkGate {
            max_eval_loss_regression: 0.05,
        };
        assert!(passes_gate(2.04, 2.0, Some(&lenient)));
        assert!(!passes_gate(f64::NAN, 2.0, Some(&lenient)));
    }

    #[test]
    fn contributors_are_summed_per_peer_largest_first() {
        let c = [
            contribution(1, 2, &[0.0]),
            contribution(2, 1, &[0.0]),
            contribution(3, 2, &[0.0]),
        ];
        let list = contributors(&c);
        assert_eq!(list.len(), 2);
        assert_eq!(
            (list[0].peer_id.as_slice(), list[0].tokens, list[0].deltas),
            (&[2u8][..], 200, 2)
        );
        assert_eq!(
            (list[1].peer_id.as_slice(), list[1].tokens),
            (&[1u8][..], 100)
        );
    }
}
