//! The inner loop of one lease: H steps of AdamW on the LoRA tensors only, from a module
//! version and a set of shards, returning the pseudo-gradient `start − end` with its stats.
//!
//! Everything that decides the result is a function of (base, start adapter, shards, seed,
//! settings, step index): the batch of each step, the dropout masks, the optimizer update.
//! The optimizer runs on the host in a fixed order, so on one backend and kernel family the
//! same inputs give the same bits. Every `commit_every` steps the loop hashes the full LoRA
//! state (weights and AdamW moments); a verifier can ask for the state at one commitment and
//! replay the segment to the next ([`replay_segment`]), which is what makes verification cheap
//! (DESIGN.md, step 5).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::checkpoint::safetensors_bytes;
use crate::data::Shard;
use crate::error::{Result, TrainerError};
use crate::lora::{Adapter, DeviceLora, LoraConfig, LoraSite};
use crate::model::{CausalLm, ForwardOptions, TokenBatch, download};
use crate::optim::{AdamW, Moments, clip_grad_norm};
use crate::tensors::{HostTensor, NamedTensors, hash_into};

/// The settings of one lease's local training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSpec {
    /// Inner steps H.
    pub inner_steps: usize,
    /// Sequences per optimizer step.
    pub batch_size: usize,
    /// Sequences per forward/backward pass; smaller than `batch_size` accumulates gradients
    /// to save memory (the result is the same up to float rounding order).
    pub micro_batch: usize,
    /// AdamW learning rate.
    pub learning_rate: f32,
    /// AdamW β1.
    pub beta1: f32,
    /// AdamW β2.
    pub beta2: f32,
    /// AdamW ε.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// Clip the global gradient norm to this value, if set.
    pub max_grad_norm: Option<f32>,
    /// Seed of the batch order and dropout masks.
    pub seed: u64,
    /// Hash the LoRA state every this many steps (k).
    pub commit_every: usize,
}

impl Default for TrainSpec {
    fn default() -> Self {
        Self {
            inner_steps: 20,
            batch_size: 8,
            micro_batch: 8,
            learning_rate: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            seed: 0,
            commit_every: 5,
        }
    }
}

impl TrainSpec {
    /// The AdamW settings of these steps.
    pub fn adamw(&self) -> AdamW {
        AdamW {
            lr: self.learning_rate,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }

    /// Checks the settings; the message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.inner_steps == 0 {
            return Err("inner_steps must be at least 1".into());
        }
        if self.batch_size == 0 || self.micro_batch == 0 || self.micro_batch > self.batch_size {
            return Err(format!(
                "batch_size ({}) and micro_batch ({}) must be positive with micro_batch ≤ batch_size",
                self.batch_size, self.micro_batch
            ));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(format!(
                "learning_rate must be positive, found {}",
                self.learning_rate
            ));
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return Err("beta1 and beta2 must be in [0, 1)".into());
        }
        let eps_ok = self.eps.is_finite() && self.eps > 0.0;
        let decay_ok = self.weight_decay.is_finite() && self.weight_decay >= 0.0;
        if !(eps_ok && decay_ok) {
            return Err("eps must be positive and weight_decay non-negative".into());
        }
        if self
            .max_grad_norm
            .is_some_and(|n| !(n.is_finite() && n > 0.0))
        {
            return Err("max_grad_norm must be positive".into());
        }
        if self.commit_every == 0 {
            return Err("commit_every must be at least 1".into());
        }
        Ok(())
    }
}

/// The complete LoRA training state: what a commitment hashes and a challenge answers with.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraState {
    /// LoRA tensors under PEFT names.
    pub params: NamedTensors,
    /// AdamW step count and moments, same names.
    pub moments: Moments,
}

impl LoraState {
    /// The state before the first step of a lease: the module version's tensors, zero moments.
    pub fn start(adapter: &Adapter) -> Self {
        Self {
            moments: Moments::zeros_like(&adapter.tensors),
            params: adapter.tensors.clone(),
        }
    }

    /// Optimizer steps taken so far.
    pub fn step(&self) -> u64 {
        self.moments.step
    }

    /// blake3 of the step and every tensor, in canonical (name) order.
    pub fn hash(&self) -> blake3::Hash {
        let mut h = blake3::Hasher::new();
        h.update(b"swarmtune-lora-state-v1");
        h.update(&self.step().to_le_bytes());
        for part in [
            &self.params,
            &self.moments.exp_avg,
            &self.moments.exp_avg_sq,
        ] {
            hash_into(&mut h, part);
        }
        h.finalize()
    }

    /// The state as a safetensors image: `param.NAME`, `exp_avg.NAME`, `exp_avg_sq.NAME`, and
    /// the step in the metadata. This is what answers a segment challenge.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut all = NamedTensors::new();
        for (prefix, part) in [
            ("param.", &self.params),
            ("exp_avg.", &self.moments.exp_avg),
            ("exp_avg_sq.", &self.moments.exp_avg_sq),
        ] {
            for (n, t) in part {
                all.insert(format!("{prefix}{n}"), t.clone());
            }
        }
        let mut meta = BTreeMap::new();
        meta.insert("format".into(), "swarmtune-lora-state".into());
        meta.insert("version".into(), "1".into());
        meta.insert("step".into(), self.step().to_string());
        Ok(safetensors_bytes(&all, &meta))
    }

    /// Parses [`LoraState::to_bytes`] output, refusing anything that does not match `adapter`'s
    /// layout (names and shapes), so a peer cannot make us allocate or train on junk.
    pub fn from_bytes(bytes: &[u8], layout: &NamedTensors, max_bytes: usize) -> Result<Self> {
        let bad = |r: String| TrainerError::InvalidInput(format!("LoRA state: {r}"));
        if bytes.len() > max_bytes {
            return Err(bad(format!(
                "{} bytes exceed the limit of {max_bytes}",
                bytes.len()
            )));
        }
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some("swarmtune-lora-state")
            || meta.get("version").map(String::as_str) != Some("1")
        {
            return Err(bad("not a version 1 swarmtune LoRA state".into()));
        }
        let step = meta
            .get("step")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no step in the metadata".into()))?;
        if st.len() != 3 * layout.len() {
            return Err(bad(format!(
                "{} tensors, expected {}",
                st.len(),
                3 * layout.len()
            )));
        }
        let mut parts: [NamedTensors; 3] = Default::default();
        for (prefix, part) in ["param.", "exp_avg.", "exp_avg_sq."]
            .iter()
            .zip(parts.iter_mut())
        {
            for (name, expected) in layout {
                let key = format!("{prefix}{name}");
                let view = st.tensor(&key).map_err(|_| bad(format!("missing {key}")))?;
                if view.dtype() != safetensors::Dtype::F32
                    || view.shape() != expected.shape.as_slice()
                {
                    return Err(bad(format!(
                        "{key} has {:?} {:?}, expected F32 {:?}",
                        view.dtype(),
                        view.shape(),
                        expected.shape
                    )));
                }
                let data = view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                part.insert(
                    name.clone(),
                    HostTensor {
                        shape: expected.shape.clone(),
                        data,
                    },
                );
            }
        }
        let [params, exp_avg, exp_avg_sq] = parts;
        Ok(Self {
            params,
            moments: Moments {
                step,
                exp_avg,
                exp_avg_sq,
            },
        })
    }
}

/// The hash of the LoRA state after a given step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commitment {
    /// Steps taken when the state was hashed (0 is the start).
    pub step: u64,
    /// [`LoraState::hash`] at that step.
    pub state_hash: [u8; 32],
}

/// What produced a delta; exact replay is promised only between equal provenances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// burn backend (`flex`, `ndarray`, `wgpu`).
    pub backend: String,
    /// CPU threads of the math pool.
    pub threads: usize,
    /// The CPU's SIMD family, which picks GEMM kernels (`avx512`, `avx2`, `neon`, ...).
    pub kernel_family: String,
}

impl Provenance {
    /// The provenance of work done on `backend` with `threads` threads on this machine.
    pub fn here(backend: &str, threads: usize) -> Self {
        Self {
            backend: backend.to_owned(),
            threads,
            kernel_family: kernel_family().to_owned(),
        }
    }
}

/// The SIMD family of this CPU, as the GEMM kernels see it.
pub fn kernel_family() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return "x86_64-avx512";
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return "x86_64-avx2";
        }
        "x86_64"
    }
    #[cfg(target_arch = "aarch64")]
    {
        "aarch64-neon"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        std::env::consts::ARCH
    }
}

/// Numbers a volunteer reports with its delta.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainStats {
    /// Optimizer steps taken.
    pub steps: usize,
    /// Tokens fed through the model (`steps × batch × seq`).
    pub tokens: u64,
    /// Tokens whose prediction was in the loss (the weight of this delta in a merge).
    pub target_tokens: u64,
    /// Loss of the first step's batch with the start weights.
    pub loss_before: f32,
    /// Loss of the same batch with the end weights.
    pub loss_after: f32,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// The result of one lease's training.
pub struct TrainOutcome {
    /// `start − end` of every LoRA tensor: the pseudo-gradient sent to the coordinator.
    pub delta: NamedTensors,
    /// The state after the last step.
    pub end_state: LoraState,
    /// State hashes at step 0, every `commit_every` steps, and the last step.
    pub commitments: Vec<Commitment>,
    /// States at each commitment, kept so a challenge can be answered without replaying.
    pub snapshots: Vec<LoraState>,
    /// What the volunteer reports.
    pub stats: TrainStats,
    /// Backend, threads, kernel family.
    pub provenance: Provenance,
}

/// Progress of a running lease, for progress bars.
#[derive(Clone, Copy, Debug)]
pub struct TrainProgress {
    /// Steps done.
    pub step: usize,
    /// Steps in the lease.
    pub total: usize,
    /// This step's loss.
    pub loss: f32,
}

/// The training sequences of a lease, in a fixed order.
pub struct LeaseData<'a> {
    shards: &'a [Shard],
    /// (shard index, sequence index) of every sequence.
    index: Vec<(usize, usize)>,
    seq_len: usize,
}

impl<'a> LeaseData<'a> {
    /// All sequences of `shards`, which must share one sequence length and fit the vocabulary.
    pub fn new(shards: &'a [Shard], vocab_size: usize) -> Result<Self> {
        let seq_len = shards.first().map_or(0, |s| s.seq_len as usize);
        let mut index = Vec::new();
        for (i, shard) in shards.iter().enumerate() {
            if shard.seq_len as usize != seq_len {
                return Err(TrainerError::InvalidInput(format!(
                    "shards have different sequence lengths ({} and {seq_len})",
                    shard.seq_len
                )));
            }
            shard
                .validate_vocab(vocab_size as u32)
                .map_err(|e| TrainerError::InvalidInput(e.to_string()))?;
            index.extend((0..shard.n_seqs()).map(|j| (i, j)));
        }
        if index.is_empty() || seq_len < 2 {
            return Err(TrainerError::InvalidInput(
                "the lease has no training sequences".into(),
            ));
        }
        Ok(Self {
            shards,
            index,
            seq_len,
        })
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when there are no sequences (never, once constructed).
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The sequence positions of step `step`'s batch: epochs of a permutation seeded by
    /// (seed, epoch), so any step's batch is known without replaying the ones before.
    fn batch_positions(&self, seed: u64, step: usize, batch: usize) -> Vec<usize> {
        let n = self.index.len();
        let mut out = Vec::with_capacity(batch);
        let mut cached: Option<(usize, Vec<usize>)> = None;
        for k in 0..batch {
            let global = step * batch + k;
            let (epoch, within) = (global / n, global % n);
            if cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
                let mut perm: Vec<usize> = (0..n).collect();
                let mut rng = StdRng::seed_from_u64(mix(seed, epoch as u64));
                perm.shuffle(&mut rng);
                cached = Some((epoch, perm));
            }
            if let Some((_, perm)) = &cached {
                out.push(perm[within]);
            }
        }
        out
    }

    /// Step `step`'s batch of `batch` sequences and their loss masks.
    pub fn batch(&self, seed: u64, step: usize, batch: usize) -> (TokenBatch, Vec<u8>) {
        self.gather(&self.batch_positions(seed, step, batch))
    }

    fn gather(&self, positions: &[usize]) -> (TokenBatch, Vec<u8>) {
        let mut ids = Vec::with_capacity(positions.len() * self.seq_len);
        let mut mask = Vec::with_capacity(positions.len() * self.seq_len);
        for &p in positions {
            let (s, j) = self.index[p];
            let (t, m) = self.shards[s].sequence(j);
            ids.extend_from_slice(t);
            mask.extend_from_slice(m);
        }
        let batch = TokenBatch {
            ids,
            batch: positions.len(),
            seq: self.seq_len,
        };
        (batch, mask)
    }
}

/// A 64-bit mix of two values (splitmix64), for deriving independent seeds.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Trains LoRA tensors on an autodiff copy of a frozen base.
pub struct LocalTrainer<'m> {
    model: &'m CausalLm,
    lora: LoraConfig,
    sites: Vec<LoraSite>,
    provenance: Provenance,
    times: std::sync::Mutex<PhaseTimes>,
}

/// Where the time of training steps went, summed since the last [`LocalTrainer::take_times`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct PhaseTimes {
    /// Forward pass and loss, seconds.
    pub forward: f64,
    /// Backward pass and reading the gradients back, seconds.
    pub backward: f64,
    /// Gradient accumulation, clipping and the AdamW update, seconds.
    pub optimizer: f64,
}

impl<'m> LocalTrainer<'m> {
    /// `model` must live on an autodiff device (see [`CausalLm::to_autodiff`]).
    pub fn new(model: &'m CausalLm, lora: LoraConfig, provenance: Provenance) -> Result<Self> {
        if !model.device().is_autodiff() {
            return Err(TrainerError::InvalidInput(
                "training needs the model on an autodiff device".into(),
            ));
        }
        lora.validate(model.config().lora_target_names())
            .map_err(TrainerError::InvalidInput)?;
        let sites = model.lora_sites(&lora);
        Ok(Self {
            model,
            lora,
            sites,
            provenance,
            times: std::sync::Mutex::new(PhaseTimes::default()),
        })
    }

    /// The phase times summed since the last call, and a fresh start.
    pub fn take_times(&self) -> PhaseTimes {
        let mut t = self.times.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *t)
    }

    fn add_time(&self, f: impl FnOnce(&mut PhaseTimes) -> &mut f64, since: Instant) {
        let mut t = self.times.lock().unwrap_or_else(|e| e.into_inner());
        *f(&mut t) += since.elapsed().as_secs_f64();
    }

    /// The adapted layers.
    pub fn sites(&self) -> &[LoraSite] {
        &self.sites
    }

    /// Loss and gradient of every LoRA tensor on one batch, the gradient of the mean
    /// next-token cross-entropy over the targets in `mask` (all positions if `None`).
    pub fn loss_and_grads(
        &self,
        params: &NamedTensors,
        batch: &TokenBatch,
        mask: Option<&[u8]>,
        dropout_seed: u64,
    ) -> Result<(f32, usize, NamedTensors)> {
        let adapter = Adapter {
            config: self.lora.clone(),
            tensors: params.clone(),
        };
        let lora = DeviceLora::new(
            &adapter,
            &self.sites,
            self.model.device(),
            true,
            dropout_seed,
        )?;
        let clock = Instant::now();
        let (loss, count) =
            self.model
                .next_token_loss(batch, mask, ForwardOptions { lora: Some(&lora) })?;
        self.add_time(|t| &mut t.forward, clock);
        let clock = Instant::now();
        let grads = loss.backward();
        let loss = loss.into_scalar::<f32>();
        let mut out = NamedTensors::new();
        for (name, tensor) in lora.named_tensors() {
            let g = match tensor.grad(&grads) {
                Some(g) => download(g)?,
                None => HostTensor::zeros(tensor.dims().to_vec()),
            };
            out.insert(name.to_owned(), g);
        }
        self.add_time(|t| &mut t.backward, clock);
        Ok((loss, count, out))
    }

    /// Loss of `params` on one batch, without gradients.
    pub fn loss(
        &self,
        params: &NamedTensors,
        batch: &TokenBatch,
        mask: Option<&[u8]>,
    ) -> Result<f32> {
        let adapter = Adapter {
            config: self.lora.clone(),
            tensors: params.clone(),
        };
        let lora = DeviceLora::new(&adapter, &self.sites, self.model.device(), false, 0)?;
        let (loss, _) =
            self.model
                .next_token_loss(batch, mask, ForwardOptions { lora: Some(&lora) })?;
        Ok(loss.into_scalar::<f32>())
    }

    /// Runs a whole lease from `start` (a module version) and returns the delta and its proof.
    pub fn train(
        &self,
        start: &Adapter,
        data: &LeaseData<'_>,
        spec: &TrainSpec,
        progress: &mut dyn FnMut(TrainProgress),
        cancel: &AtomicBool,
    ) -> Result<TrainOutcome> {
        spec.validate().map_err(TrainerError::InvalidInput)?;
        start.check_sites(&self.sites)?;
        let clock = Instant::now();
        let mut state = LoraState::start(start);
        let mut commitments = vec![commit(&state)];
        let mut snapshots = vec![state.clone()];
        let mut first_loss = None;
        let mut target_tokens = 0u64;
        for step in 0..spec.inner_steps {
            if cancel.load(Ordering::Relaxed) {
                return Err(TrainerError::Cancelled);
            }
            let (loss, targets) = self.step(&mut state, data, spec)?;
            first_loss.get_or_insert(loss);
            target_tokens += targets as u64;
            let done = step + 1;
            if done % spec.commit_every == 0 || done == spec.inner_steps {
                commitments.push(commit(&state));
                snapshots.push(state.clone());
            }
            progress(TrainProgress {
                step: done,
                total: spec.inner_steps,
                loss,
            });
        }
        let (probe, probe_mask) = data.gather(&data.batch_positions(spec.seed, 0, spec.batch_size));
        let loss_after = self.loss(&state.params, &probe, Some(&probe_mask))?;
        let delta = subtract(&start.tensors, &state.params);
        let stats = TrainStats {
            steps: spec.inner_steps,
            tokens: (spec.inner_steps * spec.batch_size * data.seq_len) as u64,
            target_tokens,
            loss_before: first_loss.unwrap_or(f32::NAN),
            loss_after,
            seconds: clock.elapsed().as_secs_f64(),
        };
        Ok(TrainOutcome {
            delta,
            end_state: state,
            commitments,
            snapshots,
            stats,
            provenance: self.provenance.clone(),
        })
    }

    /// Replays steps `state.step .. to_step` of a lease from a claimed state; the caller
    /// compares the end state's hash with the volunteer's commitment.
    pub fn replay_segment(
        &self,
        mut state: LoraState,
        data: &LeaseData<'_>,
        spec: &TrainSpec,
        to_step: u64,
    ) -> Result<LoraState> {
        spec.validate().map_err(TrainerError::InvalidInput)?;
        if to_step < state.step() || to_step > spec.inner_steps as u64 {
            return Err(TrainerError::InvalidInput(format!(
                "cannot replay from step {} to step {to_step} of a {}-step lease",
                state.step(),
                spec.inner_steps
            )));
        }
        while state.step() < to_step {
            self.step(&mut state, data, spec)?;
        }
        Ok(state)
    }

    /// One optimizer step: gradients over the step's batch (accumulated over micro-batches,
    /// weighted by their target counts), optional clipping, then AdamW. Returns the batch loss
    /// and its number of targets.
    pub fn step(
        &self,
        state: &mut LoraState,
        data: &LeaseData<'_>,
        spec: &TrainSpec,
    ) -> Result<(f32, usize)> {
        let step = state.step() as usize;
        let positions = data.batch_positions(spec.seed, step, spec.batch_size);
        let mut parts = Vec::new();
        for (i, chunk) in positions.chunks(spec.micro_batch).enumerate() {
            let (batch, mask) = data.gather(chunk);
            let dropout_seed = mix(mix(spec.seed, state.step()), i as u64 + 1);
            match self.loss_and_grads(&state.params, &batch, Some(&mask), dropout_seed) {
                Ok(part) => parts.push(part),
                // A micro-batch of padding only has nothing to learn from.
                Err(TrainerError::InvalidInput(m)) if m.contains("no target tokens") => {}
                Err(e) => return Err(e),
            }
        }
        let clock = Instant::now();
        let total: usize = parts.iter().map(|p| p.1).sum();
        if total == 0 {
            state.moments.step += 1;
            return Ok((0.0, 0));
        }
        let mut grads = NamedTensors::new();
        let mut loss = 0f64;
        for (part_loss, count, part_grads) in &parts {
            let w = *count as f32 / total as f32;
            loss += f64::from(*part_loss) * f64::from(w);
            for (name, g) in part_grads {
                let acc = grads
                    .entry(name.clone())
                    .or_insert_with(|| HostTensor::zeros(g.shape.clone()));
                for (a, &v) in acc.data.iter_mut().zip(&g.data) {
                    *a += w * v;
                }
            }
        }
        if grads.values().flat_map(|g| &g.data).any(|v| !v.is_finite()) {
            return Err(TrainerError::InvalidInput(format!(
                "non-finite gradient at step {step}"
            )));
        }
        if let Some(max) = spec.max_grad_norm {
            clip_grad_norm(&mut grads, max);
        }
        spec.adamw()
            .step(&mut state.params, &mut state.moments, &grads, |_| true);
        self.add_time(|t| &mut t.optimizer, clock);
        Ok((loss as f32, total))
    }
}

fn commit(state: &LoraState) -> Commitment {
    Commitment {
        step: state.step(),
        state_hash: *state.hash().as_bytes(),
    }
}

/// `a − b` for two maps of the same layout.
pub fn subtract(a: &NamedTensors, b: &NamedTensors) -> NamedTensors {
    a.iter()
        .filter_map(|(n, ta)| {
            let tb = b.get(n)?;
            let data = ta.data.iter().zip(&tb.data).map(|(x, y)| x - y).collect();
            Some((
                n.clone(),
                HostTensor {
                    shape: ta.shape.clone(),
                    data,
                },
            ))
        })
        .collect()
}
