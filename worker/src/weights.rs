//! Checkpoint tensors from one or more `.safetensors` files, memory-mapped. f32 tensors are used
//! in place (no copy); bf16 and f16 tensors are widened to f32 once at load time.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("cannot open {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{path}: {reason}")]
    Index { path: String, reason: String },
    #[error("params.json says the self-decoder uses {configured}, but the checkpoint holds `{tensor}`")]
    MixerMismatch { configured: &'static str, tensor: String },
    #[error("no *.safetensors files in {0}")]
    NoFiles(String),
    #[error("{path} is not a valid safetensors file (truncated or corrupt): {reason}")]
    Corrupt { path: String, reason: String },
    #[error("tensor `{name}` appears in both {first} and {second}")]
    Duplicate { name: String, first: String, second: String },
    #[error("tensor `{name}` is missing from the checkpoint in {dir}")]
    Missing { name: String, dir: String },
    #[error("tensor `{name}` in {path} has shape {found:?}, expected {expected:?}")]
    Shape { name: String, path: String, found: Vec<usize>, expected: Vec<usize> },
    #[error("tensor `{name}` in {path} has dtype {dtype}; only F32, BF16 and F16 are supported")]
    Dtype { name: String, path: String, dtype: String },
}

/// f32 numbers either borrowed from a memory map or owned.
pub enum WeightData {
    Mapped { map: Arc<Mmap>, offset: usize, len: usize },
    Owned(Vec<f32>),
}

/// One loaded tensor, always readable as a row-major f32 slice.
pub struct Tensor {
    pub shape: Vec<usize>,
    data: WeightData,
}

impl Tensor {
    pub fn from_vec(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor shape and data disagree");
        Tensor { shape, data: WeightData::Owned(data) }
    }

    pub fn as_slice(&self) -> &[f32] {
        match &self.data {
            WeightData::Owned(v) => v,
            WeightData::Mapped { map, offset, len } => {
                let bytes = &map[*offset..*offset + len * 4];
                // SAFETY: `offset` was checked to be 4-byte aligned (the map itself is page
                // aligned), the range lies inside the map, and every bit pattern is a valid f32.
                unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), *len) }
            }
        }
    }

    /// Bytes of process memory this tensor owns (mapped tensors own none).
    pub fn owned_bytes(&self) -> usize {
        match &self.data {
            WeightData::Owned(v) => v.len() * 4,
            WeightData::Mapped { .. } => 0,
        }
    }
}

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    offset: usize,
    bytes: usize,
}

/// The tensors of a model directory, indexed by name.
pub struct WeightFiles {
    dir: PathBuf,
    files: Vec<(PathBuf, Arc<Mmap>)>,
    index: HashMap<String, Entry>,
}

impl WeightFiles {
    pub fn open(dir: &Path) -> Result<Self, WeightError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |error| WeightError::Io { path, error }
        };
        let mut paths = model_files(dir)?;
        paths.sort();
        if paths.is_empty() {
            return Err(WeightError::NoFiles(dir.display().to_string()));
        }
        let mut files = Vec::new();
        let mut index: HashMap<String, Entry> = HashMap::new();
        for path in paths {
            let file = File::open(&path).map_err(io(&path))?;
            // SAFETY: the model files are treated as read-only for the life of the process; a
            // writer truncating them under us is outside what the server can defend against.
            let map = unsafe { Mmap::map(&file) }.map_err(io(&path))?;
            let map = Arc::new(map);
            let st = SafeTensors::deserialize(&map)
                .map_err(|e| WeightError::Corrupt { path: path.display().to_string(), reason: e.to_string() })?;
            let file_idx = files.len();
            for (name, view) in st.tensors() {
                let offset = view.data().as_ptr() as usize - map.as_ptr() as usize;
                if let Some(prev) = index.get(&name) {
                    return Err(WeightError::Duplicate {
                        name,
                        first: files_path(&files, prev.file),
                        second: path.display().to_string(),
                    });
                }
                let entry = Entry {
                    file: file_idx,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    offset,
                    bytes: view.data().len(),
                };
                index.insert(name, entry);
            }
            files.push((path, map));
        }
        Ok(WeightFiles { dir: dir.to_path_buf(), files, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Bytes of all tensor files (what a memory map of the whole model costs at most).
    pub fn file_bytes(&self) -> usize {
        self.files.iter().map(|(_, m)| m.len()).sum()
    }

    /// Loads `name`, checking that its shape is `expected`.
    pub fn get(&self, name: &str, expected: &[usize]) -> Result<Tensor, WeightError> {
        let entry = self
            .index
            .get(name)
            .ok_or_else(|| WeightError::Missing { name: name.to_string(), dir: self.dir.display().to_string() })?;
        let (path, map) = &self.files[entry.file];
        if entry.shape != expected {
            return Err(WeightError::Shape {
                name: name.to_string(),
                path: path.display().to_string(),
                found: entry.shape.clone(),
                expected: expected.to_vec(),
            });
        }
        let len: usize = expected.iter().product();
        let bytes = &map[entry.offset..entry.offset + entry.bytes];
        let data = match entry.dtype {
            Dtype::F32 if entry.offset % 4 == 0 && cfg!(target_endian = "little") => {
                WeightData::Mapped { map: map.clone(), offset: entry.offset, len }
            }
            Dtype::F32 => {
                WeightData::Owned(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
            }
            Dtype::BF16 => WeightData::Owned(
                bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            ),
            Dtype::F16 => WeightData::Owned(
                bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            ),
            other => {
                return Err(WeightError::Dtype {
                    name: name.to_string(),
                    path: path.display().to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        Ok(Tensor { shape: expected.to_vec(), data })
    }
}

/// The checkpoint's files: those named by `model.safetensors.index.json` when present (the
/// Hugging Face convention for sharded checkpoints), else every `*.safetensors` in `dir`.
fn model_files(dir: &Path) -> Result<Vec<PathBuf>, WeightError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let corrupt = |reason: String| WeightError::Index { path: index.display().to_string(), reason };
        let text = std::fs::read_to_string(&index)
            .map_err(|error| WeightError::Io { path: index.display().to_string(), error })?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        let map = json["weight_map"].as_object().ok_or_else(|| corrupt("no `weight_map` object".into()))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for file in map.values() {
            let name = file.as_str().ok_or_else(|| corrupt(format!("weight_map value {file} is not a file name")))?;
            let plain = Path::new(name).file_name().is_some_and(|f| f == std::ffi::OsStr::new(name));
            if !plain {
                return Err(corrupt(format!("weight_map names a file outside the model directory: {name}")));
            }
            if !files.iter().any(|f| f.ends_with(name)) {
                files.push(dir.join(name));
            }
        }
        return Ok(files);
    }
    Ok(std::fs::read_dir(dir)
        .map_err(|error| WeightError::Io { path: dir.display().to_string(), error })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect())
}

fn files_path(files: &[(PathBuf, Arc<Mmap>)], idx: usize) -> String {
    files[idx].0.display().to_string()
}
