//! The built-in base model, compiled into the binary so that the demo and the tests need no
//! download: a 3M-parameter Llama-architecture model with a byte-level vocabulary, pretrained
//! by `swarmtune pretrain trainer/recipes/builtin-base.toml` (see its `pretrain_report.json`).

use std::path::Path;

use crate::checkpoint::write_atomic;
use crate::error::Result;

/// The files of the Hugging Face directory, by name.
pub const FILES: &[(&str, &[u8])] = &[
    (
        "config.json",
        include_bytes!("../../builtin/base/config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../../builtin/base/model.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../builtin/base/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../../builtin/base/tokenizer_config.json"),
    ),
    (
        "pretrain_report.json",
        include_bytes!("../../builtin/base/pretrain_report.json"),
    ),
];

/// Writes the built-in base into `dir` as a Hugging Face directory (files already there with
/// the same bytes are left alone) and returns `dir`.
pub fn write_to(dir: &Path) -> Result<&Path> {
    for (name, bytes) in FILES {
        let path = dir.join(name);
        if std::fs::read(&path).ok().as_deref() != Some(*bytes) {
            write_atomic(&path, bytes)?;
        }
    }
    Ok(dir)
}

/// blake3 of the model's weights: how the swarm names the built-in base.
pub fn weights_hash() -> blake3::Hash {
    let weights = FILES
        .iter()
        .find(|(name, _)| *name == "model.safetensors")
        .map_or(&[][..], |(_, bytes)| *bytes);
    blake3::hash(weights)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CausalLm, ForwardOptions, TokenBatch};

    #[test]
    fn the_built_in_base_loads_and_predicts_its_corpus() {
        let dir = tempfile::tempdir().unwrap();
        write_to(dir.path()).unwrap();
        let device = crate::device::DeviceKind::Cpu.device().unwrap();
        let model = CausalLm::load(dir.path(), &device).unwrap();
        let tokenizer = crate::data::load_tokenizer(dir.path().join("tokenizer.json")).unwrap();
        let text = "Ada sees the small cat at the park. Ada has 3 apples.";
        let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        let n = ids.len();
        let (loss, _) = model
            .next_token_loss(
                &TokenBatch::new(ids, 1, n).unwrap(),
                None,
                ForwardOptions::default(),
            )
            .unwrap();
        // Uniform guessing over 257 byte tokens costs ln 257 ≈ 5.55 nats.
        let loss = loss.into_scalar::<f32>();
        assert!(loss < 2.0, "the base does not know its corpus: loss {loss}");
        // Writing again leaves the directory as it is.
        write_to(dir.path()).unwrap();
    }

    /// The skills need a base that copies what it has read: greedy answers to `Echo:` prompts
    /// with text it has never seen repeat that text.
    #[test]
    fn the_built_in_base_copies_text_it_has_not_seen() {
        let dir = tempfile::tempdir().unwrap();
        write_to(dir.path()).unwrap();
        let device = crate::device::DeviceKind::Cpu.device().unwrap();
        let model = CausalLm::load(dir.path(), &device).unwrap();
        let tokenizer = crate::data::load_tokenizer(dir.path().join("tokenizer.json")).unwrap();
        let texts = [
            "the owl calls the bear",
            "zqf plim worb",
            "june is small",
            "the quiet yak finds milo",
            "kexu dampo ri",
        ];
        let probes: Vec<crate::data::Example> = texts
            .iter()
            .map(|t| crate::data::Example::PromptCompletion {
                prompt: format!("Echo: {t} =>"),
                completion: format!(" {t}"),
            })
            .collect();
        let eos = model.config().eos_token_id();
        let answers = crate::eval::answers(
            &model,
            ForwardOptions::default(),
            &tokenizer,
            &probes,
            eos,
            2,
        )
        .unwrap();
        let copied = answers.iter().filter(|a| a.is_exact()).count();
        assert!(
            copied >= 4,
            "the base copied {copied} of 5: {:?}",
            answers.iter().map(|a| &a.produced).collect::<Vec<_>>()
        );
    }
}
