//! Finding a split's files in either layout the field uses, counting its rows, and streaming them.
//!
//! Layouts:
//! - Hugging Face `HuggingFaceH4/ultrachat_200k`: `DIR/data/{split}-*.parquet` (or `DIR/{split}-*.parquet`),
//!   columns `prompt`, `prompt_id`, `messages: list<struct<content, role>>`;
//! - the source document's download script: `DIR/{split}.jsonl`, one `{prompt, messages, prompt_id}` a line;
//! - a single `.parquet` / `.jsonl` file given directly.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::parquet_rows::ParquetRows;
use crate::record::{validate_messages, BadRow, BadRowReason, Conversation, RowLocation};

/// On-disk format of a split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Parquet,
    Jsonl,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Parquet => "parquet",
            Format::Jsonl => "jsonl",
        }
    }
}

/// The files that make up one split, in row order.
#[derive(Debug, Clone)]
pub struct SplitSource {
    pub format: Format,
    pub files: Vec<PathBuf>,
}

/// A row as read: a valid conversation or the reason it was rejected.
pub type RowResult = std::result::Result<Conversation, BadRow>;

impl SplitSource {
    /// Locate `split` under `input` (a folder in either layout, or one file).
    pub fn discover(input: &Path, split: Option<&str>) -> Result<SplitSource> {
        if !input.exists() {
            return Err(DataError::Input(format!(
                "input {} does not exist; pass a .parquet/.jsonl file or a folder holding data/{{split}}-*.parquet or {{split}}.jsonl",
                input.display()
            )));
        }
        if input.is_file() {
            let format = format_of(input).ok_or_else(|| {
                DataError::Input(format!(
                    "input {} is neither .parquet nor .jsonl",
                    input.display()
                ))
            })?;
            return Ok(SplitSource {
                format,
                files: vec![input.to_path_buf()],
            });
        }
        let split = split.ok_or_else(|| {
            DataError::Usage(format!(
                "{} is a folder: name the split to read with --split (e.g. train_sft)",
                input.display()
            ))
        })?;
        let mut parquet = Vec::new();
        for dir in [input.join("data"), input.to_path_buf()] {
            parquet.extend(list_matching(&dir, |name| {
                name.starts_with(&format!("{split}-")) && name.ends_with(".parquet")
                    || name == format!("{split}.parquet")
            })?);
        }
        let jsonl = input.join(format!("{split}.jsonl"));
        match (parquet.is_empty(), jsonl.is_file()) {
            (false, true) => Err(DataError::Input(format!(
                "{} holds both parquet shards ({}) and {}; pass the file or folder you mean",
                input.display(),
                parquet[0].display(),
                jsonl.display()
            ))),
            (false, false) => {
                parquet.sort();
                Ok(SplitSource {
                    format: Format::Parquet,
                    files: parquet,
                })
            }
            (true, true) => Ok(SplitSource {
                format: Format::Jsonl,
                files: vec![jsonl],
            }),
            (true, false) => {
                let found = available_splits(input)?;
                let hint = if found.is_empty() {
                    "no .parquet or .jsonl files are there".to_string()
                } else {
                    format!("splits found: {}", found.join(", "))
                };
                Err(DataError::Input(format!(
                    "split {split:?} not found in {} (looked for data/{split}-*.parquet, {split}-*.parquet, {split}.jsonl); {hint}",
                    input.display()
                )))
            }
        }
    }

    /// Total rows in the split: parquet footers, or non-blank jsonl lines (one fast pass).
    pub fn count_rows(&self) -> Result<u64> {
        let mut total = 0;
        for file in &self.files {
            total += match self.format {
                Format::Parquet => ParquetRows::count(file)?,
                Format::Jsonl => count_jsonl_rows(file)?,
            };
        }
        Ok(total)
    }

    /// Stream the first `limit` rows of the split, in order, never holding a whole file in memory.
    pub fn rows(&self, limit: u64) -> RowStream {
        RowStream {
            format: self.format,
            files: self.files.clone(),
            next_file: 0,
            current: None,
            emitted: 0,
            limit,
        }
    }
}

/// Iterator over the rows of a split; I/O and decoding errors end it with `Err`.
pub struct RowStream {
    format: Format,
    files: Vec<PathBuf>,
    next_file: usize,
    current: Option<FileRows>,
    emitted: u64,
    limit: u64,
}

enum FileRows {
    Parquet(ParquetRows),
    Jsonl(JsonlRows),
}

impl Iterator for RowStream {
    type Item = Result<RowResult>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.emitted < self.limit {
            if self.current.is_none() {
                let file = self.files.get(self.next_file)?.clone();
                self.next_file += 1;
                let opened = match self.format {
                    Format::Parquet => ParquetRows::open(&file).map(FileRows::Parquet),
                    Format::Jsonl => JsonlRows::open(&file).map(FileRows::Jsonl),
                };
                match opened {
                    Ok(rows) => self.current = Some(rows),
                    Err(e) => {
                        self.emitted = self.limit;
                        return Some(Err(e));
                    }
                }
            }
            let next = match self.current.as_mut().expect("opened above") {
                FileRows::Parquet(rows) => rows.next(),
                FileRows::Jsonl(rows) => rows.next(),
            };
            match next {
                None => self.current = None,
                Some(Ok(row)) => {
                    let index = self.emitted;
                    self.emitted += 1;
                    return Some(Ok(row.map(|(location, prompt_id, messages)| {
                        Conversation {
                            index,
                            location,
                            prompt_id,
                            messages,
                        }
                    })));
                }
                Some(Err(e)) => {
                    self.emitted = self.limit;
                    return Some(Err(e));
                }
            }
        }
        None
    }
}

/// A row as one file reader yields it, before it gets its split-wide index.
pub(crate) type FileRow =
    std::result::Result<(RowLocation, Option<String>, Vec<crate::record::Message>), BadRow>;

/// Validate raw (role, content) pairs into a [`FileRow`] for the given location.
pub(crate) fn finish_row(
    location: RowLocation,
    prompt_id: Option<String>,
    raw: std::result::Result<Vec<(String, String)>, (BadRowReason, String)>,
) -> FileRow {
    match raw.and_then(validate_messages) {
        Ok(messages) => Ok((location, prompt_id, messages)),
        Err((reason, detail)) => Err(BadRow {
            location,
            reason,
            detail,
        }),
    }
}

struct JsonlRows {
    path: PathBuf,
    reader: BufReader<File>,
    line: u64,
    buf: Vec<u8>,
}

impl JsonlRows {
    fn open(path: &Path) -> Result<JsonlRows> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        Ok(JsonlRows {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(1 << 20, file),
            line: 0,
            buf: Vec::new(),
        })
    }

    fn next(&mut self) -> Option<Result<FileRow>> {
        loop {
            self.buf.clear();
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some(Err(DataError::io(&self.path, e))),
            }
            self.line += 1;
            // Files saved by some Windows tools start with a UTF-8 byte-order mark.
            if self.line == 1 && self.buf.starts_with(b"\xEF\xBB\xBF") {
                self.buf.drain(..3);
            }
            if self.buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let location = RowLocation {
                file: self.path.clone(),
                row: self.line,
            };
            return Some(Ok(parse_jsonl_row(&self.buf, location)));
        }
    }
}

fn parse_jsonl_row(line: &[u8], location: RowLocation) -> FileRow {
    let value: serde_json::Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            return Err(BadRow {
                location,
                reason: BadRowReason::InvalidJson,
                detail: e.to_string(),
            })
        }
    };
    let Some(obj) = value.as_object() else {
        return Err(BadRow {
            location,
            reason: BadRowReason::WrongType,
            detail: "the line is not a JSON object".into(),
        });
    };
    let prompt_id = obj
        .get("prompt_id")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    let raw = match obj.get("messages") {
        None | Some(serde_json::Value::Null) => Err((
            BadRowReason::MissingField,
            "field `messages` is missing".to_string(),
        )),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, m)| json_message(i, m))
            .collect(),
        Some(other) => Err((
            BadRowReason::WrongType,
            format!(
                "field `messages` is {}, expected a list of {{role, content}}",
                json_kind(other)
            ),
        )),
    };
    finish_row(location, prompt_id, raw)
}

fn json_message(
    i: usize,
    m: &serde_json::Value,
) -> std::result::Result<(String, String), (BadRowReason, String)> {
    let Some(obj) = m.as_object() else {
        return Err((
            BadRowReason::WrongType,
            format!("messages[{i}] is {}, expected an object", json_kind(m)),
        ));
    };
    let field = |name: &str| match obj.get(name) {
        None | Some(serde_json::Value::Null) => Err((
            BadRowReason::MissingField,
            format!("messages[{i}].{name} is missing"),
        )),
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(other) => Err((
            BadRowReason::WrongType,
            format!(
                "messages[{i}].{name} is {}, expected a string",
                json_kind(other)
            ),
        )),
    };
    Ok((field("role")?, field("content")?))
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

fn count_jsonl_rows(path: &Path) -> Result<u64> {
    let mut file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut rows, mut line_has_text) = (0u64, false);
    loop {
        let n = file.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        for &b in &buf[..n] {
            if b == b'\n' {
                rows += u64::from(line_has_text);
                line_has_text = false;
            } else if !b.is_ascii_whitespace() {
                line_has_text = true;
            }
        }
    }
    Ok(rows + u64::from(line_has_text))
}

fn format_of(path: &Path) -> Option<Format> {
    match path.extension()?.to_str()? {
        "parquet" => Some(Format::Parquet),
        "jsonl" | "json" => Some(Format::Jsonl),
        _ => None,
    }
}

fn list_matching(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        if let Some(name) = entry.file_name().to_str() {
            if keep(name) && entry.path().is_file() {
                out.push(entry.path());
            }
        }
    }
    Ok(out)
}

/// Split names present under `input`, to suggest when the requested one is missing.
fn available_splits(input: &Path) -> Result<Vec<String>> {
    let mut names = std::collections::BTreeSet::new();
    for dir in [input.join("data"), input.to_path_buf()] {
        for path in list_matching(&dir, |n| n.ends_with(".parquet") || n.ends_with(".jsonl"))? {
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            // `train_sft-00000-of-00003` -> `train_sft`
            names.insert(stem.split('-').next().unwrap_or(stem).to_string());
        }
    }
    Ok(names.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc() -> RowLocation {
        RowLocation {
            file: "f.jsonl".into(),
            row: 3,
        }
    }

    fn reason(line: &str) -> BadRowReason {
        parse_jsonl_row(line.as_bytes(), loc()).unwrap_err().reason
    }

    #[test]
    fn jsonl_rows_are_classified_by_what_is_wrong() {
        assert_eq!(reason("{not json"), BadRowReason::InvalidJson);
        assert_eq!(reason("[1, 2]"), BadRowReason::WrongType);
        assert_eq!(reason(r#"{"prompt": "x"}"#), BadRowReason::MissingField);
        assert_eq!(reason(r#"{"messages": "hi"}"#), BadRowReason::WrongType);
        assert_eq!(
            reason(r#"{"messages": []}"#),
            BadRowReason::EmptyConversation
        );
        assert_eq!(
            reason(r#"{"messages": [{"role": "user"}]}"#),
            BadRowReason::MissingField
        );
        assert_eq!(
            reason(r#"{"messages": [{"role": "user", "content": 5}]}"#),
            BadRowReason::WrongType
        );
        assert_eq!(
            reason(r#"{"messages": [{"role": "bot", "content": "x"}]}"#),
            BadRowReason::UnknownRole
        );
        assert_eq!(
            reason(r#"{"messages": [{"role": "user", "content": "x"}]}"#),
            BadRowReason::NoAssistantTurn
        );
    }

    #[test]
    fn a_good_jsonl_row_keeps_order_and_prompt_id() {
        let line = r#"{"prompt": "p", "prompt_id": "abc", "messages": [{"content": "q", "role": "user"}, {"content": "a", "role": "assistant"}]}"#;
        let (_, id, msgs) = parse_jsonl_row(line.as_bytes(), loc()).unwrap();
        assert_eq!(id.as_deref(), Some("abc"));
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[1].content, "a");
    }

    #[test]
    fn a_byte_order_mark_does_not_spoil_the_first_row() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bom.jsonl");
        let row = r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#;
        std::fs::write(&p, format!("\u{FEFF}{row}\n")).unwrap();
        let mut rows = JsonlRows::open(&p).unwrap();
        assert!(rows.next().unwrap().unwrap().is_ok());
        assert!(rows.next().is_none());
    }

    #[test]
    fn blank_lines_are_not_rows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.jsonl");
        std::fs::write(&p, "{\"a\":1}\n\n  \n{\"a\":2}").unwrap();
        assert_eq!(count_jsonl_rows(&p).unwrap(), 2);
    }
}
