"""Measured costs predict the true final-logit KL of single-tensor changes (the oracle: the HF model with that one
tensor quantized, on the same tokens), where the proxy only measures each tensor's own output error."""

from __future__ import annotations

import torch

from qtool.calib import stats as st
from qtool.calib.data import calibration_tokens
from qtool.formats.gguf_base import gguf_codec
from qtool.io.source import open_model
from qtool.plan import Calibration
from qtool.sensitivity import measured
from qtool.sensitivity.costs import measure as proxy

TENSORS = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
           "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.up_proj"]


def _ranks(xs):
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0] * len(xs)
    for k, i in enumerate(order):
        r[i] = k
    return r


def spearman(a, b) -> float:
    ra, rb = _ranks(a), _ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def test_measured_costs_are_the_single_tensor_kl(tiny_llama):
    from transformers import AutoModelForCausalLM

    src = open_model(tiny_llama)
    s = st.collect(src, Calibration(samples=4, seq_len=32))
    ids = calibration_tokens(src, Calibration(samples=4, seq_len=32), src.load_tokenizer())
    cands = ["q3_k", "q4_k", "q6_k"]
    ms, details = measured.measure(src, s, cands, ids)
    px = proxy(src, s, cands)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        base = torch.log_softmax(model(ids).logits.double(), -1)
    true, pred, prox = [], [], []
    for name in TENSORS:
        mod = model.get_submodule(name)
        w = mod.weight.detach().clone()
        for t in ("q3_k", "q4_k"):
            with torch.no_grad():
                mod.weight.copy_(gguf_codec(t).encode(w, torch.diagonal(s.of(name).hessian)).dequantize())
                lq = torch.log_softmax(model(ids).logits.double(), -1)
                mod.weight.copy_(w)
            true.append(float((base.exp() * (base - lq)).sum(-1).mean()))
            pred.append(next(o.cost for o in ms[name] if o.codec == t))
            prox.append(next(o.cost for o in px[name] if o.codec == t))
    # measured: 0.86-1.23x the true KL on this model (second-order term at the block's own error scale)
    assert all(0.6 < p / k < 1.6 for p, k in zip(pred, true)), [round(p / k, 2) for p, k in zip(pred, true)]
    assert spearman(pred, true) > 0.9 and spearman(pred, true) > spearman(prox, true)
    assert set(details["block_sensitivity"]) == {0, 1}
