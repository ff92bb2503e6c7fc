//! Progress bars on stderr, only when stderr is a terminal.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// Row progress for `data prepare`; silent when stderr is not a terminal or logging is quiet.
pub struct RowBar {
    bar: Option<ProgressBar>,
}

impl RowBar {
    pub fn new(enabled: bool) -> RowBar {
        RowBar::counting(enabled, "rows")
    }

    /// A bar counting `unit`s (`rows`, `tensors`, ...).
    pub fn counting(enabled: bool, unit: &str) -> RowBar {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(&format!(
                    "{{spinner}} {{bar:32}} {{pos}}/{{len}} {unit}  {{per_sec}}  eta {{eta}}"
                ))
                .expect("static template"),
            );
            bar
        });
        RowBar { bar }
    }

    /// `done` of `total` units (the first call sets the length): for callbacks that count.
    pub fn tick(&self, done: usize, total: usize) {
        if let Some(bar) = &self.bar {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl ferrotune_data::Progress for RowBar {
    fn start(&self, total_rows: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total_rows);
        }
    }

    fn advance(&self, rows_done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(rows_done);
        }
    }
}

/// Training progress: a step bar with loss, lr, tokens/s and ETA on a terminal; one log line
/// per logged record otherwise (and always for evaluations and checkpoints).
pub struct TrainBar {
    bar: Option<ProgressBar>,
}

impl TrainBar {
    pub fn new(enabled: bool) -> TrainBar {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {bar:28} step {pos}/{len}  {msg}  eta {eta}",
                )
                .expect("static template"),
            );
            bar
        });
        TrainBar { bar }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    fn line(&self, text: String) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => tracing::info!("{text}"),
        }
    }
}

impl ferrotune_train::Observer for TrainBar {
    fn started(&mut self, shape: &ferrotune_train::RunShape) {
        if let Some(bar) = &self.bar {
            bar.set_length(shape.total_steps);
            bar.set_position(shape.start_step);
            bar.reset_eta();
        }
    }

    fn step(&mut self, step: u64, _total: u64, loss: f64, lr: f64, tokens_per_s: f64) {
        if let Some(bar) = &self.bar {
            bar.set_position(step);
            bar.set_message(format!(
                "loss {loss:.4}  lr {lr:.2e}  {tokens_per_s:.0} tokens/s"
            ));
        }
    }

    fn record(&mut self, record: &ferrotune_train::metrics::Record) {
        use ferrotune_train::metrics::Record;
        match record {
            Record::Train(r) if self.bar.is_none() => self.line(format!(
                "step {} (epoch {:.2}): loss {:.4}  lr {:.3e}  grad norm {:.3}  {:.0} tokens/s",
                r.step, r.epoch, r.loss, r.learning_rate, r.grad_norm, r.tokens_per_s
            )),
            Record::Train(_) => {}
            Record::Eval(r) => self.line(format!(
                "eval at step {}: loss {:.4}  perplexity {:.3}  accuracy {:.1}%  ({} tokens, {:.1} s)",
                r.step,
                r.eval_loss,
                r.eval_perplexity,
                100.0 * r.eval_accuracy,
                r.eval_tokens,
                r.eval_s
            )),
        }
    }

    fn checkpoint(&mut self, path: &std::path::Path) {
        self.line(format!("checkpoint {}", path.display()));
    }
}
