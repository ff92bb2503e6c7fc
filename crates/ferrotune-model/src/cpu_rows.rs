//! Shared plumbing of the fused CPU ops: their inputs as contiguous f32 rows, and (in tests) the
//! check that a fused op equals its composed candle graph forward and backward.

use candle_core::{CpuStorage, Layout, Result};

/// The f32 data of a contiguous CPU tensor and the length of its last dimension.
pub(crate) fn f32_rows<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<(&'a [f32], usize)> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{op}: expected f32");
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: expected a contiguous input");
    };
    Ok((
        &data[start..end],
        *l.dims().last().expect("at least one dimension"),
    ))
}

/// Token cross-entropy of one row of logits: `log Σ exp(row) − row[target]`.
pub(crate) fn row_nll(row: &[f32], target: u32) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|x| (x - max).exp()).sum();
    sum.ln() + max - row[target as usize]
}

/// In place: logits → `softmax(row) − onehot(target)`, the gradient of `row_nll`; returns
/// `row_nll(row, target)` (the same value, from the same sums).
pub(crate) fn row_nll_and_grad_in_place(row: &mut [f32], target: u32) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let at_target = row[target as usize];
    let mut sum = 0f32;
    for x in row.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
    row[target as usize] -= 1.0;
    sum.ln() + max - at_target
}

/// In place: logits → `g · (softmax(row) − onehot(target))`, the gradient of `g · row_nll`.
pub(crate) fn row_nll_grad_in_place(row: &mut [f32], target: u32, g: f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in row.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let scale = g / sum;
    for x in row.iter_mut() {
        *x *= scale;
    }
    row[target as usize] -= g;
}

#[cfg(test)]
pub(crate) mod check {
    use candle_core::{Device, Result, Tensor, Var};

    /// `max |a − b|` over all elements.
    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// `fused(x)` and `composed(x)` agree within `tol` in value and `grad_tol` in the gradient
    /// of `Σ out ⊙ probe` w.r.t. `x`, for a random `x` of `shape`.
    pub(crate) fn fused_matches_composed(
        shape: &[usize],
        fused: impl Fn(&Tensor) -> Result<Tensor>,
        composed: impl Fn(&Tensor) -> Result<Tensor>,
        tol: f32,
        grad_tol: f32,
    ) {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.5, shape, &Device::Cpu).unwrap()).unwrap();
        let (a, b) = (
            fused(x.as_tensor()).unwrap(),
            composed(x.as_tensor()).unwrap(),
        );
        let d = max_abs_diff(&a, &b);
        assert!(d <= tol, "forward differs by {d}");
        let probe = Tensor::randn(0f32, 1.0, a.dims(), &Device::Cpu).unwrap();
        let ga = (a * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let d = max_abs_diff(
            ga.get(x.as_tensor()).unwrap(),
            gb.get(x.as_tensor()).unwrap(),
        );
        assert!(d <= grad_tol, "gradient differs by {d}");
    }
}
