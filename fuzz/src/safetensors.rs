//! Checkpoint files as the weights loader reads them (`WeightFiles::from_bytes`, which runs the
//! same header parsing and indexing as `WeightFiles::open` on a memory map): one file, or two
//! (tensor names must not repeat across files), then every tensor loaded at its own shape and
//! read through, and refused at any other. Also the shard index `model.safetensors.index.json`.

use std::path::{Path, PathBuf};

use yoco_worker::weights::{files_of_index, Part, WeightDtype, WeightFiles};

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let dir = Path::new("/models/fuzz");
    if mode == b'{' {
        // The shard index (its text starts with `{`).
        let index = dir.join("model.safetensors.index.json");
        if let Ok(files) = files_of_index(dir, &index, &String::from_utf8_lossy(data)) {
            for f in &files {
                assert_eq!(f.parent(), Some(dir), "{f:?} escapes the model directory");
            }
        }
        return;
    }
    let files: Vec<(PathBuf, Vec<u8>)> = if mode & 1 == 1 && rest.len() >= 2 {
        let at = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        let rest = &rest[2..];
        let (a, b) = rest.split_at(at.min(rest.len()));
        vec![(dir.join("a.safetensors"), a.to_vec()), (dir.join("b.safetensors"), b.to_vec())]
    } else {
        vec![(dir.join("model.safetensors"), rest.to_vec())]
    };
    let weights = match WeightFiles::from_bytes(dir, files) {
        Ok(w) => w,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let mut names: Vec<String> = weights.names().map(str::to_string).collect();
    names.sort();
    for name in &names {
        let shape = weights.shape(name).expect("a listed tensor has a shape").to_vec();
        match weights.get(name, &shape) {
            Ok(t) => {
                let values = t.as_slice();
                assert_eq!(values.len(), shape.iter().product::<usize>());
                assert_eq!(t.shape, shape);
                // Touch every number (the sanitizer checks the reads).
                std::hint::black_box(values.iter().fold(0u32, |acc, v| acc ^ v.to_bits()));
            }
            // Dtypes other than F32, BF16 and F16 are refused with an error.
            Err(e) => assert!(e.to_string().contains("dtype"), "{e}"),
        }
        // Tensor-parallel parts: the back half of the rows, then of the columns.
        if let [rows, cols] = shape[..] {
            for part in [Part::Rows(rows / 2..rows), Part::Cols(cols / 2..cols)] {
                let len = match &part {
                    Part::Rows(r) => r.len() * cols,
                    Part::Cols(c) => c.len() * rows,
                    Part::Whole => unreachable!(),
                };
                match weights.get_part(name, &shape, WeightDtype::F32, part) {
                    Ok(t) => {
                        assert_eq!(t.as_slice().len(), len);
                        std::hint::black_box(t.as_slice().iter().fold(0u32, |acc, v| acc ^ v.to_bits()));
                    }
                    Err(e) => assert!(!e.to_string().is_empty()),
                }
            }
        }
        let mut other = shape.clone();
        other.push(1);
        assert!(weights.get(name, &other).is_err());
    }
    assert!(weights.get("no such tensor", &[1]).is_err());
}
