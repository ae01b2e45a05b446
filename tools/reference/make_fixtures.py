#!/usr/bin/env python3
"""Generate the golden YOCO fixtures under worker/tests/fixtures/.

Deterministic (fixed seeds, CPU only). Run from anywhere:
    pip install -r tools/reference/requirements.txt
    python tools/reference/make_fixtures.py
It self-checks the reference (incremental vs parallel paths) before writing.
"""

import json
import math
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import yoco_ref as R  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
OUT = os.path.join(REPO, "worker", "tests", "fixtures")

REF_DTYPE = torch.float64     # compute dtype of the golden numbers
N_GREEDY = 8
MIN_GREEDY_MARGIN = 0.05      # top1 - top2 logit gap required for every greedy step
MIN_DISTINCT_GREEDY = 4       # the greedy continuation must not just repeat one token

BASE = dict(dim=32, n_layers=4, hidden_dim=64, n_self_heads=4, n_attn_heads=4,
            n_attn_kv_heads=2, vocab_size=96, rope_theta=10000.0, norm_eps=1e-5)

FIXTURES = [
    # name, params, stored dtype, tied, split, prompt length, seed
    ("gret", dict(BASE), torch.float32, False, False, 300, 1001),
    ("swa", dict(BASE, sliding_window=5), torch.float32, False, False, 300, 1002),
    # head counts differ from the others on purpose: self head dim 16 != cross head dim 8,
    # multi-query (1 kv head); "sliding_window": null written explicitly.
    ("gret_bf16_tied", dict(BASE, rope_theta=500000.0, n_self_heads=2, n_attn_heads=4,
                            n_attn_kv_heads=1, sliding_window=None),
     torch.bfloat16, True, True, 37, 1003),
    # self head dim 4, cross head dim 16, no grouping (2 q heads, 2 kv heads).
    ("swa_f16", dict(BASE, sliding_window=3, n_self_heads=8, n_attn_heads=2, n_attn_kv_heads=2),
     torch.float16, False, False, 37, 1004),
]


def make_weights(cfg, gen, tied, out_scale=1.0):
    """Random weights (float32) with meaningful scale.

    Embeddings carry a shared component along a unit direction u so that gt_proj rows
    aligned with +-u give gates that are consistently slow / fast; other heads get
    random (data dependent) gates of very different scales.
    """
    D, V, Hd = cfg.dim, cfg.vocab_size, cfg.hidden_dim
    W = {}

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    def lin(out, inp, scale=1.0):
        return randn(out, inp) * (scale / math.sqrt(inp))

    def norm(n):
        return 1.0 + 0.1 * randn(n)

    u = randn(D)
    u = u / u.norm()
    W["embed_tokens.weight"] = (randn(V, D) + 3.0 * u[None, :]) / math.sqrt(D)

    def ffn(p):
        W[p + "ffn.fc1.weight"] = lin(Hd, D)
        W[p + "ffn.gate.weight"] = lin(Hd, D)
        W[p + "ffn.fc2.weight"] = lin(D, Hd, out_scale)

    for i in range(cfg.n_half):
        p = f"self_decoder.layers.{i}."
        W[p + "mixer_layer_norm.weight"] = norm(D)
        m = p + "mixer."
        if cfg.sliding_window is None:
            W[m + "q_proj.weight"] = lin(D, D)
            W[m + "k_proj.weight"] = lin(D, D)
            W[m + "v_proj.weight"] = lin(D, D)
            W[m + "g_proj.weight"] = lin(D, D)
            rows = []
            for h in range(cfg.n_self_heads):
                kind = (h + i) % 4
                if kind == 0:    # gt ~ +8: almost no decay (long memory)
                    rows.append(3.0 * u)
                elif kind == 1:  # gt ~ -2.7: decay ~0.84 per token
                    rows.append(-1.0 * u + randn(D) / math.sqrt(D))
                elif kind == 2:  # gt ~ +1.3: decay ~0.985 per token
                    rows.append(0.5 * u + randn(D) / math.sqrt(D))
                else:            # gt ~ N(0, 16^2): strongly data dependent, resets
                    rows.append(16.0 * randn(D) / math.sqrt(D))
            W[m + "gt_proj.weight"] = torch.stack(rows)
        else:
            W[m + "q_proj.weight"] = lin(D, D, 2.0)
            W[m + "k_proj.weight"] = lin(D, D)
            W[m + "v_proj.weight"] = lin(D, D)
        W[m + "out_proj.weight"] = lin(D, D, out_scale)
        W[p + "final_layer_norm.weight"] = norm(D)
        ffn(p)

    kv = cfg.n_attn_kv_heads * cfg.cross_hd
    W["cross_decoder.kv_layer_norm.weight"] = norm(D)
    W["cross_decoder.k_proj.weight"] = lin(kv, D)
    W["cross_decoder.v_proj.weight"] = lin(kv, D)
    for j in range(cfg.n_half):
        p = f"cross_decoder.layers.{j}."
        W[p + "mixer_layer_norm.weight"] = norm(D)
        W[p + "mixer.q_proj.weight"] = lin(D, D, 2.0)
        W[p + "mixer.out_proj.weight"] = lin(D, D, out_scale)
        W[p + "final_layer_norm.weight"] = norm(D)
        ffn(p)
    W["layer_norm.weight"] = norm(D)
    if not tied:
        W["output_projection.weight"] = lin(V, D, 2.0)
    return W


def greedy_incremental(cfg, W, prompt):
    """Parallel prefill + recurrent decode. Returns (tokens, logits rows)."""
    inc = R.Incremental(cfg, W)
    logits = inc.prefill_parallel(prompt)
    toks, rows = [], []
    for n in range(N_GREEDY):
        rows.append(logits)
        t = int(logits.argmax())
        toks.append(t)
        if n + 1 < N_GREEDY:
            logits = inc.step(t)
    return torch.tensor(toks, dtype=torch.int64), torch.stack(rows)


def margin(rows):
    top2 = rows.topk(2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).min())


def maxdiff(a, b):
    return float((a.double() - b.double()).abs().max())


def check_reference(name, cfg, W, prompt, full, greedy, greedy_logits, tol):
    """Self-checks of the reference: all paths must agree."""
    # 1. token-by-token recurrent path over the whole prompt vs parallel logits
    inc = R.Incremental(cfg, W)
    step_rows = torch.stack([inc.step(int(t)) for t in prompt])
    d1 = maxdiff(step_rows, full)
    # 2. the same recurrent state continued with the greedy tokens
    more = [step_rows[-1]] + [inc.step(int(t)) for t in greedy[:-1]]
    d2 = maxdiff(torch.stack(more), greedy_logits)
    # 3. parallel prefill + decode (greedy path) row 0 vs parallel logits
    d3 = maxdiff(greedy_logits[0], full[-1])
    # 4. full parallel forward over prompt + greedy tokens reproduces the decode logits
    ext = torch.cat([prompt, greedy[:-1]])
    full_ext = R.forward_full(cfg, W, ext)
    d4 = maxdiff(full_ext[len(prompt) - 1:], greedy_logits)
    d5 = maxdiff(full_ext[:len(prompt)], full)
    ds = dict(step_vs_parallel=d1, step_decode_vs_prefill_decode=d2,
              prefill_vs_parallel=d3, decode_vs_parallel_ext=d4, prefix_causality=d5)
    for k, v in ds.items():
        assert v < tol, f"{name}: self-check {k} failed: {v:.3e} >= {tol:.0e}"
    return ds


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def build_fixture(name, params, store_dtype, tied, split, T, seed):
    cfg = R.Config(params)
    gen = torch.Generator().manual_seed(seed)
    # tied embeddings make a random model repeat its input token (the residual stream
    # still looks like the token's embedding); larger layer outputs break that
    W32 = make_weights(cfg, gen, tied, out_scale=3.0 if tied else 1.0)
    stored = {k: v.to(store_dtype).contiguous() for k, v in W32.items()}
    W = R.load_weights_as(stored, REF_DTYPE)          # exactly the stored numbers
    Wf = R.load_weights_as(stored, torch.float32)

    # draw prompts until every greedy step has a clear winner
    for attempt in range(50):
        prompt = torch.randint(0, cfg.vocab_size, (T,), generator=gen, dtype=torch.int64)
        greedy, greedy_logits = greedy_incremental(cfg, W, prompt)
        if margin(greedy_logits) >= MIN_GREEDY_MARGIN and len(set(greedy.tolist())) >= MIN_DISTINCT_GREEDY:
            break
    else:
        raise RuntimeError(f"{name}: no prompt with a clear, varied greedy continuation")

    with torch.no_grad():
        full = R.forward_full(cfg, W, prompt)
        X = R.self_decoder_full(cfg, W, prompt)
    ds = check_reference(name, cfg, W, prompt, full, greedy, greedy_logits, 1e-9)

    # float32 run of the same reference: the size of f32 rounding, and the
    # incremental/parallel agreement in f32
    full32 = R.forward_full(cfg, Wf, prompt)
    inc32 = R.Incremental(cfg, Wf)
    step32 = torch.stack([inc32.step(int(t)) for t in prompt])
    d_f32_f64 = maxdiff(full32, full)
    d_f32_inc = maxdiff(step32, full32)
    assert d_f32_inc < 1e-4, f"{name}: f32 incremental vs parallel {d_f32_inc}"
    g32, gl32 = greedy_incremental(cfg, Wf, prompt)
    assert torch.equal(g32, greedy), f"{name}: f32 greedy differs from f64 greedy"

    d = os.path.join(OUT, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    p = {k: v for k, v in params.items()}
    p["model_type"] = "yoco"  # unknown field: loaders must ignore it
    write_json(os.path.join(d, "params.json"), p)
    meta = {"format": "pt"}
    if split:
        a = {k: v for k, v in stored.items() if k.startswith("self_decoder.")}
        b = {k: v for k, v in stored.items() if not k.startswith("self_decoder.")}
        files = {"model-00001-of-00002.safetensors": a, "model-00002-of-00002.safetensors": b}
        for fn, t in files.items():
            save_file(t, os.path.join(d, fn), metadata=meta)
        total = sum(v.numel() * v.element_size() for v in stored.values())
        write_json(os.path.join(d, "model.safetensors.index.json"), {
            "metadata": {"total_size": total},
            "weight_map": {k: fn for fn, t in files.items() for k in sorted(t)},
        })
    else:
        save_file(stored, os.path.join(d, "model.safetensors"), metadata=meta)

    expected = {
        "prompt": prompt.contiguous(),
        "logits": full.to(torch.float32).contiguous(),
        "greedy": greedy.contiguous(),
        "greedy_logits": greedy_logits.to(torch.float32).contiguous(),
        # extra (debugging aid): self-decoder output X at every prompt position
        "self_decoder_out": X.to(torch.float32).contiguous(),
    }
    save_file(expected, d + ".expected.safetensors", metadata=meta)

    # gate statistics (retention only): per-token decay exp(gamma) in layer 0, per head
    gate_info = ""
    if cfg.sliding_window is None:
        x = W["embed_tokens.weight"][prompt] * math.sqrt(cfg.dim)
        h = R.rms_norm(x, W["self_decoder.layers.0.mixer_layer_norm.weight"], cfg.norm_eps)
        gt = R.linear(h, W["self_decoder.layers.0.mixer.gt_proj.weight"])
        dec = (torch.nn.functional.logsigmoid(gt) / 16).exp()
        gate_info = " layer0 decay mean/min per head: " + ", ".join(
            f"{float(dec[:, i].mean()):.4f}/{float(dec[:, i].min()):.3f}" for i in range(dec.shape[1]))

    print(f"[{name}] T={T} prompt attempts={attempt + 1} logits std={float(full.std()):.3f} "
          f"mean={float(full.mean()):.3f} distinct argmax={len(set(full.argmax(-1).tolist()))} "
          f"greedy={greedy.tolist()} min greedy margin={margin(greedy_logits):.3f}")
    print(f"    self-checks (f64, max abs): " + ", ".join(f"{k}={v:.1e}" for k, v in ds.items()))
    print(f"    f32 reference: |f32-f64| logits max={d_f32_f64:.2e}, f32 step-vs-parallel max={d_f32_inc:.2e},"
          f" f32 greedy identical")
    if gate_info:
        print("   " + gate_info)


def build_rope():
    positions = torch.tensor([0, 1, 2, 3, 1000, 65535, 131071, 999999, 1000000, 1048575, 2097151],
                             dtype=torch.int64)
    hd = 16
    out = {"positions": positions}
    for theta, tag in ((10000.0, "10000"), (80000000.0, "8e7")):
        cos, sin = R.rope_cos_sin(positions, hd, theta)
        out[f"cos_theta{tag}"] = cos.contiguous()
        out[f"sin_theta{tag}"] = sin.contiguous()
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(len(positions), hd, generator=gen, dtype=torch.float32)
    out["x"] = x
    rot = R.apply_rope(x[:, None, :], out["cos_theta10000"], out["sin_theta10000"])[:, 0, :]
    out["x_rot_theta10000"] = rot.contiguous()
    # sanity: rotation keeps the norm of each pair
    assert torch.allclose(rot.view(-1, 8, 2).norm(dim=-1), x.view(-1, 8, 2).norm(dim=-1), atol=1e-5)
    save_file(out, os.path.join(OUT, "rope.safetensors"), metadata={"format": "pt"})
    print("[rope] angles (f32) at pos 1000000, theta 1e4:",
          R.rope_angles_f32(torch.tensor([1000000]), hd, 10000.0)[0].tolist())


def main():
    torch.manual_seed(0)
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    os.makedirs(OUT, exist_ok=True)
    with torch.no_grad():
        for fx in FIXTURES:
            build_fixture(*fx)
        build_rope()
    total = 0
    for root, _, files in os.walk(OUT):
        for fn in sorted(files):
            pth = os.path.join(root, fn)
            total += os.path.getsize(pth)
    print(f"fixtures total size: {total} bytes")
    print("ALL SELF-CHECKS PASSED")


if __name__ == "__main__":
    main()
