//! `swarmtune inspect`: logits and LoRA gradients of any supported checkpoint, written as
//! safetensors so they can be compared with transformers + PEFT.

use std::collections::BTreeMap;

use anyhow::Context;
use swarmtune_trainer::checkpoint::{read_input_ids, write_safetensors};
use swarmtune_trainer::device::ThreadPool;
use swarmtune_trainer::lora::{Adapter, DeviceLora};
use swarmtune_trainer::model::{CausalLm, ForwardOptions, download};
use swarmtune_trainer::tensors::{HostTensor, NamedTensors};
use swarmtune_trainer::train::{LocalTrainer, Provenance};

use crate::cli::{InspectGradsArgs, InspectLogitsArgs};

/// `swarmtune inspect logits`.
pub fn logits(args: InspectLogitsArgs) -> anyhow::Result<()> {
    let pool = ThreadPool::new(args.io.compute.threads)?;
    let device = args.io.compute.device.device()?;
    let batch = read_input_ids(&args.io.ids)?;
    let logits = pool.install(|| -> anyhow::Result<HostTensor> {
        let model = CausalLm::load(&args.io.model, &device)
            .with_context(|| format!("loading the model in {}", args.io.model.display()))?;
        let adapter = args
            .adapter
            .as_ref()
            .map(|dir| {
                Adapter::load(dir)
                    .with_context(|| format!("loading the adapter in {}", dir.display()))
            })
            .transpose()?;
        let lora = adapter
            .as_ref()
            .map(|a| DeviceLora::new(a, &model.lora_sites(&a.config), &device, false, 0))
            .transpose()?;
        let logits = model.logits(
            &batch,
            ForwardOptions {
                lora: lora.as_ref(),
            },
        )?;
        Ok(download(logits)?)
    })?;
    let mut out = NamedTensors::new();
    out.insert("logits".into(), logits);
    write_safetensors(&args.io.out, &out, &BTreeMap::new())?;
    println!(
        "wrote logits {:?} to {}",
        out["logits"].shape,
        args.io.out.display()
    );
    Ok(())
}

/// `swarmtune inspect grads`.
pub fn grads(args: InspectGradsArgs) -> anyhow::Result<()> {
    let pool = ThreadPool::new(args.io.compute.threads)?;
    let device = args.io.compute.device.device()?;
    let batch = read_input_ids(&args.io.ids)?;
    let adapter = Adapter::load(&args.adapter)
        .with_context(|| format!("loading the adapter in {}", args.adapter.display()))?;
    let (loss, mut out) = pool.install(|| -> anyhow::Result<(f32, NamedTensors)> {
        let model = CausalLm::load(&args.io.model, &device)
            .with_context(|| format!("loading the model in {}", args.io.model.display()))?
            .to_autodiff();
        let provenance = Provenance::here(args.io.compute.device.backend_name(), pool.threads());
        let trainer = LocalTrainer::new(&model, adapter.config.clone(), provenance)?;
        let (loss, _, grads) = trainer.loss_and_grads(&adapter.tensors, &batch, None, 0)?;
        Ok((loss, grads))
    })?;
    let count = out.len();
    out.insert(
        "loss".into(),
        HostTensor::new(vec![1], vec![loss]).context("loss tensor")?,
    );
    write_safetensors(&args.io.out, &out, &BTreeMap::new())?;
    println!(
        "loss {loss:.6}; wrote {count} LoRA gradients to {}",
        args.io.out.display()
    );
    Ok(())
}
