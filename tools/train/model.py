"""A trainable, batched YOCO with gated retention (arXiv 2405.05254), in plain PyTorch.

The math is that of `tools/reference/yoco_ref.py` (and so of yoco's engine), batched and with
explicit position ids so that training can skip positions (PoSE, below). Parameter names are
the official state-dict names (`../shared/docs/yoco-model.md`), so `state_dict()` is the
checkpoint. `check_against_reference` runs both on one sequence and compares them.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

GATE_LOGIT_NORMALIZER = 16.0


def rms_norm(x, weight, eps):
    out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return out if weight is None else out * weight


def rope_cos_sin(positions, head_dim, theta):
    """positions [B, T] -> cos, sin [B, T, 1, hd/2], the angles computed in float32 as the
    official build_rel_pos does."""
    angle = 1.0 / (theta ** torch.linspace(0, 1, head_dim // 2, dtype=torch.float32))
    freqs = positions.to(torch.float32)[..., None] * angle
    return torch.cos(freqs)[:, :, None, :], torch.sin(freqs)[:, :, None, :]


def apply_rope(x, cos, sin):
    """Interleaved (GPT-J) rotary embedding of x [B, T, H, hd]."""
    xe, xo = x[..., 0::2], x[..., 1::2]
    return torch.stack([xe * cos - xo * sin, xo * cos + xe * sin], dim=-1).flatten(-2)


def linear(d_in, d_out):
    return nn.Linear(d_in, d_out, bias=False)


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.gate, self.fc2 = linear(dim, hidden), linear(dim, hidden), linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)) * self.gate(x))


class GatedRetention(nn.Module):
    def __init__(self, dim, heads, eps):
        super().__init__()
        self.heads, self.hd, self.eps = heads, dim // heads, eps
        self.q_proj, self.k_proj, self.v_proj, self.g_proj = (linear(dim, dim) for _ in range(4))
        self.gt_proj = linear(dim, heads)
        self.out_proj = linear(dim, dim)

    chunk = 64

    def forward(self, h, cos, sin):
        B, T, _ = h.shape
        H, d = self.heads, self.hd
        q = apply_rope(self.q_proj(h).view(B, T, H, d), cos, sin).transpose(1, 2)  # [B, H, T, d]
        k = apply_rope(self.k_proj(h).view(B, T, H, d), cos, sin).transpose(1, 2) / math.sqrt(d)
        v = self.v_proj(h).view(B, T, H, d).transpose(1, 2)
        gamma = (F.logsigmoid(self.gt_proj(h)) / GATE_LOGIT_NORMALIZER).transpose(1, 2)  # [B, H, T]
        o = retention_chunkwise(q, k, v, gamma, self.chunk)
        o = rms_norm(o, None, self.eps).transpose(1, 2).reshape(B, T, H * d)
        return self.out_proj(F.silu(self.g_proj(h)) * o)


def retention_chunkwise(q, k, v, gamma, chunk):
    """o_t = sum_{s<=t} exp(G_t - G_s) (q_t . k_s) v_s with G = cumsum(gamma), computed chunk by
    chunk: inside a chunk the parallel form (a chunk x chunk decay matrix), across chunks the
    recurrent state S (d x d per head). The same sum as the plain parallel form, in O(T chunk)."""
    B, H, T, d = q.shape
    S = q.new_zeros(B, H, d, d)
    outs = []
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        n = c1 - c0
        qc, kc, vc = q[:, :, c0:c1], k[:, :, c0:c1], v[:, :, c0:c1]
        G = gamma[:, :, c0:c1].cumsum(-1)  # within the chunk, G[0] = gamma[c0]
        diff = G[..., :, None] - G[..., None, :]
        decay = torch.where(causal[:n, :n], diff, torch.full_like(diff, float("-inf"))).exp()
        o = ((qc @ kc.transpose(-1, -2)) * decay) @ vc
        o = o + (qc * G.exp()[..., None]) @ S  # state from before the chunk, decayed to each t
        outs.append(o)
        to_end = (G[..., -1:] - G).exp()[..., None]  # [B, H, n, 1]
        S = G[..., -1].exp()[..., None, None] * S + (kc * to_end).transpose(-1, -2) @ vc
    return torch.cat(outs, dim=2)


class CrossAttention(nn.Module):
    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.q_proj, self.out_proj = linear(dim, dim), linear(dim, dim)

    def forward(self, h, cos, sin, K, V, mask=None):
        """K, V [B, Hkv, T, hd]; query t sees keys 0..t, or as the additive `mask`
        [B, 1, T, T] says (the causal mask plus a training-only bias, see `Yoco.forward`)."""
        B, T, _ = h.shape
        q = apply_rope(self.q_proj(h).view(B, T, self.heads, self.hd), cos, sin).transpose(1, 2)
        rep = self.heads // self.kv_heads  # query head j uses kv head j // rep
        o = F.scaled_dot_product_attention(
            q, K.repeat_interleave(rep, dim=1), V.repeat_interleave(rep, dim=1),
            attn_mask=mask, is_causal=mask is None,
        )
        return self.out_proj(o.transpose(1, 2).reshape(B, T, -1))


class Layer(nn.Module):
    def __init__(self, dim, hidden, mixer):
        super().__init__()
        self.mixer_layer_norm = nn.Parameter(torch.ones(dim))
        self.mixer = mixer
        self.final_layer_norm = nn.Parameter(torch.ones(dim))
        self.ffn = FeedForward(dim, hidden)


class SelfDecoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(
            Layer(cfg["dim"], cfg["hidden_dim"], GatedRetention(cfg["dim"], cfg["n_self_heads"], cfg["norm_eps"]))
            for _ in range(cfg["n_layers"] // 2)
        )


class CrossDecoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim, kv = cfg["dim"], cfg["n_attn_kv_heads"] * (cfg["dim"] // cfg["n_attn_heads"])
        self.kv_layer_norm = nn.Parameter(torch.ones(dim))
        self.k_proj, self.v_proj = linear(dim, kv), linear(dim, kv)
        self.layers = nn.ModuleList(
            Layer(dim, cfg["hidden_dim"], CrossAttention(dim, cfg["n_attn_heads"], cfg["n_attn_kv_heads"]))
            for _ in range(cfg["n_layers"] // 2)
        )


class Yoco(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        dim = cfg["dim"]
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], dim)
        self.self_decoder = SelfDecoder(cfg)
        self.cross_decoder = CrossDecoder(cfg)
        self.layer_norm = nn.Parameter(torch.ones(dim))
        self.output_projection = linear(dim, cfg["vocab_size"])

    def init_weights(self, generator):
        """Normal(0, 0.02) projections, the residual outputs scaled by 1/sqrt(2 n_layers),
        embeddings Normal(0, dim^-1/2) (the forward multiplies them by sqrt(dim))."""
        dim, n = self.cfg["dim"], self.cfg["n_layers"]
        for name, p in self.named_parameters():
            if p.dim() == 1:
                continue
            if name == "embed_tokens.weight":
                std = dim**-0.5
            elif name.endswith(("out_proj.weight", "fc2.weight")):
                std = 0.02 / math.sqrt(2 * n)
            else:
                std = 0.02
            with torch.no_grad():
                p.normal_(0.0, std, generator=generator)

    def state_dict_official(self):
        """The checkpoint: official names (norm weights are stored as `<norm>.weight`)."""
        out = {}
        for name, p in self.named_parameters():
            if name.endswith("layer_norm"):
                name += ".weight"
            out[name] = p.detach().clone().contiguous()
        return out

    def load_official(self, weights):
        """Loads a checkpoint written by `state_dict_official`."""
        self.load_state_dict({k.removesuffix(".weight") if k.endswith("layer_norm.weight") else k: v
                              for k, v in weights.items()})

    def forward(self, tokens, positions, key_bias=None, twin=None):
        """tokens, positions [B, T] (positions increasing along T) -> logits [B, T, vocab].

        `key_bias` [B, T, T] (training only, the "virtual haystack"): added to every
        cross-attention logit of query row r and key column k (k <= r); a bias of ln(N/n) on n
        filler keys weighs them as N filler keys would, so the model learns the logit margin a
        haystack of N tokens needs without running one. None: plain causal attention, the
        served model.

        `twin` (training only): (rows [n], twin tokens [n, T], split [n]). Row rows[i]'s
        self-decoder output from split[i] on is that of its twin, a sequence equal to it from
        split[i] on but with the retrieval task's answer-bearing tokens (the needle's key, the
        first copy, the recall values) replaced before it. That is the row continued from the
        twin's retention state: the global K/V before split[i] still hold the answer, the state
        does not, so the answer can only come from the cache, the part of YOCO that retrieves at
        any distance (gated retention's state decays)."""
        cfg = self.cfg
        eps, theta = cfg["norm_eps"], cfg["rope_theta"]
        B, T = tokens.shape
        if twin is not None:
            rows, twin_tokens, split = twin
            tokens = torch.cat([tokens, twin_tokens])
            positions = torch.cat([positions, positions[rows]])
        x = self.embed_tokens(tokens) * math.sqrt(cfg["dim"])
        cos, sin = rope_cos_sin(positions, cfg["dim"] // cfg["n_self_heads"], theta)
        for layer in self.self_decoder.layers:
            x = x + layer.mixer(rms_norm(x, layer.mixer_layer_norm, eps), cos, sin)
            x = x + layer.ffn(rms_norm(x, layer.final_layer_norm, eps))
        if twin is not None:
            late = torch.arange(T, device=x.device)[None, :, None] >= split[:, None, None]
            real, spliced = x[:B], torch.where(late, x[B:], x[rows])
            x, positions = real.index_put((rows,), spliced), positions[:B]
        cd = self.cross_decoder
        hd = cfg["dim"] // cfg["n_attn_heads"]
        cos, sin = rope_cos_sin(positions, hd, theta)
        xn = rms_norm(x, cd.kv_layer_norm, eps)
        K = apply_rope(cd.k_proj(xn).view(B, T, -1, hd), cos, sin).transpose(1, 2)
        V = cd.v_proj(xn).view(B, T, -1, hd).transpose(1, 2)
        mask = None
        if key_bias is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            mask = torch.where(causal, key_bias.to(x.dtype), torch.tensor(float("-inf"), dtype=x.dtype))[:, None]
        for layer in cd.layers:
            x = x + layer.mixer(rms_norm(x, layer.mixer_layer_norm, eps), cos, sin, K, V, mask)
            x = x + layer.ffn(rms_norm(x, layer.final_layer_norm, eps))
        return self.output_projection(rms_norm(x, self.layer_norm, eps))


def check_against_reference(model, tokens):
    """Logits of this model and of the independent reference on one sequence (positions
    0..T-1), both in float64; returns the largest absolute difference."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "reference"))
    import yoco_ref

    W = {k: v.to(torch.float64) for k, v in model.state_dict_official().items()}
    params = dict(model.cfg)
    ref = yoco_ref.forward_full(yoco_ref.Config(params), W, tokens)
    m64 = Yoco(model.cfg).to(torch.float64)
    m64.load_state_dict({k: v.to(torch.float64) for k, v in model.state_dict().items()})
    with torch.no_grad():
        ours = m64(tokens[None], torch.arange(tokens.shape[0])[None])[0]
    return (ours - ref).abs().max().item()
