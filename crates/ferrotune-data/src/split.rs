//! `split[:P%]` row selection exactly as Hugging Face `datasets` computes it.

/// Number of leading rows `datasets` keeps for `split[:pc%]` of a split with `total` rows.
///
/// `datasets` uses `round(pc * total / 100)` with Python's round-half-to-even; done here in
/// integers so it is exact for any row count (5% of 207,865 = 10,393.25 → 10,393).
pub fn rows_for_percent(total: u64, pc: u32) -> u64 {
    let scaled = u128::from(total) * u128::from(pc);
    let (whole, rem) = (scaled / 100, scaled % 100);
    let rounded = match rem.cmp(&50) {
        std::cmp::Ordering::Less => whole,
        std::cmp::Ordering::Greater => whole + 1,
        std::cmp::Ordering::Equal => whole + (whole % 2),
    };
    u64::try_from(rounded).expect("rounded percentage of a u64 never exceeds it")
}

#[cfg(test)]
mod tests {
    use super::rows_for_percent;

    #[test]
    fn matches_datasets_on_ultrachat_splits() {
        // Values datasets 2.x reports for HuggingFaceH4/ultrachat_200k with split[:5%].
        assert_eq!(rows_for_percent(207_865, 5), 10_393);
        assert_eq!(rows_for_percent(23_110, 5), 1_156); // 1155.5 rounds to even
        assert_eq!(rows_for_percent(256_032, 5), 12_802); // 12801.6
        assert_eq!(rows_for_percent(28_304, 5), 1_415); // 1415.2
    }

    #[test]
    fn rounds_half_to_even_like_python() {
        assert_eq!(rows_for_percent(10, 5), 0); // 0.5 -> 0
        assert_eq!(rows_for_percent(30, 5), 2); // 1.5 -> 2
        assert_eq!(rows_for_percent(50, 5), 2); // 2.5 -> 2
        assert_eq!(rows_for_percent(7, 100), 7);
        assert_eq!(rows_for_percent(0, 50), 0);
    }
}
