//! One conversation as ultrachat stores it, and the reasons a row can be rejected.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Who speaks a turn. ultrachat only has user/assistant; system prompts are common elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One turn: `{"role": ..., "content": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

/// One validated row of the data set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// Row index within the selected split (0-based, over all files of the split in order).
    pub index: u64,
    /// File and row it was read from.
    pub location: RowLocation,
    pub prompt_id: Option<String>,
    pub messages: Vec<Message>,
}

/// Where a row came from, for error messages: `file:row` with a 1-based row number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowLocation {
    pub file: PathBuf,
    /// 1-based: a line number for jsonl, a row number within the file for parquet.
    pub row: u64,
}

impl fmt::Display for RowLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.row)
    }
}

/// Why a row was rejected. Serialised names are the keys of the stats' `dropped` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BadRowReason {
    InvalidJson,
    MissingField,
    WrongType,
    UnknownRole,
    EmptyConversation,
    NoAssistantTurn,
    TemplateError,
    /// Valid row, but truncation to --max-seq-length left no trained token.
    NoTrainableTokensAfterTruncation,
}

impl BadRowReason {
    pub fn as_str(self) -> &'static str {
        match self {
            BadRowReason::InvalidJson => "invalid_json",
            BadRowReason::MissingField => "missing_field",
            BadRowReason::WrongType => "wrong_type",
            BadRowReason::UnknownRole => "unknown_role",
            BadRowReason::EmptyConversation => "empty_conversation",
            BadRowReason::NoAssistantTurn => "no_assistant_turn",
            BadRowReason::TemplateError => "template_error",
            BadRowReason::NoTrainableTokensAfterTruncation => {
                "no_trainable_tokens_after_truncation"
            }
        }
    }

    /// Malformed input (as opposed to a valid row that simply has nothing left to train).
    pub fn is_malformed(self) -> bool {
        !matches!(self, BadRowReason::NoTrainableTokensAfterTruncation)
    }
}

impl fmt::Display for BadRowReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected row: where, why, and a human-readable detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadRow {
    pub location: RowLocation,
    pub reason: BadRowReason,
    pub detail: String,
}

/// Check the fields every ultrachat row must have; `messages` is (role, content) pairs as read.
pub(crate) fn validate_messages(
    raw: Vec<(String, String)>,
) -> std::result::Result<Vec<Message>, (BadRowReason, String)> {
    if raw.is_empty() {
        return Err((
            BadRowReason::EmptyConversation,
            "`messages` is empty".into(),
        ));
    }
    let mut out = Vec::with_capacity(raw.len());
    for (i, (role, content)) in raw.into_iter().enumerate() {
        let Some(role) = Role::parse(&role) else {
            return Err((
                BadRowReason::UnknownRole,
                format!("messages[{i}].role is {role:?}; expected system, user or assistant"),
            ));
        };
        out.push(Message { role, content });
    }
    if !out.iter().any(|m| m.role == Role::Assistant) {
        return Err((
            BadRowReason::NoAssistantTurn,
            "no assistant turn, so nothing to train".into(),
        ));
    }
    Ok(out)
}
