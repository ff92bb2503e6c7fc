//! Streaming reader for ultrachat parquet shards: record batches of `messages` (and `prompt_id`),
//! one row at a time, never the whole file in memory.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::{
    Array, ArrayRef, GenericListArray, LargeStringArray, OffsetSizeTrait, RecordBatch, StringArray,
    StringViewArray, StructArray,
};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use parquet::file::reader::{FileReader, SerializedFileReader};

use crate::error::{DataError, Result};
use crate::record::{BadRowReason, RowLocation};
use crate::source::{finish_row, FileRow};

const BATCH_ROWS: usize = 1024;

/// Rows of one parquet file, in order.
pub struct ParquetRows {
    path: PathBuf,
    reader: ParquetRecordBatchReader,
    batch: Option<RecordBatch>,
    pos: usize,
    /// 1-based row number of the next row within the file.
    row: u64,
}

impl ParquetRows {
    /// Row count from the footer, without reading any data page.
    pub fn count(path: &Path) -> Result<u64> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let reader = SerializedFileReader::new(file).map_err(|e| parquet_err(path, e))?;
        let rows = reader.metadata().file_metadata().num_rows();
        u64::try_from(rows).map_err(|_| parquet_err(path, "negative row count in footer"))
    }

    pub fn open(path: &Path) -> Result<ParquetRows> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| parquet_err(path, e))?;
        let schema = builder.schema().clone();
        let Some((messages_idx, messages)) = schema.column_with_name("messages") else {
            let names: Vec<_> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            return Err(DataError::Input(format!(
                "{}: no `messages` column (columns: {}); ultrachat rows need messages: list<struct<content, role>>",
                path.display(),
                names.join(", ")
            )));
        };
        check_messages_type(path, messages.data_type())?;
        let mut roots = vec![messages_idx];
        if let Some((idx, f)) = schema.column_with_name("prompt_id") {
            if is_string(f.data_type()) {
                roots.push(idx);
            }
        }
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
        let reader = builder
            .with_projection(mask)
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(|e| parquet_err(path, e))?;
        Ok(ParquetRows {
            path: path.to_path_buf(),
            reader,
            batch: None,
            pos: 0,
            row: 1,
        })
    }

    pub fn next(&mut self) -> Option<Result<FileRow>> {
        loop {
            if let Some(batch) = &self.batch {
                if self.pos < batch.num_rows() {
                    let i = self.pos;
                    self.pos += 1;
                    let row = self.row;
                    self.row += 1;
                    let location = RowLocation {
                        file: self.path.clone(),
                        row,
                    };
                    let prompt_id = batch
                        .column_by_name("prompt_id")
                        .and_then(|c| string_at(c.as_ref(), i))
                        .flatten()
                        .map(str::to_owned);
                    let messages = batch.column_by_name("messages").expect("projected at open");
                    return Some(Ok(finish_row(
                        location,
                        prompt_id,
                        read_messages(messages, i),
                    )));
                }
            }
            match self.reader.next()? {
                Ok(batch) => {
                    self.batch = Some(batch);
                    self.pos = 0;
                }
                Err(e) => return Some(Err(parquet_err(&self.path, e))),
            }
        }
    }
}

type RawMessages = std::result::Result<Vec<(String, String)>, (BadRowReason, String)>;

fn read_messages(column: &ArrayRef, i: usize) -> RawMessages {
    if let Some(list) = column.as_any().downcast_ref::<GenericListArray<i32>>() {
        list_row(list, i)
    } else if let Some(list) = column.as_any().downcast_ref::<GenericListArray<i64>>() {
        list_row(list, i)
    } else {
        unreachable!("messages type is checked when the file is opened")
    }
}

fn list_row<O: OffsetSizeTrait>(list: &GenericListArray<O>, i: usize) -> RawMessages {
    if list.is_null(i) {
        return Err((BadRowReason::MissingField, "`messages` is null".into()));
    }
    let items = list.value(i);
    let items = items
        .as_any()
        .downcast_ref::<StructArray>()
        .expect("list item type is checked when the file is opened");
    let roles = items.column_by_name("role").expect("checked at open");
    let contents = items.column_by_name("content").expect("checked at open");
    (0..items.len())
        .map(|j| {
            if items.is_null(j) {
                return Err((BadRowReason::MissingField, format!("messages[{j}] is null")));
            }
            let field = |arr: &ArrayRef, name: &str| {
                string_at(arr.as_ref(), j)
                    .flatten()
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        (
                            BadRowReason::MissingField,
                            format!("messages[{j}].{name} is null"),
                        )
                    })
            };
            Ok((field(roles, "role")?, field(contents, "content")?))
        })
        .collect()
}

/// `Some(value or null)` for the string array kinds arrow may hand back; `None` for other types.
fn string_at(arr: &dyn Array, i: usize) -> Option<Option<&str>> {
    let any = arr.as_any();
    if arr.is_null(i) {
        return Some(None);
    }
    if let Some(a) = any.downcast_ref::<StringArray>() {
        Some(Some(a.value(i)))
    } else if let Some(a) = any.downcast_ref::<LargeStringArray>() {
        Some(Some(a.value(i)))
    } else {
        any.downcast_ref::<StringViewArray>()
            .map(|a| Some(a.value(i)))
    }
}

fn is_string(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

fn check_messages_type(path: &Path, t: &DataType) -> Result<()> {
    let item = match t {
        DataType::List(f) | DataType::LargeList(f) => f.data_type(),
        _ => return Err(bad_type(path, t)),
    };
    let DataType::Struct(fields) = item else {
        return Err(bad_type(path, t));
    };
    for name in ["role", "content"] {
        match fields.iter().find(|f| f.name() == name) {
            Some(f) if is_string(f.data_type()) => {}
            _ => return Err(bad_type(path, t)),
        }
    }
    Ok(())
}

fn bad_type(path: &Path, t: &DataType) -> DataError {
    DataError::Input(format!(
        "{}: column `messages` has type {t}; expected list<struct<content: string, role: string>>",
        path.display()
    ))
}

fn parquet_err(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Parquet {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}
