//! Sliding-window causal attention: query t sees keys `t−W+1 … t`. Each query works on its band
//! of at most W keys, so memory is O(T·W), never O(T²).

use rayon::prelude::*;

use super::simd::{axpy, dot};

/// Attention of `T` queries over a key/value buffer holding `prefix` earlier rows followed by the
/// `T` rows of the queries themselves (all `[rows, heads·head_dim]`, keys already rotated).
#[allow(clippy::too_many_arguments)]
pub fn window_attention(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    prefix: usize,
    window: usize,
    heads: usize,
    head_dim: usize,
    out: &mut [f32],
) {
    let width = heads * head_dim;
    let t_len = q.len() / width;
    assert_eq!(keys.len(), (prefix + t_len) * width);
    assert_eq!(values.len(), keys.len());
    assert_eq!(out.len(), q.len());
    let scale = 1.0 / (head_dim as f32).sqrt();
    out.par_chunks_mut(width).enumerate().for_each(|(i, out_row)| {
        let row = prefix + i;
        let first = (row + 1).saturating_sub(window);
        let mut scores = vec![0f32; row + 1 - first];
        for h in 0..heads {
            let cols = h * head_dim..(h + 1) * head_dim;
            let qh = &q[i * width..][cols.clone()];
            let mut max = f32::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate() {
                *s = dot(qh, &keys[(first + j) * width..][cols.clone()]) * scale;
                max = max.max(*s);
            }
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let oh = &mut out_row[cols.clone()];
            oh.fill(0.0);
            for (j, &p) in scores.iter().enumerate() {
                axpy(p / sum, &values[(first + j) * width..][cols.clone()], oh);
            }
        }
    });
}

/// Plain masked attention in f64 over the full `[rows, rows]` score matrix: the reference.
pub fn window_attention_reference(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    prefix: usize,
    window: usize,
    heads: usize,
    head_dim: usize,
) -> Vec<f32> {
    let width = heads * head_dim;
    let t_len = q.len() / width;
    let rows = prefix + t_len;
    let mut out = vec![0f32; q.len()];
    for i in 0..t_len {
        for h in 0..heads {
            let scores: Vec<f64> = (0..rows)
                .map(|j| {
                    let visible = j <= prefix + i && j + window > prefix + i;
                    if !visible {
                        return f64::NEG_INFINITY;
                    }
                    (0..head_dim)
                        .map(|c| q[i * width + h * head_dim + c] as f64 * keys[j * width + h * head_dim + c] as f64)
                        .sum::<f64>()
                        / (head_dim as f64).sqrt()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for c in 0..head_dim {
                let o: f64 =
                    (0..rows).map(|j| (scores[j] - max).exp() / z * values[j * width + h * head_dim + c] as f64).sum();
                out[i * width + h * head_dim + c] = o as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{assert_close, randn};

    #[test]
    fn banded_matches_masked_reference() {
        let (heads, hd) = (2, 8);
        let width = heads * hd;
        for &(prefix, t_len, window) in &[(0, 20, 1), (0, 20, 5), (4, 9, 5), (3, 30, 64), (0, 1, 3), (7, 1, 8)] {
            let q = randn(t_len * width, 1);
            let k = randn((prefix + t_len) * width, 2);
            let v = randn((prefix + t_len) * width, 3);
            let mut out = vec![0.0; q.len()];
            window_attention(&q, &k, &v, prefix, window, heads, hd, &mut out);
            let want = window_attention_reference(&q, &k, &v, prefix, window, heads, hd);
            assert_close(&out, &want, 1e-4, &format!("prefix {prefix} T {t_len} W {window}"));
        }
    }
}
