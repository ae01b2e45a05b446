//! Token embedding: rows of the table, scaled by `sqrt(dim)` as the reference does.

use super::widen::Widen;

/// Gathers the rows of `table [vocab, dim]` (f32, bf16 or f16) for `ids` into a new
/// `[ids.len(), dim]` f32 buffer. Ids are validated at the edge; an id out of range here is a bug.
pub fn embed<W: Widen>(ids: &[u32], table: &[W], dim: usize, scale: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(ids.len() * dim);
    for &id in ids {
        let row = &table[id as usize * dim..(id as usize + 1) * dim];
        out.extend(row.iter().map(|v| v.widen() * scale));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn gathers_and_scales() {
        let table: Vec<f32> = (0..12).map(|v| v as f32).collect();
        assert_eq!(super::embed(&[2, 0], &table, 4, 0.5), vec![4.0, 4.5, 5.0, 5.5, 0.0, 0.5, 1.0, 1.5]);
        let half: Vec<half::bf16> = table.iter().map(|&v| half::bf16::from_f32(v)).collect();
        assert_eq!(super::embed(&[1], &half, 4, 2.0), vec![8.0, 10.0, 12.0, 14.0]);
    }
}
