//! Progress bars on stderr, only when stderr is a terminal.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// Row progress for `data prepare`; silent when stderr is not a terminal or logging is quiet.
pub struct RowBar {
    bar: Option<ProgressBar>,
}

impl RowBar {
    pub fn new(enabled: bool) -> RowBar {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {bar:32} {pos}/{len} rows  {per_sec}  eta {eta}",
                )
                .expect("static template"),
            );
            bar
        });
        RowBar { bar }
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
