"""PyTorch eager inference of a YOCO checkpoint, timed: the baseline `yoco bench --torch` prints
beside yoco's own figures, in the same run and on the same model.

It serves a prompt the way a PyTorch user would write YOCO inference (and the way yoco does):
the self-decoder over the whole prompt with chunkwise gated retention (the official chunk of
256), the global K/V of every position, the cross-decoder for the last position only; then
greedy decode, each token one step of the recurrent retention and of cross-attention over the
cache. The model is `tools/train/model.py` (checked against the independent reference there),
in float32 or converted with `model.to(torch.bfloat16)` (oneDNN's bf16 kernels, every tensor
in bf16), under `torch.inference_mode()`.

    python tools/bench/torch_yoco.py MODEL_DIR --lengths 4096,16384 --dtypes f32,bf16

prints one JSON object: for each dtype and length the prefill seconds, the decode tokens/s at
that context, and the greedy token and its logit after the prompt (so the caller can check that
both ran the same model).
"""

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "train"))
from model import GATE_LOGIT_NORMALIZER, Yoco, apply_rope, rms_norm, rope_cos_sin  # noqa: E402

CHUNK = int(os.environ.get("YOCO_TORCH_CHUNK", "256"))


def load(model_dir):
    with open(os.path.join(model_dir, "params.json")) as f:
        cfg = json.load(f)
    if "sliding_window" in cfg:
        sys.exit("torch_yoco.py: only gated retention models (no sliding_window)")
    weights = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(model_dir, name)))
    weights = {k: v.to(torch.float32) for k, v in weights.items()}
    weights.setdefault("output_projection.weight", weights["embed_tokens.weight"])
    model = Yoco(cfg)
    model.load_official(weights)
    return model.eval()


def retention_prefill(mixer, h, cos, sin):
    """Chunkwise gated retention over h [1, T, dim] -> output [1, T, dim] and the final state
    S [1, H, d, d] (keys scaled by 1/sqrt(d), as the recurrent form uses it)."""
    B, T, _ = h.shape
    H, d = mixer.heads, mixer.hd
    q = apply_rope(mixer.q_proj(h).view(B, T, H, d), cos, sin).transpose(1, 2)
    k = apply_rope(mixer.k_proj(h).view(B, T, H, d), cos, sin).transpose(1, 2) / math.sqrt(d)
    v = mixer.v_proj(h).view(B, T, H, d).transpose(1, 2)
    gamma = (F.logsigmoid(mixer.gt_proj(h)) / GATE_LOGIT_NORMALIZER).transpose(1, 2)
    S = q.new_zeros(B, H, d, d)
    outs = []
    causal = torch.ones(CHUNK, CHUNK, dtype=torch.bool).tril()
    for c0 in range(0, T, CHUNK):
        c1 = min(T, c0 + CHUNK)
        n = c1 - c0
        qc, kc, vc = q[:, :, c0:c1], k[:, :, c0:c1], v[:, :, c0:c1]
        G = gamma[:, :, c0:c1].cumsum(-1)
        diff = G[..., :, None] - G[..., None, :]
        decay = torch.where(causal[:n, :n], diff, torch.full_like(diff, float("-inf"))).exp()
        o = ((qc @ kc.transpose(-1, -2)) * decay) @ vc + (qc * G.exp()[..., None]) @ S
        outs.append(o)
        to_end = (G[..., -1:] - G).exp()[..., None]
        S = G[..., -1].exp()[..., None, None] * S + (kc * to_end).transpose(-1, -2) @ vc
    o = torch.cat(outs, dim=2)
    o = rms_norm(o, None, mixer.eps).transpose(1, 2).reshape(B, T, H * d)
    return mixer.out_proj(F.silu(mixer.g_proj(h)) * o), S


def retention_step(mixer, h, cos, sin, S):
    """One token h [1, 1, dim] through the recurrent form; updates S in place."""
    H, d = mixer.heads, mixer.hd
    q = apply_rope(mixer.q_proj(h).view(1, 1, H, d), cos, sin).transpose(1, 2)
    k = apply_rope(mixer.k_proj(h).view(1, 1, H, d), cos, sin).transpose(1, 2) / math.sqrt(d)
    v = mixer.v_proj(h).view(1, 1, H, d).transpose(1, 2)
    decay = (F.logsigmoid(mixer.gt_proj(h)) / GATE_LOGIT_NORMALIZER).exp().view(1, H, 1, 1)
    S.mul_(decay).add_(k.transpose(-1, -2) @ v)
    o = rms_norm(q @ S, None, mixer.eps).transpose(1, 2).reshape(1, 1, H * d)
    return mixer.out_proj(F.silu(mixer.g_proj(h)) * o)


class Session:
    """One sequence: the self-decoder's states and the global K/V cache."""

    def __init__(self, model, capacity):
        cfg = model.cfg
        self.model, self.cfg = model, cfg
        self.hd = cfg["dim"] // cfg["n_attn_heads"]
        dtype = model.embed_tokens.weight.dtype
        self.K = torch.empty(1, cfg["n_attn_kv_heads"], capacity, self.hd, dtype=dtype)
        self.V = torch.empty_like(self.K)
        self.len = 0
        self.states = []

    def _kv(self, x, cos, sin):
        cd, B, T = self.model.cross_decoder, x.shape[0], x.shape[1]
        xn = rms_norm(x, cd.kv_layer_norm, self.cfg["norm_eps"])
        self.K[:, :, self.len : self.len + T] = apply_rope(cd.k_proj(xn).view(B, T, -1, self.hd), cos, sin).transpose(1, 2)
        self.V[:, :, self.len : self.len + T] = cd.v_proj(xn).view(B, T, -1, self.hd).transpose(1, 2)
        self.len += T

    def _cross(self, x, cos, sin):
        """The cross-decoder for the rows x [1, t, dim] (the last t positions), then logits."""
        cfg, m = self.cfg, self.model
        eps = cfg["norm_eps"]
        K, V = self.K[:, :, : self.len], self.V[:, :, : self.len]
        for layer in m.cross_decoder.layers:
            a = layer.mixer
            h = rms_norm(x, layer.mixer_layer_norm, eps)
            q = apply_rope(a.q_proj(h).view(1, x.shape[1], a.heads, a.hd), cos, sin).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, K, V, enable_gqa=True)  # the last rows see every key
            x = x + a.out_proj(o.transpose(1, 2).reshape(1, x.shape[1], -1))
            x = x + layer.ffn(rms_norm(x, layer.final_layer_norm, eps))
        return m.output_projection(rms_norm(x, m.layer_norm, eps))[0, -1]

    def prefill(self, tokens):
        cfg, m = self.cfg, self.model
        eps, theta = cfg["norm_eps"], cfg["rope_theta"]
        pos = torch.arange(tokens.shape[0])[None]
        x = m.embed_tokens(tokens[None]) * math.sqrt(cfg["dim"])
        cos, sin = rope_cos_sin(pos, cfg["dim"] // cfg["n_self_heads"], theta)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer in m.self_decoder.layers:
            o, S = retention_prefill(layer.mixer, rms_norm(x, layer.mixer_layer_norm, eps), cos, sin)
            self.states.append(S)
            x = x + o
            x = x + layer.ffn(rms_norm(x, layer.final_layer_norm, eps))
        cos, sin = rope_cos_sin(pos, self.hd, theta)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        self._kv(x, cos, sin)
        return self._cross(x[:, -1:], cos[:, -1:], sin[:, -1:])

    def decode(self, token):
        cfg, m = self.cfg, self.model
        eps, theta = cfg["norm_eps"], cfg["rope_theta"]
        pos = torch.tensor([[self.len]])
        x = m.embed_tokens(torch.tensor([[token]])) * math.sqrt(cfg["dim"])
        cos, sin = rope_cos_sin(pos, cfg["dim"] // cfg["n_self_heads"], theta)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer, S in zip(m.self_decoder.layers, self.states):
            x = x + retention_step(layer.mixer, rms_norm(x, layer.mixer_layer_norm, eps), cos, sin, S)
            x = x + layer.ffn(rms_norm(x, layer.final_layer_norm, eps))
        cos, sin = rope_cos_sin(pos, self.hd, theta)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        self._kv(x, cos, sin)
        return self._cross(x, cos, sin)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--lengths", default="4096,16384,32768")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--dtypes", default="f32,bf16")
    p.add_argument("--threads", type=int, default=0, help="0: PyTorch's default")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "chunk": CHUNK, "runs": []}
    for name in args.dtypes.split(","):
        dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[name]
        model = load(args.model_dir).to(dtype)
        with torch.inference_mode():  # warm-up: oneDNN builds its kernels on first use
            Session(model, 1024).prefill(torch.arange(1024))
        for n in (int(s) for s in args.lengths.split(",")):
            tokens = torch.tensor([(i * 7919) % 50000 for i in range(n)])
            with torch.inference_mode():
                s = Session(model, n + args.decode_tokens)
                started = time.perf_counter()
                logits = s.prefill(tokens)
                prefill = time.perf_counter() - started
                top = int(logits.argmax())
                first = (top, float(logits[top]))
                started = time.perf_counter()
                for _ in range(args.decode_tokens):
                    top = int(s.decode(top).argmax())
                decode = args.decode_tokens / (time.perf_counter() - started)
            out["runs"].append({
                "dtype": name, "context": n, "prefill_seconds": prefill, "decode_tokens_per_second": decode,
                "greedy_token": first[0], "greedy_logit": first[1],
            })
            print(f"torch {name} {n}: prefill {n / prefill:.0f} tok/s, decode {decode:.1f} tok/s", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
