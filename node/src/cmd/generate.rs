//! `swarmtune generate`: continue a prompt with a model and optional adapter, printing text as
//! each token arrives.

use std::io::Write;

use anyhow::{Context, anyhow};
use swarmtune_trainer::device::ThreadPool;
use swarmtune_trainer::generate::{Sampling, generate};
use swarmtune_trainer::lora::{Adapter, DeviceLora};
use swarmtune_trainer::model::{CausalLm, ForwardOptions};

use crate::cli::GenerateArgs;

/// Runs `swarmtune generate`.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let pool = ThreadPool::new(args.compute.threads)?;
    let device = args.compute.device.device()?;
    let model_dir = super::model_dir(args.model.as_deref())?;
    let tokenizer_path = model_dir.join("tokenizer.json");
    let tokenizer = swarmtune_trainer::data::load_tokenizer(&tokenizer_path)?;
    let prompt = tokenizer
        .encode(args.prompt.as_str(), false)
        .map_err(|e| anyhow!("cannot tokenize the prompt: {e}"))?
        .get_ids()
        .to_vec();
    let adapter = args
        .adapter
        .as_ref()
        .map(|dir| {
            Adapter::load(dir).with_context(|| format!("loading the adapter in {}", dir.display()))
        })
        .transpose()?;
    pool.install(|| -> anyhow::Result<()> {
        let model = CausalLm::load(&model_dir, &device)
            .with_context(|| format!("loading the model in {}", model_dir.display()))?;
        let lora = adapter
            .as_ref()
            .map(|a| DeviceLora::new(a, &model.lora_sites(&a.config), &device, false, 0))
            .transpose()?;
        let sampling = Sampling {
            max_new_tokens: args.max_new_tokens,
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
            stop_tokens: model.config().eos_token_id().into_iter().collect(),
        };
        let mut stdout = std::io::stdout().lock();
        write!(stdout, "{}", args.prompt)?;
        stdout.flush()?;
        // Decode the whole continuation each time and print what is new, so tokens that are
        // only part of a UTF-8 character appear once the character is complete.
        let mut ids = Vec::new();
        let mut printed = 0;
        generate(
            &model,
            ForwardOptions {
                lora: lora.as_ref(),
            },
            &prompt,
            &sampling,
            &mut |token| {
                ids.push(token);
                if let Ok(text) = tokenizer.decode(&ids, true)
                    && text.len() > printed
                    && text.is_char_boundary(printed)
                    && !text.ends_with('\u{FFFD}')
                {
                    let _ = write!(stdout, "{}", &text[printed..]);
                    let _ = stdout.flush();
                    printed = text.len();
                }
                true
            },
        )?;
        writeln!(stdout)?;
        Ok(())
    })
}
