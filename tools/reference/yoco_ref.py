"""Independent plain-PyTorch reference of the YOCO model (arXiv 2405.05254).

Written from /work/shared/docs/yoco-model.md and the official code in
microsoft/unilm YOCO/yoco/models/decoder/ (no flash_attn / triton / fairseq).
The math is kept as simple as possible:

* ``forward_full``: whole sequence at once. Gated retention in its plain
  parallel form (explicit T x T decay matrix), sliding-window and cross
  attention as explicit masked softmax attention.
* ``Incremental``: token-at-a-time decoding with the recurrent retention state,
  a sliding-window KV cache and the one growing global KV cache. It can also be
  primed from a parallel prefill (state S_T computed in closed form), like a
  real server does.

Weights are a dict ``name -> tensor`` with the official state-dict names.
Everything is computed in ``dtype`` (float64 by default) from the weights
upcast exactly; only the RoPE cos/sin tables are computed in float32 exactly
like the official code and then upcast.
"""

import math

import torch
import torch.nn.functional as F

GATE_LOGIT_NORMALIZER = 16.0


class Config:
    def __init__(self, params: dict):
        self.dim = int(params["dim"])
        self.n_layers = int(params["n_layers"])
        self.hidden_dim = int(params["hidden_dim"])
        self.n_self_heads = int(params["n_self_heads"])
        self.n_attn_heads = int(params["n_attn_heads"])
        self.n_attn_kv_heads = int(params["n_attn_kv_heads"])
        self.vocab_size = int(params["vocab_size"])
        self.rope_theta = float(params.get("rope_theta", 10000.0))
        self.norm_eps = float(params.get("norm_eps", 1e-5))
        sw = params.get("sliding_window", None)
        self.sliding_window = None if sw is None else int(sw)
        assert self.n_layers % 2 == 0
        self.n_half = self.n_layers // 2
        self.self_hd = self.dim // self.n_self_heads
        self.cross_hd = self.dim // self.n_attn_heads
        assert self.n_attn_heads % self.n_attn_kv_heads == 0


# ---------------------------------------------------------------- building blocks

def rms_norm(x, weight, eps):
    out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    return out


def linear(x, w):
    # w is [out, in]; y = x w^T
    return x @ w.t()


def rope_angles_f32(positions, head_dim, theta):
    """Angle table exactly as the official build_rel_pos: all in float32."""
    angle = 1.0 / (theta ** torch.linspace(0, 1, head_dim // 2, dtype=torch.float32))
    return positions.to(torch.float32)[:, None] * angle


def rope_cos_sin(positions, head_dim, theta):
    freqs = rope_angles_f32(positions, head_dim, theta)
    return torch.cos(freqs), torch.sin(freqs)  # float32 [P, head_dim/2]


def apply_rope(x, cos, sin):
    """Interleaved (GPT-J) rotary embedding.

    x: [T, H, hd]; cos/sin: [T, hd/2]. Pair (x[2i], x[2i+1]) is rotated by angle_i.
    """
    cos = cos.to(x.dtype)[:, None, :]
    sin = sin.to(x.dtype)[:, None, :]
    x_even = x[..., 0::2]
    x_odd = x[..., 1::2]
    out_even = x_even * cos - x_odd * sin
    out_odd = x_odd * cos + x_even * sin
    return torch.stack([out_even, out_odd], dim=-1).flatten(-2)


def ffn(x, W, prefix):
    a = linear(x, W[prefix + "fc1.weight"])
    b = linear(x, W[prefix + "gate.weight"])
    return linear(F.silu(a) * b, W[prefix + "fc2.weight"])


def output_weight(W):
    if "output_projection.weight" in W:
        return W["output_projection.weight"]
    return W["embed_tokens.weight"]  # tied


def load_weights_as(W, dtype):
    return {k: v.to(dtype) for k, v in W.items()}


# ---------------------------------------------------------------- full (parallel) forward

def retention_parallel(cfg, W, p, h, cos, sin):
    """Gated retention, plain parallel form. h: [T, D] (already normed)."""
    T = h.shape[0]
    H, d = cfg.n_self_heads, cfg.self_hd
    q = linear(h, W[p + "q_proj.weight"]).view(T, H, d)
    k = linear(h, W[p + "k_proj.weight"]).view(T, H, d)
    v = linear(h, W[p + "v_proj.weight"]).view(T, H, d)
    g = linear(h, W[p + "g_proj.weight"])
    gt = linear(h, W[p + "gt_proj.weight"])  # [T, H]
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    gamma = F.logsigmoid(gt) / GATE_LOGIT_NORMALIZER  # [T, H], <= 0
    G = gamma.cumsum(0).t()  # [H, T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    # decay[h, t, s] = exp(G_t - G_s) for s <= t, else 0
    diff = G[:, :, None] - G[:, None, :]
    decay = torch.where(causal, diff, torch.full_like(diff, float("-inf"))).exp()
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, T, d]
    scores = (qh @ kh.transpose(-1, -2)) / math.sqrt(d) * decay
    o = scores @ vh  # [H, T, d]
    o = rms_norm(o, None, cfg.norm_eps)  # subln: per head over d, no weight
    o = o.transpose(0, 1).reshape(T, H * d)
    o = F.silu(g) * o
    return linear(o, W[p + "out_proj.weight"])


def swa_parallel(cfg, W, p, h, cos, sin):
    T = h.shape[0]
    H, d, Wn = cfg.n_self_heads, cfg.self_hd, cfg.sliding_window
    q = apply_rope(linear(h, W[p + "q_proj.weight"]).view(T, H, d), cos, sin)
    k = apply_rope(linear(h, W[p + "k_proj.weight"]).view(T, H, d), cos, sin)
    v = linear(h, W[p + "v_proj.weight"]).view(T, H, d)
    t = torch.arange(T)[:, None]
    s = torch.arange(T)[None, :]
    allowed = (s <= t) & (s >= t - Wn + 1)
    scores = (q.transpose(0, 1) @ k.transpose(0, 1).transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(~allowed, float("-inf"))
    o = scores.softmax(-1) @ v.transpose(0, 1)  # [H, T, d]
    o = o.transpose(0, 1).reshape(T, H * d)
    return linear(o, W[p + "out_proj.weight"])


def cross_attention(cfg, W, p, h, q_pos_cos, q_pos_sin, K, V, q_positions):
    """h: [Tq, D] normed queries at absolute positions q_positions; K, V: [Tk, Hkv, hd]
    for positions 0..Tk-1. Query at position t sees keys 0..t."""
    Tq = h.shape[0]
    Hq, Hkv, hd = cfg.n_attn_heads, cfg.n_attn_kv_heads, cfg.cross_hd
    q = apply_rope(linear(h, W[p + "q_proj.weight"]).view(Tq, Hq, hd), q_pos_cos, q_pos_sin)
    rep = Hq // Hkv
    # GQA: query head j uses kv head j // rep (flash_attn convention)
    Kx = K.repeat_interleave(rep, dim=1)  # [Tk, Hq, hd]
    Vx = V.repeat_interleave(rep, dim=1)
    Tk = K.shape[0]
    scores = (q.transpose(0, 1) @ Kx.transpose(0, 1).transpose(-1, -2)) / math.sqrt(hd)  # [Hq,Tq,Tk]
    allowed = torch.arange(Tk)[None, :] <= q_positions[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    o = scores.softmax(-1) @ Vx.transpose(0, 1)  # [Hq, Tq, hd]
    o = o.transpose(0, 1).reshape(Tq, Hq * hd)
    return linear(o, W[p + "out_proj.weight"])


def global_kv(cfg, W, X, cos, sin):
    T = X.shape[0]
    Xn = rms_norm(X, W["cross_decoder.kv_layer_norm.weight"], cfg.norm_eps)
    K = linear(Xn, W["cross_decoder.k_proj.weight"]).view(T, cfg.n_attn_kv_heads, cfg.cross_hd)
    V = linear(Xn, W["cross_decoder.v_proj.weight"]).view(T, cfg.n_attn_kv_heads, cfg.cross_hd)
    return apply_rope(K, cos, sin), V


def cross_layers(cfg, W, x, K, V, positions):
    cos, sin = rope_cos_sin(positions, cfg.cross_hd, cfg.rope_theta)
    for j in range(cfg.n_half):
        p = f"cross_decoder.layers.{j}."
        h = rms_norm(x, W[p + "mixer_layer_norm.weight"], cfg.norm_eps)
        x = x + cross_attention(cfg, W, p + "mixer.", h, cos, sin, K, V, positions)
        x = x + ffn(rms_norm(x, W[p + "final_layer_norm.weight"], cfg.norm_eps), W, p + "ffn.")
    return x


def self_decoder_full(cfg, W, tokens):
    T = tokens.shape[0]
    pos = torch.arange(T)
    x = W["embed_tokens.weight"][tokens] * math.sqrt(cfg.dim)
    cos, sin = rope_cos_sin(pos, cfg.self_hd, cfg.rope_theta)
    for i in range(cfg.n_half):
        p = f"self_decoder.layers.{i}."
        h = rms_norm(x, W[p + "mixer_layer_norm.weight"], cfg.norm_eps)
        if cfg.sliding_window is None:
            x = x + retention_parallel(cfg, W, p + "mixer.", h, cos, sin)
        else:
            x = x + swa_parallel(cfg, W, p + "mixer.", h, cos, sin)
        x = x + ffn(rms_norm(x, W[p + "final_layer_norm.weight"], cfg.norm_eps), W, p + "ffn.")
    return x


def head(cfg, W, x):
    return linear(rms_norm(x, W["layer_norm.weight"], cfg.norm_eps), output_weight(W))


def forward_full(cfg, W, tokens):
    """Logits [T, vocab] at every position (cross-decoder over all positions, causal)."""
    T = tokens.shape[0]
    pos = torch.arange(T)
    X = self_decoder_full(cfg, W, tokens)
    cos_c, sin_c = rope_cos_sin(pos, cfg.cross_hd, cfg.rope_theta)
    K, V = global_kv(cfg, W, X, cos_c, sin_c)
    x = cross_layers(cfg, W, X, K, V, pos)
    return head(cfg, W, x)


# ---------------------------------------------------------------- incremental path

class Incremental:
    """Token-by-token decoding: recurrent retention state S (H x d x d per layer),
    sliding-window cache (last W-1 keys/values per layer), one global KV cache."""

    def __init__(self, cfg, W):
        self.cfg, self.W = cfg, W
        self.pos = 0
        dt = W["embed_tokens.weight"].dtype
        H, d = cfg.n_self_heads, cfg.self_hd
        self.S = [torch.zeros(H, d, d, dtype=dt) for _ in range(cfg.n_half)]
        self.win_k = [[] for _ in range(cfg.n_half)]
        self.win_v = [[] for _ in range(cfg.n_half)]
        self.K = torch.zeros(0, cfg.n_attn_kv_heads, cfg.cross_hd, dtype=dt)
        self.V = torch.zeros(0, cfg.n_attn_kv_heads, cfg.cross_hd, dtype=dt)

    def _retention_step(self, i, p, h, cos, sin):
        cfg, W = self.cfg, self.W
        H, d = cfg.n_self_heads, cfg.self_hd
        q = apply_rope(linear(h, W[p + "q_proj.weight"]).view(1, H, d), cos, sin)[0]
        k = apply_rope(linear(h, W[p + "k_proj.weight"]).view(1, H, d), cos, sin)[0]
        v = linear(h, W[p + "v_proj.weight"]).view(H, d)
        g = linear(h, W[p + "g_proj.weight"])
        gt = linear(h, W[p + "gt_proj.weight"]).view(H)
        decay = (F.logsigmoid(gt) / GATE_LOGIT_NORMALIZER).exp()  # [H]
        # S_t = exp(gamma_t) S_{t-1} + (k_t / sqrt d)^T v_t ; o_t = q_t S_t
        self.S[i] = decay[:, None, None] * self.S[i] + (k / math.sqrt(d))[:, :, None] * v[:, None, :]
        o = (q[:, None, :] @ self.S[i])[:, 0, :]  # [H, d]
        o = rms_norm(o, None, cfg.norm_eps).reshape(1, H * d)
        o = F.silu(g) * o
        return linear(o, W[p + "out_proj.weight"])

    def _swa_step(self, i, p, h, cos, sin):
        cfg, W = self.cfg, self.W
        H, d, Wn = cfg.n_self_heads, cfg.self_hd, cfg.sliding_window
        q = apply_rope(linear(h, W[p + "q_proj.weight"]).view(1, H, d), cos, sin)[0]
        k = apply_rope(linear(h, W[p + "k_proj.weight"]).view(1, H, d), cos, sin)[0]
        v = linear(h, W[p + "v_proj.weight"]).view(H, d)
        keys = torch.stack(self.win_k[i] + [k])  # [n<=W, H, d]
        vals = torch.stack(self.win_v[i] + [v])
        scores = torch.einsum("hd,nhd->hn", q, keys) / math.sqrt(d)
        o = torch.einsum("hn,nhd->hd", scores.softmax(-1), vals).reshape(1, H * d)
        # keep only the last W-1 for the next step
        self.win_k[i] = (self.win_k[i] + [k])[max(0, len(self.win_k[i]) + 1 - (Wn - 1)):]
        self.win_v[i] = (self.win_v[i] + [v])[max(0, len(self.win_v[i]) + 1 - (Wn - 1)):]
        return linear(o, W[p + "out_proj.weight"])

    def step(self, token):
        """Feed one token at position self.pos; return logits [vocab]."""
        cfg, W = self.cfg, self.W
        pos = torch.tensor([self.pos])
        x = W["embed_tokens.weight"][torch.tensor([token])] * math.sqrt(cfg.dim)
        cos, sin = rope_cos_sin(pos, cfg.self_hd, cfg.rope_theta)
        for i in range(cfg.n_half):
            p = f"self_decoder.layers.{i}."
            h = rms_norm(x, W[p + "mixer_layer_norm.weight"], cfg.norm_eps)
            if cfg.sliding_window is None:
                x = x + self._retention_step(i, p + "mixer.", h, cos, sin)
            else:
                x = x + self._swa_step(i, p + "mixer.", h, cos, sin)
            x = x + ffn(rms_norm(x, W[p + "final_layer_norm.weight"], cfg.norm_eps), W, p + "ffn.")
        cos_c, sin_c = rope_cos_sin(pos, cfg.cross_hd, cfg.rope_theta)
        k, v = global_kv(cfg, W, x, cos_c, sin_c)
        self.K = torch.cat([self.K, k])
        self.V = torch.cat([self.V, v])
        y = cross_layers(cfg, W, x, self.K, self.V, pos)
        self.pos += 1
        return head(cfg, W, y)[0]

    def prefill_parallel(self, tokens):
        """Prefill a fresh state with the parallel forms (as a server would):
        self-decoder + K/V over all tokens, final retention state in closed form
        S_T = sum_s exp(G_T - G_s) (k_s/sqrt d)^T v_s, window cache = last W-1
        keys/values; cross-decoder only for the last token. Returns its logits."""
        assert self.pos == 0
        cfg, W = self.cfg, self.W
        T = tokens.shape[0]
        pos = torch.arange(T)
        x = W["embed_tokens.weight"][tokens] * math.sqrt(cfg.dim)
        cos, sin = rope_cos_sin(pos, cfg.self_hd, cfg.rope_theta)
        H, d = cfg.n_self_heads, cfg.self_hd
        for i in range(cfg.n_half):
            p = f"self_decoder.layers.{i}."
            h = rms_norm(x, W[p + "mixer_layer_norm.weight"], cfg.norm_eps)
            m = p + "mixer."
            k = apply_rope(linear(h, W[m + "k_proj.weight"]).view(T, H, d), cos, sin)
            v = linear(h, W[m + "v_proj.weight"]).view(T, H, d)
            if cfg.sliding_window is None:
                gamma = F.logsigmoid(linear(h, W[m + "gt_proj.weight"])) / GATE_LOGIT_NORMALIZER
                G = gamma.cumsum(0)  # [T, H]
                wts = (G[-1][None, :] - G).exp()  # [T, H]
                self.S[i] = torch.einsum("th,thd,the->hde", wts, k / math.sqrt(d), v)
                x = x + retention_parallel(cfg, W, m, h, cos, sin)
            else:
                n = cfg.sliding_window - 1
                self.win_k[i] = [k[t] for t in range(max(0, T - n), T)] if n > 0 else []
                self.win_v[i] = [v[t] for t in range(max(0, T - n), T)] if n > 0 else []
                x = x + swa_parallel(cfg, W, m, h, cos, sin)
            x = x + ffn(rms_norm(x, W[p + "final_layer_norm.weight"], cfg.norm_eps), W, p + "ffn.")
        cos_c, sin_c = rope_cos_sin(pos, cfg.cross_hd, cfg.rope_theta)
        self.K, self.V = global_kv(cfg, W, x, cos_c, sin_c)
        self.pos = T
        y = cross_layers(cfg, W, x[-1:], self.K, self.V, pos[-1:])
        return head(cfg, W, y)[0]
