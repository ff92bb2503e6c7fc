//! Safetensors shards written one tensor at a time: every shard's header is known before any
//! weight is read (names, dtypes and shapes come from the base model's headers), so each tensor
//! is produced, written and dropped in turn and an export never holds more than one tensor.
//! Shards are split as `huggingface_hub` splits a state dict (in order; a tensor that would
//! overflow the current shard starts the next one) and named as transformers names them, with
//! `model.safetensors.index.json` when there is more than one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use candle_core::DType;
use serde_json::json;

use crate::error::{ExportError, Result};

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

/// One tensor to write.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn elements(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64
    }

    pub fn bytes(&self) -> u64 {
        self.elements() * self.dtype.size_in_bytes() as u64
    }
}

/// safetensors' name of a dtype.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "F32",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::F64 => "F64",
        DType::U8 => "U8",
        DType::U32 => "U32",
        DType::I64 => "I64",
        _ => "UNKNOWN",
    }
}

/// Indices of `specs` per shard.
pub fn plan_shards(specs: &[TensorSpec], max_shard_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut size = 0u64;
    for (i, spec) in specs.iter().enumerate() {
        let b = spec.bytes();
        if !current.is_empty() && size + b > max_shard_bytes {
            shards.push(std::mem::take(&mut current));
            size = 0;
        }
        current.push(i);
        size += b;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// `model.safetensors`, or `model-00001-of-00003.safetensors`, ...
pub fn shard_names(count: usize) -> Vec<String> {
    if count == 1 {
        return vec![SINGLE_FILE.to_string()];
    }
    (1..=count)
        .map(|i| format!("model-{i:05}-of-{count:05}.safetensors"))
        .collect()
}

/// What was written.
#[derive(Debug, Clone)]
pub struct WrittenWeights {
    pub files: Vec<String>,
    pub total_bytes: u64,
    pub total_parameters: u64,
}

/// Write `specs` into `dir` as shards of at most `max_shard_bytes` (a larger tensor gets a shard
/// of its own); `produce` returns each tensor's little-endian bytes when its turn comes, and
/// `written` is told after each tensor (tensors done, total).
pub fn write_shards(
    dir: &Path,
    specs: &[TensorSpec],
    max_shard_bytes: u64,
    produce: &mut dyn FnMut(&TensorSpec) -> Result<Vec<u8>>,
    written: &mut dyn FnMut(usize, usize),
) -> Result<WrittenWeights> {
    let plan = plan_shards(specs, max_shard_bytes);
    let names = shard_names(plan.len());
    let mut weight_map = BTreeMap::new();
    let mut done = 0;
    for (indices, file_name) in plan.iter().zip(&names) {
        let path = dir.join(file_name);
        let file = std::fs::File::create(&path).map_err(|e| ExportError::io(&path, e))?;
        let mut out = std::io::BufWriter::with_capacity(8 << 20, file);
        out.write_all(&header(specs, indices))
            .map_err(|e| ExportError::io(&path, e))?;
        for &i in indices {
            let spec = &specs[i];
            let bytes = produce(spec)?;
            if bytes.len() as u64 != spec.bytes() {
                return Err(ExportError::invalid(
                    &path,
                    format!(
                        "tensor `{}`: {} bytes produced for {:?} {:?}",
                        spec.name,
                        bytes.len(),
                        spec.dtype,
                        spec.shape
                    ),
                ));
            }
            out.write_all(&bytes)
                .map_err(|e| ExportError::io(&path, e))?;
            weight_map.insert(spec.name.clone(), file_name.clone());
            done += 1;
            written(done, specs.len());
        }
        let file = out
            .into_inner()
            .map_err(|e| ExportError::io(&path, e.into_error()))?;
        file.sync_all().map_err(|e| ExportError::io(&path, e))?;
    }
    let total_bytes = specs.iter().map(TensorSpec::bytes).sum();
    let total_parameters = specs.iter().map(TensorSpec::elements).sum();
    if names.len() > 1 {
        let index = json!({
            "metadata": {"total_parameters": total_parameters, "total_size": total_bytes},
            "weight_map": weight_map,
        });
        let path = dir.join(INDEX_FILE);
        let text = serde_json::to_string_pretty(&index).expect("index serialises") + "\n";
        std::fs::write(&path, text).map_err(|e| ExportError::io(&path, e))?;
    }
    Ok(WrittenWeights {
        files: names,
        total_bytes,
        total_parameters,
    })
}

/// The 8-byte length and JSON header of one shard, padded with spaces to a multiple of 8 bytes
/// as the safetensors library pads it.
fn header(specs: &[TensorSpec], indices: &[usize]) -> Vec<u8> {
    let mut entries = serde_json::Map::new();
    entries.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for &i in indices {
        let s = &specs[i];
        let end = offset + s.bytes();
        entries.insert(
            s.name.clone(),
            json!({"dtype": dtype_name(s.dtype), "shape": s.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut text = serde_json::to_vec(&entries).expect("header serialises");
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn spec(name: &str, shape: &[usize]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype: DType::F32,
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn shards_split_in_order_and_oversized_tensors_stand_alone() {
        // 40, 40, 200, 8 bytes with a 100-byte limit.
        let specs = [
            spec("a", &[10]),
            spec("b", &[10]),
            spec("c", &[50]),
            spec("d", &[2]),
        ];
        assert_eq!(plan_shards(&specs, 100), vec![vec![0, 1], vec![2], vec![3]]);
        assert_eq!(plan_shards(&specs, 1 << 20), vec![vec![0, 1, 2, 3]]);
        assert_eq!(shard_names(1), ["model.safetensors"]);
        assert_eq!(
            shard_names(3)[2],
            "model-00003-of-00003.safetensors".to_string()
        );
    }

    #[test]
    fn written_shards_read_back_with_candle_and_the_index_lists_every_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let specs = [spec("x", &[2, 3]), spec("y", &[5]), spec("z", &[7])];
        let value = |s: &TensorSpec| -> Vec<f32> {
            (0..s.elements())
                .map(|i| i as f32 + s.name.len() as f32 * 0.5 + s.shape[0] as f32)
                .collect()
        };
        let mut produce = |s: &TensorSpec| -> Result<Vec<u8>> {
            Ok(value(s).iter().flat_map(|v| v.to_le_bytes()).collect())
        };
        let mut seen = Vec::new();
        let w = write_shards(dir.path(), &specs, 24, &mut produce, &mut |d, t| {
            seen.push((d, t))
        })
        .unwrap();
        assert_eq!(w.files.len(), 3);
        assert_eq!(w.total_bytes, 4 * (6 + 5 + 7));
        assert_eq!(seen.last(), Some(&(3, 3)));
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(INDEX_FILE)).unwrap())
                .unwrap();
        assert_eq!(index["metadata"]["total_size"], 72);
        for s in &specs {
            let file = index["weight_map"][&s.name].as_str().unwrap();
            let header_len = {
                let bytes = std::fs::read(dir.path().join(file)).unwrap();
                u64::from_le_bytes(bytes[..8].try_into().unwrap())
            };
            assert_eq!(header_len % 8, 0);
            let loaded =
                candle_core::safetensors::load(dir.path().join(file), &Device::Cpu).unwrap();
            let t: &Tensor = &loaded[&s.name];
            assert_eq!(t.dims(), s.shape.as_slice());
            assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), value(s));
        }
    }

    #[test]
    fn a_producer_that_returns_the_wrong_size_is_an_error_not_a_corrupt_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_shards(
            dir.path(),
            &[spec("x", &[4])],
            1 << 20,
            &mut |_| Ok(vec![0u8; 3]),
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("3 bytes produced"), "{err}");
    }
}
