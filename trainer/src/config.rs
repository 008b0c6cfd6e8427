//! Model configurations read from a Hugging Face `config.json`, in both the transformers 4
//! layout (`rope_theta`, `rope_scaling`, `torch_dtype` at the top level) and the transformers 5
//! layout (`rope_parameters`, `dtype`).

use std::path::Path;

use serde_json::Value;

use crate::error::{Result, TrainerError};
use crate::lora::LoraSite;

/// The architectures this trainer implements.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelConfig {
    /// Llama, Mistral, Qwen2, SmolLM: RMSNorm, RoPE, grouped-query attention, SwiGLU.
    Llama(LlamaConfig),
    /// GPT-2: learned positions, LayerNorm, gelu_new, Conv1D weight layout.
    Gpt2(Gpt2Config),
}

/// The linear layers of a Llama-family block that LoRA can adapt.
pub const LLAMA_LORA_TARGETS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The linear layers of a GPT-2 block that LoRA can adapt.
pub const GPT2_LORA_TARGETS: &[&str] = &["c_attn", "c_proj", "c_fc"];

/// How RoPE frequencies are scaled for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        /// Scale of the low frequencies.
        factor: f64,
        /// Wavelength bound of the low-frequency band, in units of the original context.
        low_freq_factor: f64,
        /// Wavelength bound of the high-frequency band.
        high_freq_factor: f64,
        /// The context the model was pretrained with.
        original_max_position_embeddings: f64,
    },
}

/// A Llama-family configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// `model_type` as written in the file.
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU hidden layer.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Whether q/k/v projections have a bias (Qwen2).
    pub attention_bias: bool,
    /// Whether the o projection has a bias.
    pub o_bias: bool,
    /// Whether the MLP projections have a bias.
    pub mlp_bias: bool,
    /// Whether the output head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// End-of-sequence token, when the config names one.
    pub eos_token_id: Option<u32>,
    /// Beginning-of-sequence token, when the config names one.
    pub bos_token_id: Option<u32>,
}

/// A GPT-2 configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Gpt2Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Number of blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Width of the MLP hidden layer.
    pub n_inner: usize,
    /// Number of learned positions.
    pub n_positions: usize,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: f64,
    /// Whether the MLP uses the tanh approximation of GELU (`gelu_new`) or the exact one.
    pub gelu_tanh: bool,
    /// Whether attention scores are divided by sqrt(head_dim).
    pub scale_attn_weights: bool,
    /// Whether attention scores are further divided by (layer index + 1).
    pub scale_attn_by_inverse_layer_idx: bool,
    /// End-of-sequence token.
    pub eos_token_id: Option<u32>,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
}

impl ModelConfig {
    /// Reads `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainerError::io(path, e))?;
        Self::from_json(&text).map_err(|e| match e {
            TrainerError::Config { reason, .. } => TrainerError::config(path, reason),
            other => other,
        })
    }

    /// Parses the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| TrainerError::config("config.json", format!("not valid JSON: {e}")))?;
        let fields = Fields(&value);
        let model_type = fields.string("model_type")?;
        match model_type.as_str() {
            "llama" | "mistral" | "qwen2" | "smollm" | "smollm2" => {
                Ok(Self::Llama(LlamaConfig::parse(&fields, model_type)?))
            }
            "gpt2" => Ok(Self::Gpt2(Gpt2Config::parse(&fields)?)),
            _ => Err(TrainerError::UnsupportedModel(model_type)),
        }
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Llama(c) => c.vocab_size,
            Self::Gpt2(c) => c.vocab_size,
        }
    }

    /// Number of transformer blocks.
    pub fn num_layers(&self) -> usize {
        match self {
            Self::Llama(c) => c.num_hidden_layers,
            Self::Gpt2(c) => c.n_layer,
        }
    }

    /// Longest sequence the position encoding supports (`usize::MAX` when unbounded).
    pub fn max_positions(&self) -> usize {
        match self {
            // RoPE extrapolates; the trained length is advice, not a hard limit.
            Self::Llama(_) => usize::MAX,
            Self::Gpt2(c) => c.n_positions,
        }
    }

    /// End-of-sequence token id from the config.
    pub fn eos_token_id(&self) -> Option<u32> {
        match self {
            Self::Llama(c) => c.eos_token_id,
            Self::Gpt2(c) => c.eos_token_id,
        }
    }

    /// Every linear layer LoRA can adapt, in model order, with its module path and shapes.
    pub fn lora_sites(&self) -> Vec<LoraSite> {
        let site = |path: String, in_features, out_features, fan_in_fan_out| LoraSite {
            path,
            in_features,
            out_features,
            fan_in_fan_out,
        };
        match self {
            Self::Llama(c) => {
                let (h, inter) = (c.hidden_size, c.intermediate_size);
                let (q, kv) = (
                    c.num_attention_heads * c.head_dim,
                    c.num_key_value_heads * c.head_dim,
                );
                (0..c.num_hidden_layers)
                    .flat_map(|i| {
                        let p = format!("model.layers.{i}");
                        [
                            site(format!("{p}.self_attn.q_proj"), h, q, false),
                            site(format!("{p}.self_attn.k_proj"), h, kv, false),
                            site(format!("{p}.self_attn.v_proj"), h, kv, false),
                            site(format!("{p}.self_attn.o_proj"), q, h, false),
                            site(format!("{p}.mlp.gate_proj"), h, inter, false),
                            site(format!("{p}.mlp.up_proj"), h, inter, false),
                            site(format!("{p}.mlp.down_proj"), inter, h, false),
                        ]
                    })
                    .collect()
            }
            Self::Gpt2(c) => {
                let (e, inner) = (c.n_embd, c.n_inner);
                (0..c.n_layer)
                    .flat_map(|i| {
                        let p = format!("transformer.h.{i}");
                        [
                            site(format!("{p}.attn.c_attn"), e, 3 * e, true),
                            site(format!("{p}.attn.c_proj"), e, e, true),
                            site(format!("{p}.mlp.c_fc"), e, inner, true),
                            site(format!("{p}.mlp.c_proj"), inner, e, true),
                        ]
                    })
                    .collect()
            }
        }
    }

    /// The layers `lora` adapts, in model order.
    pub fn lora_sites_for(&self, lora: &crate::lora::LoraConfig) -> Vec<LoraSite> {
        self.lora_sites()
            .into_iter()
            .filter(|s| lora.targets(&s.path))
            .collect()
    }

    /// Whether adapted weights are stored `[in, out]` (GPT-2's Conv1D), PEFT's `fan_in_fan_out`.
    pub fn fan_in_fan_out(&self) -> bool {
        matches!(self, Self::Gpt2(_))
    }

    /// The LoRA target module names this architecture has.
    pub fn lora_target_names(&self) -> &'static [&'static str] {
        match self {
            Self::Llama(_) => LLAMA_LORA_TARGETS,
            Self::Gpt2(_) => GPT2_LORA_TARGETS,
        }
    }
}

impl LlamaConfig {
    fn parse(f: &Fields<'_>, model_type: String) -> Result<Self> {
        let hidden_size = f.usize("hidden_size")?;
        let num_attention_heads = f.usize("num_attention_heads")?;
        let num_key_value_heads = f
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_attention_heads == 0 || num_key_value_heads == 0 {
            return Err(f.err("num_attention_heads and num_key_value_heads must be positive"));
        }
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(f.err(format!(
                "num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
            )));
        }
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(f.err("hidden_size is not a multiple of num_attention_heads and head_dim is not given"));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(f.err(format!("head_dim must be even for RoPE, found {head_dim}")));
        }
        let rope_parameters = f.0.get("rope_parameters").filter(|v| !v.is_null());
        let rope_theta = match rope_parameters.and_then(|p| p.get("rope_theta")) {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| f.err("rope_parameters.rope_theta is not a number"))?,
            None => f.opt_f64("rope_theta")?.unwrap_or(10_000.0),
        };
        let scaling = rope_parameters.or_else(|| f.0.get("rope_scaling").filter(|v| !v.is_null()));
        let rope_scaling = parse_rope_scaling(f, scaling)?;
        let qwen = model_type == "qwen2";
        let attention_bias = f.opt_bool("attention_bias")?.unwrap_or(qwen);
        Ok(Self {
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers: f.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            attention_bias,
            // Qwen2 puts a bias on q, k and v but not on o; Llama's `attention_bias` covers all four.
            o_bias: attention_bias && !qwen,
            mlp_bias: f.opt_bool("mlp_bias")?.unwrap_or(false),
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(2048),
            eos_token_id: f.token_id("eos_token_id")?,
            bos_token_id: f.token_id("bos_token_id")?,
            model_type,
        })
    }
}

impl LlamaConfig {
    /// The `config.json` transformers writes for this configuration (plain RoPE only).
    pub fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
            "use_cache": true,
        })
    }
}

fn parse_rope_scaling(f: &Fields<'_>, scaling: Option<&Value>) -> Result<RopeScaling> {
    let Some(s) = scaling else {
        return Ok(RopeScaling::None);
    };
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        s.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| f.err(format!("rope scaling {kind:?} needs a number {key:?}")))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(f.err(format!(
            "unsupported rope scaling type {other:?}: supported are default, linear and llama3"
        ))),
    }
}

impl Gpt2Config {
    fn parse(f: &Fields<'_>) -> Result<Self> {
        let n_embd = f.usize("n_embd")?;
        let n_head = f.usize("n_head")?;
        if n_head == 0 || n_embd % n_head != 0 {
            return Err(f.err(format!(
                "n_embd ({n_embd}) must be a positive multiple of n_head ({n_head})"
            )));
        }
        let activation = f
            .opt_string("activation_function")?
            .unwrap_or_else(|| "gelu_new".into());
        let gelu_tanh = match activation.as_str() {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => true,
            "gelu" => false,
            other => {
                return Err(f.err(format!(
                    "unsupported activation_function {other:?}: supported are gelu_new, gelu_pytorch_tanh and gelu"
                )));
            }
        };
        if f.opt_bool("tie_word_embeddings")? == Some(false) {
            return Err(f.err("GPT-2 with an untied lm_head is not supported"));
        }
        Ok(Self {
            vocab_size: f.usize("vocab_size")?,
            n_embd,
            n_layer: f.usize("n_layer")?,
            n_head,
            n_inner: f.opt_usize("n_inner")?.unwrap_or(4 * n_embd),
            n_positions: f.usize("n_positions")?,
            layer_norm_epsilon: f.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5),
            gelu_tanh,
            scale_attn_weights: f.opt_bool("scale_attn_weights")?.unwrap_or(true),
            scale_attn_by_inverse_layer_idx: f
                .opt_bool("scale_attn_by_inverse_layer_idx")?
                .unwrap_or(false),
            eos_token_id: f.token_id("eos_token_id")?,
            bos_token_id: f.token_id("bos_token_id")?,
        })
    }
}

/// Typed access to the fields of a JSON object, with errors that name the field.
struct Fields<'a>(&'a Value);

impl Fields<'_> {
    fn err(&self, reason: impl Into<String>) -> TrainerError {
        TrainerError::config("config.json", reason)
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn string(&self, key: &str) -> Result<String> {
        self.opt_string(key)?
            .ok_or_else(|| self.err(format!("missing field {key:?}")))
    }

    fn opt_string(&self, key: &str) -> Result<Option<String>> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| self.err(format!("field {key:?} must be a string, found {v}")))
            })
            .transpose()
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(format!("missing field {key:?}")))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .filter(|&n| n > 0 && n < (1 << 31))
                    .ok_or_else(|| {
                        self.err(format!(
                            "field {key:?} must be a positive integer, found {v}"
                        ))
                    })
            })
            .transpose()
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| self.err(format!("field {key:?} must be a number, found {v}")))
            })
            .transpose()
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| {
                v.as_bool().ok_or_else(|| {
                    self.err(format!("field {key:?} must be true or false, found {v}"))
                })
            })
            .transpose()
    }

    /// A token id: an integer, or a list of integers (the first is used), or null.
    fn token_id(&self, key: &str) -> Result<Option<u32>> {
        let first = match self.get(key) {
            None => return Ok(None),
            Some(Value::Array(items)) => match items.first() {
                None => return Ok(None),
                Some(v) => v,
            },
            Some(v) => v,
        };
        first
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| self.err(format!("field {key:?} must be a token id, found {first}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_transformers_4_and_5_rope_fields() {
        let v5 = r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,"rope_parameters":{"rope_theta":500.0,"rope_type":"default"}}"#;
        let v4 = r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,"rope_theta":500.0,"rope_scaling":null,"torch_dtype":"float32"}"#;
        for text in [v5, v4] {
            let ModelConfig::Llama(c) = ModelConfig::from_json(text).unwrap() else {
                panic!("expected llama")
            };
            assert_eq!(c.rope_theta, 500.0);
            assert_eq!(c.rope_scaling, RopeScaling::None);
            assert_eq!(c.num_key_value_heads, 2);
            assert_eq!(c.head_dim, 4);
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let err = ModelConfig::from_json(r#"{"model_type":"t5"}"#).unwrap_err();
        assert!(err.to_string().contains("\"t5\""), "{err}");
        let err = ModelConfig::from_json(
            r#"{"model_type":"llama","vocab_size":"many","hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("vocab_size"), "{err}");
        let err = ModelConfig::from_json(
            r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":3,"num_key_value_heads":2}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("multiple of num_key_value_heads"),
            "{err}"
        );
    }

    #[test]
    fn reads_the_fixture_configs() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
        let qwen = ModelConfig::from_file(&Path::new(dir).join("qwen2/model/config.json")).unwrap();
        let ModelConfig::Llama(q) = qwen else {
            panic!()
        };
        assert!(q.attention_bias && !q.o_bias && q.tie_word_embeddings);
        assert_eq!(q.rope_theta, 1e6);
        let gpt2 = ModelConfig::from_file(&Path::new(dir).join("gpt2/model/config.json")).unwrap();
        let ModelConfig::Gpt2(g) = gpt2 else { panic!() };
        assert_eq!((g.n_inner, g.n_head, g.gelu_tanh), (256, 4, true));
    }
}
