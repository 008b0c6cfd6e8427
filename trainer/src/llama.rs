//! The Llama family (Llama, Mistral, Qwen2, SmolLM): RMSNorm, rotary position embeddings,
//! grouped-query attention and a SwiGLU MLP, with tied or untied output embeddings and
//! optional q/k/v biases (Qwen2). Tensor names and semantics follow transformers'
//! `modeling_llama.py`.

use burn::tensor::activation::silu;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::checkpoint::Checkpoint;
use crate::config::{LlamaConfig, RopeScaling};
use crate::error::Result;
use crate::model::{
    CacheSlots, Dims, ForwardOptions, Linear, Weight, WeightLayout, causal_attention, extend_cache,
    merge_heads, rms_norm, split_heads,
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
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
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

    pub(crate) fn map_weights(&self, f: &dyn Fn(Tensor<2>) -> Tensor<2>) -> Self {
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
        let device = ids.device();
        let mut x = self.embed_tokens.tensor.clone().select(0, ids);
        let (cos, sin) = self.rope_tables(d, &device);
        for (i, block) in self.blocks.iter().enumerate() {
            let slot = cache.as_mut().map(|c| &mut c[i]);
            x = self.block(block, x, d, &cos, &sin, opts, slot);
        }
        rms_norm(x, &self.norm.tensor, self.cfg.rms_norm_eps)
    }

    /// Logits `[rows, vocab]`.
    pub(crate) fn head(&self, hidden: Tensor<2>) -> Tensor<2> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        hidden.matmul(head.tensor.clone().transpose())
    }

    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        b: &Block,
        x: Tensor<2>,
        d: Dims,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        opts: ForwardOptions<'_>,
        slot: Option<&mut Option<(Tensor<4>, Tensor<4>)>>,
    ) -> Tensor<2> {
        let c = &self.cfg;
        let h = rms_norm(x.clone(), &b.input_norm.tensor, c.rms_norm_eps);
        let q = split_heads(
            b.q_proj.forward(h.clone(), opts),
            d,
            c.num_attention_heads,
            c.head_dim,
        );
        let k = split_heads(
            b.k_proj.forward(h.clone(), opts),
            d,
            c.num_key_value_heads,
            c.head_dim,
        );
        let v = split_heads(
            b.v_proj.forward(h, opts),
            d,
            c.num_key_value_heads,
            c.head_dim,
        );
        let q = apply_rope(q, cos, sin);
        let k = apply_rope(k, cos, sin);
        let (k, v) = extend_cache(slot, k, v);
        let attn = causal_attention(q, k, v, d.offset, 1.0 / (c.head_dim as f64).sqrt());
        let x = x + b.o_proj.forward(merge_heads(attn, d), opts);
        let h = rms_norm(x.clone(), &b.post_attention_norm.tensor, c.rms_norm_eps);
        let gated = silu(b.gate_proj.forward(h.clone(), opts)) * b.up_proj.forward(h, opts);
        x + b.down_proj.forward(gated, opts)
    }

    /// `cos` and `sin` of the rotation angles, `[1, 1, seq, head_dim]`, for positions
    /// `offset..offset + seq` (each frequency appears twice, as transformers lays them out).
    fn rope_tables(&self, d: Dims, device: &Device) -> (Tensor<4>, Tensor<4>) {
        let half = self.inv_freq.len();
        let hd = 2 * half;
        let mut cos = vec![0f32; d.seq * hd];
        let mut sin = vec![0f32; d.seq * hd];
        for t in 0..d.seq {
            let pos = (d.offset + t) as f64;
            for (j, f) in self.inv_freq.iter().enumerate() {
                let angle = pos * f;
                let (s, c) = angle.sin_cos();
                for k in [j, j + half] {
                    cos[t * hd + k] = c as f32;
                    sin[t * hd + k] = s as f32;
                }
            }
        }
        let up =
            |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, [1, 1, d.seq, hd]), device);
        (up(cos), up(sin))
    }
}

/// Rotates `x` (`[batch, heads, seq, head_dim]`): `x·cos + rotate_half(x)·sin`.
fn apply_rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let hd = x.dims()[3];
    let half = hd / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
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
