//! LoRA training for ferrotune: the config (the source document's parameter names), AdamW with
//! fp32 master weights, transformers' schedules, token-weighted gradient accumulation, the
//! training loop with evaluation, atomic checkpoints and exact resume, metrics, and the memory
//! planner.

pub mod batches;
pub mod checkpoint;
pub mod config;
pub mod dist;
pub mod error;
pub mod eval;
mod flex;
pub mod metrics;
pub mod optimizer;
pub mod plan;
pub mod plot;
pub mod schedule;
pub mod setup;
pub mod trainer;

pub use config::{Precision, SchedulerKind, TrainConfig};
pub use error::{Result, TrainError};
pub use trainer::{train, Finish, Observer, RunData, RunOptions, RunShape, Summary};
