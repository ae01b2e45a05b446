//! Token embedding: rows of the table, scaled by `sqrt(dim)` as the reference does.

/// Gathers the rows of `table [vocab, dim]` for `ids` into a new `[ids.len(), dim]` buffer.
/// Ids are validated at the edge; an id out of range here is a bug.
pub fn embed(ids: &[u32], table: &[f32], dim: usize, scale: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(ids.len() * dim);
    for &id in ids {
        let row = &table[id as usize * dim..(id as usize + 1) * dim];
        out.extend(row.iter().map(|v| v * scale));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn gathers_and_scales() {
        let table: Vec<f32> = (0..12).map(|v| v as f32).collect();
        assert_eq!(super::embed(&[2, 0], &table, 4, 0.5), vec![4.0, 4.5, 5.0, 5.5, 0.0, 0.5, 1.0, 1.5]);
    }
}
