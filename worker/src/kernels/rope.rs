//! Interleaved (GPT-J) rotary embedding with YOCO's `linspace` frequencies.
//!
//! The reference builds its angle table in f32: `θ_i = 1 / theta^linspace(0, 1, n)[i]` and
//! `angle = f32(pos) · θ_i` rounded to f32. At a million positions that rounding moves angles by
//! up to 0.03 rad and the trained weights expect it, so we round the same way; cos/sin of that
//! f32 angle are then taken in f64 and rounded once (as close as f32 can be).

use rayon::prelude::*;

/// Per-head frequencies `θ_i`, `i < head_dim / 2`.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

/// cos/sin of every (row, i) for a list of positions: `[rows, head_dim / 2]` each.
#[derive(Debug, Clone, Default)]
pub struct RopeTable {
    pub half: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl Rope {
    pub fn new(theta: f64, head_dim: usize) -> Self {
        let n = head_dim / 2;
        let base = theta as f32;
        let inv_freq =
            torch_linspace01(n).into_iter().map(|e| 1.0f32 / ((base as f64).powf(e as f64) as f32)).collect();
        Rope { inv_freq }
    }

    pub fn half(&self) -> usize {
        self.inv_freq.len()
    }

    /// The f32 angle the reference uses for (position, i).
    #[inline]
    pub fn angle(&self, pos: usize, i: usize) -> f32 {
        pos as f32 * self.inv_freq[i]
    }

    pub fn table(&self, positions: impl IntoIterator<Item = usize>) -> RopeTable {
        let half = self.half();
        let positions: Vec<usize> = positions.into_iter().collect();
        let mut table =
            RopeTable { half, cos: vec![0.0; positions.len() * half], sin: vec![0.0; positions.len() * half] };
        let rows = |(pos, (cos, sin)): (&[usize], (&mut [f32], &mut [f32]))| {
            for ((&pos, cos), sin) in pos.iter().zip(cos.chunks_exact_mut(half)).zip(sin.chunks_exact_mut(half)) {
                for i in 0..half {
                    let a = self.angle(pos, i) as f64;
                    cos[i] = a.cos() as f32;
                    sin[i] = a.sin() as f32;
                }
            }
        };
        if half > 0 && super::parallel(table.cos.len()) {
            let n = super::rows_per_task(half);
            let (cos, sin) = (table.cos.par_chunks_mut(n * half), table.sin.par_chunks_mut(n * half));
            positions.par_chunks(n).zip(cos.zip(sin)).for_each(rows);
        } else if half > 0 {
            rows((&positions, (&mut table.cos, &mut table.sin)));
        }
        table
    }
}

/// `torch.linspace(0, 1, n)` in f32, computed the way PyTorch's CPU kernel does (from the start
/// for the first half, from the end for the second half).
fn torch_linspace01(n: usize) -> Vec<f32> {
    match n {
        0 => vec![],
        1 => vec![0.0],
        _ => {
            let step = 1.0f32 / (n - 1) as f32;
            let halfway = n / 2;
            (0..n).map(|i| if i < halfway { step * i as f32 } else { 1.0 - step * (n - 1 - i) as f32 }).collect()
        }
    }
}

/// Rotates every head of every row of `x [rows, n_heads · head_dim]` in place, row r by the
/// angles of row r of `table`.
pub fn apply_rope(x: &mut [f32], n_heads: usize, head_dim: usize, table: &RopeTable) {
    let width = n_heads * head_dim;
    let half = head_dim / 2;
    assert_eq!(table.half, half, "rope table built for another head dim");
    assert_eq!(x.len() / width, table.cos.len() / half.max(1), "rope table rows != x rows");
    if super::parallel(x.len()) {
        let rows = super::rows_per_task(width);
        x.par_chunks_mut(rows * width)
            .enumerate()
            .for_each(|(task, x)| rope_rows(x, task * rows, head_dim, width, table));
    } else {
        rope_rows(x, 0, head_dim, width, table);
    }
}

/// [`apply_rope`] on rows `first..` of x (`x` holds whole rows).
fn rope_rows(x: &mut [f32], first: usize, head_dim: usize, width: usize, table: &RopeTable) {
    let half = head_dim / 2;
    for (r, row) in x.chunks_exact_mut(width).enumerate() {
        let r = first + r;
        let cos = &table.cos[r * half..(r + 1) * half];
        let sin = &table.sin[r * half..(r + 1) * half];
        for head in row.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (x0, x1) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = x0 * cos[i] - x1 * sin[i];
                head[2 * i + 1] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_endpoints_and_symmetry() {
        let l = torch_linspace01(5);
        assert_eq!(l, vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(torch_linspace01(2), vec![0.0, 1.0]);
    }

    #[test]
    fn rotation_matches_complex_multiplication_in_f64() {
        let rope = Rope::new(10000.0, 8);
        let positions = [0usize, 1, 17, 999_999];
        let table = rope.table(positions);
        let x: Vec<f32> = (0..2 * 8 * positions.len()).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut y = x.clone();
        apply_rope(&mut y, 2, 8, &table);
        for (r, &pos) in positions.iter().enumerate() {
            for h in 0..2 {
                for i in 0..4 {
                    let a = rope.angle(pos, i) as f64;
                    let base = r * 16 + h * 8 + 2 * i;
                    let (x0, x1) = (x[base] as f64, x[base + 1] as f64);
                    assert!((y[base] as f64 - (x0 * a.cos() - x1 * a.sin())).abs() < 1e-6);
                    assert!((y[base + 1] as f64 - (x0 * a.sin() + x1 * a.cos())).abs() < 1e-6);
                }
            }
        }
        // Position 0 is the identity.
        assert_eq!(&y[..16], &x[..16]);
    }

    /// Split across threads (a prompt chunk's rows), the table and the rotation are those of
    /// one row at a time, bit for bit.
    #[test]
    fn parallel_rows_equal_single_rows() {
        let rope = Rope::new(10000.0, 64);
        let positions: Vec<usize> = (0..5000).map(|i| i * 37 + 5).collect();
        let table = rope.table(positions.iter().copied());
        let x: Vec<f32> = (0..positions.len() * 2 * 64).map(|i| (i as f32 * 0.013).sin()).collect();
        let mut all = x.clone();
        apply_rope(&mut all, 2, 64, &table);
        for (r, &pos) in positions.iter().enumerate().step_by(499) {
            let one = rope.table([pos]);
            assert_eq!(&table.cos[r * 32..(r + 1) * 32], &one.cos[..]);
            assert_eq!(&table.sin[r * 32..(r + 1) * 32], &one.sin[..]);
            let mut row = x[r * 128..(r + 1) * 128].to_vec();
            apply_rope(&mut row, 2, 64, &one);
            assert_eq!(&all[r * 128..(r + 1) * 128], &row[..], "row {r}");
        }
    }
}
