//! Checkpoint tensors from one or more `.safetensors` files, memory-mapped. Weight matrices are
//! kept in the element type asked for ([`WeightDtype`]; by default the checkpoint's own): a
//! tensor already in that type is used in place (no copy), any other is converted once at load
//! time. Vectors (norm weights) are always f32.

use std::collections::HashMap;
use std::fs::File;
use std::ops::{Deref, Range};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;

pub use crate::kernels::widen::WeightRef;
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

/// The bytes of one tensor file: memory-mapped, or already in memory (tests, fuzzing).
pub enum FileBytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Owned(v) => v,
        }
    }
}

/// The element type weight matrices are kept in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightDtype {
    /// As the checkpoint stores each matrix (f32, bf16 or f16): always used in place.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

impl WeightDtype {
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::Auto => "auto",
            WeightDtype::F32 => "f32",
            WeightDtype::Bf16 => "bf16",
            WeightDtype::F16 => "f16",
        }
    }

    fn elem(self, stored: Elem) -> Elem {
        match self {
            WeightDtype::Auto => stored,
            WeightDtype::F32 => Elem::F32,
            WeightDtype::Bf16 => Elem::Bf16,
            WeightDtype::F16 => Elem::F16,
        }
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "auto" => Ok(WeightDtype::Auto),
            "f32" | "float32" => Ok(WeightDtype::F32),
            "bf16" | "bfloat16" => Ok(WeightDtype::Bf16),
            "f16" | "float16" => Ok(WeightDtype::F16),
            other => Err(format!("weight dtype `{other}`: expected auto, f32, bf16 or f16")),
        }
    }
}

/// The type the CPU's large matrix products (prefill) compute in: `f32`, `bf16` (activations
/// rounded to bf16 as they are packed, bf16 weights, f32 accumulation; everything else — norms,
/// retention states, softmax, logits — stays f32), or `auto`: as the checkpoint's weights (bf16
/// for a bf16 checkpoint), the way PyTorch and vLLM users expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeDtype {
    #[default]
    F32,
    Bf16,
    Auto,
}

impl ComputeDtype {
    pub fn name(self) -> &'static str {
        match self {
            ComputeDtype::F32 => "f32",
            ComputeDtype::Bf16 => "bf16",
            ComputeDtype::Auto => "auto",
        }
    }

    /// `auto` resolved against the loaded weights' type (`Model::weight_dtype`): bf16 when they
    /// all are, else f32.
    pub fn resolve(self, weight_dtype: &str) -> ComputeDtype {
        match self {
            ComputeDtype::Auto if weight_dtype == "bf16" => ComputeDtype::Bf16,
            ComputeDtype::Auto => ComputeDtype::F32,
            other => other,
        }
    }

    /// The weight type a load should convert the matrices to for this compute type: bf16
    /// products take bf16 weights (as `model.to(torch.bfloat16)` does); otherwise `asked`.
    pub fn weights(self, asked: WeightDtype) -> WeightDtype {
        match self {
            ComputeDtype::Bf16 => WeightDtype::Bf16,
            _ => asked,
        }
    }
}

impl std::fmt::Display for ComputeDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ComputeDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "f32" | "float32" => Ok(ComputeDtype::F32),
            "bf16" | "bfloat16" => Ok(ComputeDtype::Bf16),
            "auto" => Ok(ComputeDtype::Auto),
            other => Err(format!("compute dtype `{other}`: expected f32, bf16 or auto")),
        }
    }
}

/// The element type of one loaded tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    F32,
    Bf16,
    F16,
}

impl Elem {
    pub fn bytes(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::Bf16 | Elem::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Elem::F32 => "f32",
            Elem::Bf16 => "bf16",
            Elem::F16 => "f16",
        }
    }
}

/// A tensor's elements: borrowed from a tensor file's bytes (a memory map), or owned (shared
/// between clones: the CPU backend computes with a clone of the model's tensors).
#[derive(Clone)]
pub enum WeightData {
    Mapped { map: Arc<FileBytes>, offset: usize, len: usize, elem: Elem },
    F32(Arc<[f32]>),
    Bf16(Arc<[bf16]>),
    F16(Arc<[f16]>),
}

/// One loaded tensor, row-major. A clone shares the elements (the map, or the owned ones).
#[derive(Clone)]
pub struct Tensor {
    pub shape: Vec<usize>,
    data: WeightData,
}

impl Tensor {
    pub fn from_vec(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor shape and data disagree");
        Tensor { shape, data: WeightData::F32(data.into()) }
    }

    pub fn elem(&self) -> Elem {
        match &self.data {
            WeightData::Mapped { elem, .. } => *elem,
            WeightData::F32(_) => Elem::F32,
            WeightData::Bf16(_) => Elem::Bf16,
            WeightData::F16(_) => Elem::F16,
        }
    }

    pub fn view(&self) -> WeightRef<'_> {
        match &self.data {
            WeightData::F32(v) => WeightRef::F32(v),
            WeightData::Bf16(v) => WeightRef::Bf16(v),
            WeightData::F16(v) => WeightRef::F16(v),
            WeightData::Mapped { map, offset, len, elem } => {
                let bytes = &map[*offset..*offset + len * elem.bytes()];
                let p = bytes.as_ptr();
                // SAFETY: the address `map + offset` was checked to be aligned for the element
                // type, the range lies inside the map, and every bit pattern is a valid f32,
                // bf16 or f16.
                unsafe {
                    match elem {
                        Elem::F32 => WeightRef::F32(std::slice::from_raw_parts(p.cast(), *len)),
                        Elem::Bf16 => WeightRef::Bf16(std::slice::from_raw_parts(p.cast(), *len)),
                        Elem::F16 => WeightRef::F16(std::slice::from_raw_parts(p.cast(), *len)),
                    }
                }
            }
        }
    }

    /// The elements of a tensor loaded as f32 (vectors always are; see [`WeightFiles::get`]).
    pub fn as_slice(&self) -> &[f32] {
        match self.view() {
            WeightRef::F32(v) => v,
            _ => panic!("a {} tensor read as f32: matrices are read through `view`", self.elem().name()),
        }
    }

    /// Bytes of the tensor's elements, mapped or owned.
    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.elem().bytes()
    }

    /// Bytes of process memory this tensor owns (mapped tensors own none).
    pub fn owned_bytes(&self) -> usize {
        match &self.data {
            WeightData::Mapped { .. } => 0,
            _ => self.bytes(),
        }
    }
}

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    offset: usize,
}

/// The tensors of a model directory, indexed by name.
pub struct WeightFiles {
    dir: PathBuf,
    files: Vec<(PathBuf, Arc<FileBytes>)>,
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
        let mut weights = WeightFiles { dir: dir.to_path_buf(), files: Vec::new(), index: HashMap::new() };
        for path in paths {
            let file = File::open(&path).map_err(io(&path))?;
            // SAFETY: the model files are treated as read-only for the life of the process; a
            // writer truncating them under us is outside what the server can defend against.
            let map = unsafe { Mmap::map(&file) }.map_err(io(&path))?;
            weights.add(path, FileBytes::Mapped(map))?;
        }
        Ok(weights)
    }

    /// Tensor files already in memory, as if they were the files of `dir` (the same checks as
    /// [`WeightFiles::open`], without the file system).
    pub fn from_bytes(dir: &Path, files: Vec<(PathBuf, Vec<u8>)>) -> Result<Self, WeightError> {
        if files.is_empty() {
            return Err(WeightError::NoFiles(dir.display().to_string()));
        }
        let mut weights = WeightFiles { dir: dir.to_path_buf(), files: Vec::new(), index: HashMap::new() };
        for (path, bytes) in files {
            weights.add(path, FileBytes::Owned(bytes))?;
        }
        Ok(weights)
    }

    /// Parses one file's safetensors header and indexes its tensors.
    fn add(&mut self, path: PathBuf, bytes: FileBytes) -> Result<(), WeightError> {
        let map = Arc::new(bytes);
        let st = SafeTensors::deserialize(&map)
            .map_err(|e| WeightError::Corrupt { path: path.display().to_string(), reason: e.to_string() })?;
        let file_idx = self.files.len();
        for (name, view) in st.tensors() {
            let offset = view.data().as_ptr() as usize - map.as_ptr() as usize;
            if let Some(prev) = self.index.get(&name) {
                return Err(WeightError::Duplicate {
                    name,
                    first: files_path(&self.files, prev.file),
                    second: path.display().to_string(),
                });
            }
            let entry = Entry { file: file_idx, dtype: view.dtype(), shape: view.shape().to_vec(), offset };
            self.index.insert(name, entry);
        }
        self.files.push((path, map));
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The shape of tensor `name` as the checkpoint stores it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.index.get(name).map(|e| e.shape.as_slice())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Bytes of all tensor files (what a memory map of the whole model costs at most).
    pub fn file_bytes(&self) -> usize {
        self.files.iter().map(|(_, m)| m.len()).sum()
    }

    /// Loads `name` as f32, checking that its shape is `expected`.
    pub fn get(&self, name: &str, expected: &[usize]) -> Result<Tensor, WeightError> {
        self.get_as(name, expected, WeightDtype::F32)
    }

    /// Loads `name` in the element type `dtype` asks for, checking that its shape is
    /// `expected`: in place when the file already holds that type (at an aligned address),
    /// else converted (rounded to nearest even when narrowed).
    pub fn get_as(&self, name: &str, expected: &[usize], dtype: WeightDtype) -> Result<Tensor, WeightError> {
        self.get_part(name, expected, dtype, Part::Whole)
    }

    /// [`WeightFiles::get_as`] for a part of a matrix (a tensor-parallel shard): only that
    /// part's bytes are read. Rows are used in place like a whole tensor; columns are copied.
    pub fn get_part(
        &self,
        name: &str,
        expected: &[usize],
        dtype: WeightDtype,
        part: Part,
    ) -> Result<Tensor, WeightError> {
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
        let stored = match entry.dtype {
            Dtype::F32 => Elem::F32,
            Dtype::BF16 => Elem::Bf16,
            Dtype::F16 => Elem::F16,
            other => {
                return Err(WeightError::Dtype {
                    name: name.to_string(),
                    path: path.display().to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        let eb = stored.bytes();
        let cols = if expected.len() == 2 { expected[1] } else { expected.iter().product() };
        let rows = if expected.len() == 2 { expected[0] } else { 1 };
        // The part as a rectangle of the stored matrix: row range × column range.
        let (row_range, col_range) = match &part {
            Part::Whole => (0..rows, 0..cols),
            Part::Rows(r) => (r.clone(), 0..cols),
            Part::Cols(c) => (0..rows, c.clone()),
        };
        if expected.len() != 2 && !matches!(part, Part::Whole)
            || row_range.end > rows
            || col_range.end > cols
            || row_range.is_empty()
            || col_range.is_empty()
        {
            return Err(WeightError::Shape {
                name: format!("{name} (part {part:?})"),
                path: path.display().to_string(),
                found: entry.shape.clone(),
                expected: expected.to_vec(),
            });
        }
        let shape = if expected.len() == 2 { vec![row_range.len(), col_range.len()] } else { expected.to_vec() };
        let want = dtype.elem(stored);
        let full_rows = col_range.len() == cols;
        let offset = entry.offset + row_range.start * cols * eb;
        let len = row_range.len() * col_range.len();
        let aligned = (map.as_ptr() as usize + offset).is_multiple_of(eb);
        if want == stored && full_rows && aligned && cfg!(target_endian = "little") {
            return Ok(Tensor { shape, data: WeightData::Mapped { map: map.clone(), offset, len, elem: stored } });
        }
        let (c0, c1) = (col_range.start * eb, col_range.end * eb);
        let bytes = &map[offset..offset + row_range.len() * cols * eb];
        let part_bytes: std::borrow::Cow<[u8]> = if full_rows {
            bytes.into()
        } else {
            bytes.chunks_exact(cols * eb).flat_map(|row| &row[c0..c1]).copied().collect::<Vec<u8>>().into()
        };
        let values: Box<dyn Iterator<Item = f32> + '_> = match stored {
            Elem::F32 => Box::new(part_bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
            Elem::Bf16 => Box::new(part_bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())),
            Elem::F16 => Box::new(part_bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())),
        };
        let data = match want {
            Elem::F32 => WeightData::F32(values.collect()),
            Elem::Bf16 => WeightData::Bf16(values.map(bf16::from_f32).collect()),
            Elem::F16 => WeightData::F16(values.map(f16::from_f32).collect()),
        };
        Ok(Tensor { shape, data })
    }
}

/// Which part of a matrix `[rows, cols]` to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Whole,
    /// These rows, every column (a split by output).
    Rows(Range<usize>),
    /// These columns of every row (a split by input).
    Cols(Range<usize>),
}

/// The checkpoint's files: those named by `model.safetensors.index.json` when present (the
/// Hugging Face convention for sharded checkpoints), else every `*.safetensors` in `dir`.
fn model_files(dir: &Path) -> Result<Vec<PathBuf>, WeightError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)
            .map_err(|error| WeightError::Io { path: index.display().to_string(), error })?;
        return files_of_index(dir, &index, &text);
    }
    Ok(std::fs::read_dir(dir)
        .map_err(|error| WeightError::Io { path: dir.display().to_string(), error })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect())
}

/// The files that the text of `model.safetensors.index.json` (at `index`) names, inside `dir`.
pub fn files_of_index(dir: &Path, index: &Path, text: &str) -> Result<Vec<PathBuf>, WeightError> {
    let corrupt = |reason: String| WeightError::Index { path: index.display().to_string(), reason };
    let json: serde_json::Value = serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?;
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
    Ok(files)
}

fn files_path(files: &[(PathBuf, Arc<FileBytes>)], idx: usize) -> String {
    files[idx].0.display().to_string()
}

#[cfg(test)]
mod tests {
    use safetensors::tensor::TensorView;

    use super::*;

    fn file(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
        let views: Vec<(&str, TensorView)> = tensors
            .iter()
            .map(|(name, dtype, shape, data)| (*name, TensorView::new(*dtype, shape.clone(), data).unwrap()))
            .collect();
        safetensors::serialize(views, None).unwrap()
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn files_in_memory_load_like_mapped_ones() {
        let half: Vec<u8> = [1.0f32, -2.0, 0.5].iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
        let bytes = file(&[
            ("a", Dtype::F16, vec![3], half),
            ("b", Dtype::F32, vec![2, 2], f32_bytes(&[1.0, 2.0, 3.0, 4.0])),
            ("c", Dtype::I32, vec![1], vec![0; 4]),
        ]);
        let dir = Path::new("/models/m");
        let w = WeightFiles::from_bytes(dir, vec![(dir.join("model.safetensors"), bytes)]).unwrap();
        assert_eq!(w.shape("b"), Some(&[2, 2][..]));
        assert_eq!(w.get("a", &[3]).unwrap().as_slice(), &[1.0, -2.0, 0.5]);
        assert_eq!(w.get("b", &[2, 2]).unwrap().as_slice(), &[1.0, 2.0, 3.0, 4.0]);
        // f32 data at an aligned address is used in place.
        assert_eq!(w.get("b", &[2, 2]).unwrap().owned_bytes(), 0);
        assert!(matches!(w.get("b", &[4]), Err(WeightError::Shape { .. })));
        assert!(matches!(w.get("c", &[1]), Err(WeightError::Dtype { .. })));
        assert!(matches!(w.get("d", &[1]), Err(WeightError::Missing { .. })));
    }

    #[test]
    fn misaligned_f32_data_is_copied_not_cast() {
        // Written by hand (the safetensors writer aligns): three f16 numbers, then an f32 at an
        // offset of 6 bytes from the data's start.
        let header = r#"{"a":{"dtype":"F16","shape":[3],"data_offsets":[0,6]},"b":{"dtype":"F32","shape":[1],"data_offsets":[6,10]}}"#;
        let mut header = header.as_bytes().to_vec();
        header.resize(header.len().next_multiple_of(8), b' ');
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(&header);
        bytes.extend([0u8; 6]);
        bytes.extend(2.5f32.to_le_bytes());
        let dir = Path::new("/models/m");
        let w = WeightFiles::from_bytes(dir, vec![(dir.join("model.safetensors"), bytes)]).unwrap();
        let t = w.get("b", &[1]).unwrap();
        assert_eq!(t.as_slice(), &[2.5]);
        assert_eq!(t.owned_bytes(), 4);
    }

    #[test]
    fn parts_of_a_matrix_load_as_their_rows_and_columns() {
        let m: Vec<f32> = (0..12).map(|v| v as f32).collect(); // [3, 4]
        let halves: Vec<u8> = m.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
        let bytes = file(&[("m", Dtype::F32, vec![3, 4], f32_bytes(&m)), ("h", Dtype::BF16, vec![3, 4], halves)]);
        let dir = Path::new("/models/m");
        let w = WeightFiles::from_bytes(dir, vec![(dir.join("model.safetensors"), bytes)]).unwrap();
        let rows = w.get_part("m", &[3, 4], WeightDtype::Auto, Part::Rows(1..3)).unwrap();
        assert_eq!(
            (rows.shape.clone(), rows.as_slice()),
            (vec![2, 4], &[4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0][..])
        );
        assert_eq!(rows.owned_bytes(), 0, "rows are used in place");
        let cols = w.get_part("m", &[3, 4], WeightDtype::Auto, Part::Cols(2..4)).unwrap();
        assert_eq!((cols.shape.clone(), cols.as_slice()), (vec![3, 2], &[2.0, 3.0, 6.0, 7.0, 10.0, 11.0][..]));
        let hc = w.get_part("h", &[3, 4], WeightDtype::F32, Part::Cols(1..2)).unwrap();
        assert_eq!(hc.as_slice(), &[1.0, 5.0, 9.0]);
        let hr = w.get_part("h", &[3, 4], WeightDtype::Auto, Part::Rows(2..3)).unwrap();
        assert_eq!((hr.elem(), hr.owned_bytes()), (Elem::Bf16, 0));
        for bad in [Part::Rows(2..4), Part::Cols(3..5), Part::Rows(1..1)] {
            assert!(matches!(w.get_part("m", &[3, 4], WeightDtype::Auto, bad), Err(WeightError::Shape { .. })));
        }
    }

    #[test]
    fn corrupt_and_duplicate_files_are_errors() {
        let dir = Path::new("/models/m");
        let one = file(&[("x", Dtype::F32, vec![1], f32_bytes(&[1.0]))]);
        let files = vec![(dir.join("a.safetensors"), one.clone()), (dir.join("b.safetensors"), one.clone())];
        assert!(matches!(WeightFiles::from_bytes(dir, files), Err(WeightError::Duplicate { .. })));
        let truncated = vec![(dir.join("a.safetensors"), one[..one.len() - 1].to_vec())];
        assert!(matches!(WeightFiles::from_bytes(dir, truncated), Err(WeightError::Corrupt { .. })));
        assert!(matches!(WeightFiles::from_bytes(dir, vec![]), Err(WeightError::NoFiles(_))));
    }

    #[test]
    fn the_shard_index_names_files_inside_the_directory() {
        let (dir, index) = (Path::new("/m"), Path::new("/m/model.safetensors.index.json"));
        let text = r#"{"weight_map": {"a": "one.safetensors", "b": "two.safetensors", "c": "one.safetensors"}}"#;
        let files = files_of_index(dir, index, text).unwrap();
        assert_eq!(files, vec![dir.join("one.safetensors"), dir.join("two.safetensors")]);
        for bad in [r#"{"weight_map": {"a": "../x.safetensors"}}"#, r#"{"weight_map": {"a": 3}}"#, "[1]", "{"] {
            assert!(matches!(files_of_index(dir, index, bad), Err(WeightError::Index { .. })), "{bad}");
        }
    }
}
