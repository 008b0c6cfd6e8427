//! Fused CPU kernels with hand-written backward passes, for burn-flex (the `cpu` device).
//!
//! burn builds RMSNorm, SwiGLU, rotary embeddings and the cross-entropy out of elementwise and
//! reduction ops: each one a pass over memory and a node in the autodiff graph that keeps its
//! inputs alive. Here each of them is one op: the forward is one pass over its input, and the
//! backward one pass over what it kept, written out by hand. On other devices (ndarray, GPU)
//! the same functions fall back to burn's composed ops, so every device computes the same math.
//!
//! Every kernel splits work by rows and computes each row serially, in a fixed order, so the
//! bits do not depend on the number of threads; sums across rows (a weight's gradient, the
//! loss) add fixed-size chunks in index order for the same reason. Exact-replay verification
//! rests on that.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, DispatchDevice, Flex, GradientCheckpointingStrategy};
use burn::tensor::activation::{log_softmax, silu};
use burn::tensor::{DType, Int, Tensor, TensorData};
use rayon::prelude::*;

type Ad = Autodiff<Flex>;

/// Rows per task of the row-parallel kernels, and per partial sum of the cross-row sums. Fixed,
/// so that sums add up in the same order whatever the thread count.
const ROW_CHUNK: usize = 16;

/// Where a tensor lives, as far as the fused kernels care.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Route {
    /// Plain burn-flex: the fused forward, no graph.
    Flex,
    /// burn-flex under autodiff without gradient checkpointing: the fused forward, recorded
    /// with its hand-written backward.
    FlexAutodiff,
    /// Anything else: burn's composed ops.
    Composed,
}

fn route<const D: usize>(t: &Tensor<D>) -> Route {
    if t.dtype() != DType::F32 {
        return Route::Composed;
    }
    match t.device().as_dispatch() {
        DispatchDevice::Flex(_) => Route::Flex,
        DispatchDevice::Autodiff(a)
            if matches!(**a, DispatchDevice::Flex(_))
                && a.gradient_checkpointing_strategy()
                    == GradientCheckpointingStrategy::Disabled =>
        {
            Route::FlexAutodiff
        }
        _ => Route::Composed,
    }
}

/// The contiguous f32 values of a flex tensor (copied only if it is a strided view).
fn values(t: &FlexTensor) -> FlexTensor {
    t.to_contiguous()
}

fn slice(t: &FlexTensor) -> &[f32] {
    // `values` made it contiguous and `route` checked the dtype, so this cannot fail; an
    // empty slice would only make the kernels below produce an error-free empty result.
    t.as_slice::<f32>().unwrap_or(&[])
}

fn flex(data: Vec<f32>, shape: [usize; 2]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

fn dims(t: &FlexTensor) -> [usize; 2] {
    let s = t.layout().shape();
    [s[0], s[1]]
}

fn plain<const D: usize>(t: Tensor<D>) -> FlexTensor {
    t.try_into_primitive::<Flex>()
        .expect("route() said this is a flex tensor")
}

fn tracked<const D: usize>(
    t: Tensor<D>,
) -> <Ad as burn::backend::BackendTypes>::FloatTensorPrimitive {
    t.try_into_primitive::<Ad>()
        .expect("route() said this is a flex autodiff tensor")
}

/// A one-input fused op: `forward` computes the output and what the backward keeps. On plain
/// burn-flex only the output is used; under autodiff the output is recorded with `op`'s
/// backward (or without one when the input is not tracked).
fn unary<const D: usize, const E: usize, B: Backward<Flex, 1>>(
    op: B,
    x: Tensor<D>,
    forward: impl Fn(&FlexTensor) -> (FlexTensor, B::State),
) -> Tensor<E> {
    if route(&x) == Route::Flex {
        return Tensor::from_primitive::<Flex>(forward(&values(&plain(x))).0);
    }
    let a = tracked(x);
    let xp = values(a.primitive());
    let out = match op
        .prepare::<NoCheckpointing>([a.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (y, state) = forward(&xp);
            prep.finish(state, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(&xp).0),
    };
    Tensor::from_primitive::<Ad>(out)
}

// ------------------------------------------------------------------------------------------
// RMSNorm

/// RMSNorm over the last dimension, `x / sqrt(mean(x²) + eps) · w`; `x` is `[rows, d]`, `w`
/// is `[1, d]`. Gradients flow to `x`, and to `w` when it is trainable.
pub(crate) fn rms_norm(x: Tensor<2>, w: &Tensor<2>, eps: f64) -> Tensor<2> {
    let r = route(&x);
    match if route(w) == r { r } else { Route::Composed } {
        Route::Composed => {
            let ms = x.clone().square().mean_dim(1);
            x * (ms + eps).sqrt().recip() * w.clone()
        }
        Route::Flex => {
            let (xp, wp) = (values(&plain(x)), values(&plain(w.clone())));
            Tensor::from_primitive::<Flex>(rms_forward(&xp, &wp, eps as f32).0)
        }
        Route::FlexAutodiff => {
            let (xa, wa) = (tracked(x), tracked(w.clone()));
            let xp = values(xa.primitive());
            let wp = values(wa.primitive());
            let out = match RmsNormBackward
                .prepare::<NoCheckpointing>([xa.node(), wa.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let (y, rstd) = rms_forward(&xp, &wp, eps as f32);
                    prep.finish((xp, wp, Arc::new(rstd)), y)
                }
                OpsKind::UnTracked(prep) => prep.finish(rms_forward(&xp, &wp, eps as f32).0),
            };
            Tensor::from_primitive::<Ad>(out)
        }
    }
}

fn rms_forward(x: &FlexTensor, w: &FlexTensor, eps: f32) -> (FlexTensor, Vec<f32>) {
    let [rows, d] = dims(x);
    let (xs, ws) = (slice(x), slice(w));
    let mut y = vec![0f32; rows * d];
    let mut rstd = vec![0f32; rows];
    y.par_chunks_mut(ROW_CHUNK * d)
        .zip(rstd.par_chunks_mut(ROW_CHUNK))
        .enumerate()
        .for_each(|(c, (yc, rc))| {
            for (i, (yr, r)) in yc.chunks_mut(d).zip(rc.iter_mut()).enumerate() {
                let row = c * ROW_CHUNK + i;
                let xr = &xs[row * d..(row + 1) * d];
                let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
                *r = 1.0 / (ms + eps).sqrt();
                for ((o, &xv), &wv) in yr.iter_mut().zip(xr).zip(ws) {
                    *o = xv * *r * wv;
                }
            }
        });
    (flex(y, [rows, d]), rstd)
}

#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Flex, 2> for RmsNormBackward {
    /// `x`, `w` and each row's `1 / rms`.
    type State = (FlexTensor, FlexTensor, Arc<Vec<f32>>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_parent, w_parent] = ops.parents;
        let g = values(&grads.consume::<Flex>(&ops.node));
        let (x, w, rstd) = ops.state;
        let [rows, d] = dims(&x);
        let (xs, ws, gs) = (slice(&x), slice(&w), slice(&g));
        if let Some(parent) = x_parent {
            // dx = r·(g⊙w) − x · r³ · mean(g⊙w⊙x)
            let mut dx = vec![0f32; rows * d];
            dx.par_chunks_mut(ROW_CHUNK * d)
                .enumerate()
                .for_each(|(c, dc)| {
                    for (i, dr) in dc.chunks_mut(d).enumerate() {
                        let row = c * ROW_CHUNK + i;
                        let (xr, gr) = (&xs[row * d..(row + 1) * d], &gs[row * d..(row + 1) * d]);
                        let r = rstd[row];
                        let dot: f32 = xr.iter().zip(gr).zip(ws).map(|((x, g), w)| x * g * w).sum();
                        let k = r * r * r * dot / d as f32;
                        for (((o, &xv), &gv), &wv) in dr.iter_mut().zip(xr).zip(gr).zip(ws) {
                            *o = r * gv * wv - xv * k;
                        }
                    }
                });
            grads.register::<Flex>(parent.id, flex(dx, [rows, d]));
        }
        if let Some(parent) = w_parent {
            // dw = Σ_rows g ⊙ x · r, in fixed chunks added in order.
            let partials: Vec<Vec<f32>> = (0..rows.div_ceil(ROW_CHUNK))
                .into_par_iter()
                .map(|c| {
                    let mut acc = vec![0f32; d];
                    for row in c * ROW_CHUNK..((c + 1) * ROW_CHUNK).min(rows) {
                        let r = rstd[row];
                        let (xr, gr) = (&xs[row * d..(row + 1) * d], &gs[row * d..(row + 1) * d]);
                        for ((a, &xv), &gv) in acc.iter_mut().zip(xr).zip(gr) {
                            *a += gv * xv * r;
                        }
                    }
                    acc
                })
                .collect();
            let mut dw = vec![0f32; d];
            for p in partials {
                for (a, v) in dw.iter_mut().zip(p) {
                    *a += v;
                }
            }
            grads.register::<Flex>(parent.id, flex(dw, [1, d]));
        }
    }
}

// ------------------------------------------------------------------------------------------
// SwiGLU

/// `silu(gate) ⊙ up` where `gate_up` is `[rows, 2·inter]`, the gate in its first `inter`
/// columns and up in the rest (the output of one fused gate/up projection).
pub(crate) fn swiglu(gate_up: Tensor<2>, inter: usize) -> Tensor<2> {
    match route(&gate_up) {
        Route::Composed => {
            let gate = gate_up.clone().narrow(1, 0, inter);
            silu(gate) * gate_up.narrow(1, inter, inter)
        }
        Route::Flex | Route::FlexAutodiff => unary(SwigluBackward, gate_up, |gu| {
            (swiglu_forward(gu, inter), (gu.clone(), inter))
        }),
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn swiglu_forward(gate_up: &FlexTensor, inter: usize) -> FlexTensor {
    let [rows, _] = dims(gate_up);
    let gu = slice(gate_up);
    let mut y = vec![0f32; rows * inter];
    y.par_chunks_mut(inter).enumerate().for_each(|(r, yr)| {
        let (g, u) = gu[r * 2 * inter..(r + 1) * 2 * inter].split_at(inter);
        for ((o, &g), &u) in yr.iter_mut().zip(g).zip(u) {
            *o = g * sigmoid(g) * u;
        }
    });
    flex(y, [rows, inter])
}

#[derive(Debug)]
struct SwigluBackward;

impl Backward<Flex, 1> for SwigluBackward {
    /// The fused gate/up input and `inter`.
    type State = (FlexTensor, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let dy = values(&grads.consume::<Flex>(&ops.node));
        let Some(parent) = parent else { return };
        let (gate_up, inter) = ops.state;
        let [rows, cols] = dims(&gate_up);
        let (gu, dys) = (slice(&gate_up), slice(&dy));
        let mut d = vec![0f32; rows * cols];
        d.par_chunks_mut(cols).enumerate().for_each(|(r, dr)| {
            let (g, u) = gu[r * cols..(r + 1) * cols].split_at(inter);
            let dyr = &dys[r * inter..(r + 1) * inter];
            let (dg, du) = dr.split_at_mut(inter);
            for j in 0..inter {
                let s = sigmoid(g[j]);
                // d silu(g)/dg = s·(1 + g·(1 − s))
                dg[j] = dyr[j] * u[j] * s * (1.0 + g[j] * (1.0 - s));
                du[j] = dyr[j] * g[j] * s;
            }
        });
        grads.register::<Flex>(parent.id, flex(d, [rows, cols]));
    }
}

// ------------------------------------------------------------------------------------------
// Rotary position embeddings

/// `cos` and `sin` of the rotation angles for each position and frequency, `[seq, half]`,
/// with the position of row `r` of a `[batch * seq, …]` tensor being `r % seq`.
#[derive(Clone, Debug)]
pub(crate) struct RopeTables {
    pub seq: usize,
    pub half: usize,
    pub cos: Arc<Vec<f32>>,
    pub sin: Arc<Vec<f32>>,
}

/// Rotates the first `heads` heads (of width `2 · half`) of every row of `x`
/// (`[batch * seq, n_heads · head_dim]`) as transformers does: `x·cos + rotate_half(x)·sin`.
/// Columns after those heads pass through unchanged, so one call can rotate the queries and
/// keys of a fused q/k/v projection and leave the values alone.
pub(crate) fn rope(x: Tensor<2>, heads: usize, t: &RopeTables) -> Tensor<2> {
    match route(&x) {
        Route::Composed => rope_composed(x, heads, t),
        Route::Flex | Route::FlexAutodiff => unary(RopeBackward, x, |xp| {
            (rope_apply(xp, heads, t, false), (heads, t.clone()))
        }),
    }
}

/// The rotation (or, with `inverse`, its transpose, which is the backward) on the host.
fn rope_apply(x: &FlexTensor, heads: usize, t: &RopeTables, inverse: bool) -> FlexTensor {
    let [rows, cols] = dims(x);
    let xs = slice(x);
    let (half, hd) = (t.half, 2 * t.half);
    let sign = if inverse { -1.0 } else { 1.0 };
    let mut y = xs.to_vec();
    y.par_chunks_mut(cols).enumerate().for_each(|(row, yr)| {
        let pos = row % t.seq;
        let (cos, sin) = (
            &t.cos[pos * half..(pos + 1) * half],
            &t.sin[pos * half..(pos + 1) * half],
        );
        for h in 0..heads {
            let head = &mut yr[h * hd..(h + 1) * hd];
            let (x1, x2) = head.split_at_mut(half);
            for j in 0..half {
                let (a, b) = (x1[j], x2[j]);
                let (c, s) = (cos[j], sign * sin[j]);
                x1[j] = a * c - b * s;
                x2[j] = b * c + a * s;
            }
        }
    });
    flex(y, [rows, cols])
}

#[derive(Debug)]
struct RopeBackward;

impl Backward<Flex, 1> for RopeBackward {
    /// The number of rotated heads and the tables.
    type State = (usize, RopeTables);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let g = values(&grads.consume::<Flex>(&ops.node));
        if let Some(parent) = parent {
            let (heads, t) = ops.state;
            grads.register::<Flex>(parent.id, rope_apply(&g, heads, &t, true));
        }
    }
}

fn rope_composed(x: Tensor<2>, heads: usize, t: &RopeTables) -> Tensor<2> {
    let [rows, cols] = x.dims();
    let (half, hd) = (t.half, 2 * t.half);
    let device = x.device();
    // Tables per row, each frequency twice as transformers lays them out, 1 and 0 past the
    // rotated heads.
    let mut cos = vec![1f32; rows * cols];
    let mut sin = vec![0f32; rows * cols];
    for row in 0..rows {
        let pos = row % t.seq;
        for h in 0..heads {
            for j in 0..half {
                for k in [j, j + half] {
                    cos[row * cols + h * hd + k] = t.cos[pos * half + j];
                    sin[row * cols + h * hd + k] = t.sin[pos * half + j];
                }
            }
        }
    }
    let cos = Tensor::<2>::from_data(TensorData::new(cos, [rows, cols]), &device);
    let sin = Tensor::<2>::from_data(TensorData::new(sin, [rows, cols]), &device);
    // rotate_half within each head: [-x2, x1].
    let n = cols / hd;
    let x4 = x.clone().reshape([rows, n, 2, half]);
    let x1 = x4.clone().narrow(2, 0, 1);
    let x2 = x4.narrow(2, 1, 1);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 2).reshape([rows, cols]);
    x * cos + rotated * sin
}

// ------------------------------------------------------------------------------------------
// Causal softmax

/// `softmax(scores · scale)` over the last dimension with the causal mask: `scores` is
/// `[batch, heads, rows, s]` where row `r` is the query at position `r % t` (several query
/// heads that share a key head can be stacked in one matrix), and the query at position `i`
/// sees keys `0..=offset + i`. Masked entries are 0.
pub(crate) fn causal_softmax(scores: Tensor<4>, scale: f64, offset: usize, t: usize) -> Tensor<4> {
    let [.., rows, s] = scores.dims();
    match route(&scores) {
        Route::Composed => {
            let scores = scores * scale;
            let scores = if offset + 1 < s {
                let mut mask = vec![0f32; rows * s];
                for r in 0..rows {
                    for j in (offset + r % t + 1)..s {
                        mask[r * s + j] = f32::NEG_INFINITY;
                    }
                }
                let mask = Tensor::<4>::from_data(
                    TensorData::new(mask, [1, 1, rows, s]),
                    &scores.device(),
                );
                scores + mask
            } else {
                scores
            };
            burn::tensor::activation::softmax(scores, 3)
        }
        Route::Flex | Route::FlexAutodiff => unary(SoftmaxBackward, scores, |x| {
            let y = softmax_forward(x, t, scale as f32, offset);
            (y.clone(), (y, scale as f32))
        }),
    }
}

fn softmax_forward(x: &FlexTensor, t: usize, scale: f32, offset: usize) -> FlexTensor {
    let shape = x.layout().shape().clone();
    let s = shape[shape.num_dims() - 1];
    let xs = slice(x);
    let mut y = vec![0f32; xs.len()];
    y.par_chunks_mut(s).enumerate().for_each(|(row, yr)| {
        let seen = (offset + row % t + 1).min(s);
        let xr = &xs[row * s..row * s + seen];
        let m = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max) * scale;
        let mut sum = 0f32;
        for (o, &v) in yr.iter_mut().zip(xr) {
            *o = (v * scale - m).exp();
            sum += *o;
        }
        let inv = 1.0 / sum;
        for o in &mut yr[..seen] {
            *o *= inv;
        }
    });
    FlexTensor::from_data(TensorData::new(y, shape))
}

#[derive(Debug)]
struct SoftmaxBackward;

impl Backward<Flex, 1> for SoftmaxBackward {
    /// The output and the scale.
    type State = (FlexTensor, f32);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let g = values(&grads.consume::<Flex>(&ops.node));
        let Some(parent) = parent else { return };
        let (y, scale) = ops.state;
        let shape = y.layout().shape().clone();
        let s = shape[shape.num_dims() - 1];
        let (ys, gs) = (slice(&y), slice(&g));
        let mut dx = vec![0f32; ys.len()];
        // dx = scale · y ⊙ (g − Σ g⊙y); masked entries have y = 0, so they get 0.
        dx.par_chunks_mut(s).enumerate().for_each(|(row, dr)| {
            let (yr, gr) = (&ys[row * s..(row + 1) * s], &gs[row * s..(row + 1) * s]);
            let dot: f32 = yr.iter().zip(gr).map(|(y, g)| y * g).sum();
            for ((o, &y), &g) in dr.iter_mut().zip(yr).zip(gr) {
                *o = scale * y * (g - dot);
            }
        });
        grads.register::<Flex>(parent.id, FlexTensor::from_data(TensorData::new(dx, shape)));
    }
}

// ------------------------------------------------------------------------------------------
// Cross-entropy

/// `−Σ_r weight_r · log softmax(logits_r)[target_r] / count`; `logits` is `[rows, vocab]`,
/// `targets` and `weights` have one entry per row. The backward is `softmax − onehot` scaled,
/// computed in one pass without keeping the softmax.
pub(crate) fn cross_entropy(
    logits: Tensor<2>,
    targets: Vec<usize>,
    weights: Vec<f32>,
    count: usize,
) -> Tensor<1> {
    let scale = 1.0 / count as f32;
    match route(&logits) {
        Route::Composed => {
            let [rows, _] = logits.dims();
            let device = logits.device();
            let t: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
            let t = Tensor::<2, Int>::from_data(TensorData::new(t, [rows, 1]), &device);
            let w = Tensor::<2>::from_data(TensorData::new(weights, [rows, 1]), &device);
            let picked = log_softmax(logits, 1).gather(1, t);
            (picked * w).sum().neg() * scale
        }
        Route::Flex | Route::FlexAutodiff => {
            let (targets, weights) = (Arc::new(targets), Arc::new(weights));
            unary(CrossEntropyBackward, logits, |lp| {
                let (loss, lse) = ce_forward(lp, &targets, &weights, scale);
                let state = CeState {
                    logits: lp.clone(),
                    lse: Arc::new(lse),
                    targets: targets.clone(),
                    weights: weights.clone(),
                    scale,
                };
                (loss, state)
            })
        }
    }
}

/// The loss `[1]` and each row's log-sum-exp.
fn ce_forward(
    logits: &FlexTensor,
    targets: &[usize],
    weights: &[f32],
    scale: f32,
) -> (FlexTensor, Vec<f32>) {
    let [rows, vocab] = dims(logits);
    let ls = slice(logits);
    let lse: Vec<f32> = (0..rows)
        .into_par_iter()
        .map(|r| {
            let row = &ls[r * vocab..(r + 1) * vocab];
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            m + row.iter().map(|x| (x - m).exp()).sum::<f32>().ln()
        })
        .collect();
    // Rows in index order: the same sum for any thread count.
    let mut loss = 0f32;
    for r in 0..rows {
        if weights[r] != 0.0 {
            loss += weights[r] * (lse[r] - ls[r * vocab + targets[r].min(vocab - 1)]);
        }
    }
    (
        FlexTensor::from_data(TensorData::new(vec![loss * scale], [1])),
        lse,
    )
}

#[derive(Clone, Debug)]
struct CeState {
    logits: FlexTensor,
    lse: Arc<Vec<f32>>,
    targets: Arc<Vec<usize>>,
    weights: Arc<Vec<f32>>,
    scale: f32,
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl Backward<Flex, 1> for CrossEntropyBackward {
    type State = CeState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let g = values(&grads.consume::<Flex>(&ops.node));
        let Some(parent) = parent else { return };
        let s = ops.state;
        let upstream = slice(&g).first().copied().unwrap_or(0.0);
        let [rows, vocab] = dims(&s.logits);
        let ls = slice(&s.logits);
        let mut dl = vec![0f32; rows * vocab];
        dl.par_chunks_mut(vocab).enumerate().for_each(|(r, dr)| {
            let k = s.weights[r] * s.scale * upstream;
            if k == 0.0 {
                return;
            }
            let row = &ls[r * vocab..(r + 1) * vocab];
            for (o, &x) in dr.iter_mut().zip(row) {
                *o = (x - s.lse[r]).exp() * k;
            }
            dr[s.targets[r].min(vocab - 1)] -= k;
        });
        grads.register::<Flex>(parent.id, flex(dl, [rows, vocab]));
    }
}

#[cfg(test)]
mod tests {
    //! Each fused op against burn's composed ops, values and gradients, on burn-flex (fused)
    //! and burn-ndarray (composed, the reference).
    use super::*;
    use burn::tensor::Device;

    fn random(shape: [usize; 2], seed: u64, device: &Device) -> Tensor<2> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..shape[0] * shape[1])
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        Tensor::from_data(TensorData::new(v, shape), device)
    }

    fn host(t: Tensor<2>) -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap()
    }

    fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
            .fold(0f32, f32::max);
        assert!(worst <= tol, "{what}: worst relative difference {worst}");
    }

    /// Runs `op` on two inputs on flex autodiff (fused) and ndarray autodiff (composed) and
    /// compares outputs and both input gradients after `sum(output · probe)`.
    fn check(op: impl Fn(Tensor<2>, Tensor<2>) -> Tensor<2>, a: [usize; 2], b: [usize; 2]) {
        let mut results = Vec::new();
        #[allow(deprecated)]
        for device in [Device::flex().autodiff(), Device::ndarray().autodiff()] {
            let x = random(a, 1, &device).require_grad();
            let y = random(b, 2, &device).require_grad();
            let out = op(x.clone(), y.clone());
            let probe = random(out.dims(), 3, &device);
            let grads = (out.clone() * probe).sum().backward();
            let gx = x.grad(&grads).map(host).unwrap_or_default();
            let gy = y.grad(&grads).map(host).unwrap_or_default();
            results.push((host(out), gx, gy));
        }
        close(&results[0].0, &results[1].0, 1e-5, "value");
        close(&results[0].1, &results[1].1, 1e-4, "first input's gradient");
        close(
            &results[0].2,
            &results[1].2,
            1e-4,
            "second input's gradient",
        );
    }

    #[test]
    fn fused_rms_norm_matches_composed() {
        check(|x, w| rms_norm(x, &w, 1e-5), [37, 24], [1, 24]);
    }

    #[test]
    fn fused_swiglu_matches_composed() {
        check(|gu, y| swiglu(gu, 12) + y, [37, 24], [37, 12]);
    }

    #[test]
    fn fused_rope_matches_composed() {
        let tables = RopeTables {
            seq: 5,
            half: 4,
            cos: Arc::new((0..20).map(|i| (i as f32 * 0.3).cos()).collect()),
            sin: Arc::new((0..20).map(|i| (i as f32 * 0.3).sin()).collect()),
        };
        // 3 heads of 8 rotated, 1 passed through; `y` only joins the graph.
        check(|x, y| rope(x, 3, &tables) + y, [10, 32], [10, 32]);
    }

    #[test]
    fn fused_cross_entropy_matches_composed() {
        let targets = vec![3, 0, 5, 5, 1, 7, 2];
        let weights = vec![1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0];
        check(
            |logits, y| {
                let loss = cross_entropy(logits, targets.clone(), weights.clone(), 5);
                loss.reshape([1, 1]) + y.sum().reshape([1, 1]) * 0.0
            },
            [7, 8],
            [1, 1],
        );
    }

    #[test]
    fn fused_causal_softmax_matches_composed() {
        for (offset, t) in [(0, 3), (2, 3), (0, 1), (4, 1)] {
            check(
                |x, y| {
                    let s = causal_softmax(x.reshape([1, 2, 3, 5]), 0.7, offset, t);
                    s.reshape([6, 5]) + y
                },
                [6, 5],
                [6, 5],
            );
        }
    }

    #[test]
    fn plain_devices_take_the_fused_forward() {
        let d = Device::flex();
        let x = random([4, 8], 1, &d);
        assert_eq!(route(&x), Route::Flex);
        assert_eq!(route(&x.clone().autodiff()), Route::FlexAutodiff);
        #[allow(deprecated)]
        let n = random([4, 8], 1, &Device::ndarray());
        assert_eq!(route(&n), Route::Composed);
        let w = random([1, 8], 2, &d);
        let fused = host(rms_norm(x.clone(), &w, 1e-5));
        let ms = x.clone().square().mean_dim(1);
        let composed = host(x * (ms + 1e-5).sqrt().recip() * w);
        close(&fused, &composed, 1e-6, "plain rms_norm");
    }
}
