//! SplitMix64: the one small, stable generator behind LoRA initialisation and dropout masks.
//! Stable across versions and platforms, so a seed means the same numbers forever (a resumed
//! run and a fresh one draw identically).

/// SplitMix64's increment and finaliser, shared with the dropout-mask kernel so host and
/// device draw the same stream.
pub use ferrotune_kernels::dropout::{mix, GAMMA};

#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        mix(self.0)
    }

    /// Uniform in [0, 1) with 53 bits of resolution.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, 1) with 24 bits of resolution.
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform integer in `0..n` (n > 0); the bias for n far below 2^64 is negligible.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// A key for stream `b` derived from key `a` (order matters).
pub fn derive(a: u64, b: u64) -> u64 {
    mix(a ^ mix(b.wrapping_add(GAMMA)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_derive_separates_streams() {
        let mut r = SplitMix(7);
        assert!((0..1000).all(|_| r.below(13) < 13));
        assert_ne!(derive(1, 2), derive(2, 1));
        assert_ne!(derive(1, 2), derive(1, 3));
    }
}
