//! The optimizer of local training and pretraining: AdamW with PyTorch's semantics, run on the
//! host over tensors in canonical (name) order, so that its result is the same bits on every
//! machine and its state can be hashed, exported and replayed. Moments exist only for the
//! tensors being trained.

use crate::tensors::{NamedTensors, norm};

/// AdamW hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    /// Learning rate of this step.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
}

/// The optimizer's state: the step count and both moments, named like the parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Moments {
    /// Steps taken.
    pub step: u64,
    /// First moments.
    pub exp_avg: NamedTensors,
    /// Second moments.
    pub exp_avg_sq: NamedTensors,
}

impl Moments {
    /// Zero moments shaped like `params`.
    pub fn zeros_like(params: &NamedTensors) -> Self {
        let zeros: NamedTensors = params
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    crate::tensors::HostTensor::zeros(t.shape.clone()),
                )
            })
            .collect();
        Self {
            step: 0,
            exp_avg: zeros.clone(),
            exp_avg_sq: zeros,
        }
    }
}

impl AdamW {
    /// One step in place: decoupled decay on the parameters for which `decays(name)` holds,
    /// moment updates, bias-corrected update. Gradients without a parameter are ignored.
    pub fn step(
        &self,
        params: &mut NamedTensors,
        moments: &mut Moments,
        grads: &NamedTensors,
        decays: impl Fn(&str) -> bool,
    ) {
        moments.step += 1;
        let t = moments.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        let step_size = self.lr / bc1;
        for (name, g) in grads {
            let (Some(p), Some(m), Some(v)) = (
                params.get_mut(name),
                moments.exp_avg.get_mut(name),
                moments.exp_avg_sq.get_mut(name),
            ) else {
                continue;
            };
            let keep = if decays(name) {
                1.0 - self.lr * self.weight_decay
            } else {
                1.0
            };
            for i in 0..g.data.len().min(p.data.len()) {
                let gi = g.data[i];
                p.data[i] *= keep;
                m.data[i] = self.beta1 * m.data[i] + (1.0 - self.beta1) * gi;
                v.data[i] = self.beta2 * v.data[i] + (1.0 - self.beta2) * gi * gi;
                let denom = v.data[i].sqrt() / bc2_sqrt + self.eps;
                p.data[i] -= step_size * m.data[i] / denom;
            }
        }
    }
}

/// Scales `grads` down so their global norm is at most `max`; returns the norm before.
pub fn clip_grad_norm(grads: &mut NamedTensors, max: f32) -> f32 {
    let total = norm(grads) as f32;
    if total > max {
        let scale = max / (total + 1e-6);
        grads
            .values_mut()
            .flat_map(|g| g.data.iter_mut())
            .for_each(|v| *v *= scale);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensors::HostTensor;

    #[test]
    fn matches_pytorch_adamw_on_a_hand_computed_step() {
        // torch.optim.AdamW([p], lr=0.1, weight_decay=0.01) with p = 1.0 and grad = 0.5:
        // p = 1·(1 − 0.001) − 0.1·(0.05/0.1)/(sqrt(0.00025/0.001) + 1e-8) = 0.999 − 0.1 = 0.899.
        let mut params =
            NamedTensors::from([("p".to_owned(), HostTensor::new(vec![1], vec![1.0]).unwrap())]);
        let grads =
            NamedTensors::from([("p".to_owned(), HostTensor::new(vec![1], vec![0.5]).unwrap())]);
        let mut moments = Moments::zeros_like(&params);
        let opt = AdamW {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        opt.step(&mut params, &mut moments, &grads, |_| true);
        assert!(
            (params["p"].data[0] - 0.899).abs() < 1e-6,
            "{}",
            params["p"].data[0]
        );
        assert_eq!(moments.step, 1);
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let mut g = NamedTensors::from([(
            "a".to_owned(),
            HostTensor::new(vec![2], vec![3.0, 4.0]).unwrap(),
        )]);
        assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
        assert!((norm(&g) - 1.0).abs() < 1e-5);
    }
}
