#!/usr/bin/env python3
"""Cross-check the simple reference (yoco_ref.py) against plain-torch transliterations
of the official kernels' math (microsoft/unilm YOCO/yoco/models/decoder/kernel/*):

* chunk_gate_retention (chunk 256, cross-chunk state via the naive loop that the
  official triton kernel is tested against), with the official prefill padding to a
  multiple of 256 and the official closed-form last_hidden_state;
* recurrent_gate_retention (decode);
* the interleaved rotary kernel written the way the triton kernel indexes it
  (x1 = x[1,0,3,2,...], cos/sin repeated per pair).

Run: python tools/reference/check_official_forms.py   (CPU, a few seconds)
"""

import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import yoco_ref as R  # noqa: E402

torch.set_default_dtype(torch.float64)


# ---- official math, transliterated (shapes [B, H, T, d]) -----------------------------
def naive_kv_recurrent(kv, cross_decay, last_kv=None):
    B, H, N, Dk, Dv = kv.shape
    out = []
    state = torch.zeros(B, H, Dk, Dv) if last_kv is None else last_kv
    for i in range(N):
        out.append(state)
        state = state * cross_decay[:, :, i, None, None] + kv[:, :, i]
    return torch.stack(out, dim=2)


def cross_chunk(q, k, v, g, last_hidden_state=None):
    kv = k.transpose(-1, -2) @ (v * (-g + g[:, :, :, -1, None]).exp()[..., None])
    cross_decay = g[:, :, :, -1].exp()
    S = naive_kv_recurrent(kv, cross_decay, last_hidden_state)
    return (q * g[..., None].exp()) @ S


def inner_chunk(q, k, v, g):
    attn = q @ k.transpose(-1, -2)
    causal_mask = torch.full([q.shape[-2], q.shape[-2]], float("-inf")).triu(1)
    attn = attn * (g[..., None] - g[..., None, :] + causal_mask).exp()
    return attn @ v


def chunk_gate_retention(q, k, v, g, chunk_size=64, last_hidden_state=None):
    bsz, num_head, tgt_len, key_dim = q.shape
    head_dim = v.shape[-1]
    num_chunk = tgt_len // chunk_size
    q = q.view(bsz, num_head, num_chunk, chunk_size, key_dim)
    k = k.view(bsz, num_head, num_chunk, chunk_size, key_dim) * (key_dim ** -0.5)
    v = v.view(bsz, num_head, num_chunk, chunk_size, head_dim)
    g = g.view(bsz, num_head, num_chunk, chunk_size).cumsum(-1)
    o = cross_chunk(q, k, v, g, last_hidden_state) + inner_chunk(q, k, v, g)
    return o.view(bsz, num_head, tgt_len, head_dim)


def recurrent_gate_retention(q, k, v, g, state):
    bsz, num_head, _, key_dim = q.shape
    k = k * key_dim ** -0.5
    g = g.view(bsz, num_head, 1, 1).exp()
    kv = k.transpose(-1, -2) * v
    if "last_hidden_state" in state:
        kv = kv + state["last_hidden_state"] * g
    state["last_hidden_state"] = kv
    return q @ kv


def official_prefill(qr, kr, v, gt, real_len, state, chunk=256):
    """GateRetention.forward prefill branch (inputs already padded to a multiple of 256)."""
    index_mask = torch.arange(qr.shape[2]) >= real_len
    hd = qr.shape[-1]
    gt_sum = gt.masked_fill(index_mask, 0).sum(dim=-1, keepdim=True)
    gt_mask = (gt_sum - gt.cumsum(dim=-1)).exp().masked_fill(index_mask, 0)
    nxt = (kr.transpose(-1, -2) * hd ** -0.5) @ (v * gt_mask.unsqueeze(-1))
    last = state.get("last_hidden_state")
    if last is not None:
        nxt = nxt + last * gt_sum.exp().unsqueeze(-1)
    state["last_hidden_state"] = nxt
    return chunk_gate_retention(qr, kr, v, gt, chunk_size=chunk, last_hidden_state=last)


def rotary_like_triton(x, cos, sin):
    """x [T, H, hd]; the interleaved branch of rotary_kernel."""
    hd = x.shape[-1]
    rk = torch.arange(hd)
    rk_swap = rk + ((rk + 1) % 2) * 2 - 1
    rk_repeat = rk // 2
    c = cos[:, rk_repeat][:, None, :]
    s = sin[:, rk_repeat][:, None, :]
    x0, x1 = x, x[..., rk_swap]
    return torch.where(rk % 2 == 0, x0 * c - x1 * s, x0 * c + x1 * s)


# ---- checks --------------------------------------------------------------------------
def retention_core_ref(q, k, v, gamma):
    """Simple parallel form as in yoco_ref.retention_parallel (before subln)."""
    T, d = q.shape[2], q.shape[3]
    G = gamma.cumsum(-1)
    diff = G[..., :, None] - G[..., None, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    decay = torch.where(causal, diff, torch.full_like(diff, float("-inf"))).exp()
    return ((q @ k.transpose(-1, -2)) / math.sqrt(d) * decay) @ v


def main():
    gen = torch.Generator().manual_seed(0)
    B, H, d = 1, 3, 8
    worst = 0.0
    for T in (1, 7, 255, 256, 300, 600):
        q = torch.randn(B, H, T, d, generator=gen)
        k = torch.randn(B, H, T, d, generator=gen)
        v = torch.randn(B, H, T, d, generator=gen)
        gt = torch.randn(B, H, T, generator=gen) * torch.tensor([0.5, 4.0, 16.0])[None, :, None]
        gamma = F.logsigmoid(gt) / 16
        ref = retention_core_ref(q, k, v, gamma)

        # official prefill: two prefill calls (split at 200), each padded to 256
        pad = lambda t, n: F.pad(t, (0, 0, 0, n)) if t.dim() == 4 else F.pad(t, (0, n))  # noqa: E731
        state = {}
        outs = []
        for a, b in ((0, min(T, 200)), (min(T, 200), T)):
            if a == b:
                continue
            n = b - a
            padn = (256 - n % 256) % 256
            # padded tokens have x = 0 -> q = k = v = 0 and gt = 0 -> gamma = logsigmoid(0)/16
            qq, kk, vv = (pad(t[:, :, a:b], padn) for t in (q, k, v))
            gg = torch.cat([gamma[:, :, a:b], torch.full((B, H, padn), F.logsigmoid(torch.tensor(0.0)) / 16)], -1)
            outs.append(official_prefill(qq, kk, vv, gg, n, state)[:, :, :n])
        o_chunk = torch.cat(outs, dim=2)
        worst = max(worst, float((o_chunk - ref).abs().max()))

        # official recurrent decode from scratch
        st = {}
        o_rec = torch.cat([recurrent_gate_retention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                                    gamma[:, :, t], st) for t in range(T)], dim=2)
        worst = max(worst, float((o_rec - ref).abs().max()))

        # decode after the official prefill state == full parallel at the next position
        qn, kn, vn = (torch.randn(B, H, 1, d, generator=gen) for _ in range(3))
        gn = F.logsigmoid(torch.randn(B, H, 1, generator=gen) * 4) / 16
        o_next = recurrent_gate_retention(qn, kn, vn, gn[:, :, 0], state)
        ref2 = retention_core_ref(torch.cat([q, qn], 2), torch.cat([k, kn], 2), torch.cat([v, vn], 2),
                                  torch.cat([gamma, gn], 2))[:, :, -1:]
        worst = max(worst, float((o_next - ref2).abs().max()))
    assert worst < 1e-10, worst
    print(f"gated retention: official chunk(256)+padding / recurrent / prefill-state forms == parallel form "
          f"(max abs diff {worst:.1e})")

    # rotary
    pos = torch.tensor([0, 1, 5, 1000, 999999])
    for hd in (4, 8, 16):
        cos, sin = R.rope_cos_sin(pos, hd, 10000.0)
        x = torch.randn(len(pos), 2, hd, generator=gen, dtype=torch.float32)
        a = R.apply_rope(x, cos, sin)
        b = rotary_like_triton(x, cos, sin)
        assert torch.equal(a, b), (hd, (a - b).abs().max())
    print("rotary: yoco_ref.apply_rope == triton interleaved indexing (bit-exact in f32)")
    print("ALL OFFICIAL-FORM CHECKS PASSED")


if __name__ == "__main__":
    main()
