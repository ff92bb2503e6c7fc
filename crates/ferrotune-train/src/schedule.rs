//! Learning-rate schedules exactly as transformers' `get_scheduler` builds them: a `LambdaLR`
//! multiplier of the step count, where step `k` is the number of optimizer steps already taken
//! (the first update uses `lambda(0)`, which is 0 with warmup).

use crate::config::SchedulerKind;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: SchedulerKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// Warmup steps as the Trainer derives them: `warmup_steps` if > 0, else
    /// `ceil(total · warmup_ratio)`.
    pub fn warmup_for(total_steps: u64, warmup_steps: u64, warmup_ratio: f64) -> u64 {
        if warmup_steps > 0 {
            warmup_steps
        } else {
            (total_steps as f64 * warmup_ratio).ceil() as u64
        }
    }

    /// Learning rate of the update made after `done` optimizer steps.
    pub fn lr(&self, done: u64) -> f64 {
        self.base_lr * self.multiplier(done)
    }

    fn multiplier(&self, step: u64) -> f64 {
        let (w, total) = (self.warmup_steps, self.total_steps);
        let s = step as f64;
        if step < w && self.kind != SchedulerKind::Constant {
            return s / (w.max(1) as f64);
        }
        let progress = (s - w as f64) / (total.saturating_sub(w).max(1) as f64);
        match self.kind {
            SchedulerKind::Constant | SchedulerKind::ConstantWithWarmup => 1.0,
            SchedulerKind::Linear => {
                ((total as f64 - s) / (total.saturating_sub(w).max(1) as f64)).max(0.0)
            }
            SchedulerKind::Cosine => {
                // num_cycles = 0.5: half a cosine from 1 to 0.
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
            SchedulerKind::CosineWithRestarts => {
                // num_cycles = 1 hard restart: one full decay over the run.
                if progress >= 1.0 {
                    0.0
                } else {
                    (0.5 * (1.0 + (std::f64::consts::PI * ((1.0 * progress) % 1.0)).cos())).max(0.0)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(kind: SchedulerKind) -> Schedule {
        Schedule {
            kind,
            base_lr: 1.0,
            warmup_steps: 2,
            total_steps: 10,
        }
    }

    #[test]
    fn warmup_then_decay_as_transformers() {
        let c = s(SchedulerKind::Cosine);
        assert_eq!(c.lr(0), 0.0);
        assert_eq!(c.lr(1), 0.5);
        assert_eq!(c.lr(2), 1.0);
        assert!((c.lr(6) - 0.5).abs() < 1e-12);
        assert!(c.lr(10).abs() < 1e-12);
        let l = s(SchedulerKind::Linear);
        assert!((l.lr(6) - 0.5).abs() < 1e-12);
        assert_eq!(l.lr(12), 0.0);
        assert_eq!(s(SchedulerKind::Constant).lr(0), 1.0);
        assert_eq!(s(SchedulerKind::ConstantWithWarmup).lr(1), 0.5);
        assert_eq!(s(SchedulerKind::CosineWithRestarts).lr(10), 0.0);
        assert_eq!(Schedule::warmup_for(10, 0, 0.1), 1);
        assert_eq!(Schedule::warmup_for(11, 0, 0.1), 2);
        assert_eq!(Schedule::warmup_for(11, 3, 0.1), 3);
    }
}
