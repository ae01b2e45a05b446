//! The arithmetic of context parallelism: how a step's tokens are cut into one chunk per rank,
//! and how each rank recovers, exactly, the self-decoder state that precedes its chunk from what
//! the other ranks computed on theirs.

use std::ops::Range;

/// Cuts `n` tokens into `world` contiguous chunks of `ceil(n / world)` (the last ones shorter or
/// empty): the start of each rank's chunk.
pub fn even_split(n: usize, world: usize) -> Vec<usize> {
    let size = n.div_ceil(world.max(1));
    (0..world).map(|r| (r * size).min(n)).collect()
}

/// Rank `r`'s chunk of `n` tokens cut at `starts`.
pub fn chunk(starts: &[usize], n: usize, r: usize) -> Range<usize> {
    starts[r]..starts.get(r + 1).copied().unwrap_or(n)
}

/// Checks that `starts` cuts `n` tokens into one contiguous chunk per rank.
pub fn validate_split(starts: &[usize], n: usize, world: usize) -> Result<(), String> {
    if starts.len() != world {
        return Err(format!("chunk_starts has {} entries for {world} ranks", starts.len()));
    }
    if starts.first() != Some(&0) {
        return Err("chunk_starts must begin at 0".into());
    }
    if starts.windows(2).any(|w| w[0] > w[1]) || starts.iter().any(|&s| s > n) {
        return Err(format!("chunk_starts must be non-decreasing and at most {n}"));
    }
    Ok(())
}

/// Gated retention across ranks. Rank j ran its chunk from a zero state and got `S_j` (`[heads,
/// d, d]`) and the chunk's total log-decay per head. With `S_prev` the state before the step,
/// the state entering rank r's chunk is `S_in(r) = D_{r−1}·S_in(r−1) + S_{r−1}`,
/// `S_in(0) = S_prev`, `D_j = exp(logdecay_j)`. Returns `(S_in(rank), S_in(world))`: the
/// incoming state of this rank and the state after the whole step.
pub fn retention_incoming(
    s_prev: &[f32],
    parts: &[(&[f32], &[f32])],
    heads: usize,
    rank: usize,
) -> (Vec<f32>, Vec<f32>) {
    let dd = s_prev.len() / heads;
    let mut s = s_prev.to_vec();
    let mut incoming = None;
    for (j, (s_j, log_decay)) in parts.iter().enumerate() {
        if j == rank {
            incoming = Some(s.clone());
        }
        for h in 0..heads {
            let decay = (log_decay[h] as f64).exp() as f32;
            for (a, &b) in s[h * dd..(h + 1) * dd].iter_mut().zip(&s_j[h * dd..(h + 1) * dd]) {
                *a = decay * *a + b;
            }
        }
    }
    (incoming.unwrap_or_else(|| s.clone()), s)
}

/// The last `keep` rows (each `width` wide) of the concatenation of `parts`.
pub fn last_rows(parts: &[&[f32]], keep: usize, width: usize) -> Vec<f32> {
    let mut need = keep * width;
    let mut taken: Vec<&[f32]> = Vec::new();
    for part in parts.iter().rev() {
        if need == 0 {
            break;
        }
        let take = need.min(part.len());
        taken.push(&part[part.len() - take..]);
        need -= take;
    }
    taken.iter().rev().flat_map(|p| p.iter().copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_the_tokens_in_order() {
        assert_eq!(even_split(10, 3), vec![0, 4, 8]);
        assert_eq!(even_split(2, 4), vec![0, 1, 2, 2]);
        assert_eq!(even_split(0, 2), vec![0, 0]);
        let s = even_split(10, 3);
        assert_eq!((chunk(&s, 10, 0), chunk(&s, 10, 2)), (0..4, 8..10));
        assert!(validate_split(&s, 10, 3).is_ok());
        assert!(validate_split(&[0, 5, 4], 10, 3).is_err());
        assert!(validate_split(&[1, 5, 6], 10, 3).is_err());
        assert!(validate_split(&[0, 5], 10, 3).is_err());
        assert!(validate_split(&[0, 5, 11], 10, 3).is_err());
    }

    #[test]
    fn incoming_state_composes_decays() {
        // One head, d = 1: states are scalars.
        let parts: [(&[f32], &[f32]); 3] = [(&[1.0], &[0.5f32.ln()]), (&[2.0], &[0.25f32.ln()]), (&[3.0], &[0.0])];
        let (s0, after) = retention_incoming(&[4.0], &parts, 1, 0);
        assert_eq!(s0, vec![4.0]);
        let (s2, _) = retention_incoming(&[4.0], &parts, 1, 2);
        // S_in(1) = 0.5·4 + 1 = 3; S_in(2) = 0.25·3 + 2 = 2.75; after = 1·2.75 + 3.
        assert!((s2[0] - 2.75).abs() < 1e-6);
        assert!((after[0] - 5.75).abs() < 1e-6);
    }

    #[test]
    fn last_rows_spans_parts() {
        let (a, b, c) = ([1.0, 1.0, 2.0, 2.0], [3.0, 3.0], []);
        assert_eq!(last_rows(&[&a, &b, &c], 2, 2), vec![2.0, 2.0, 3.0, 3.0]);
        assert_eq!(last_rows(&[&a, &b], 5, 2), vec![1.0, 1.0, 2.0, 2.0, 3.0, 3.0]);
        assert_eq!(last_rows(&[&a], 0, 2), Vec::<f32>::new());
    }
}
