//! Exports of ferrotune checkpoints: MLflow model folders in `mlflow.transformers`' layout (the
//! adapter merged into the base weights, streamed shard by shard) that MLflow, transformers and
//! Azure ML load as they are, PEFT adapter folders with a model card, and their verification.

pub mod chat;
pub mod components;
pub mod error;
pub mod export;
pub mod lineage;
pub mod mlmodel;
pub mod model_card;
pub mod output;
pub mod shards;
pub mod source;
pub mod verify;

pub use error::{ExportError, Result};
pub use export::{export, ExportOptions, ExportReport, Mode, DEFAULT_MAX_SHARD_BYTES};
pub use lineage::Lineage;
pub use verify::{verify, VerifyReport};
