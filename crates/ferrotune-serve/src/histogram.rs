//! Latency histograms in Prometheus' exposition format: fixed buckets, lock-free counters, so
//! the engine thread records without waiting on a scrape.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds in seconds: from a fast decode step to the source's 90 s request timeout.
const BOUNDS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 90.0, 120.0,
];

#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations `<= BOUNDS[i]` and above the bound before (not cumulative).
    buckets: [AtomicU64; BOUNDS.len()],
    /// Above the last bound.
    over: AtomicU64,
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        let seconds = seconds.max(0.0);
        match BOUNDS.iter().position(|&b| seconds <= b) {
            Some(i) => self.buckets[i].fetch_add(1, Ordering::Relaxed),
            None => self.over.fetch_add(1, Ordering::Relaxed),
        };
        self.sum_us
            .fetch_add((seconds * 1e6).round() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The `_bucket` (cumulative, `le` up to `+Inf`), `_sum` and `_count` lines of `name` with
    /// the label `deployment`.
    pub fn render(&self, name: &str, deployment: &str, out: &mut String) {
        let mut cumulative = 0;
        for (bound, n) in BOUNDS.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{deployment=\"{deployment}\",le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self.over.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{deployment=\"{deployment}\",le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{deployment=\"{deployment}\"}} {sum}");
        let _ = writeln!(
            out,
            "{name}_count{{deployment=\"{deployment}\"}} {}",
            self.count()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_end_at_the_count() {
        let h = Histogram::default();
        for s in [0.003, 0.007, 0.2, 0.2, 400.0] {
            h.observe(s);
        }
        let mut out = String::new();
        h.render("x", "demo", &mut out);
        let line = |le: &str| {
            out.lines()
                .find(|l| l.contains(&format!("le=\"{le}\"")))
                .unwrap()
                .rsplit(' ')
                .next()
                .unwrap()
                .to_string()
        };
        assert_eq!(line("0.005"), "1");
        assert_eq!(line("0.01"), "2");
        assert_eq!(line("0.1"), "2");
        assert_eq!(line("0.25"), "4");
        assert_eq!(line("120"), "4");
        assert_eq!(line("+Inf"), "5");
        assert!(out.contains("x_count{deployment=\"demo\"} 5\n"));
        assert!(out.contains("x_sum{deployment=\"demo\"} 400.41\n"), "{out}");
    }
}
