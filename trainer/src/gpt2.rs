//! GPT-2: learned position embeddings, pre-LayerNorm blocks, fused q/k/v projection, `gelu_new`
//! MLP and Conv1D weights stored `[in, out]`, with the output head tied to the token embedding.
//! Tensor names follow transformers' `GPT2LMHeadModel` (with or without the `transformer.`
//! prefix that checkpoints saved from `GPT2Model` lack).

use burn::tensor::activation::{gelu, gelu_approximate};
use burn::tensor::{Device, Int, Tensor};

use crate::checkpoint::Checkpoint;
use crate::config::Gpt2Config;
use crate::error::Result;
use crate::model::{
    CacheSlots, Dims, ForwardOptions, Linear, Weight, WeightLayout, causal_attention, extend_cache,
    layer_norm, merge_heads, split_heads,
};

struct Block {
    ln_1: (Weight, Weight),
    c_attn: Linear,
    attn_c_proj: Linear,
    ln_2: (Weight, Weight),
    c_fc: Linear,
    mlp_c_proj: Linear,
}

/// A GPT-2 model on a burn device.
pub struct Gpt2 {
    cfg: Gpt2Config,
    /// `[vocab, n_embd]`, also the output head.
    wte: Weight,
    /// `[n_positions, n_embd]`.
    wpe: Weight,
    blocks: Vec<Block>,
    ln_f: (Weight, Weight),
}

/// LayerNorm with a (weight, bias) pair.
fn ln(x: Tensor<2>, (weight, bias): &(Weight, Weight), eps: f64) -> Tensor<2> {
    layer_norm(x, &weight.tensor, &bias.tensor, eps)
}

/// The names a tensor may have: with the `transformer.` prefix and without.
fn names(name: &str) -> Vec<String> {
    vec![format!("transformer.{name}"), name.to_owned()]
}

impl Gpt2 {
    /// Takes the model's tensors out of `ck`.
    pub(crate) fn load(cfg: &Gpt2Config, ck: &mut Checkpoint, device: &Device) -> Result<Self> {
        let e = cfg.n_embd;
        let norm = |ck: &mut Checkpoint, name: &str| -> Result<(Weight, Weight)> {
            let w = Weight::load(ck, &names(&format!("{name}.weight")), &[e], false, device)?;
            let b = Weight::load(ck, &names(&format!("{name}.bias")), &[e], false, device)?;
            Ok((w, b))
        };
        // Grown as the tensors are found: the layer count comes from a file a peer may send.
        let mut blocks = Vec::new();
        for i in 0..cfg.n_layer {
            let ln_1 = norm(ck, &format!("h.{i}.ln_1"))?;
            let ln_2 = norm(ck, &format!("h.{i}.ln_2"))?;
            let mut linear = |name: &str, inp: usize, out: usize| {
                let rel = format!("h.{i}.{name}");
                let path = format!("transformer.{rel}");
                Linear::load(
                    ck,
                    &names(&rel),
                    &path,
                    inp,
                    out,
                    WeightLayout::InOut,
                    true,
                    device,
                )
            };
            blocks.push(Block {
                ln_1,
                c_attn: linear("attn.c_attn", e, 3 * e)?,
                attn_c_proj: linear("attn.c_proj", e, e)?,
                ln_2,
                c_fc: linear("mlp.c_fc", e, cfg.n_inner)?,
                mlp_c_proj: linear("mlp.c_proj", cfg.n_inner, e)?,
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            ln_f: norm(ck, "ln_f")?,
            wte: Weight::load(
                ck,
                &names("wte.weight"),
                &[cfg.vocab_size, e],
                false,
                device,
            )?,
            wpe: Weight::load(
                ck,
                &names("wpe.weight"),
                &[cfg.n_positions, e],
                false,
                device,
            )?,
            blocks,
        })
    }

    pub(crate) fn map_weights(&self, f: &dyn Fn(Tensor<2>) -> Tensor<2>) -> Self {
        let pair = |(w, b): &(Weight, Weight)| (w.map(f), b.map(f));
        Self {
            cfg: self.cfg.clone(),
            wte: self.wte.map(f),
            wpe: self.wpe.map(f),
            blocks: self
                .blocks
                .iter()
                .map(|b| Block {
                    ln_1: pair(&b.ln_1),
                    c_attn: b.c_attn.map_weights(f),
                    attn_c_proj: b.attn_c_proj.map_weights(f),
                    ln_2: pair(&b.ln_2),
                    c_fc: b.c_fc.map_weights(f),
                    mlp_c_proj: b.mlp_c_proj.map_weights(f),
                })
                .collect(),
            ln_f: pair(&self.ln_f),
        }
    }

    /// Every weight, each once.
    pub(crate) fn weights(&self) -> Vec<&Weight> {
        let mut out = vec![&self.wte, &self.wpe];
        for b in &self.blocks {
            out.extend([&b.ln_1.0, &b.ln_1.1, &b.ln_2.0, &b.ln_2.1]);
            for l in [&b.c_attn, &b.attn_c_proj, &b.c_fc, &b.mlp_c_proj] {
                out.extend(l.weights());
            }
        }
        out.extend([&self.ln_f.0, &self.ln_f.1]);
        out
    }

    /// Final hidden states `[batch * seq, n_embd]`.
    pub(crate) fn hidden(
        &self,
        ids: Tensor<1, Int>,
        d: Dims,
        opts: ForwardOptions<'_>,
        mut cache: CacheSlots<'_>,
    ) -> Tensor<2> {
        let e = self.cfg.n_embd;
        let tokens = self
            .wte
            .tensor
            .clone()
            .select(0, ids)
            .reshape([d.batch, d.seq, e]);
        let positions = self
            .wpe
            .tensor
            .clone()
            .narrow(0, d.offset, d.seq)
            .unsqueeze::<3>();
        let mut x = (tokens + positions).reshape([d.batch * d.seq, e]);
        for (i, block) in self.blocks.iter().enumerate() {
            let slot = cache.as_mut().map(|c| &mut c[i]);
            x = self.block(i, block, x, d, opts, slot);
        }
        ln(x, &self.ln_f, self.cfg.layer_norm_epsilon)
    }

    /// Logits `[rows, vocab]`.
    pub(crate) fn head(&self, hidden: Tensor<2>) -> Tensor<2> {
        hidden.matmul(self.wte.tensor.clone().transpose())
    }

    fn block(
        &self,
        index: usize,
        b: &Block,
        x: Tensor<2>,
        d: Dims,
        opts: ForwardOptions<'_>,
        slot: Option<&mut Option<(Tensor<4>, Tensor<4>)>>,
    ) -> Tensor<2> {
        let c = &self.cfg;
        let (e, heads) = (c.n_embd, c.n_head);
        let hd = e / heads;
        let h = ln(x.clone(), &b.ln_1, c.layer_norm_epsilon);
        let qkv = b.c_attn.forward(h, opts);
        let q = split_heads(qkv.clone().narrow(1, 0, e), d, heads, hd);
        let k = split_heads(qkv.clone().narrow(1, e, e), d, heads, hd);
        let v = split_heads(qkv.narrow(1, 2 * e, e), d, heads, hd);
        let (k, v) = extend_cache(slot, k, v);
        let mut scale = if c.scale_attn_weights {
            1.0 / (hd as f64).sqrt()
        } else {
            1.0
        };
        if c.scale_attn_by_inverse_layer_idx {
            scale /= (index + 1) as f64;
        }
        let attn = causal_attention(q, k, v, d.offset, scale);
        let x = x + b.attn_c_proj.forward(merge_heads(attn, d), opts);
        let h = ln(x.clone(), &b.ln_2, c.layer_norm_epsilon);
        let h = b.c_fc.forward(h, opts);
        let h = if c.gelu_tanh {
            gelu_approximate(h)
        } else {
            gelu(h)
        };
        x + b.mlp_c_proj.forward(h, opts)
    }
}
