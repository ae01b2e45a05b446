//! A prefix-cache snapshot as plain host data, to move it off the backend (to a file: see
//! `crate::snapshot_store`) and back, bit for bit.
//!
//! An image holds what the snapshot adds to its parent on this rank: the self-decoder states,
//! the shard's layout (which positions this rank keeps, every context-parallel rank's rows) and
//! the cache blocks after the `⌊parent_rows / block⌋` whole blocks it shares with the parent.
//! A partly filled block of the parent's was copied before the snapshot's sequence wrote to it,
//! so the snapshot's own block at that index is in the image. Restoring shares the parent's
//! whole blocks again and fills new ones, so a chain of images rebuilds a chain of snapshots
//! with the same sharing — and the same budget — as when they were taken.

use super::caches::{KvShard, State};
use super::{Engine, EngineError, SnapshotId};
use crate::backend::Backend;

/// One self-decoder layer's state, on the host.
#[derive(Debug, Clone, PartialEq)]
pub enum StateImage {
    /// Gated retention: `[heads, d, d]` of this rank's heads.
    Retention(Vec<f32>),
    /// Sliding window: `rows` rotated keys and values, each `[rows, width]`.
    Window { keys: Vec<f32>, values: Vec<f32>, rows: usize },
}

/// What a snapshot's parent looked like on this rank when the image was made: restoring
/// checks that the parent it is given is that one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParentShape {
    pub pos: usize,
    pub rows: usize,
    pub lens: Vec<usize>,
}

/// A snapshot on this rank, beyond its parent (see the module).
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotImage {
    /// The position the snapshot resumes at.
    pub pos: usize,
    pub states: Vec<StateImage>,
    /// This rank's runs of positions `(first, n)`, its rows, and every context-parallel rank's.
    pub runs: Vec<(usize, usize)>,
    pub rows: usize,
    pub lens: Vec<usize>,
    pub parent: Option<ParentShape>,
    /// The blocks after the parent's shared ones, as [`Backend::kv_read_block`] gives them.
    pub blocks: Vec<Vec<u8>>,
}

impl SnapshotImage {
    /// Bytes of states and blocks (what the image costs to hold or write, less its layout).
    pub fn payload_bytes(&self) -> usize {
        let states: usize = self
            .states
            .iter()
            .map(|s| match s {
                StateImage::Retention(v) => v.len(),
                StateImage::Window { keys, values, .. } => keys.len() + values.len(),
            })
            .sum();
        4 * states + self.blocks.iter().map(Vec::len).sum::<usize>()
    }
}

impl<B: Backend> Engine<B> {
    /// Snapshot `id` as an image beyond `parent` (the snapshot it continues: its blocks must
    /// be the first ones of `id`'s, which they are when `id` was taken from a sequence that
    /// resumed from or took `parent`).
    pub fn export_snapshot(&self, id: SnapshotId, parent: Option<SnapshotId>) -> Result<SnapshotImage, EngineError> {
        self.backend.bind()?;
        let snap = self.snapshots.get(&id).ok_or(EngineError::UnknownSnapshot(id))?;
        let bt = self.pool.block_tokens();
        let (shared, parent) = match parent {
            None => (0, None),
            Some(p) => {
                let ps = self.snapshots.get(&p).ok_or(EngineError::UnknownSnapshot(p))?;
                let shared = ps.kv.rows / bt;
                if ps.pos > snap.pos || snap.kv.table.get(..shared) != ps.kv.table.get(..shared) {
                    return Err(bad(format!("snapshot {p} is not the one snapshot {id} continues")));
                }
                (shared, Some(ParentShape { pos: ps.pos, rows: ps.kv.rows, lens: ps.kv.lens.clone() }))
            }
        };
        let b = &self.backend;
        let states = snap
            .states
            .iter()
            .map(|s| {
                Ok(match s {
                    State::Retention(x) => StateImage::Retention(b.download(x)?),
                    State::Window { keys, values, rows } => {
                        let width = self.state_widths().1;
                        let mut keys = b.download(keys)?;
                        let mut values = b.download(values)?;
                        keys.truncate(rows * width);
                        values.truncate(rows * width);
                        StateImage::Window { keys, values, rows: *rows }
                    }
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        let blocks = snap.kv.table[shared..]
            .iter()
            .map(|&block| b.kv_read_block(&self.pool.storage, block))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SnapshotImage {
            pos: snap.pos,
            states,
            runs: snap.kv.runs().to_vec(),
            rows: snap.kv.rows,
            lens: snap.kv.lens.clone(),
            parent,
            blocks,
        })
    }

    /// Makes snapshot `id` from `image` on top of snapshot `parent` (which must look as the
    /// image says its parent did). Checked whole before anything changes; takes its blocks
    /// from the pool all or none.
    pub fn import_snapshot(
        &mut self,
        id: SnapshotId,
        parent: Option<SnapshotId>,
        image: &SnapshotImage,
    ) -> Result<(), EngineError> {
        if self.snapshots.contains_key(&id) {
            return Err(bad(format!("snapshot {id} exists already")));
        }
        let bt = self.pool.block_tokens();
        let prefix = match (parent, &image.parent) {
            (None, None) => Vec::new(),
            (Some(p), Some(shape)) => {
                let ps = self.snapshots.get(&p).ok_or(EngineError::UnknownSnapshot(p))?;
                if (ps.pos, ps.kv.rows, &ps.kv.lens) != (shape.pos, shape.rows, &shape.lens) {
                    return Err(bad(format!(
                        "snapshot {p} (at {}, {} rows here) is not the parent the image was made on (at {}, {} rows)",
                        ps.pos, ps.kv.rows, shape.pos, shape.rows
                    )));
                }
                ps.kv.table[..shape.rows / bt].to_vec()
            }
            (None, Some(_)) => return Err(bad("the image continues a parent snapshot, and none was given".into())),
            (Some(_), None) => return Err(bad("the image has no parent, and one was given".into())),
        };
        self.check_image(image, prefix.len())?;
        self.backend.bind()?;
        let b = &self.backend;
        let states = image
            .states
            .iter()
            .map(|s| {
                Ok(match s {
                    StateImage::Retention(x) => State::Retention(b.upload(x)?),
                    StateImage::Window { keys, values, rows } => {
                        State::Window { keys: b.upload(keys)?, values: b.upload(values)?, rows: *rows }
                    }
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        let table = self.pool.restore(b, &prefix, &image.blocks)?;
        let kv = KvShard::from_parts(table, image.runs.clone(), image.lens.clone());
        self.snapshots.insert(id, super::Caches { pos: image.pos, states, kv });
        Ok(())
    }

    /// Whether `image` fits this rank: its states this model's, its layout consistent, its
    /// blocks as many and as large as its rows past the `shared` parent blocks need.
    fn check_image(&self, image: &SnapshotImage, shared: usize) -> Result<(), EngineError> {
        let (per, width) = self.state_widths();
        let layers = &self.weights.self_layers;
        if image.states.len() != layers.len() {
            return Err(bad(format!("{} layer states for {} self-decoder layers", image.states.len(), layers.len())));
        }
        for (i, (s, l)) in image.states.iter().zip(layers).enumerate() {
            let fits = match (s, &l.mixer) {
                (StateImage::Retention(x), super::layers::Mixer::Retention { .. }) => x.len() == per,
                (StateImage::Window { keys, values, rows }, super::layers::Mixer::Window { window, .. }) => {
                    *rows < (*window).max(1) && keys.len() == rows * width && values.len() == rows * width
                }
                _ => false,
            };
            if !fits {
                return Err(bad(format!("layer {i}'s state does not fit the model's")));
            }
        }
        let bt = self.pool.block_tokens();
        let run_rows: usize = image.runs.iter().map(|r| r.1).sum();
        let ordered = image.runs.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0);
        let ends_before = image.runs.last().is_none_or(|&(first, n)| first + n <= image.pos);
        if image.lens.len() != self.cp_size()
            || image.lens[self.cp_rank()] != image.rows
            || run_rows != image.rows
            || !ordered
            || !ends_before
            || image.lens.iter().sum::<usize>() != image.pos
        {
            return Err(bad("the image's shard layout is inconsistent".into()));
        }
        let want = image.rows.div_ceil(bt).saturating_sub(shared);
        let block_bytes = self.pool.block_bytes();
        if image.blocks.len() != want || image.blocks.iter().any(|b| b.len() != block_bytes) {
            return Err(bad(format!("the image needs {want} blocks of {block_bytes} bytes")));
        }
        Ok(())
    }
}

fn bad(message: String) -> EngineError {
    EngineError::Snapshot(message)
}
