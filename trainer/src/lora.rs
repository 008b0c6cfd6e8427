//! LoRA: the configuration, the adapter in PEFT format (`adapter_config.json`,
//! `adapter_model.safetensors` with PEFT tensor names), its initialisation, its merge into a
//! base checkpoint, and its tensors on a burn device.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{read_safetensors, write_atomic, write_safetensors};
use crate::error::{Result, TrainerError};
use crate::tensors::{HostTensor, NamedTensors};

/// The prefix PEFT puts before a module path in adapter tensor names.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// What a LoRA adapter adapts and how strongly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank r of the update `B·A`.
    pub rank: usize,
    /// Scale numerator: the update is multiplied by `alpha / rank`.
    pub alpha: f32,
    /// Dropout on the adapter's input during training.
    pub dropout: f32,
    /// Module names to adapt (`q_proj`, `v_proj`, ... or `c_attn`, `c_proj`, `c_fc`).
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
        }
    }
}

impl LoraConfig {
    /// The factor the update `B·A` is multiplied by.
    pub fn scaling(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// Whether the module at `path` (e.g. `model.layers.3.self_attn.q_proj`) is adapted: its last
    /// component equals one of the targets, as PEFT matches a list of names.
    pub fn targets(&self, path: &str) -> bool {
        let last = path.rsplit('.').next().unwrap_or(path);
        self.target_modules.iter().any(|t| t == last || t == path)
    }

    /// Checks the values a user or a peer sent; `known_targets` are the names the model has.
    pub fn validate(&self, known_targets: &[&str]) -> std::result::Result<(), String> {
        if self.rank == 0 || self.rank > 1024 {
            return Err(format!(
                "rank must be between 1 and 1024, found {}",
                self.rank
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(format!(
                "alpha must be a positive number, found {}",
                self.alpha
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("dropout must be in [0, 1), found {}", self.dropout));
        }
        if self.target_modules.is_empty() {
            return Err("target_modules is empty".into());
        }
        for t in &self.target_modules {
            if !known_targets.contains(&t.as_str()) {
                return Err(format!(
                    "target module {t:?} is not in this model; it has {}",
                    known_targets.join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// One adapted linear layer: its module path and the shapes of its weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoraSite {
    /// Module path in the Hugging Face model class, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// Whether the base weight is stored `[in, out]` (GPT-2's Conv1D) rather than `[out, in]`.
    pub fan_in_fan_out: bool,
}

impl LoraSite {
    /// PEFT name of the A matrix (`[rank, in]`).
    pub fn a_name(&self) -> String {
        format!("{PEFT_PREFIX}{}.lora_A.weight", self.path)
    }

    /// PEFT name of the B matrix (`[out, rank]`).
    pub fn b_name(&self) -> String {
        format!("{PEFT_PREFIX}{}.lora_B.weight", self.path)
    }
}

/// A LoRA adapter: its config and its tensors under PEFT names, on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter {
    /// Rank, alpha, dropout and targets.
    pub config: LoraConfig,
    /// `lora_A` / `lora_B` tensors under PEFT names.
    pub tensors: NamedTensors,
}

impl Adapter {
    /// A fresh adapter as PEFT initialises one: A uniform in ±1/sqrt(in) (Kaiming with a=√5),
    /// B zero, so the adapted model starts equal to the base.
    pub fn init(config: LoraConfig, sites: &[LoraSite], seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tensors = NamedTensors::new();
        for site in sites {
            let bound = 1.0 / (site.in_features as f32).sqrt();
            let a = (0..config.rank * site.in_features)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            tensors.insert(
                site.a_name(),
                HostTensor {
                    shape: vec![config.rank, site.in_features],
                    data: a,
                },
            );
            tensors.insert(
                site.b_name(),
                HostTensor::zeros(vec![site.out_features, config.rank]),
            );
        }
        Self { config, tensors }
    }

    /// Checks that the adapter has exactly the tensors `sites` need, with the right shapes.
    pub fn check_sites(&self, sites: &[LoraSite]) -> Result<()> {
        let r = self.config.rank;
        let mut expected = BTreeMap::new();
        for s in sites {
            expected.insert(s.a_name(), vec![r, s.in_features]);
            expected.insert(s.b_name(), vec![s.out_features, r]);
        }
        for (name, shape) in &expected {
            let t = self
                .tensors
                .get(name)
                .ok_or_else(|| TrainerError::MissingTensor {
                    name: name.clone(),
                    location: "the adapter".into(),
                })?;
            if &t.shape != shape {
                return Err(TrainerError::ShapeMismatch {
                    name: name.clone(),
                    found: t.shape.clone(),
                    expected: shape.clone(),
                });
            }
        }
        if let Some(extra) = self.tensors.keys().find(|n| !expected.contains_key(*n)) {
            return Err(TrainerError::InvalidInput(format!(
                "adapter tensor {extra:?} matches no adapted module of this model"
            )));
        }
        Ok(())
    }

    /// Reads a PEFT adapter directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let config_path = dir.join("adapter_config.json");
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| TrainerError::io(&config_path, e))?;
        let config = parse_peft_config(&text).map_err(|r| TrainerError::config(&config_path, r))?;
        let (raw, _) = read_safetensors(&dir.join("adapter_model.safetensors"))?;
        // Older PEFT versions kept the adapter name (`lora_A.default.weight`) in saved files.
        let tensors = raw
            .into_iter()
            .map(|(name, t)| (name.replace(".default.weight", ".weight"), t))
            .collect();
        Ok(Self { config, tensors })
    }

    /// Writes a PEFT adapter directory that `PeftModel.from_pretrained` loads unchanged.
    pub fn save(&self, dir: &Path, base_model: Option<&str>, fan_in_fan_out: bool) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| TrainerError::io(dir, e))?;
        let mut meta = BTreeMap::new();
        meta.insert("format".to_owned(), "pt".to_owned());
        write_safetensors(&dir.join("adapter_model.safetensors"), &self.tensors, &meta)?;
        let config = peft_config_json(&self.config, base_model, fan_in_fan_out);
        let text = serde_json::to_string_pretty(&config)
            .map_err(|e| TrainerError::InvalidInput(e.to_string()))?;
        write_atomic(&dir.join("adapter_config.json"), text.as_bytes())
    }

    /// The update `scaling · B·A` for `site`, laid out like the base weight (`[out, in]`, or
    /// `[in, out]` for Conv1D).
    pub fn weight_delta(&self, site: &LoraSite) -> Result<HostTensor> {
        let get = |name: String| {
            self.tensors.get(&name).ok_or(TrainerError::MissingTensor {
                name,
                location: "the adapter".into(),
            })
        };
        let a = get(site.a_name())?;
        let b = get(site.b_name())?;
        let (r, inp, out) = (self.config.rank, site.in_features, site.out_features);
        if a.shape != [r, inp] || b.shape != [out, r] {
            return Err(TrainerError::ShapeMismatch {
                name: site.a_name(),
                found: a.shape.clone(),
                expected: vec![r, inp],
            });
        }
        let s = self.config.scaling();
        let mut delta = vec![0.0f32; out * inp];
        for o in 0..out {
            for k in 0..r {
                let bk = b.data[o * r + k] * s;
                let arow = &a.data[k * inp..(k + 1) * inp];
                let drow = &mut delta[o * inp..(o + 1) * inp];
                for (d, &av) in drow.iter_mut().zip(arow) {
                    *d += bk * av;
                }
            }
        }
        if site.fan_in_fan_out {
            let mut t = vec![0.0f32; out * inp];
            for o in 0..out {
                for i in 0..inp {
                    t[i * out + o] = delta[o * inp + i];
                }
            }
            return Ok(HostTensor {
                shape: vec![inp, out],
                data: t,
            });
        }
        Ok(HostTensor {
            shape: vec![out, inp],
            data: delta,
        })
    }
}

/// Reads the fields we use from a PEFT `adapter_config.json`.
fn parse_peft_config(text: &str) -> std::result::Result<LoraConfig, String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    match v.get("peft_type").and_then(|p| p.as_str()) {
        Some("LORA") | None => {}
        Some(other) => {
            return Err(format!(
                "peft_type is {other:?}; only LORA adapters are supported"
            ));
        }
    }
    for unsupported in ["use_dora", "use_rslora"] {
        if v.get(unsupported).and_then(|x| x.as_bool()) == Some(true) {
            return Err(format!("{unsupported} adapters are not supported"));
        }
    }
    for pattern in ["rank_pattern", "alpha_pattern"] {
        if v.get(pattern)
            .and_then(|p| p.as_object())
            .is_some_and(|m| !m.is_empty())
        {
            return Err(format!("a non-empty {pattern} is not supported"));
        }
    }
    let rank = v
        .get("r")
        .and_then(|r| r.as_u64())
        .ok_or("field \"r\" must be a positive integer")? as usize;
    let alpha = v
        .get("lora_alpha")
        .and_then(|a| a.as_f64())
        .ok_or("field \"lora_alpha\" must be a number")? as f32;
    let dropout = v
        .get("lora_dropout")
        .and_then(|d| d.as_f64())
        .unwrap_or(0.0) as f32;
    let target_modules = match v.get("target_modules") {
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|t| {
                t.as_str()
                    .map(str::to_owned)
                    .ok_or("target_modules must be strings")
            })
            .collect::<std::result::Result<Vec<_>, _>>()?,
        Some(serde_json::Value::String(s)) => {
            return Err(format!(
                "target_modules as a regular expression ({s:?}) is not supported; list the names"
            ));
        }
        _ => return Err("field \"target_modules\" must be a list of module names".into()),
    };
    let config = LoraConfig {
        rank,
        alpha,
        dropout,
        target_modules,
    };
    if rank == 0 {
        return Err("field \"r\" must be positive".into());
    }
    Ok(config)
}

fn peft_config_json(
    c: &LoraConfig,
    base_model: Option<&str>,
    fan_in_fan_out: bool,
) -> serde_json::Value {
    let mut targets = c.target_modules.clone();
    targets.sort();
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": c.rank,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "target_modules": targets,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    })
}

/// The adapter's matrices on a burn device, as the forward pass uses them.
pub struct DeviceLora {
    scaling: f32,
    dropout: f32,
    sites: HashMap<String, (Tensor<2>, Tensor<2>)>,
    names: Vec<(String, String, String)>,
    dropout_rng: RefCell<StdRng>,
}

impl DeviceLora {
    /// Uploads `adapter` to `device`. With `trainable`, the matrices require gradients (the
    /// device must be an autodiff device) and dropout is active, seeded by `dropout_seed`.
    pub fn new(
        adapter: &Adapter,
        sites: &[LoraSite],
        device: &Device,
        trainable: bool,
        dropout_seed: u64,
    ) -> Result<Self> {
        adapter.check_sites(sites)?;
        let mut map = HashMap::new();
        let mut names = Vec::new();
        for s in sites {
            let upload = |name: &str| -> Tensor<2> {
                let t = &adapter.tensors[name];
                let x = Tensor::<2>::from_data(
                    TensorData::new(t.data.clone(), [t.shape[0], t.shape[1]]),
                    device,
                );
                if trainable { x.require_grad() } else { x }
            };
            let (an, bn) = (s.a_name(), s.b_name());
            map.insert(s.path.clone(), (upload(&an), upload(&bn)));
            names.push((s.path.clone(), an, bn));
        }
        Ok(Self {
            scaling: adapter.config.scaling(),
            dropout: if trainable {
                adapter.config.dropout
            } else {
                0.0
            },
            sites: map,
            names,
            dropout_rng: RefCell::new(StdRng::seed_from_u64(dropout_seed)),
        })
    }

    /// The low-rank update for the module at `path` applied to `x` (`[n, in]` → `[n, out]`), or
    /// `None` if that module is not adapted.
    pub fn apply(&self, path: &str, x: Tensor<2>) -> Option<Tensor<2>> {
        let (a, b) = self.sites.get(path)?;
        let x = if self.dropout > 0.0 { self.drop(x) } else { x };
        let h = x.matmul(a.clone().transpose());
        Some(h.matmul(b.clone().transpose()) * self.scaling)
    }

    fn drop(&self, x: Tensor<2>) -> Tensor<2> {
        // Masks come from our own seeded generator, not the device's, so a replay of the same
        // lease draws the same masks on any backend.
        let [n, d] = x.dims();
        let keep = 1.0 - self.dropout;
        let mut rng = self.dropout_rng.borrow_mut();
        let mask: Vec<f32> = (0..n * d)
            .map(|_| {
                if rng.random::<f32>() < keep {
                    1.0 / keep
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::<2>::from_data(TensorData::new(mask, [n, d]), &x.device());
        x * mask
    }

    /// Each adapted module's (PEFT A name, A tensor) and (PEFT B name, B tensor).
    pub fn named_tensors(&self) -> impl Iterator<Item = (&str, &Tensor<2>)> {
        self.names.iter().flat_map(|(path, an, bn)| {
            let (a, b) = &self.sites[path];
            [(an.as_str(), a), (bn.as_str(), b)]
        })
    }
}

/// Files of a Hugging Face model directory that a merged export carries over unchanged.
const CARRIED_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Writes `base_dir`'s model with `adapter` merged into its weights (`W + scaling·B·A`) to
/// `out_dir` as a plain Hugging Face checkpoint (`model.safetensors` in F32, plus the config
/// and tokenizer files), loadable without PEFT.
pub fn merge_into_base(base_dir: &Path, adapter: &Adapter, out_dir: &Path) -> Result<()> {
    let config = crate::config::ModelConfig::from_file(&base_dir.join("config.json"))?;
    let sites = config.lora_sites_for(&adapter.config);
    adapter.check_sites(&sites)?;
    let mut tensors = crate::checkpoint::read_checkpoint_tensors(base_dir)?;
    for site in &sites {
        let delta = adapter.weight_delta(site)?;
        let candidates = [
            format!("{}.weight", site.path),
            format!("{}.weight", site.path.trim_start_matches("transformer.")),
        ];
        let name = candidates
            .iter()
            .find(|n| tensors.contains_key(*n))
            .ok_or_else(|| TrainerError::MissingTensor {
                name: candidates[0].clone(),
                location: base_dir.display().to_string(),
            })?;
        let weight = tensors
            .get_mut(name)
            .ok_or_else(|| TrainerError::MissingTensor {
                name: name.clone(),
                location: base_dir.display().to_string(),
            })?;
        if weight.shape != delta.shape {
            return Err(TrainerError::ShapeMismatch {
                name: name.clone(),
                found: weight.shape.clone(),
                expected: delta.shape,
            });
        }
        for (w, d) in weight.data.iter_mut().zip(&delta.data) {
            *w += d;
        }
    }
    std::fs::create_dir_all(out_dir).map_err(|e| TrainerError::io(out_dir, e))?;
    let mut meta = BTreeMap::new();
    meta.insert("format".to_owned(), "pt".to_owned());
    write_safetensors(&out_dir.join("model.safetensors"), &tensors, &meta)?;
    for file in CARRIED_FILES {
        let from = base_dir.join(file);
        if from.is_file() {
            let bytes = std::fs::read(&from).map_err(|e| TrainerError::io(&from, e))?;
            write_atomic(&out_dir.join(file), &bytes)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_targets_match_by_last_component() {
        let c = LoraConfig {
            target_modules: vec!["c_proj".into()],
            ..LoraConfig::default()
        };
        assert!(c.targets("transformer.h.0.attn.c_proj"));
        assert!(c.targets("transformer.h.0.mlp.c_proj"));
        assert!(!c.targets("transformer.h.0.attn.c_attn"));
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let known = ["q_proj", "v_proj"];
        let bad = LoraConfig {
            target_modules: vec!["c_attn".into()],
            ..LoraConfig::default()
        };
        assert!(bad.validate(&known).unwrap_err().contains("c_attn"));
        let bad = LoraConfig {
            rank: 0,
            ..LoraConfig::default()
        };
        assert!(bad.validate(&known).unwrap_err().contains("rank"));
        assert!(
            parse_peft_config(r#"{"peft_type":"PREFIX_TUNING"}"#)
                .unwrap_err()
                .contains("LORA")
        );
        assert!(parse_peft_config(r#"{"r":4,"lora_alpha":8,"target_modules":".*proj"}"#).is_err());
    }

    #[test]
    fn weight_delta_is_scaled_b_times_a_in_the_base_layout() {
        let config = LoraConfig {
            rank: 1,
            alpha: 2.0,
            dropout: 0.0,
            target_modules: vec!["q_proj".into()],
        };
        let site = LoraSite {
            path: "m.q_proj".into(),
            in_features: 2,
            out_features: 3,
            fan_in_fan_out: false,
        };
        let mut tensors = NamedTensors::new();
        tensors.insert(
            site.a_name(),
            HostTensor::new(vec![1, 2], vec![1.0, 2.0]).unwrap(),
        );
        tensors.insert(
            site.b_name(),
            HostTensor::new(vec![3, 1], vec![1.0, 0.0, -1.0]).unwrap(),
        );
        let adapter = Adapter { config, tensors };
        let d = adapter.weight_delta(&site).unwrap();
        assert_eq!(d.shape, vec![3, 2]);
        assert_eq!(d.data, vec![2.0, 4.0, 0.0, 0.0, -2.0, -4.0]);
        let conv = LoraSite {
            fan_in_fan_out: true,
            ..site
        };
        let d = adapter.weight_delta(&conv).unwrap();
        assert_eq!(d.shape, vec![2, 3]);
        assert_eq!(d.data, vec![2.0, 0.0, -2.0, 4.0, 0.0, -4.0]);
    }

    #[test]
    fn adapter_round_trips_through_peft_files() {
        let dir = tempfile::tempdir().unwrap();
        let site = LoraSite {
            path: "model.layers.0.self_attn.q_proj".into(),
            in_features: 8,
            out_features: 8,
            fan_in_fan_out: false,
        };
        let adapter = Adapter::init(LoraConfig::default(), std::slice::from_ref(&site), 3);
        adapter.save(dir.path(), Some("base"), false).unwrap();
        let back = Adapter::load(dir.path()).unwrap();
        assert_eq!(back, adapter);
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(json["peft_type"], "LORA");
        assert_eq!(json["r"], 8);
    }
}
