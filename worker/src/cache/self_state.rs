//! The self-decoder's constant-size per-sequence caches.

/// One self-decoder layer's cache for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerState {
    /// Gated retention: the `[heads, d, d]` state after the last token seen.
    Retention { state: Vec<f32> },
    /// Sliding window: the rotated keys and values of the last `min(seen, W−1)` tokens,
    /// `[rows, dim]` each, oldest first.
    Window { keys: Vec<f32>, values: Vec<f32> },
}

impl LayerState {
    pub fn bytes(&self) -> usize {
        4 * match self {
            LayerState::Retention { state } => state.len(),
            LayerState::Window { keys, values } => keys.len() + values.len(),
        }
    }
}
