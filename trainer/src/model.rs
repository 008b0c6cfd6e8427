//! The causal language model behind every job: loads a Hugging Face checkpoint of a supported
//! architecture onto a burn device and runs it, optionally with a LoRA adapter and a KV cache.
//! The architectures themselves live in [`crate::llama`] and [`crate::gpt2`]; the layers they
//! share (linear with LoRA, norms, attention, the loss) live here.

use std::path::Path;

use burn::tensor::{Device, Gradients, Int, Tensor, TensorData};

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{Result, TrainerError};
use crate::gpt2::Gpt2;
use crate::llama::Llama;
use crate::lora::{DeviceLora, LoraConfig, LoraSite};
use crate::tensors::{HostTensor, NamedTensors};

/// A batch of token sequences of equal length, row-major `[batch, seq]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBatch {
    /// `batch * seq` token ids.
    pub ids: Vec<u32>,
    /// Number of sequences.
    pub batch: usize,
    /// Length of each sequence.
    pub seq: usize,
}

impl TokenBatch {
    /// A batch, checked: `ids.len() == batch * seq` and both positive.
    pub fn new(ids: Vec<u32>, batch: usize, seq: usize) -> Result<Self> {
        if batch == 0 || seq == 0 || ids.len() != batch * seq {
            return Err(TrainerError::InvalidInput(format!(
                "a batch of {batch} sequences of {seq} tokens needs {} ids, got {}",
                batch * seq,
                ids.len()
            )));
        }
        Ok(Self { ids, batch, seq })
    }

    fn to_device(&self, device: &Device) -> Tensor<1, Int> {
        let ids: Vec<i64> = self.ids.iter().map(|&i| i64::from(i)).collect();
        Tensor::<1, Int>::from_data(TensorData::new(ids, [self.ids.len()]), device)
    }
}

/// The cached keys and values of the tokens seen so far, for generation.
pub struct KvCache {
    /// Per layer: keys and values `[batch, kv_heads, seen, head_dim]`.
    pub(crate) layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    /// Number of positions already cached.
    pub(crate) len: usize,
}

impl KvCache {
    /// An empty cache for a model with `layers` blocks.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: (0..layers).map(|_| None).collect(),
            len: 0,
        }
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Where the forward pass reads its optional extras.
#[derive(Default, Clone, Copy)]
pub struct ForwardOptions<'a> {
    /// The adapter, if any.
    pub lora: Option<&'a DeviceLora>,
}

enum Arch {
    Llama(Box<Llama>),
    Gpt2(Box<Gpt2>),
}

/// A causal language model of a supported architecture on a burn device.
pub struct CausalLm {
    config: ModelConfig,
    arch: Arch,
    device: Device,
}

impl CausalLm {
    /// Loads `config.json` and the safetensors weights of the Hugging Face directory `dir`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let checkpoint = Checkpoint::open(dir)?;
        Self::from_checkpoint(config, checkpoint, device)
    }

    /// Builds the model from a parsed config and its tensors.
    pub fn from_checkpoint(
        config: ModelConfig,
        mut checkpoint: Checkpoint,
        device: &Device,
    ) -> Result<Self> {
        let arch = match &config {
            ModelConfig::Llama(c) => {
                Arch::Llama(Box::new(Llama::load(c, &mut checkpoint, device)?))
            }
            ModelConfig::Gpt2(c) => Arch::Gpt2(Box::new(Gpt2::load(c, &mut checkpoint, device)?)),
        };
        Ok(Self {
            config,
            arch,
            device: device.clone(),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The same weights seen from an autodiff device (no copy; the weights stay frozen).
    pub fn to_autodiff(&self) -> Self {
        let device = self.device.clone().autodiff();
        let arch = match &self.arch {
            Arch::Llama(m) => Arch::Llama(Box::new(m.map_weights(&|t| t.autodiff(), true))),
            Arch::Gpt2(m) => Arch::Gpt2(Box::new(m.map_weights(&|t| t.autodiff()))),
        };
        Self {
            config: self.config.clone(),
            arch,
            device,
        }
    }

    /// The same weights, all trainable: on an autodiff device and requiring gradients (for
    /// pretraining; LoRA training keeps the base frozen with [`CausalLm::to_autodiff`]).
    pub fn to_trainable(&self) -> Self {
        let device = self.device.clone().autodiff();
        let f = |t: Tensor<2>| t.autodiff().require_grad();
        let arch = match &self.arch {
            Arch::Llama(m) => Arch::Llama(Box::new(m.map_weights(&f, false))),
            Arch::Gpt2(m) => Arch::Gpt2(Box::new(m.map_weights(&f))),
        };
        Self {
            config: self.config.clone(),
            arch,
            device,
        }
    }

    fn weights(&self) -> Vec<&Weight> {
        match &self.arch {
            Arch::Llama(m) => m.weights(),
            Arch::Gpt2(m) => m.weights(),
        }
    }

    /// The gradient of every weight after `backward` on a [`CausalLm::to_trainable`] model, in
    /// the checkpoint's names and layouts (zeros for weights the loss did not reach).
    pub fn weight_grads(&self, grads: &Gradients) -> Result<NamedTensors> {
        self.weights()
            .into_iter()
            .map(|w| {
                let host = match w.tensor.grad(grads) {
                    Some(g) => w.to_stored(g)?,
                    None => HostTensor::zeros(w.stored_shape.clone()),
                };
                Ok((w.name.clone(), host))
            })
            .collect()
    }

    /// The layers `lora` adapts, in model order.
    pub fn lora_sites(&self, lora: &LoraConfig) -> Vec<LoraSite> {
        self.config.lora_sites_for(lora)
    }

    fn check_batch(&self, batch: &TokenBatch, offset: usize) -> Result<()> {
        let vocab = self.config.vocab_size();
        if let Some(bad) = batch.ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(TrainerError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let max = self.config.max_positions();
        if offset + batch.seq > max {
            return Err(TrainerError::InvalidInput(format!(
                "{} positions exceed the model's {max} learned positions",
                offset + batch.seq
            )));
        }
        Ok(())
    }

    /// Final hidden states `[batch * seq, hidden]` for `batch`, after the final norm. With a
    /// cache, the tokens continue the cached ones and the cache grows.
    pub fn hidden(
        &self,
        batch: &TokenBatch,
        opts: ForwardOptions<'_>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor<2>> {
        let offset = cache.as_ref().map_or(0, |c| c.len);
        self.check_batch(batch, offset)?;
        let ids = batch.to_device(&self.device);
        let dims = Dims {
            batch: batch.batch,
            seq: batch.seq,
            offset,
        };
        let mut cache = cache;
        let layers = cache.as_mut().map(|c| c.layers.as_mut_slice());
        let hidden = match &self.arch {
            Arch::Llama(m) => m.hidden(ids, dims, opts, layers),
            Arch::Gpt2(m) => m.hidden(ids, dims, opts, layers),
        };
        if let Some(c) = cache {
            c.len += batch.seq;
        }
        Ok(hidden)
    }

    /// Output logits `[rows, vocab]` for hidden states `[rows, hidden]`.
    pub fn head(&self, hidden: Tensor<2>) -> Tensor<2> {
        match &self.arch {
            Arch::Llama(m) => m.head(hidden),
            Arch::Gpt2(m) => m.head(hidden),
        }
    }

    /// Logits `[batch, seq, vocab]` for every position of `batch`.
    pub fn logits(&self, batch: &TokenBatch, opts: ForwardOptions<'_>) -> Result<Tensor<3>> {
        let hidden = self.hidden(batch, opts, None)?;
        let vocab = self.config.vocab_size();
        Ok(self.head(hidden).reshape([batch.batch, batch.seq, vocab]))
    }

    /// Mean next-token cross-entropy over the positions whose target has weight 1 in
    /// `target_mask` (`[batch * seq]`, the mask of the token being predicted; position 0 of
    /// each sequence is never a target). Returns the loss `[1]` and the number of targets.
    pub fn next_token_loss(
        &self,
        batch: &TokenBatch,
        target_mask: Option<&[u8]>,
        opts: ForwardOptions<'_>,
    ) -> Result<(Tensor<1>, usize)> {
        let hidden = self.hidden(batch, opts, None)?;
        let logits = self.head(hidden);
        next_token_cross_entropy(logits, batch, target_mask)
    }
}

/// Mean cross-entropy of `logits` (`[batch * seq, vocab]`) against the next token of `batch`.
pub fn next_token_cross_entropy(
    logits: Tensor<2>,
    batch: &TokenBatch,
    target_mask: Option<&[u8]>,
) -> Result<(Tensor<1>, usize)> {
    let (b, t) = (batch.batch, batch.seq);
    if let Some(m) = target_mask
        && m.len() != b * t
    {
        return Err(TrainerError::InvalidInput(format!(
            "loss mask has {} entries for {} tokens",
            m.len(),
            b * t
        )));
    }
    // Row (i, j) predicts token (i, j + 1); the last row of each sequence predicts nothing.
    let mut targets = vec![0usize; b * t];
    let mut weights = vec![0f32; b * t];
    let mut count = 0usize;
    for i in 0..b {
        for j in 0..t.saturating_sub(1) {
            let next = i * t + j + 1;
            if target_mask.is_none_or(|m| m[next] != 0) {
                targets[i * t + j] = batch.ids[next] as usize;
                weights[i * t + j] = 1.0;
                count += 1;
            }
        }
    }
    if count == 0 {
        return Err(TrainerError::InvalidInput(
            "the batch has no target tokens".into(),
        ));
    }
    Ok((
        crate::fused::cross_entropy(logits, targets, weights, count),
        count,
    ))
}

/// Shape facts shared by the layers of one forward pass.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub batch: usize,
    pub seq: usize,
    /// Positions already in the KV cache.
    pub offset: usize,
}

/// Per-layer KV cache slots handed to an architecture's forward pass.
pub(crate) type CacheSlots<'a> = Option<&'a mut [Option<(Tensor<4>, Tensor<4>)>]>;

/// A tensor of the model together with the checkpoint name and layout it came from, so
/// that gradients and trained values can be written back under Hugging Face names.
#[derive(Clone)]
pub(crate) struct Weight {
    /// Name in the checkpoint.
    pub name: String,
    /// Shape in the checkpoint.
    pub stored_shape: Vec<usize>,
    /// Whether the device tensor is the stored matrix transposed.
    pub transposed: bool,
    /// The device tensor, always rank 2 (vectors are `[1, n]`).
    pub tensor: Tensor<2>,
}

impl Weight {
    /// Takes the first of `names` with shape `shape`, transposing it when `transpose` (a
    /// `[out, in]` matrix becomes `[in, out]` so that `x·W` reads it contiguously).
    pub fn load(
        ck: &mut Checkpoint,
        names: &[String],
        shape: &[usize],
        transpose: bool,
        device: &Device,
    ) -> Result<Self> {
        let (name, host) = ck.take_first(names, shape)?;
        let host = if transpose {
            transpose_host(host)
        } else {
            host
        };
        let dims = match host.shape.as_slice() {
            [n] => [1, *n],
            [r, c] => [*r, *c],
            other => {
                return Err(TrainerError::InvalidInput(format!(
                    "tensor {name:?} has rank {}, expected 1 or 2",
                    other.len()
                )));
            }
        };
        Ok(Self {
            name,
            stored_shape: shape.to_vec(),
            transposed: transpose,
            tensor: upload(host, dims, device),
        })
    }

    /// The same weight with its tensor passed through `f`.
    pub fn map(&self, f: &dyn Fn(Tensor<2>) -> Tensor<2>) -> Self {
        Self {
            tensor: f(self.tensor.clone()),
            ..self.clone()
        }
    }

    /// A device tensor shaped like this weight (its value or its gradient) in the
    /// checkpoint's layout, on the host.
    pub fn to_stored(&self, t: Tensor<2>) -> Result<HostTensor> {
        let host = download(t)?;
        let host = if self.transposed {
            transpose_host(host)
        } else {
            host
        };
        Ok(HostTensor {
            shape: self.stored_shape.clone(),
            data: host.data,
        })
    }
}

/// A dense layer `x·W + b` with `W` kept `[in, out]`, plus the LoRA update of its module path.
pub(crate) struct Linear {
    pub path: String,
    pub weight: Weight,
    pub bias: Option<Weight>,
}

/// How a checkpoint stores a dense weight.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum WeightLayout {
    /// `nn.Linear`: `[out, in]`.
    OutIn,
    /// GPT-2's `Conv1D`: `[in, out]`.
    InOut,
}

impl Linear {
    /// Loads `{name}.weight` (and `{name}.bias` when `bias`) for the module at `path`, trying
    /// each of `names` (checkpoints differ in prefixes).
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        ck: &mut Checkpoint,
        names: &[String],
        path: &str,
        in_features: usize,
        out_features: usize,
        layout: WeightLayout,
        bias: bool,
        device: &Device,
    ) -> Result<Self> {
        let with = |suffix: &str| -> Vec<String> {
            names.iter().map(|n| format!("{n}.{suffix}")).collect()
        };
        let weight = match layout {
            WeightLayout::OutIn => Weight::load(
                ck,
                &with("weight"),
                &[out_features, in_features],
                true,
                device,
            )?,
            WeightLayout::InOut => Weight::load(
                ck,
                &with("weight"),
                &[in_features, out_features],
                false,
                device,
            )?,
        };
        let bias = if bias {
            Some(Weight::load(
                ck,
                &with("bias"),
                &[out_features],
                false,
                device,
            )?)
        } else {
            None
        };
        Ok(Self {
            path: path.to_owned(),
            weight,
            bias,
        })
    }

    /// `x` is `[rows, in]`; returns `[rows, out]`.
    pub fn forward(&self, x: Tensor<2>, opts: ForwardOptions<'_>) -> Tensor<2> {
        let update = opts.lora.and_then(|l| l.apply(&self.path, x.clone()));
        let mut y = x.matmul(self.weight.tensor.clone());
        if let Some(b) = &self.bias {
            y = y + b.tensor.clone();
        }
        match update {
            Some(u) => y + u,
            None => y,
        }
    }

    /// Width of the output.
    pub fn out_features(&self) -> usize {
        self.weight.tensor.dims()[1]
    }

    pub fn map_weights(&self, f: &dyn Fn(Tensor<2>) -> Tensor<2>) -> Self {
        Self {
            path: self.path.clone(),
            weight: self.weight.map(f),
            bias: self.bias.as_ref().map(|b| b.map(f)),
        }
    }

    pub fn weights(&self) -> impl Iterator<Item = &Weight> {
        std::iter::once(&self.weight).chain(self.bias.as_ref())
    }
}

/// `[rows, cols]` → `[cols, rows]` on the host.
fn transpose_host(t: HostTensor) -> HostTensor {
    let (r, c) = (t.shape[0], t.shape[1]);
    let mut out = vec![0.0f32; r * c];
    for i in 0..r {
        for j in 0..c {
            out[j * r + i] = t.data[i * c + j];
        }
    }
    HostTensor {
        shape: vec![c, r],
        data: out,
    }
}

/// Puts a host tensor on `device` with the given dimensions.
pub(crate) fn upload<const D: usize>(
    t: HostTensor,
    dims: [usize; D],
    device: &Device,
) -> Tensor<D> {
    Tensor::<D>::from_data(TensorData::new(t.data, dims), device)
}

/// Reads a tensor back to the host.
pub fn download<const D: usize>(t: Tensor<D>) -> Result<HostTensor> {
    let shape = t.dims().to_vec();
    let data = t
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| TrainerError::Device(format!("{e:?}")))?;
    Ok(HostTensor { shape, data })
}

/// LayerNorm over the last dimension with the biased variance, as PyTorch computes it.
pub(crate) fn layer_norm(
    x: Tensor<2>,
    weight: &Tensor<2>,
    bias: &Tensor<2>,
    eps: f64,
) -> Tensor<2> {
    let mean = x.clone().mean_dim(1);
    let centered = x - mean;
    let var = centered.clone().square().mean_dim(1);
    centered * (var + eps).sqrt().recip() * weight.clone() + bias.clone()
}

/// Splits `[batch * seq, heads * head_dim]` into `[batch, heads, seq, head_dim]`.
pub(crate) fn split_heads(x: Tensor<2>, d: Dims, heads: usize, head_dim: usize) -> Tensor<4> {
    x.reshape([d.batch, d.seq, heads, head_dim]).swap_dims(1, 2)
}

/// Merges `[batch, heads, seq, head_dim]` back into `[batch * seq, heads * head_dim]`.
pub(crate) fn merge_heads(x: Tensor<4>, d: Dims) -> Tensor<2> {
    let [_, heads, _, head_dim] = x.dims();
    x.swap_dims(1, 2)
        .reshape([d.batch * d.seq, heads * head_dim])
}

/// Appends this step's keys and values to a layer's cache slot and returns the whole history.
pub(crate) fn extend_cache(
    slot: Option<&mut Option<(Tensor<4>, Tensor<4>)>>,
    k: Tensor<4>,
    v: Tensor<4>,
) -> (Tensor<4>, Tensor<4>) {
    match slot {
        None => (k, v),
        Some(slot) => {
            let (k, v) = match slot.take() {
                Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
                None => (k, v),
            };
            *slot = Some((k.clone(), v.clone()));
            (k, v)
        }
    }
}

/// Causal scaled dot-product attention. `q` is `[batch, heads, seq, d]`, `k` and `v` are
/// `[batch, kv_heads, offset + seq, d]`; query `i` sees keys up to position `offset + i`.
/// Grouped-query attention stacks the query heads of each kv head into one matrix
/// (`[batch, kv_heads, group · seq, d]`), so the keys and values are used as they are instead
/// of being repeated for every query head.
pub(crate) fn causal_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    offset: usize,
    scale: f64,
) -> Tensor<4> {
    let [b, heads, t, hd] = q.dims();
    let kv_heads = k.dims()[1];
    let q = q.reshape([b, kv_heads, heads / kv_heads * t, hd]);
    let scores = q.matmul(k.swap_dims(2, 3));
    crate::fused::causal_softmax(scores, scale, offset, t)
        .matmul(v)
        .reshape([b, heads, t, hd])
}
