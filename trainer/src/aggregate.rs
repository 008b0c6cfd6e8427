//! Aggregation math for a round's merge: combining the verified deltas (pseudo-gradients) of
//! many volunteers into one, robustly enough that a minority of bad deltas cannot steer it, and
//! the DiLoCo outer step that applies the result to the module with Nesterov momentum.
//!
//! Every loop runs in canonical order (tensor names, then values, then deltas in the order
//! given) with `f64` accumulation, so the same deltas in the same order give the same bits on
//! every machine. Callers that want order independence pass deltas in a canonical order (for
//! example by lease id).
//!
//! The functions here are the plain definitions, over deltas decoded to `f32`. A merge of many
//! deltas uses [`blockwise`]: the same rules and results, computed a block of coordinates at a
//! time from deltas kept packed, in memory proportional to one delta.

pub mod blockwise;

use crate::tensors::{HostTensor, NamedTensors, same_layout};

/// One volunteer's delta and the number of tokens it was trained on (its weight).
#[derive(Clone, Copy, Debug)]
pub struct WeightedDelta<'a> {
    /// The pseudo-gradient, `start − end` of the LoRA tensors.
    pub delta: &'a NamedTensors,
    /// Tokens trained on; must be positive.
    pub tokens: u64,
}

/// Why deltas could not be aggregated or an outer step taken.
#[derive(thiserror::Error, Debug, PartialEq)]
pub enum AggregateError {
    /// Nothing to aggregate.
    #[error("no deltas to aggregate")]
    Empty,
    /// A delta's names or shapes differ from the first delta's.
    #[error("delta {index} does not have the tensor names and shapes of delta 0")]
    Layout {
        /// Position of the offending delta.
        index: usize,
    },
    /// A delta claims zero tokens, so it has no weight.
    #[error("delta {index} was trained on zero tokens")]
    ZeroTokens {
        /// Position of the offending delta.
        index: usize,
    },
    /// A trim fraction outside `[0, 0.5)`.
    #[error("trim fraction {0} is not in [0, 0.5)")]
    InvalidTrim(f32),
    /// A clipping radius that is not positive and finite.
    #[error("clipping radius tau {0} is not positive and finite")]
    InvalidTau(f64),
    /// Outer learning rate or momentum out of range.
    #[error(
        "outer optimizer needs a finite lr > 0 and momentum in [0, 1), got lr {lr}, momentum {momentum}"
    )]
    InvalidHyperparameters {
        /// The learning rate given.
        lr: f32,
        /// The momentum given.
        momentum: f32,
    },
    /// Params, pseudo-gradient and momentum buffer do not share names and shapes.
    #[error("{0} does not have the tensor names and shapes of the params")]
    OuterLayout(&'static str),
}

/// How a round's deltas are combined.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AggregationRule {
    /// Token-weighted mean: efficient, not robust.
    Mean,
    /// Coordinate-wise trimmed mean (see [`trimmed_mean`]).
    TrimmedMean {
        /// Share of deltas dropped at each end of every coordinate, in `[0, 0.5)`.
        trim_fraction: f32,
    },
    /// Centered clipping around the coordinate-wise median (see [`centered_clipping`]).
    CenteredClipping {
        /// Clipping radius, in the units of the delta's Euclidean norm.
        tau: f64,
        /// Number of clipping iterations; 1 to 3 is typical.
        iterations: usize,
    },
}

/// Aggregates with `rule`; centered clipping starts from the coordinate-wise median.
pub fn aggregate(
    rule: AggregationRule,
    deltas: &[WeightedDelta],
) -> Result<NamedTensors, AggregateError> {
    match rule {
        AggregationRule::Mean => token_weighted_mean(deltas),
        AggregationRule::TrimmedMean { trim_fraction } => trimmed_mean(deltas, trim_fraction),
        AggregationRule::CenteredClipping { tau, iterations } => {
            let center = coordinate_median(deltas)?;
            centered_clipping(deltas, &center, tau, iterations)
        }
    }
}

/// The mean of the deltas, each weighted by its share of the tokens.
pub fn token_weighted_mean(deltas: &[WeightedDelta]) -> Result<NamedTensors, AggregateError> {
    let weights = normalized_weights(deltas)?;
    Ok(map_coordinates(deltas, |column| {
        column
            .iter()
            .zip(&weights)
            .map(|(&x, &w)| w * f64::from(x))
            .sum()
    }))
}

/// Coordinate-wise trimmed mean. For each value position, the `floor(trim_fraction · n)`
/// smallest and as many largest values are dropped (ties in delta order) and the rest are
/// averaged weighted by their tokens, summed in delta order. Since the fraction is below 0.5
/// at least one value survives; trim 0 is the token-weighted mean.
pub fn trimmed_mean(
    deltas: &[WeightedDelta],
    trim_fraction: f32,
) -> Result<NamedTensors, AggregateError> {
    if !(0.0..0.5).contains(&trim_fraction) {
        return Err(AggregateError::InvalidTrim(trim_fraction));
    }
    let weights = normalized_weights(deltas)?;
    let n = deltas.len();
    let trim = trim_count(trim_fraction, n);
    let mut order: Vec<usize> = (0..n).collect();
    let mut survives = vec![false; n];
    Ok(map_coordinates(deltas, |column| {
        order.sort_by(|&a, &b| column[a].total_cmp(&column[b]).then(a.cmp(&b)));
        survives.fill(false);
        for &i in &order[trim..n - trim] {
            survives[i] = true;
        }
        let survivors = || (0..n).filter(|&i| survives[i]);
        let weight: f64 = survivors().map(|i| weights[i]).sum();
        survivors()
            .map(|i| weights[i] * f64::from(column[i]))
            .sum::<f64>()
            / weight
    }))
}

/// How many of `n` values a trimmed mean drops at each end: `floor(trim_fraction · n)`, at
/// most `(n − 1) / 2`. The product is grown by a relative 2^-23 so that an `f32` fraction
/// stored just below its decimal value (0.35 is 0.34999999) still drops 7 of 20.
fn trim_count(trim_fraction: f32, n: usize) -> usize {
    let trim =
        (f64::from(trim_fraction) * n as f64 * (1.0 + f64::from(f32::EPSILON))).floor() as usize;
    trim.min(n.saturating_sub(1) / 2)
}

/// Coordinate-wise median, unweighted so a delta cannot pull it by claiming many tokens; with
/// an even count it is the midpoint of the two middle values. A robust center for clipping.
pub fn coordinate_median(deltas: &[WeightedDelta]) -> Result<NamedTensors, AggregateError> {
    check_layout(deltas)?;
    let n = deltas.len();
    let mut sorted = Vec::with_capacity(n);
    Ok(map_coordinates(deltas, |column| {
        sorted.clear();
        sorted.extend_from_slice(column);
        sorted.sort_by(f32::total_cmp);
        let upper = f64::from(sorted[n / 2]);
        if n % 2 == 1 {
            upper
        } else {
            (f64::from(sorted[n / 2 - 1]) + upper) / 2.0
        }
    }))
}

/// Centered clipping (Karimireddy, He and Jaggi, 2021): starting from `center`, repeat
/// `v ← v + Σ w_i · clip(x_i − v, tau)`, where `clip` scales the whole difference (all
/// tensors together) down to norm `tau` when it is longer and `w_i` are token shares. A delta
/// can move the result by at most `w_i · tau` per iteration, however large it is.
pub fn centered_clipping(
    deltas: &[WeightedDelta],
    center: &NamedTensors,
    tau: f64,
    iterations: usize,
) -> Result<NamedTensors, AggregateError> {
    if !(tau.is_finite() && tau > 0.0) {
        return Err(AggregateError::InvalidTau(tau));
    }
    let weights = normalized_weights(deltas)?;
    if !matches_layout(center, deltas[0].delta) {
        return Err(AggregateError::OuterLayout("the clipping center"));
    }
    let mut v = center.clone();
    for _ in 0..iterations {
        // Each delta's step weight: its token share times its clipping factor.
        let step_weights: Vec<f64> = deltas
            .iter()
            .zip(&weights)
            .map(|(d, &w)| {
                let distance = squared_distance(d.delta, &v).sqrt();
                if distance > tau {
                    w * tau / distance
                } else {
                    w
                }
            })
            .collect();
        for (name, tensor) in v.iter_mut() {
            let columns: Vec<&[f32]> = deltas
                .iter()
                .map(|d| d.delta[name].data.as_slice())
                .collect();
            for (j, value) in tensor.data.iter_mut().enumerate() {
                let current = f64::from(*value);
                let step: f64 = columns
                    .iter()
                    .zip(&step_weights)
                    .map(|(x, &c)| c * (f64::from(x[j]) - current))
                    .sum();
                *value = (current + step) as f32;
            }
        }
    }
    Ok(v)
}

/// The DiLoCo outer optimizer: SGD with (optionally Nesterov) momentum on the aggregated
/// pseudo-gradient. With `lr = 1` and `momentum = 0` a step lands on the mean of the
/// volunteers' end points.
#[derive(Clone, Debug, PartialEq)]
pub struct OuterOptimizer {
    lr: f32,
    momentum: f32,
    nesterov: bool,
    momentum_buffer: NamedTensors,
}

impl OuterOptimizer {
    /// A fresh optimizer with an empty (all-zero) momentum buffer.
    pub fn new(lr: f32, momentum: f32, nesterov: bool) -> Result<Self, AggregateError> {
        Self::from_state(lr, momentum, nesterov, NamedTensors::new())
    }

    /// An optimizer resuming from a persisted momentum buffer (empty means zeros).
    pub fn from_state(
        lr: f32,
        momentum: f32,
        nesterov: bool,
        momentum_buffer: NamedTensors,
    ) -> Result<Self, AggregateError> {
        if !(lr.is_finite() && lr > 0.0 && (0.0..1.0).contains(&momentum)) {
            return Err(AggregateError::InvalidHyperparameters { lr, momentum });
        }
        Ok(Self {
            lr,
            momentum,
            nesterov,
            momentum_buffer,
        })
    }

    /// The momentum buffer, to persist between rounds.
    pub fn momentum_buffer(&self) -> &NamedTensors {
        &self.momentum_buffer
    }

    /// One outer step: `m ← μ·m + g`; `u = g + μ·m` (Nesterov) or `m`; returns `params − lr·u`.
    /// `g` is `start − end`, so it points uphill like a gradient. On error nothing changes.
    pub fn step(
        &mut self,
        params: &NamedTensors,
        g: &NamedTensors,
    ) -> Result<NamedTensors, AggregateError> {
        if !matches_layout(params, g) {
            return Err(AggregateError::OuterLayout("the pseudo-gradient"));
        }
        if !self.momentum_buffer.is_empty() && !matches_layout(params, &self.momentum_buffer) {
            return Err(AggregateError::OuterLayout("the momentum buffer"));
        }
        let (lr, mu) = (self.lr, self.momentum);
        let mut momentum = NamedTensors::new();
        let mut updated = NamedTensors::new();
        for ((name, p), grad) in params.iter().zip(g.values()) {
            let previous = self.momentum_buffer.get(name).map(|m| m.data.as_slice());
            let mut m = grad.data.clone();
            let mut new_params = p.data.clone();
            for (j, (m_j, p_j)) in m.iter_mut().zip(new_params.iter_mut()).enumerate() {
                let g_j = *m_j;
                *m_j = mu * previous.map_or(0.0, |prev| prev[j]) + g_j;
                let u_j = if self.nesterov { g_j + mu * *m_j } else { *m_j };
                *p_j -= lr * u_j;
            }
            momentum.insert(
                name.clone(),
                HostTensor {
                    shape: p.shape.clone(),
                    data: m,
                },
            );
            updated.insert(
                name.clone(),
                HostTensor {
                    shape: p.shape.clone(),
                    data: new_params,
                },
            );
        }
        self.momentum_buffer = momentum;
        Ok(updated)
    }
}

/// Token shares `tokens_i / Σ tokens`, after checking the deltas are non-empty, share one
/// layout and all have tokens.
fn normalized_weights(deltas: &[WeightedDelta]) -> Result<Vec<f64>, AggregateError> {
    check_layout(deltas)?;
    token_shares(deltas.iter().map(|d| d.tokens))
}

/// `tokens_i / Σ tokens`, refusing a zero.
fn token_shares(tokens: impl Iterator<Item = u64> + Clone) -> Result<Vec<f64>, AggregateError> {
    if let Some(index) = tokens.clone().position(|t| t == 0) {
        return Err(AggregateError::ZeroTokens { index });
    }
    let total: u128 = tokens.clone().map(u128::from).sum();
    Ok(tokens.map(|t| t as f64 / total as f64).collect())
}

fn check_layout(deltas: &[WeightedDelta]) -> Result<(), AggregateError> {
    let first = deltas.first().ok_or(AggregateError::Empty)?;
    let consistent = first
        .delta
        .values()
        .all(|t| t.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) == Some(t.data.len()));
    if !consistent {
        return Err(AggregateError::Layout { index: 0 });
    }
    match deltas
        .iter()
        .position(|d| !matches_layout(first.delta, d.delta))
    {
        Some(index) => Err(AggregateError::Layout { index }),
        None => Ok(()),
    }
}

/// Same names and shapes, and the same number of values in each pair of tensors (the fields
/// are public, so shape and data could disagree).
fn matches_layout(a: &NamedTensors, b: &NamedTensors) -> bool {
    same_layout(a, b)
        && a.values()
            .zip(b.values())
            .all(|(x, y)| x.data.len() == y.data.len())
}

/// Builds a tensor map with the deltas' layout whose every value is `reduce` of that
/// position's values across deltas (in delta order). Layout must have been checked.
fn map_coordinates(
    deltas: &[WeightedDelta],
    mut reduce: impl FnMut(&[f32]) -> f64,
) -> NamedTensors {
    let mut column = Vec::with_capacity(deltas.len());
    let mut out = NamedTensors::new();
    for (name, first) in deltas[0].delta {
        let tensors: Vec<&[f32]> = deltas
            .iter()
            .map(|d| d.delta[name].data.as_slice())
            .collect();
        let data = (0..first.data.len())
            .map(|j| {
                column.clear();
                column.extend(tensors.iter().map(|t| t[j]));
                reduce(&column) as f32
            })
            .collect();
        out.insert(
            name.clone(),
            HostTensor {
                shape: first.shape.clone(),
                data,
            },
        );
    }
    out
}

/// `‖x − v‖²` over all tensors, accumulated in `f64` in canonical order.
fn squared_distance(x: &NamedTensors, v: &NamedTensors) -> f64 {
    x.values()
        .zip(v.values())
        .flat_map(|(a, b)| a.data.iter().zip(&b.data))
        .map(|(&a, &b)| {
            let d = f64::from(a) - f64::from(b);
            d * d
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensors::norm;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Two LoRA-shaped tensors (128 values) with values uniform in [-scale, scale].
    fn random_tensors(rng: &mut StdRng, scale: f32) -> NamedTensors {
        [
            ("a.lora_A.weight", vec![4, 16]),
            ("a.lora_B.weight", vec![16, 4]),
        ]
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            let data = (0..n)
                .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
                .collect();
            (name.to_owned(), HostTensor { shape, data })
        })
        .collect()
    }

    /// `a + s·b`, tensor by tensor.
    fn axpy(a: &NamedTensors, s: f32, b: &NamedTensors) -> NamedTensors {
        let mut out = a.clone();
        for (x, y) in out.values_mut().zip(b.values()) {
            x.data
                .iter_mut()
                .zip(&y.data)
                .for_each(|(x, y)| *x += s * y);
        }
        out
    }

    fn distance(a: &NamedTensors, b: &NamedTensors) -> f64 {
        norm(&axpy(a, -1.0, b))
    }

    fn weighted<'a>(deltas: &'a [NamedTensors], tokens: &[u64]) -> Vec<WeightedDelta<'a>> {
        deltas
            .iter()
            .zip(tokens)
            .map(|(delta, &tokens)| WeightedDelta { delta, tokens })
            .collect()
    }

    fn single(value: f32) -> NamedTensors {
        [(
            "w".to_owned(),
            HostTensor::new(vec![1], vec![value]).unwrap(),
        )]
        .into()
    }

    #[test]
    fn mean_of_identical_deltas_is_the_delta() {
        let delta = random_tensors(&mut StdRng::seed_from_u64(1), 1.0);
        let inputs_deltas = [delta.clone(), delta.clone(), delta.clone()];
        let inputs = weighted(&inputs_deltas, &[3, 100, 7]);
        for rule in [
            AggregationRule::Mean,
            AggregationRule::TrimmedMean { trim_fraction: 0.3 },
            AggregationRule::CenteredClipping {
                tau: 0.1,
                iterations: 3,
            },
        ] {
            let out = aggregate(rule, &inputs).unwrap();
            // Σ w_i·x in f64 with Σ w_i = 1 rounds back to x, up to one f32 ulp.
            for (a, b) in out.values().zip(delta.values()) {
                for (&x, &y) in a.data.iter().zip(&b.data) {
                    assert!(
                        (x - y).abs() <= y.abs() * f32::EPSILON,
                        "{rule:?}: {x} vs {y}"
                    );
                }
            }
        }
    }

    #[test]
    fn mean_is_token_weighted() {
        let out = token_weighted_mean(&weighted(&[single(1.0), single(4.0)], &[3, 1])).unwrap();
        assert_eq!(out["w"].data, vec![1.75]);
    }

    #[test]
    fn trimmed_mean_with_trim_zero_is_the_mean() {
        let mut rng = StdRng::seed_from_u64(2);
        let deltas: Vec<_> = (0..5).map(|_| random_tensors(&mut rng, 1.0)).collect();
        let inputs = weighted(&deltas, &[10, 20, 30, 40, 50]);
        assert_eq!(
            trimmed_mean(&inputs, 0.0).unwrap(),
            token_weighted_mean(&inputs).unwrap()
        );
    }

    #[test]
    fn trimmed_mean_drops_the_extremes_and_weights_the_survivors() {
        let values = [100.0, 1.0, -50.0, 2.0, 4.0];
        let deltas: Vec<_> = values.iter().map(|&v| single(v)).collect();
        // trim 0.2 of 5 drops one at each end (-50 and 100); survivors 1, 2, 4 with 1, 1, 2 tokens.
        let out = trimmed_mean(&weighted(&deltas, &[9, 1, 9, 1, 2]), 0.2).unwrap();
        assert_eq!(out["w"].data, vec![2.75]);
        assert!(matches!(
            trimmed_mean(&weighted(&deltas, &[1; 5]), 0.5),
            Err(AggregateError::InvalidTrim(_))
        ));
    }

    #[test]
    fn median_odd_and_even() {
        let deltas: Vec<_> = [5.0, -1.0, 3.0, 100.0].iter().map(|&v| single(v)).collect();
        assert_eq!(
            coordinate_median(&weighted(&deltas[..3], &[1; 3])).unwrap()["w"].data,
            vec![3.0]
        );
        assert_eq!(
            coordinate_median(&weighted(&deltas, &[1; 4])).unwrap()["w"].data,
            vec![4.0]
        );
    }

    #[test]
    fn centered_clipping_by_hand() {
        // Deltas 0 and 1000 with equal weight, center 0, tau 2. The far delta always clips to
        // +2·½ = +1; the near one pulls back by half its distance once it is within tau:
        //   v1 = 0 + 0 + 1 = 1,  v2 = 1 − 0.5 + 1 = 1.5,  v3 = 1.5 − 0.75 + 1 = 1.75.
        let inputs_deltas = [single(0.0), single(1000.0)];
        let inputs = weighted(&inputs_deltas, &[1, 1]);
        let out = centered_clipping(&inputs, &single(0.0), 2.0, 3).unwrap();
        assert_eq!(out["w"].data, vec![1.75]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let other: NamedTensors = [("v".to_owned(), HostTensor::zeros(vec![1]))].into();
        let mismatched_deltas = [single(1.0), other];
        let mismatched = weighted(&mismatched_deltas, &[1, 1]);
        assert_eq!(
            token_weighted_mean(&mismatched),
            Err(AggregateError::Layout { index: 1 })
        );
        assert_eq!(token_weighted_mean(&[]), Err(AggregateError::Empty));
        let zero_deltas = [single(1.0), single(2.0)];
        let zero = weighted(&zero_deltas, &[1, 0]);
        assert_eq!(
            token_weighted_mean(&zero),
            Err(AggregateError::ZeroTokens { index: 1 })
        );
        let ok_deltas = [single(1.0)];
        let ok = weighted(&ok_deltas, &[1]);
        assert!(matches!(
            centered_clipping(&ok, &single(0.0), 0.0, 1),
            Err(AggregateError::InvalidTau(_))
        ));
        assert!(OuterOptimizer::new(0.7, 1.0, true).is_err());
        let mut outer = OuterOptimizer::new(0.7, 0.9, true).unwrap();
        let two: NamedTensors = [("w".to_owned(), HostTensor::zeros(vec![2]))].into();
        assert!(outer.step(&single(1.0), &two).is_err());
        assert!(outer.momentum_buffer().is_empty());
    }

    #[test]
    fn outer_step_with_lr_1_and_no_momentum_averages_the_end_points() {
        let mut rng = StdRng::seed_from_u64(3);
        let start = random_tensors(&mut rng, 1.0);
        let ends: Vec<_> = (0..4)
            .map(|_| axpy(&start, 0.1, &random_tensors(&mut rng, 1.0)))
            .collect();
        let deltas: Vec<_> = ends.iter().map(|end| axpy(&start, -1.0, end)).collect();
        let g = token_weighted_mean(&weighted(&deltas, &[1; 4])).unwrap();
        let mut outer = OuterOptimizer::new(1.0, 0.0, true).unwrap();
        let stepped = outer.step(&start, &g).unwrap();
        assert_eq!(stepped, axpy(&start, -1.0, &g));
        let mean_end = token_weighted_mean(&weighted(&ends, &[1; 4])).unwrap();
        assert!(
            distance(&stepped, &mean_end) < 1e-6,
            "{}",
            distance(&stepped, &mean_end)
        );
    }

    #[test]
    fn nesterov_two_steps_by_hand() {
        // lr 0.5, μ 0.9, p0 = 1, g1 = 0.2, g2 = 0.1:
        //   m1 = 0.2,              u1 = 0.2 + 0.9·0.2  = 0.38,  p1 = 1 − 0.19     = 0.81
        //   m2 = 0.9·0.2 + 0.1 = 0.28, u2 = 0.1 + 0.9·0.28 = 0.352, p2 = 0.81 − 0.176 = 0.634
        let mut outer = OuterOptimizer::new(0.5, 0.9, true).unwrap();
        let p1 = outer.step(&single(1.0), &single(0.2)).unwrap();
        assert!((p1["w"].data[0] - 0.81).abs() < 1e-6);
        // Persist and resume between the steps, as the coordinator does.
        let buffer = outer.momentum_buffer().clone();
        assert!((buffer["w"].data[0] - 0.2).abs() < 1e-6);
        let mut outer = OuterOptimizer::from_state(0.5, 0.9, true, buffer).unwrap();
        let p2 = outer.step(&p1, &single(0.1)).unwrap();
        assert!((outer.momentum_buffer()["w"].data[0] - 0.28).abs() < 1e-6);
        assert!((p2["w"].data[0] - 0.634).abs() < 1e-6);
        // Plain heavy ball on the same inputs: u = m, so p1 = 0.9 and p2 = 0.9 − 0.14 = 0.76.
        let mut heavy_ball = OuterOptimizer::new(0.5, 0.9, false).unwrap();
        let p1 = heavy_ball.step(&single(1.0), &single(0.2)).unwrap();
        let p2 = heavy_ball.step(&p1, &single(0.1)).unwrap();
        assert!((p2["w"].data[0] - 0.76).abs() < 1e-6);
    }

    /// 10 honest deltas (a common true vector plus ±10% noise per value), 3 of them replaced
    /// by attackers: ×100 scaled, sign-flipped, and large random noise. Robust rules must land
    /// within 0.25·‖honest mean‖ of the honest mean, while the plain mean is thrown ≥ 5× that far.
    #[test]
    fn robust_rules_resist_30_percent_attackers() {
        let mut rng = StdRng::seed_from_u64(4);
        let truth = random_tensors(&mut rng, 1.0);
        let mut deltas: Vec<_> = (0..10)
            .map(|_| axpy(&truth, 0.1, &random_tensors(&mut rng, 1.0)))
            .collect();
        let tokens: Vec<u64> = (0..10).map(|i| 1000 + 100 * i).collect();
        let honest_mean = token_weighted_mean(&weighted(&deltas[3..], &tokens[3..])).unwrap();
        deltas[0] = axpy(&zeros_like(&truth), 100.0, &deltas[0]);
        deltas[1] = axpy(&zeros_like(&truth), -1.0, &deltas[1]);
        deltas[2] = random_tensors(&mut rng, 50.0);
        let inputs = weighted(&deltas, &tokens);

        let bound = 0.25 * norm(&honest_mean);
        let plain = distance(&token_weighted_mean(&inputs).unwrap(), &honest_mean);
        let trimmed = distance(&trimmed_mean(&inputs, 0.3).unwrap(), &honest_mean);
        // tau ≈ 2× an honest delta's distance from the truth (0.1·√(128/3) ≈ 0.65).
        let rule = AggregationRule::CenteredClipping {
            tau: 1.5,
            iterations: 3,
        };
        let clipped = distance(&aggregate(rule, &inputs).unwrap(), &honest_mean);
        assert!(trimmed <= bound, "trimmed mean {trimmed} > {bound}");
        assert!(clipped <= bound, "centered clipping {clipped} > {bound}");
        assert!(plain >= 5.0 * bound, "plain mean {plain} < 5 × {bound}");
    }

    /// Zeros with the layout of `t` (so `axpy(zeros, s, x)` is `s·x`).
    fn zeros_like(t: &NamedTensors) -> NamedTensors {
        t.iter()
            .map(|(n, x)| (n.clone(), HostTensor::zeros(x.shape.clone())))
            .collect()
    }
}
