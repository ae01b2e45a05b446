//! Where an upload goes on its way to the device. A copy from pageable host memory may make the
//! driver wait for the stream to drain before it stages the bytes itself, so a step's many small
//! uploads (ids, positions, state slots, block tables, decays) would each stall the host behind
//! the GPU's queue. Instead they are copied into one of two page-locked arenas and from there to
//! the device asynchronously, one arena filling while the other's copies complete; an arena is
//! reused only after an event recorded behind its last copy has passed. Uploads larger than an
//! arena (weights at load time) go directly.
//!
//! [`Arenas`] is the bookkeeping alone, so that it is tested without a GPU; the CUDA runtime
//! (`driver.rs`) owns the page-locked memory and the events.

/// Bytes of each page-locked arena.
pub const ARENA_BYTES: usize = 4 << 20;
/// Each upload's offset in an arena is a multiple of this (the widest element type and then some).
const ALIGN: usize = 256;

/// Where an upload of some bytes goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Directly from the caller's memory: larger than an arena, or empty.
    Direct,
    /// Into arena `arena` at `offset`, then to the device. First, where `retire` names the
    /// other arena, record its event (its last copy is enqueued); where `wait` is set, wait for
    /// this arena's event (its copies from the last time round are done).
    Staged { arena: usize, offset: usize, retire: Option<usize>, wait: bool },
}

/// The fill of two arenas of `capacity` bytes each.
#[derive(Debug)]
pub struct Arenas {
    capacity: usize,
    current: usize,
    used: usize,
    /// Whether each arena has been retired once (so has an event to wait for).
    retired: [bool; 2],
}

impl Arenas {
    pub fn new(capacity: usize) -> Self {
        Arenas { capacity, current: 0, used: 0, retired: [false; 2] }
    }

    pub fn place(&mut self, bytes: usize) -> Place {
        if bytes == 0 || bytes > self.capacity {
            return Place::Direct;
        }
        let offset = self.used.div_ceil(ALIGN) * ALIGN;
        if offset + bytes <= self.capacity {
            self.used = offset + bytes;
            return Place::Staged { arena: self.current, offset, retire: None, wait: false };
        }
        let old = self.current;
        self.retired[old] = true;
        self.current = 1 - old;
        self.used = bytes;
        Place::Staged { arena: self.current, offset: 0, retire: Some(old), wait: self.retired[self.current] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uploads fill an arena at aligned offsets, then the other (the first retired), then the
    /// first again once its event has passed; what does not fit an arena goes directly.
    #[test]
    fn uploads_alternate_between_arenas_and_wait_before_reuse() {
        let mut a = Arenas::new(1024);
        assert_eq!(a.place(0), Place::Direct);
        assert_eq!(a.place(1025), Place::Direct);
        assert_eq!(a.place(100), Place::Staged { arena: 0, offset: 0, retire: None, wait: false });
        assert_eq!(a.place(300), Place::Staged { arena: 0, offset: 256, retire: None, wait: false });
        assert_eq!(a.place(200), Place::Staged { arena: 0, offset: 768, retire: None, wait: false });
        // 1024 + 600 > 1024: the second arena, the first retired; nothing to wait for yet.
        assert_eq!(a.place(600), Place::Staged { arena: 1, offset: 0, retire: Some(0), wait: false });
        assert_eq!(a.place(1024), Place::Staged { arena: 0, offset: 0, retire: Some(1), wait: true });
        assert_eq!(a.place(1), Place::Staged { arena: 1, offset: 0, retire: Some(0), wait: true });
        assert_eq!(a.place(1023 - 255), Place::Staged { arena: 1, offset: 256, retire: None, wait: false });
    }
}
