//! ferrotune-data: ultrachat (parquet or jsonl) → chat template → tokens with an assistant-only
//! label mask → optional packing → cached token shards. No tensors here; the trainer reads the
//! shards.

pub mod chat_template;
pub mod error;
pub mod label_mask;
pub mod manifest;
pub mod pack;
mod parquet_rows;
pub mod prepare;
pub mod prepared;
pub mod record;
mod sentencepiece_bpe;
pub mod shard;
pub mod source;
pub mod special_tokens;
pub mod split;
pub mod tokenizer;

pub use chat_template::ChatTemplate;
pub use error::{DataError, Result};
pub use label_mask::{tokenize_conversation, TokenizedConversation};
pub use manifest::{Manifest, OnBadRow};
pub use prepare::{prepare, Outcome, PrepareOptions, Progress, Quiet};
pub use prepared::{trained_segments, Prepared, StoredDocument, TrainingSequence};
pub use record::{Message, Role};
pub use special_tokens::SpecialTokens;
pub use tokenizer::Tokenizer;
