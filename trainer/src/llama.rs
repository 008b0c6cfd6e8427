//! The Llama family (Llama, Mistral, Qwen2, SmolLM): RMSNorm, rotary position embeddings,
//! grouped-query attention and a SwiGLU MLP, with tied or untied output embeddings and
//! optional q/k/v biases (Qwen2). Tensor names and semantics follow transformers'
//! `modeling_llama.py`.

use std::sync::Arc;

use burn::tensor::{Device, Int, Tensor};

use crate::checkpoint::Checkpoint;
use crate::config::{LlamaConfig, RopeScaling};
use crate::error::Result;
use crate::fused::{RopeTables, rms_norm, rope, swiglu};
use crate::model::{
    CacheSlots, Dims, ForwardOptions, Linear, Weight, WeightLayout, causal_attention, extend_cache,
    merge_heads, split_heads,
};

/// One transformer block.
struct Block {
    input_norm: Weight,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_norm: Weight,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    /// q/k/v as one `[hidden, q_out + 2·kv_out]` matrix, and gate/up as one
    /// `[hidden, 2·intermediate]`, so that each group of projections is one GEMM forward and
    /// one backward. The separate weights above are views into these. Absent when the weights
    /// are trainable (pretraining), whose gradients must land on the separate weights.
    fused: Option<FusedProjections>,
}

#[derive(Clone)]
struct FusedProjections {
    qkv: Tensor<2>,
    qkv_bias: Option<Tensor<2>>,
    gate_up: Tensor<2>,
    gate_up_bias: Option<Tensor<2>>,
}

impl FusedProjections {
    /// Concatenates the projections' weights (a copy, made once at load) and points each
    /// projection at its slice of the result, so the model holds one copy of every weight.
    fn build(linears: [&mut Linear; 5]) -> Self {
        let [q, k, v, gate, up] = linears;
        let (qkv, qkv_bias) = Self::join(&mut [q, k, v]);
        let (gate_up, gate_up_bias) = Self::join(&mut [gate, up]);
        Self {
            qkv,
            qkv_bias,
            gate_up,
            gate_up_bias,
        }
    }

    fn join(parts: &mut [&mut Linear]) -> (Tensor<2>, Option<Tensor<2>>) {
        let weight = Tensor::cat(parts.iter().map(|l| l.weight.tensor.clone()).collect(), 1);
        let bias = parts.iter().all(|l| l.bias.is_some()).then(|| {
            Tensor::cat(
                parts
                    .iter()
                    .filter_map(|l| l.bias.as_ref().map(|b| b.tensor.clone()))
                    .collect(),
                1,
            )
        });
        let mut start = 0;
        for l in parts.iter_mut() {
            let width = l.out_features();
            l.weight.tensor = weight.clone().narrow(1, start, width);
            if let (Some(b), Some(all)) = (l.bias.as_mut(), bias.as_ref()) {
                b.tensor = all.clone().narrow(1, start, width);
            }
            start += width;
        }
        (weight, bias)
    }

    fn map(&self, f: &dyn Fn(Tensor<2>) -> Tensor<2>) -> Self {
        Self {
            qkv: f(self.qkv.clone()),
            qkv_bias: self.qkv_bias.clone().map(f),
            gate_up: f(self.gate_up.clone()),
            gate_up_bias: self.gate_up_bias.clone().map(f),
        }
    }
}

/// `x·W (+ b)` for a fused projection, plus the LoRA updates of the adapted parts (zeros for
/// the others), so the adapter sees exactly what it sees with separate projections.
fn fused_forward(
    x: Tensor<2>,
    weight: &Tensor<2>,
    bias: Option<&Tensor<2>>,
    parts: &[&Linear],
    opts: ForwardOptions<'_>,
) -> Tensor<2> {
    let updates: Vec<Option<Tensor<2>>> = parts
        .iter()
        .map(|l| opts.lora.and_then(|a| a.apply(&l.path, x.clone())))
        .collect();
    let rows = x.dims()[0];
    let device = x.device();
    let mut y = x.matmul(weight.clone());
    if let Some(b) = bias {
        y = y + b.clone();
    }
    if updates.iter().any(Option::is_some) {
        let full = updates
            .into_iter()
            .zip(parts)
            .map(|(u, l)| u.unwrap_or_else(|| Tensor::zeros([rows, l.out_features()], &device)))
            .collect();
        y = y + Tensor::cat(full, 1);
    }
    y
}

impl Block {
    fn linears(&self) -> [&Linear; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }
}

/// A Llama-family model on a burn device.
pub struct Llama {
    cfg: LlamaConfig,
    /// `[vocab, hidden]`.
    embed_tokens: Weight,
    blocks: Vec<Block>,
    /// `[1, hidden]`.
    norm: Weight,
    /// `[vocab, hidden]`; `None` when the head is tied to the embedding.
    lm_head: Option<Weight>,
    /// RoPE inverse frequencies, `head_dim / 2` of them, scaling applied.
    inv_freq: Vec<f64>,
}

impl Llama {
    /// Takes the model's tensors out of `ck`; errors name the missing or misshapen tensor.
    pub(crate) fn load(cfg: &LlamaConfig, ck: &mut Checkpoint, device: &Device) -> Result<Self> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let (q_out, kv_out) = (
            cfg.num_attention_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim,
        );
        let vector =
            |ck: &mut Checkpoint, name: String| Weight::load(ck, &[name], &[h], false, device);
        let embed_tokens = Weight::load(
            ck,
            &["model.embed_tokens.weight".into()],
            &[v, h],
            false,
            device,
        )?;
        // Grown as the tensors are found: the layer count comes from a file a peer may send.
        let mut blocks = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut linear = |name: &str, inp: usize, out: usize, bias: bool| {
                let path = format!("{p}.{name}");
                Linear::load(
                    ck,
                    std::slice::from_ref(&path),
                    &path,
                    inp,
                    out,
                    WeightLayout::OutIn,
                    bias,
                    device,
                )
            };
            let q_proj = linear("self_attn.q_proj", h, q_out, cfg.attention_bias)?;
            let k_proj = linear("self_attn.k_proj", h, kv_out, cfg.attention_bias)?;
            let v_proj = linear("self_attn.v_proj", h, kv_out, cfg.attention_bias)?;
            let o_proj = linear("self_attn.o_proj", q_out, h, cfg.o_bias)?;
            let gate_proj = linear("mlp.gate_proj", h, cfg.intermediate_size, cfg.mlp_bias)?;
            let up_proj = linear("mlp.up_proj", h, cfg.intermediate_size, cfg.mlp_bias)?;
            let down_proj = linear("mlp.down_proj", cfg.intermediate_size, h, cfg.mlp_bias)?;
            let (mut q_proj, mut k_proj, mut v_proj) = (q_proj, k_proj, v_proj);
            let (mut gate_proj, mut up_proj) = (gate_proj, up_proj);
            let fused = Some(FusedProjections::build([
                &mut q_proj,
                &mut k_proj,
                &mut v_proj,
                &mut gate_proj,
                &mut up_proj,
            ]));
            blocks.push(Block {
                input_norm: vector(ck, format!("{p}.input_layernorm.weight"))?,
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                post_attention_norm: vector(ck, format!("{p}.post_attention_layernorm.weight"))?,
                gate_proj,
                up_proj,
                down_proj,
                fused,
            });
        }
        let norm = vector(ck, "model.norm.weight".into())?;
        // Some tied checkpoints still carry a copy of the head; the embedding is authoritative.
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(Weight::load(
                ck,
                &["lm_head.weight".into()],
                &[v, h],
                false,
                device,
            )?)
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            blocks,
            norm,
            lm_head,
            inv_freq: rope_inv_freq(cfg),
        })
    }

    /// The same model with every weight passed through `f`; `keep_fused` keeps the fused
    /// projections (frozen weights), otherwise the separate weights are used (trainable ones).
    pub(crate) fn map_weights(&self, f: &dyn Fn(Tensor<2>) -> Tensor<2>, keep_fused: bool) -> Self {
        Self {
            cfg: self.cfg.clone(),
            embed_tokens: self.embed_tokens.map(f),
            blocks: self
                .blocks
                .iter()
                .map(|b| Block {
                    input_norm: b.input_norm.map(f),
                    q_proj: b.q_proj.map_weights(f),
                    k_proj: b.k_proj.map_weights(f),
                    v_proj: b.v_proj.map_weights(f),
                    o_proj: b.o_proj.map_weights(f),
                    post_attention_norm: b.post_attention_norm.map(f),
                    gate_proj: b.gate_proj.map_weights(f),
                    up_proj: b.up_proj.map_weights(f),
                    down_proj: b.down_proj.map_weights(f),
                    fused: if keep_fused {
                        b.fused.as_ref().map(|p| p.map(f))
                    } else {
                        None
                    },
                })
                .collect(),
            norm: self.norm.map(f),
            lm_head: self.lm_head.as_ref().map(|w| w.map(f)),
            inv_freq: self.inv_freq.clone(),
        }
    }

    /// Every weight, each once (a tied head is the embedding).
    pub(crate) fn weights(&self) -> Vec<&Weight> {
        let mut out = vec![&self.embed_tokens];
        for b in &self.blocks {
            out.push(&b.input_norm);
            out.push(&b.post_attention_norm);
            out.extend(b.linears().into_iter().flat_map(Linear::weights));
        }
        out.push(&self.norm);
        out.extend(self.lm_head.as_ref());
        out
    }

    /// Final hidden states `[batch * seq, hidden]`.
    pub(crate) fn hidden(
        &self,
        ids: Tensor<1, Int>,
        d: Dims,
        opts: ForwardOptions<'_>,
        mut cache: CacheSlots<'_>,
    ) -> Tensor<2> {
        let mut x = self.embed_tokens.tensor.clone().select(0, ids);
        let tables = self.rope_tables(d);
        for (i, block) in self.blocks.iter().enumerate() {
            let slot = cache.as_mut().map(|c| &mut c[i]);
            x = self.block(block, x, d, &tables, opts, slot);
        }
        rms_norm(x, &self.norm.tensor, self.cfg.rms_norm_eps)
    }

    /// Logits `[rows, vocab]`.
    pub(crate) fn head(&self, hidden: Tensor<2>) -> Tensor<2> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        hidden.matmul(head.tensor.clone().transpose())
    }

    fn block(
        &self,
        b: &Block,
        x: Tensor<2>,
        d: Dims,
        tables: &RopeTables,
        opts: ForwardOptions<'_>,
        slot: Option<&mut Option<(Tensor<4>, Tensor<4>)>>,
    ) -> Tensor<2> {
        let c = &self.cfg;
        let (heads, kv_heads, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let h = rms_norm(x.clone(), &b.input_norm.tensor, c.rms_norm_eps);
        let (q, k, v) = match &b.fused {
            Some(f) => {
                let parts = [&b.q_proj, &b.k_proj, &b.v_proj];
                let qkv = fused_forward(h, &f.qkv, f.qkv_bias.as_ref(), &parts, opts);
                // Queries and keys rotated in one pass; the values pass through.
                let qkv = rope(qkv, heads + kv_heads, tables);
                let (q_out, kv_out) = (heads * hd, kv_heads * hd);
                (
                    qkv.clone().narrow(1, 0, q_out),
                    qkv.clone().narrow(1, q_out, kv_out),
                    qkv.narrow(1, q_out + kv_out, kv_out),
                )
            }
            None => (
                rope(b.q_proj.forward(h.clone(), opts), heads, tables),
                rope(b.k_proj.forward(h.clone(), opts), kv_heads, tables),
                b.v_proj.forward(h, opts),
            ),
        };
        let q = split_heads(q, d, heads, hd);
        let k = split_heads(k, d, kv_heads, hd);
        let v = split_heads(v, d, kv_heads, hd);
        let (k, v) = extend_cache(slot, k, v);
        let attn = causal_attention(q, k, v, d.offset, 1.0 / (hd as f64).sqrt());
        let x = x + b.o_proj.forward(merge_heads(attn, d), opts);
        let h = rms_norm(x.clone(), &b.post_attention_norm.tensor, c.rms_norm_eps);
        let gate_up = match &b.fused {
            Some(f) => {
                let parts = [&b.gate_proj, &b.up_proj];
                fused_forward(h, &f.gate_up, f.gate_up_bias.as_ref(), &parts, opts)
            }
            None => Tensor::cat(
                vec![
                    b.gate_proj.forward(h.clone(), opts),
                    b.up_proj.forward(h, opts),
                ],
                1,
            ),
        };
        x + b
            .down_proj
            .forward(swiglu(gate_up, c.intermediate_size), opts)
    }

    /// `cos` and `sin` of the rotation angles for positions `offset..offset + seq`, one entry
    /// per frequency.
    fn rope_tables(&self, d: Dims) -> RopeTables {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(d.seq * half);
        let mut sin = Vec::with_capacity(d.seq * half);
        for t in 0..d.seq {
            let pos = (d.offset + t) as f64;
            for f in &self.inv_freq {
                let (s, c) = (pos * f).sin_cos();
                cos.push(c as f32);
                sin.push(s as f32);
            }
        }
        RopeTables {
            seq: d.seq,
            half,
            cos: Arc::new(cos),
            sin: Arc::new(sin),
        }
    }
}

/// RoPE inverse frequencies `1 / theta^(2j / head_dim)`, with the config's scaling applied.
fn rope_inv_freq(cfg: &LlamaConfig) -> Vec<f64> {
    let hd = cfg.head_dim;
    let base: Vec<f64> = (0..hd / 2)
        .map(|j| 1.0 / cfg.rope_theta.powf((2 * j) as f64 / hd as f64))
        .collect();
    match cfg.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_ctx,
        } => {
            let low_wavelen = old_ctx / low_freq_factor;
            let high_wavelen = old_ctx / high_freq_factor;
            base.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_ctx / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}
