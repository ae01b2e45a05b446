//! Which cross-decoder rows run together so that their caches stay in the last-level cache.
//!
//! Every cross-decoder layer reads the same global KV cache. Run one layer over all rows of a
//! batch, then the next, and each layer streams every row's cache from memory again: 32
//! sequences of 4K tokens are 67 MB per layer (tiny preset, f32), twice the L3. Run a few rows
//! through all layers, then the next few, and only the first layer reads their caches from
//! memory; the others find them in L3 (measured on 32 × 4K: four layers' attention 10.9–12.9 ms
//! in one pass, 6.5–7.5 ms in groups of two rows per thread). The price is smaller products per
//! layer, so groups are used only where the caches would not stay cached anyway.

use std::ops::Range;
use std::sync::OnceLock;

/// What is assumed where the operating system does not tell the size of the last-level cache.
const FALLBACK_LLC_BYTES: usize = 8 << 20;

/// The largest data cache this CPU reports (Linux sysfs), or 8 MiB.
pub fn last_level_cache_bytes() -> usize {
    static BYTES: OnceLock<usize> = OnceLock::new();
    *BYTES.get_or_init(|| read_llc_bytes().unwrap_or(FALLBACK_LLC_BYTES))
}

fn read_llc_bytes() -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.filter_map(|e| {
        let path = e.ok()?.path();
        let kind = std::fs::read_to_string(path.join("type")).ok()?;
        if kind.trim() == "Instruction" {
            return None;
        }
        parse_size(&std::fs::read_to_string(path.join("size")).ok()?)
    })
    .max()
}

/// A sysfs cache size: `32768K`, `1M`, or plain bytes.
fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let (digits, unit) = match s.as_bytes().last()? {
        b'K' => (&s[..s.len() - 1], 1 << 10),
        b'M' => (&s[..s.len() - 1], 1 << 20),
        b'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    digits.parse::<usize>().ok()?.checked_mul(unit)
}

/// Rows (their cache bytes `bytes[r]`, in order) in consecutive groups, each group's caches
/// within a thread's share of a `llc`-byte last-level cache when `threads` groups run at once:
/// a quarter of `llc / threads`, which leaves room for the layers' weights and the other
/// threads' neighbours (two rows of 2 MB per thread measured best on a 32 MiB L3).
///
/// `None` where one pass over all rows is as good: fewer than two rows, caches that fit in half
/// the last-level cache together, or no more groups than threads (one group per thread gains
/// nothing over one pass and costs the smaller products).
pub fn cache_groups(bytes: &[usize], llc: usize, threads: usize) -> Option<Vec<Range<usize>>> {
    let threads = threads.max(1);
    let total: usize = bytes.iter().sum();
    if bytes.len() < 2 || total <= llc / 2 {
        return None;
    }
    let budget = llc / threads / 4;
    let mut groups = Vec::new();
    let (mut start, mut held) = (0, 0usize);
    for (r, &b) in bytes.iter().enumerate() {
        if r > start && held + b > budget {
            groups.push(start..r);
            (start, held) = (r, 0);
        }
        held += b;
    }
    groups.push(start..bytes.len());
    (groups.len() > threads).then_some(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: usize = 1 << 20;

    #[test]
    fn sizes_as_sysfs_writes_them() {
        assert_eq!(parse_size("32768K\n"), Some(32 * MB));
        assert_eq!(parse_size("1M"), Some(MB));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("K"), None);
        assert_eq!(parse_size("12x"), None);
        assert!(last_level_cache_bytes() >= 64 << 10);
    }

    #[test]
    fn rows_group_within_a_threads_share_of_the_cache() {
        // 32 rows of 2 MB, a 32 MiB cache, 2 threads: 4 MB a group, two rows each.
        let groups = cache_groups(&[2 * MB; 32], 32 * MB, 2).unwrap();
        assert_eq!(groups.len(), 16);
        assert!(groups.iter().enumerate().all(|(i, g)| *g == (2 * i..2 * i + 2)));
        // Uneven rows: a row larger than the budget stands alone; the groups cover every row
        // once, in order.
        let bytes = [MB, MB, 9 * MB, MB, 3 * MB, MB, MB, MB, MB, 2 * MB];
        let groups = cache_groups(&bytes, 32 * MB, 2).unwrap();
        assert_eq!(groups, vec![0..2, 2..3, 3..5, 5..9, 9..10]);
    }

    #[test]
    fn one_pass_where_groups_gain_nothing() {
        // Everything fits in half the cache.
        assert_eq!(cache_groups(&[MB; 16], 32 * MB, 2), None);
        // One row, or as many groups as threads.
        assert_eq!(cache_groups(&[64 * MB], 32 * MB, 2), None);
        assert_eq!(cache_groups(&[20 * MB, 20 * MB], 32 * MB, 2), None);
        assert_eq!(cache_groups(&[], 32 * MB, 2), None);
        // Three rows of 20 MB on two threads: three groups.
        assert_eq!(cache_groups(&[20 * MB; 3], 32 * MB, 2).map(|g| g.len()), Some(3));
    }
}
