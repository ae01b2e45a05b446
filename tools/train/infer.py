"""YOCO inference in PyTorch eager, the way yoco serves: the self-decoder over the prompt in
pieces, carrying gated retention's state from piece to piece (chunkwise inside a piece, in the
official blocks of 256), the global K/V of every position kept, and the cross-decoder only for
the rows that need logits (the last prompt token, or a teacher-forced tail); then greedy decode
one token at a time (the recurrent retention step, cross-attention over the cache).

`tools/bench/torch_yoco.py` times it against yoco; `eval_tail.py` measures passkey retrieval
with it at lengths where the training model's full forward would not fit (1M tokens: the
self-decoder in 16K pieces, K/V 1 KiB per token).
"""

import json
import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from model import GATE_LOGIT_NORMALIZER, Yoco, apply_rope, rms_norm, rope_cos_sin

BLOCK = 256


def load(model_dir, dtype=torch.float32):
    """A model directory (params.json, *.safetensors; gated retention only) as the training
    model in `dtype` (converted from f32, as `model.to(dtype)` does), in eval mode."""
    with open(os.path.join(model_dir, "params.json")) as f:
        cfg = json.load(f)
    if "sliding_window" in cfg:
        raise SystemExit(f"{model_dir}: only gated retention models (no sliding_window)")
    weights = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(model_dir, name)))
    weights = {k: v.to(torch.float32) for k, v in weights.items()}
    weights.setdefault("output_projection.weight", weights["embed_tokens.weight"])  # tied
    model = Yoco(cfg)
    model.load_official(weights)
    return model.to(dtype).eval()


def retention(mixer, h, cos, sin, S=None):
    """Gated retention over h [1, T, dim] from the state S [1, H, d, d] (zeros if None; keys
    scaled by 1/sqrt(d), as the recurrent form keeps it) -> (output [1, T, dim], state after)."""
    B, T, _ = h.shape
    H, d = mixer.heads, mixer.hd
    q = apply_rope(mixer.q_proj(h).view(B, T, H, d), cos, sin).transpose(1, 2)
    k = apply_rope(mixer.k_proj(h).view(B, T, H, d), cos, sin).transpose(1, 2) / math.sqrt(d)
    v = mixer.v_proj(h).view(B, T, H, d).transpose(1, 2)
    gamma = (F.logsigmoid(mixer.gt_proj(h)) / GATE_LOGIT_NORMALIZER).transpose(1, 2)
    S = q.new_zeros(B, H, d, d) if S is None else S
    outs = []
    causal = torch.ones(BLOCK, BLOCK, dtype=torch.bool).tril()
    for c0 in range(0, T, BLOCK):
        c1 = min(T, c0 + BLOCK)
        n = c1 - c0
        qc, kc, vc = q[:, :, c0:c1], k[:, :, c0:c1], v[:, :, c0:c1]
        G = gamma[:, :, c0:c1].cumsum(-1)
        diff = G[..., :, None] - G[..., None, :]
        decay = torch.where(causal[:n, :n], diff, torch.full_like(diff, float("-inf"))).exp()
        outs.append(((qc @ kc.transpose(-1, -2)) * decay) @ vc + (qc * G.exp()[..., None]) @ S)
        to_end = (G[..., -1:] - G).exp()[..., None]
        S = G[..., -1].exp()[..., None, None] * S + (kc * to_end).transpose(-1, -2) @ vc
    o = torch.cat(outs, dim=2)
    o = rms_norm(o, None, mixer.eps).transpose(1, 2).reshape(B, T, H * d)
    return mixer.out_proj(F.silu(mixer.g_proj(h)) * o), S


def retention_step(mixer, h, cos, sin, S):
    """One token h [1, 1, dim] through the recurrent form from the state S -> (output, state
    after): a new tensor, never S changed in place (S may be saved for a backward pass)."""
    H, d = mixer.heads, mixer.hd
    q = apply_rope(mixer.q_proj(h).view(1, 1, H, d), cos, sin).transpose(1, 2)
    k = apply_rope(mixer.k_proj(h).view(1, 1, H, d), cos, sin).transpose(1, 2) / math.sqrt(d)
    v = mixer.v_proj(h).view(1, 1, H, d).transpose(1, 2)
    decay = (F.logsigmoid(mixer.gt_proj(h)) / GATE_LOGIT_NORMALIZER).exp().view(1, H, 1, 1)
    S = S * decay + k.transpose(-1, -2) @ v
    o = rms_norm(q @ S, None, mixer.eps).transpose(1, 2).reshape(1, 1, H * d)
    return mixer.out_proj(F.silu(mixer.g_proj(h)) * o), S


def rope(cfg, positions, head_dim, dtype):
    cos, sin = rope_cos_sin(positions, head_dim, cfg["rope_theta"])
    return cos.to(dtype), sin.to(dtype)


def self_decoder(model, tokens, positions, states):
    """tokens [T] at positions [1, T] through the self-decoder from the retention states (a
    list, one per layer, None for zeros; replaced by the states after) -> [1, T, dim]. One token
    after a state takes the recurrent step."""
    cfg = model.cfg
    eps = cfg["norm_eps"]
    x = model.embed_tokens(tokens[None]) * math.sqrt(cfg["dim"])
    cos, sin = rope(cfg, positions, cfg["dim"] // cfg["n_self_heads"], x.dtype)
    for i, layer in enumerate(model.self_decoder.layers):
        h = rms_norm(x, layer.mixer_layer_norm, eps)
        if tokens.shape[0] == 1 and states[i] is not None:
            o, states[i] = retention_step(layer.mixer, h, cos, sin, states[i])
        else:
            o, states[i] = retention(layer.mixer, h, cos, sin, states[i])
        x = x + o
        x = x + layer.ffn(rms_norm(x, layer.final_layer_norm, eps))
    return x


def global_kv(model, x, positions):
    """The global K (rotated) and V [1, Hkv, T, hd] of the self-decoder's output x [1, T, dim]."""
    cfg, cd, T = model.cfg, model.cross_decoder, x.shape[1]
    hd = cfg["dim"] // cfg["n_attn_heads"]
    cos, sin = rope(cfg, positions, hd, x.dtype)
    xn = rms_norm(x, cd.kv_layer_norm, cfg["norm_eps"])
    K = apply_rope(cd.k_proj(xn).view(1, T, -1, hd), cos, sin).transpose(1, 2)
    return K, cd.v_proj(xn).view(1, T, -1, hd).transpose(1, 2)


def cross_decoder(model, x, positions, K, V, mask=None):
    """The cross-decoder and logits for the rows x [1, t, dim] at positions [1, t] over the
    global K/V, attention masked by `mask` ([t, len] bool or additive float; None: every key)
    -> logits [t, vocab]."""
    cfg = model.cfg
    eps, t = cfg["norm_eps"], x.shape[1]
    cos, sin = rope(cfg, positions, cfg["dim"] // cfg["n_attn_heads"], x.dtype)
    for layer in model.cross_decoder.layers:
        a = layer.mixer
        h = rms_norm(x, layer.mixer_layer_norm, eps)
        q = apply_rope(a.q_proj(h).view(1, t, a.heads, a.hd), cos, sin).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, K, V, attn_mask=mask, enable_gqa=True)
        x = x + a.out_proj(o.transpose(1, 2).reshape(1, t, -1))
        x = x + layer.ffn(rms_norm(x, layer.final_layer_norm, eps))
    return model.output_projection(rms_norm(x, model.layer_norm, eps))[0]


class Session:
    """One sequence: the self-decoder's retention states and the global K/V cache."""

    def __init__(self, model, capacity):
        cfg = model.cfg
        self.model, self.cfg = model, cfg
        self.hd = cfg["dim"] // cfg["n_attn_heads"]
        dtype = model.embed_tokens.weight.dtype
        self.K = torch.empty(1, cfg["n_attn_kv_heads"], capacity, self.hd, dtype=dtype)
        self.V = torch.empty_like(self.K)
        self.len = 0
        self.states = [None] * len(model.self_decoder.layers)

    def _append_kv(self, x, pos):
        T = x.shape[1]
        self.K[:, :, self.len : self.len + T], self.V[:, :, self.len : self.len + T] = global_kv(self.model, x, pos)
        self.len += T

    def feed(self, tokens, piece=None, keep=1):
        """Appends the prompt tokens [T] in pieces of `piece` tokens (all at once if None):
        states carried, K/V cached. Returns the self-decoder output of the last `keep` tokens
        [1, keep, dim], for `cross`."""
        T = tokens.shape[0]
        piece = piece or T
        tail = []
        for p0 in range(0, T, piece):
            part = tokens[p0 : p0 + piece]
            pos = torch.arange(self.len, self.len + part.shape[0])[None]
            x = self_decoder(self.model, part, pos, self.states)
            self._append_kv(x, pos)
            tail.append(x[:, -keep:])
        return torch.cat(tail, dim=1)[:, -keep:]

    def cross(self, x):
        """The cross-decoder and logits for the last rows x [1, t, dim] of the cached sequence:
        row i sees the keys up to its own position. -> logits [t, vocab]."""
        t = x.shape[1]
        pos = torch.arange(self.len - t, self.len)[None]
        mask = None
        if t > 1:
            mask = torch.arange(self.len)[None, :] <= pos[0][:, None]  # [t, len]
        return cross_decoder(self.model, x, pos, self.K[:, :, : self.len], self.V[:, :, : self.len], mask)

    def prefill(self, tokens, piece=None):
        """The prompt's last logits [vocab] (early exit: the cross-decoder for one row)."""
        return self.cross(self.feed(tokens, piece))[-1]

    def decode(self, token):
        """Appends one token; its logits [vocab]."""
        t = torch.tensor([token])
        x = self_decoder(self.model, t, torch.tensor([[self.len]]), self.states)
        self._append_kv(x, torch.tensor([[self.len]]))
        return self.cross(x)[-1]


def check_against_model(model, tokens, piece, tail):
    """Largest |logit difference| between the training model's full forward and a Session fed
    `tokens` in pieces of `piece` tokens with the cross-decoder on the last `tail` rows, then
    two decode steps; both in float64."""
    m64 = type(model)(model.cfg).to(torch.float64)
    m64.load_state_dict({k: v.to(torch.float64) for k, v in model.state_dict().items()})
    extra = [7, 11]
    full_tokens = torch.cat([tokens, torch.tensor(extra)])
    with torch.no_grad():
        want = m64(full_tokens[None], torch.arange(full_tokens.shape[0])[None])[0]
        s = Session(m64, full_tokens.shape[0])
        got = s.cross(s.feed(tokens, piece, keep=tail))
        err = (got - want[tokens.shape[0] - tail : tokens.shape[0]]).abs().max().item()
        for i, t in enumerate(extra):
            err = max(err, (s.decode(t) - want[tokens.shape[0] + i]).abs().max().item())
    return err


if __name__ == "__main__":
    cfg = {"dim": 64, "n_layers": 4, "hidden_dim": 96, "n_self_heads": 2, "n_attn_heads": 4,
           "n_attn_kv_heads": 2, "vocab_size": 97, "rope_theta": 1e4, "norm_eps": 1e-5}
    m = Yoco(cfg)
    m.init_weights(torch.Generator().manual_seed(3))
    toks = torch.randint(0, 97, (700,), generator=torch.Generator().manual_seed(4))
    for piece, tail in [(None, 1), (300, 5), (256, 300), (1, 3)]:
        err = check_against_model(m, toks, piece, tail)
        print(f"pieces of {piece}, tail {tail}: max |logit diff| vs the full forward {err:.2e}")
        assert err < 1e-9, err
