//! Storage of global-cache blocks in f32, bf16 or f16. Rows are written from f32 (rounded to
//! nearest, ties to even) and read back as f32 tiles, so every kernel computes in f32 and the
//! cache's data type only changes how many bytes a position costs and how many are read.

use half::{bf16, f16, slice::HalfFloatSliceExt};

/// The element type of the global KV cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum CacheDtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl CacheDtype {
    pub const ALL: [CacheDtype; 3] = [CacheDtype::F32, CacheDtype::Bf16, CacheDtype::F16];

    pub fn bytes(self) -> usize {
        match self {
            CacheDtype::F32 => 4,
            CacheDtype::Bf16 | CacheDtype::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CacheDtype::F32 => "f32",
            CacheDtype::Bf16 => "bf16",
            CacheDtype::F16 => "f16",
        }
    }
}

impl std::fmt::Display for CacheDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for CacheDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(CacheDtype::F32),
            "bf16" | "bfloat16" => Ok(CacheDtype::Bf16),
            "f16" | "float16" => Ok(CacheDtype::F16),
            other => Err(format!("cache dtype `{other}`: expected f32, bf16 or f16")),
        }
    }
}

/// One block's elements.
#[derive(Clone)]
pub enum Block {
    F32(Box<[f32]>),
    Bf16(Box<[bf16]>),
    F16(Box<[f16]>),
}

impl Block {
    pub fn zeros(dtype: CacheDtype, len: usize) -> Block {
        match dtype {
            CacheDtype::F32 => Block::F32(vec![0.0; len].into_boxed_slice()),
            CacheDtype::Bf16 => Block::Bf16(vec![bf16::ZERO; len].into_boxed_slice()),
            CacheDtype::F16 => Block::F16(vec![f16::ZERO; len].into_boxed_slice()),
        }
    }

    /// Stores `src` at element offset `at`, rounded to the block's type.
    pub fn write(&mut self, at: usize, src: &[f32]) {
        let range = at..at + src.len();
        match self {
            Block::F32(b) => b[range].copy_from_slice(src),
            Block::Bf16(b) => b[range].convert_from_f32_slice(src),
            Block::F16(b) => b[range].convert_from_f32_slice(src),
        }
    }

    /// The block's elements as little-endian bytes (f32: 4 each, bf16/f16: 2): how a prefix
    /// snapshot's blocks go to a file, bit for bit.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Block::F32(b) => b.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Block::Bf16(b) => b.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
            Block::F16(b) => b.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        }
    }

    /// Overwrites every element from [`Block::to_bytes`]'s form; `bytes` must be as long.
    pub fn set_bytes(&mut self, bytes: &[u8]) -> Result<(), String> {
        let (len, width) = match self {
            Block::F32(b) => (b.len(), 4),
            Block::Bf16(b) => (b.len(), 2),
            Block::F16(b) => (b.len(), 2),
        };
        if bytes.len() != len * width {
            return Err(format!("{} bytes for a block of {len} {width}-byte elements", bytes.len()));
        }
        match self {
            Block::F32(b) => {
                for (x, c) in b.iter_mut().zip(bytes.chunks_exact(4)) {
                    *x = f32::from_le_bytes(c.try_into().expect("4 bytes"));
                }
            }
            Block::Bf16(b) => {
                for (x, c) in b.iter_mut().zip(bytes.chunks_exact(2)) {
                    *x = bf16::from_bits(u16::from_le_bytes([c[0], c[1]]));
                }
            }
            Block::F16(b) => {
                for (x, c) in b.iter_mut().zip(bytes.chunks_exact(2)) {
                    *x = f16::from_bits(u16::from_le_bytes([c[0], c[1]]));
                }
            }
        }
        Ok(())
    }

    pub fn as_ref(&self) -> BlockRef<'_> {
        match self {
            Block::F32(b) => BlockRef::F32(b),
            Block::Bf16(b) => BlockRef::Bf16(b),
            Block::F16(b) => BlockRef::F16(b),
        }
    }
}

/// A borrowed block, as the kernels read it.
#[derive(Clone, Copy)]
pub enum BlockRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl<'a> BlockRef<'a> {
    /// Elements `range` as f32: the block itself when it is f32, else converted into `scratch`.
    pub fn f32_rows<'s>(self, range: std::ops::Range<usize>, scratch: &'s mut Vec<f32>) -> &'s [f32]
    where
        'a: 's,
    {
        let n = range.len();
        let convert = |scratch: &'s mut Vec<f32>| {
            scratch.resize(n, 0.0);
            scratch
        };
        match self {
            BlockRef::F32(b) => &b[range],
            BlockRef::Bf16(b) => {
                let out = convert(scratch);
                b[range].convert_to_f32_slice(out);
                out
            }
            BlockRef::F16(b) => {
                let out = convert(scratch);
                b[range].convert_to_f32_slice(out);
                out
            }
        }
    }

    /// Bytes of one element.
    pub fn element_bytes(self) -> usize {
        match self {
            BlockRef::F32(_) => 4,
            BlockRef::Bf16(_) | BlockRef::F16(_) => 2,
        }
    }

    /// Element `i` as f32.
    pub fn get(self, i: usize) -> f32 {
        match self {
            BlockRef::F32(b) => b[i],
            BlockRef::Bf16(b) => b[i].to_f32(),
            BlockRef::F16(b) => b[i].to_f32(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_within_the_types_precision() {
        let src: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.731).collect();
        for dtype in CacheDtype::ALL {
            let mut block = Block::zeros(dtype, 50);
            block.write(5, &src);
            let mut scratch = Vec::new();
            let got = block.as_ref().f32_rows(5..42, &mut scratch).to_vec();
            // Relative rounding error: 2^-8 for bf16 (8 significant bits), 2^-11 for f16.
            let rel = match dtype {
                CacheDtype::F32 => 0.0,
                CacheDtype::Bf16 => 1.0 / 256.0,
                CacheDtype::F16 => 1.0 / 2048.0,
            };
            for (g, s) in got.iter().zip(&src) {
                assert!((g - s).abs() <= rel * s.abs(), "{dtype}: {g} vs {s}");
            }
            assert_eq!(block.as_ref().get(5 + 3), got[3]);
            assert_eq!(block.as_ref().get(0), 0.0);
        }
    }

    #[test]
    fn dtype_names_parse_back() {
        for d in CacheDtype::ALL {
            assert_eq!(d.name().parse::<CacheDtype>().unwrap(), d);
        }
        assert!("f8".parse::<CacheDtype>().unwrap_err().contains("expected f32, bf16 or f16"));
    }
}
