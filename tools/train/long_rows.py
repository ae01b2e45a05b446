"""Training on passkey rows far longer than a full forward-and-backward could hold: YOCO's
cross-decoder reads only the global K/V, so a long row's loss needs the self-decoder's output
everywhere but the cross-decoder only on the rows that are scored (the question and answer).

A long row is run the way yoco serves it (`infer.py`): the self-decoder over the whole row, in
pieces, carrying gated retention's state; K/V for every position; the cross-decoder on the tail
rows only. Gradients flow where they carry the retrieval signal:

* the self-decoder only inside the *grad spans* (around the needle and the tail); elsewhere it
  runs without gradients and its state enters the next span detached (truncated back-propagation
  through the recurrence, as state-passing training does);
* the K/V projections (`kv_layer_norm`, `k_proj`, `v_proj`) at *every* position, from the
  self-decoder's output (detached outside the spans): the softmax's gradient then sees every
  distractor key it has to push down, not only the needle's, so the estimate of the K/V weights'
  gradient is the full row's;
* the cross-decoder and output projection on the tail rows.

The forward values are the full model's (`check` compares them with `Yoco.forward`); only
gradients into the self-decoder from outside the spans are dropped.
"""

import torch
import torch.nn.functional as F

from infer import cross_decoder, global_kv, self_decoder

PIECE = 16384  # self-decoder tokens per no-gradient piece (memory, not values)


def segments(T, spans, cut=None):
    """[0, T) cut into (start, end, grad) runs: the merged `spans` with gradients, the rest
    without, pieces of at most PIECE tokens; a run also starts at `cut`."""
    merged = []
    for a, b in sorted((max(0, a), min(T, b)) for a, b in spans):
        if a >= b:
            continue
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    out, at = [], 0
    for a, b in merged + [[T, T]]:
        while at < a:
            out.append((at, min(a, at + PIECE), False))
            at = out[-1][1]
        if a < b:
            out.append((a, b, True))
        at = max(at, b)
    if cut is not None:
        out = [part for a, b, g in out for part in ([(a, cut, g), (cut, b, g)] if a < cut < b else [(a, b, g)])]
    return out


@torch.no_grad()
def states_after(model, tokens):
    """The self-decoder's retention states after tokens [T] (positions 0..T-1), without
    gradients."""
    states = [None] * len(model.self_decoder.layers)
    for a in range(0, tokens.shape[0], PIECE):
        self_decoder(model, tokens[a : a + PIECE], torch.arange(a, min(tokens.shape[0], a + PIECE))[None], states)
    return states


def tail_logits(model, tokens, spans, tail, key_bias=None, positions=None, kv_grad_everywhere=True, tail_states=None):
    """Logits [T - tail, vocab] of the input rows tail..T-1 of `tokens` [T] (positions 0..T-1
    unless given [T]), computed as the module docstring says; rows tail..T-1 must lie in one
    grad span.
    `key_bias` [T] (optional): added to the tail rows' cross-attention logits of each key (the
    virtual haystack, `train.Batches.haystack_bias`). `tail_states` (optional): the retention
    states the tail starts from instead of the row's own (see `loss`)."""
    T = tokens.shape[0]
    pos = torch.arange(T) if positions is None else positions
    states = [None] * len(model.self_decoder.layers)
    Ks, Vs, x_tail = [], [], None
    for a, b, grad in segments(T, spans, tail):
        p = pos[a:b][None]
        if a == tail and tail_states is not None:
            states = list(tail_states)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            x = self_decoder(model, tokens[a:b], p, states)
        if a <= tail < b:
            assert grad, "the tail must lie in a grad span"
            x_tail = x[:, tail - a :]
        with torch.set_grad_enabled((grad or kv_grad_everywhere) and torch.is_grad_enabled()):
            K, V = global_kv(model, x, p)
        Ks.append(K)
        Vs.append(V)
    rows = torch.arange(tail, T)
    causal = torch.arange(T)[None, :] <= rows[:, None]  # [t, T]
    bias = torch.zeros(T) if key_bias is None else key_bias
    mask = torch.where(causal, bias[None, :], torch.tensor(float("-inf"))).to(x_tail.dtype)[None, None]
    return cross_decoder(model, x_tail, pos[tail:][None], torch.cat(Ks, 2), torch.cat(Vs, 2), mask)


def loss(model, tokens, weights, spans, tail, key_bias=None, kv_grad_everywhere=True, twin=None):
    """The weighted cross-entropy *sum* of a long row (tokens, weights: lists of the row, the last
    token only a target) over its tail rows, to be divided by the batch's weight like any row's;
    and whether every supervised (weight > 1) token there is the greedy one.

    `twin` (optional): the same row with the needle's tokens replaced by filler; the tail then
    starts from the twin's retention states, which hold no trace of the needle, so the answer
    can only come from the global K/V (the built-in model of phase 4 answered from the state
    alone: without the needle in it, 0/16 at 1K; without it in the cache, 16/16)."""
    inp = torch.tensor(tokens[:-1])
    tail_states = states_after(model, torch.tensor(twin[:tail])) if twin is not None else None
    logits = tail_logits(model, inp, spans, tail, key_bias, kv_grad_everywhere=kv_grad_everywhere,
                         tail_states=tail_states)
    target = torch.tensor(tokens[tail + 1 :])
    w = torch.tensor(weights[tail + 1 :])
    nll = F.cross_entropy(logits, target, reduction="none")
    sup = w > 1.0
    hit = bool((logits[sup].argmax(-1) == target[sup]).all()) if sup.any() else False
    return (nll * w).sum(), hit


def check(model, T=1500, seed=5):
    """Largest |logit difference| (float64) between `tail_logits` and the full forward, for a
    row cut into grad and no-grad runs across retention blocks and pieces; and the largest
    relative difference of the tail loss's gradients when one span covers the whole row."""
    global PIECE
    m64 = type(model)(model.cfg).to(torch.float64)
    m64.load_state_dict({k: v.to(torch.float64) for k, v in model.state_dict().items()})
    toks = torch.randint(0, model.cfg["vocab_size"], (T,), generator=torch.Generator().manual_seed(seed))
    saved, PIECE = PIECE, 300
    try:
        with torch.no_grad():
            want = m64(toks[None], torch.arange(T)[None])[0]
            got = tail_logits(m64, toks, [(100, 170), (T - 90, T)], T - 90)
    finally:
        PIECE = saved
    err = (got - want[T - 90 :]).abs().max().item()
    target = toks[T - 89 :]
    full = F.cross_entropy(m64(toks[None, :-1], torch.arange(T - 1)[None])[0, T - 90 :], target)
    g_full = torch.autograd.grad(full, list(m64.parameters()))
    part = F.cross_entropy(tail_logits(m64, toks[:-1], [(0, T - 1)], T - 90), target)
    g_part = torch.autograd.grad(part, list(m64.parameters()), allow_unused=True)
    gerr = max(((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()
               for a, b in zip(g_full, g_part) if b is not None)
    # a one-token run between spans takes the recurrent step from a state a backward pass needs
    gapped = tail_logits(m64, toks[:-1], [(100, 170), (171, 240), (T - 90, T - 1)], T - 90)
    F.cross_entropy(gapped, target).backward()
    return err, gerr


def check_twin(model, T=700, split=450, seed=6):
    """Largest |logit difference| (float64) between `Yoco.forward` with a twin row and the same
    row computed as yoco serves it from the twin's retention states (`tail_logits` with
    `tail_states`), over all rows (those before the split must be the row's own)."""
    m64 = type(model)(model.cfg).to(torch.float64)
    m64.load_state_dict({k: v.to(torch.float64) for k, v in model.state_dict().items()})
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, model.cfg["vocab_size"], (T,), generator=g)
    twin = toks.clone()
    twin[100:130] = torch.randint(0, model.cfg["vocab_size"], (30,), generator=g)
    other = torch.randint(0, model.cfg["vocab_size"], (T,), generator=g)  # a row without a twin
    pos = torch.arange(T)[None].expand(2, T)
    with torch.no_grad():
        got = m64(torch.stack([other, toks]), pos, twin=(torch.tensor([1]), twin[None], torch.tensor([split])))
        want_other = m64(other[None], pos[:1])[0]
        want_head = m64(toks[None, :split], pos[:1, :split])[0]
        want_tail = tail_logits(m64, toks, [(0, T)], split, tail_states=states_after(m64, twin[:split]))
    return max((got[0] - want_other).abs().max().item(), (got[1, :split] - want_head).abs().max().item(),
               (got[1, split:] - want_tail).abs().max().item())


if __name__ == "__main__":
    from model import Yoco

    cfg = {"dim": 64, "n_layers": 4, "hidden_dim": 96, "n_self_heads": 2, "n_attn_heads": 4,
           "n_attn_kv_heads": 2, "vocab_size": 97, "rope_theta": 1e4, "norm_eps": 1e-5}
    m = Yoco(cfg)
    m.init_weights(torch.Generator().manual_seed(3))
    err, gerr = check(m)
    print(f"long rows vs the full forward: max |logit diff| {err:.2e}, gradients (one span) {gerr:.2e}")
    assert err < 1e-9 and gerr < 1e-9, (err, gerr)
    terr = check_twin(m)
    print(f"twin rows vs the served forward from the twin's states: max |logit diff| {terr:.2e}")
    assert terr < 1e-9, terr
    assert segments(40000, [(100, 170), (39900, 40000)]) == [
        (0, 100, False), (100, 170, True), (170, 16554, False), (16554, 32938, False),
        (32938, 39900, False), (39900, 40000, True)]
