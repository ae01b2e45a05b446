//! The model's layers on a backend, each holding this rank's tensor-parallel part of its
//! weights, as Megatron splits them: a column-parallel linear computes its part of the outputs
//! (heads, FFN columns); a row-parallel one a partial sum over its part of the inputs, which it
//! all-reduces across the tensor-parallel row; the embedding and the output projection are split
//! by vocabulary. With one rank per row every collective is skipped, so the same layers serve
//! a lone rank, a `tp × 1` row, a `1 × cp` column and any grid.

use crate::backend::{Backend, BackendError};
use crate::comm::{Collective, CommError, Grid};
use crate::config::ModelConfig;
use crate::kernels::cross_attention::CrossShape;
use crate::kernels::rope::Rope;
use crate::model::{FeedForward, Model, SelfMixer, TpShard};
use crate::weights::Tensor;

use super::EngineError;

/// The gate logit normaliser of gated retention: `γ = logsigmoid(gt) / 16`.
pub(super) const GATE_LOGIT_NORMALIZER: f32 = 16.0;

type Result<T> = std::result::Result<T, EngineError>;

/// A linear layer whose outputs are split across the row: `x · W_partᵀ`, this rank's columns
/// of the output (the whole output on one rank).
pub(super) struct ColumnLinear<B: Backend> {
    w: B::Matrix,
}

impl<B: Backend> ColumnLinear<B> {
    fn load(b: &B, w: &Tensor) -> std::result::Result<Self, BackendError> {
        Ok(ColumnLinear { w: b.matrix(w)? })
    }

    pub(super) fn forward(&self, b: &B, x: &B::Buf, rows: usize) -> Result<B::Buf> {
        Ok(b.matmul(x, rows, &self.w)?)
    }

    /// Several linears of one input, in order (`Backend::matmuls`: the input prepared once).
    pub(super) fn forward_many<const N: usize>(b: &B, x: &B::Buf, rows: usize, ls: [&Self; N]) -> Result<[B::Buf; N]> {
        let outs = b.matmuls(x, rows, &ls.map(|l| &l.w))?;
        Ok(outs.try_into().unwrap_or_else(|_| unreachable!("one output per linear")))
    }
}

/// A linear layer whose inputs are split across the row: each rank multiplies its part of the
/// inputs, and the partial sums are all-reduced, so every rank of the row gets the whole output.
pub(super) struct RowLinear<B: Backend> {
    w: B::Matrix,
    /// Output features.
    out: usize,
}

impl<B: Backend> RowLinear<B> {
    fn load(b: &B, w: &Tensor) -> std::result::Result<Self, BackendError> {
        Ok(RowLinear { w: b.matrix(w)?, out: w.shape.first().copied().unwrap_or(0) })
    }

    pub(super) fn forward(&self, b: &B, x: &B::Buf, rows: usize, grid: &mut Grid) -> Result<B::Buf> {
        tp_sum(b, b.matmul(x, rows, &self.w)?, rows * self.out, grid)
    }
}

/// `partial` (`len` f32), summed over the tensor-parallel row (itself on a row of one): on the
/// device where the whole group agreed it can ([`Grid::device_collectives`]), else a host copy.
fn tp_sum<B: Backend>(b: &B, partial: B::Buf, len: usize, grid: &mut Grid) -> Result<B::Buf> {
    if grid.tp_size() == 1 || len == 0 {
        return Ok(partial);
    }
    if grid.device_collectives() {
        if let Some((addr, have)) = b.device_buffer(&partial)? {
            if have < len {
                return Err(CommError::Protocol { peer: grid.rank(), reason: format!("{have} of {len} sums") }.into());
            }
            // SAFETY: the backend gives the buffer's own address, holding `len` f32 (checked),
            // its writes complete; `partial` outlives the call.
            match unsafe { grid.tp().all_reduce_sum_device(addr, len) } {
                Ok(true) => return Ok(partial),
                Ok(false) => {}
                Err(e) => {
                    // The collective may still write the buffer after a timeout: it is never
                    // freed (the group is broken anyway).
                    std::mem::forget(partial);
                    return Err(e.into());
                }
            }
        }
    }
    let mut host = b.download_owned(partial)?;
    grid.tp().all_reduce_sum(&mut host)?;
    Ok(b.upload_owned(host)?)
}

/// The row's parts `part` (`len` f32 each) gathered on the device where the whole group agreed
/// it can ([`Grid::device_collectives`]) and the parts are of one size (NCCL gathers equal
/// parts), then brought to the host at once: `None` where not, and the caller gathers host
/// copies. (`part` itself is not forgotten on a failure: the caller drops it after its own
/// error, and a gather only reads it.)
fn gather_on_device<B: Backend>(
    b: &B,
    part: &B::Buf,
    len: usize,
    widths: &[usize],
    grid: &mut Grid,
) -> Result<Option<Vec<Vec<f32>>>> {
    if !grid.device_collectives() || len == 0 || widths.iter().any(|&w| w != widths[0]) {
        return Ok(None);
    }
    let all = b.zeros(len * widths.len())?;
    let (Some((send, have)), Some((recv, room))) = (b.device_buffer(part)?, b.device_buffer(&all)?) else {
        return Ok(None);
    };
    if have < len || room < len * widths.len() {
        return Err(CommError::Protocol { peer: grid.rank(), reason: format!("{have} of {len} logits") }.into());
    }
    // SAFETY: the backend gives both buffers' own addresses and lengths (checked to hold the
    // parts), their writes complete; both outlive the call and are distinct allocations.
    match unsafe { grid.tp().all_gather_device(send, len, recv) } {
        Ok(true) => {}
        Ok(false) => return Ok(None),
        Err(e) => {
            std::mem::forget(all); // as in tp_sum: the collective may still write it
            return Err(e.into());
        }
    }
    let host = b.download_owned(all)?;
    Ok(Some(host.chunks_exact(len.max(1)).take(widths.len()).map(<[f32]>::to_vec).collect()))
}

/// SwiGLU feed-forward, `fc2(silu(fc1 x) ⊙ gate x)`: fc1 and gate by column, fc2 by row.
pub(super) struct Ffn<B: Backend> {
    fc1: ColumnLinear<B>,
    gate: ColumnLinear<B>,
    fc2: RowLinear<B>,
    /// This rank's hidden columns.
    hidden: usize,
}

impl<B: Backend> Ffn<B> {
    fn load(b: &B, f: &FeedForward) -> std::result::Result<Self, BackendError> {
        Ok(Ffn {
            fc1: ColumnLinear::load(b, &f.fc1.weight)?,
            gate: ColumnLinear::load(b, &f.gate.weight)?,
            fc2: RowLinear::load(b, &f.fc2.weight)?,
            hidden: f.fc1.out_dim,
        })
    }

    pub(super) fn forward(&self, b: &B, x: &B::Buf, rows: usize, grid: &mut Grid) -> Result<B::Buf> {
        let [mut a, gate] = ColumnLinear::forward_many(b, x, rows, [&self.fc1, &self.gate])?;
        b.silu_mul(&mut a, &gate, rows * self.hidden)?;
        self.fc2.forward(b, &a, rows, grid)
    }
}

/// The embedding table split by vocabulary: each rank looks up the ids it holds (zeros for the
/// others) and the row sums them, exactly, as every sum has one term that is not zero.
pub(super) struct VocabEmbedding<B: Backend> {
    table: B::Matrix,
    /// The first id of this rank's part.
    first: u32,
}

impl<B: Backend> VocabEmbedding<B> {
    /// Token embeddings scaled by `sqrt(dim)`, `[tokens, dim]`.
    pub(super) fn forward(&self, b: &B, ids: &[u32], dim: usize, grid: &mut Grid) -> Result<B::Buf> {
        let x = b.embed(ids, &self.table, self.first, (dim as f32).sqrt())?;
        tp_sum(b, x, ids.len() * dim, grid)
    }
}

pub(super) enum Mixer<B: Backend> {
    Retention {
        q: ColumnLinear<B>,
        k: ColumnLinear<B>,
        v: ColumnLinear<B>,
        g: ColumnLinear<B>,
        gt: ColumnLinear<B>,
        out: RowLinear<B>,
    },
    Window {
        q: ColumnLinear<B>,
        k: ColumnLinear<B>,
        v: ColumnLinear<B>,
        out: RowLinear<B>,
        window: usize,
    },
}

pub(super) struct SelfLayer<B: Backend> {
    pub(super) norm: B::Buf,
    pub(super) mixer: Mixer<B>,
    pub(super) final_norm: B::Buf,
    pub(super) ffn: Ffn<B>,
}

pub(super) struct CrossLayer<B: Backend> {
    pub(super) norm: B::Buf,
    pub(super) q: ColumnLinear<B>,
    pub(super) out: RowLinear<B>,
    pub(super) final_norm: B::Buf,
    pub(super) ffn: Ffn<B>,
}

/// The whole model on a backend: this rank's part of it.
pub struct Weights<B: Backend> {
    pub cfg: ModelConfig,
    pub(super) tp: TpShard,
    pub(super) embed: VocabEmbedding<B>,
    pub(super) self_layers: Vec<SelfLayer<B>>,
    pub(super) kv_norm: B::Buf,
    pub(super) k_proj: ColumnLinear<B>,
    pub(super) v_proj: ColumnLinear<B>,
    pub(super) cross_layers: Vec<CrossLayer<B>>,
    pub(super) norm: B::Buf,
    /// This rank's part of the output projection; `None` when tied to the embedding.
    output: Option<B::Matrix>,
    pub(super) rope_self: Rope,
    pub(super) rope_cross: Rope,
    /// Bytes of the model's tensors this rank holds, and their element type (for Info).
    weight_bytes: usize,
    weight_dtype: &'static str,
}

impl<B: Backend> Weights<B> {
    /// `model`'s tensors on `b` (the CPU backend shares them; a device uploads them).
    pub fn load(b: &B, model: &Model) -> std::result::Result<Self, BackendError> {
        let col = |l: &crate::model::Linear| ColumnLinear::load(b, &l.weight);
        let row = |l: &crate::model::Linear| RowLinear::load(b, &l.weight);
        let vector = |t: &Tensor| b.upload(t.as_slice());
        let self_layers = model
            .self_layers
            .iter()
            .map(|l| {
                let mixer = match &l.mixer {
                    SelfMixer::Retention { q_proj, k_proj, v_proj, g_proj, gt_proj, out_proj } => Mixer::Retention {
                        q: col(q_proj)?,
                        k: col(k_proj)?,
                        v: col(v_proj)?,
                        g: col(g_proj)?,
                        gt: col(gt_proj)?,
                        out: row(out_proj)?,
                    },
                    SelfMixer::Window { q_proj, k_proj, v_proj, out_proj, window } => Mixer::Window {
                        q: col(q_proj)?,
                        k: col(k_proj)?,
                        v: col(v_proj)?,
                        out: row(out_proj)?,
                        window: *window,
                    },
                };
                Ok(SelfLayer {
                    norm: vector(&l.mixer_layer_norm)?,
                    mixer,
                    final_norm: vector(&l.final_layer_norm)?,
                    ffn: Ffn::load(b, &l.ffn)?,
                })
            })
            .collect::<std::result::Result<Vec<_>, BackendError>>()?;
        let cross_layers = model
            .cross_layers
            .iter()
            .map(|l| {
                Ok(CrossLayer {
                    norm: vector(&l.mixer_layer_norm)?,
                    q: col(&l.q_proj)?,
                    out: row(&l.out_proj)?,
                    final_norm: vector(&l.final_layer_norm)?,
                    ffn: Ffn::load(b, &l.ffn)?,
                })
            })
            .collect::<std::result::Result<Vec<_>, BackendError>>()?;
        let cfg = model.cfg.clone();
        Ok(Weights {
            embed: VocabEmbedding {
                table: b.matrix(&model.embed_tokens)?,
                first: model.tp.vocab(cfg.vocab_size).start as u32,
            },
            self_layers,
            kv_norm: vector(&model.kv_layer_norm)?,
            k_proj: col(&model.k_proj)?,
            v_proj: col(&model.v_proj)?,
            cross_layers,
            norm: vector(&model.layer_norm)?,
            output: model.output_projection.as_ref().map(|l| b.matrix(&l.weight)).transpose()?,
            rope_self: Rope::new(cfg.rope_theta, cfg.self_head_dim()),
            rope_cross: Rope::new(cfg.rope_theta, cfg.head_dim()),
            weight_bytes: model.weight_bytes(),
            weight_dtype: model.weight_dtype(),
            tp: model.tp,
            cfg,
        })
    }

    /// Bytes of the model's tensors this rank holds (as loaded, before the backend took them).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// The element type of the weight matrices (`f32`, `bf16`, `f16` or `mixed`).
    pub fn weight_dtype(&self) -> &'static str {
        self.weight_dtype
    }

    /// This rank's part of the weights.
    pub fn tp(&self) -> TpShard {
        self.tp
    }

    /// The self-decoder heads this rank computes.
    pub(super) fn self_heads(&self) -> usize {
        self.cfg.n_self_heads / self.tp.size
    }

    /// Cross-attention on this rank: its query heads and the KV heads they use.
    pub(super) fn cross_shape(&self) -> CrossShape {
        CrossShape {
            heads: self.cfg.n_attn_heads / self.tp.size,
            kv_heads: (self.cfg.n_attn_kv_heads / self.tp.size).max(1),
            head_dim: self.cfg.head_dim(),
        }
    }

    /// Width of this rank's part of a global-cache row (K or V): its KV heads.
    pub(super) fn kv_dim(&self) -> usize {
        self.cross_shape().kv_dim()
    }

    /// The logits of the final hidden rows `x [rows, dim]`, `[rows, vocab]` on every rank of
    /// the row: on one rank into `buf`, whose allocation is reused; split by vocabulary, each
    /// rank's part gathered across the row.
    pub(super) fn logits(&self, b: &B, x: &B::Buf, rows: usize, grid: &mut Grid, buf: Vec<f32>) -> Result<Vec<f32>> {
        let (dim, vocab) = (self.cfg.dim, self.cfg.vocab_size);
        let xn = b.rms_norm(x, rows, dim, Some(&self.norm), self.cfg.norm_eps)?;
        let w = self.output.as_ref().unwrap_or(&self.embed.table);
        if self.tp.size == 1 {
            return Ok(b.logits_into(&xn, rows, w, buf)?);
        }
        let widths: Vec<usize> = (0..self.tp.size).map(|rank| TpShard { rank, ..self.tp }.vocab(vocab).len()).collect();
        let part = b.matmul(&xn, rows, w)?;
        let parts = match gather_on_device(b, &part, rows * widths[0], &widths, grid)? {
            Some(parts) => parts,
            None => grid.tp().all_gather(&b.download_owned(part)?)?,
        };
        let mut logits = Vec::with_capacity(rows * vocab);
        for r in 0..rows {
            for (t, (p, &width)) in parts.iter().zip(&widths).enumerate() {
                let row = p.get(r * width..(r + 1) * width).ok_or_else(|| CommError::Protocol {
                    peer: t,
                    reason: "a vocabulary part of the wrong size".into(),
                })?;
                logits.extend_from_slice(row);
            }
        }
        Ok(logits)
    }
}
