"""Calibration precision: bf16 math mode for the calibration stream's linears and Hessians, fp32 otherwise.

On a CPU with bf16 GEMMs (AMX / AVX512-BF16; this project's machines) bf16 must really change the products
(rounded GEMM inputs: not bit-identical to fp32) yet stay within bf16's error bound; without such a CPU the
bf16 tests that need it skip, saying why, and `effective` says the run falls back to fp32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtool.calib.hessian import HessianCollector, gram_upper_, symmetric_
from qtool.calib.precision import BF16_ATTENTION, bf16_stream, bf16_supported, effective, matmul_precision
from qtool.engine.blocks import BlockRunner, materialize, skeleton
from qtool.engine.staged import StagedBlock
from qtool.errors import PlanError
from qtool.io.arch import arch_of
from qtool.io.source import open_model
from qtool.plan import parse_plan

needs_bf16 = pytest.mark.skipif(not bf16_supported(), reason="this CPU has no oneDNN bf16 GEMMs (AMX/AVX512-BF16)")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_matmul_precision_restores_the_knob_and_refuses_unknown_names():
    before = torch.backends.mkldnn.matmul.fp32_precision
    with matmul_precision("bf16"):
        pass
    with pytest.raises(RuntimeError, match="boom"):
        with matmul_precision("bf16"):
            raise RuntimeError("boom")
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    with pytest.raises(ValueError, match="precision must be one of"):
        with matmul_precision("fp16"):
            pass
    assert effective("fp32") == "fp32"
    assert effective("bf16") == ("bf16" if bf16_supported() else "fp32")


@needs_bf16
def test_bf16_gram_is_rounded_but_within_bf16_error():
    x = torch.randn(2048, 320, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, 320)
    ref = x.double().T @ x.double()
    exact = symmetric_(gram_upper_(None, x))
    with matmul_precision("bf16"):
        fast = symmetric_(gram_upper_(None, x))
    assert _rel(exact, ref) < 1e-6
    assert 1e-5 < _rel(fast, ref) < 5e-3  # inputs rounded to bf16 (8 bits), accumulation in float32
    assert torch.equal(fast, fast.T)  # still exactly symmetric


def _tiny_block(tiny_llama):
    src = open_model(tiny_llama)
    cfg, arch = src.config, arch_of(src.config)
    skel = skeleton(cfg)
    block = materialize(skel.get_submodule("model.layers.0"), "model.layers.0.", src)
    return block, arch, BlockRunner(skel, cfg, 32), cfg


@needs_bf16
def test_bf16_stream_round_only_inside_the_context_and_keep_hooks(tiny_llama):
    block, _, runner, cfg = _tiny_block(tiny_llama)
    x = torch.randn(4, 32, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    ref = runner(block, x)
    seen = []
    h = block.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    with bf16_stream(block, "bf16"):
        fast = runner(block, x)
        assert torch.backends.mkldnn.matmul.fp32_precision != "bf16"  # attention and the rest stay float32
    h.remove()
    assert seen == [x.shape]  # hooks still fire on the shadowed forward
    assert fast.dtype == torch.float32 and not torch.equal(fast, ref)
    assert _rel(fast, ref) < 2e-2
    assert torch.equal(runner(block, x), ref)  # original forwards restored
    assert all("forward" not in m.__dict__ for m in block.modules() if isinstance(m, nn.Linear))
    with bf16_stream(block, "fp32"):  # fp32: nothing changes, bit for bit
        assert torch.equal(runner(block, x), ref)


@needs_bf16
def test_bf16_attention_runs_on_bf16_tensors_inside_the_context_only(tiny_llama, monkeypatch):
    """Inside the context the block's sdpa attention gets bf16 q/k/v (and returns float32); outside, float32."""
    block, _, runner, cfg = _tiny_block(tiny_llama)
    x = torch.randn(2, 32, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append(q.dtype)
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with bf16_stream(block, "bf16"):
        assert block.self_attn.config._attn_implementation == BF16_ATTENTION
        fast = runner(block, x)
    assert block.self_attn.config._attn_implementation == "sdpa"
    ref = runner(block, x)
    assert seen == [torch.bfloat16, torch.float32] and fast.dtype == torch.float32
    with bf16_stream(block, "fp32"):
        assert block.self_attn.config._attn_implementation == "sdpa"
    assert 0 < _rel(fast, ref) < 2e-2


@needs_bf16
def test_bf16_linear_reads_weights_rewritten_in_place():
    lin = nn.Linear(256, 128, bias=False)
    x = torch.randn(64, 256)
    with bf16_stream(lin, "bf16"):
        a = lin(x)
        with torch.no_grad():
            lin.weight.mul_(2)
        b = lin(x)
    assert _rel(b, 2 * a) < 1e-6  # the doubled weight is used (bf16 rounding commutes with x2)
    assert _rel(b, F.linear(x, lin.weight)) < 1e-2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_staged_walk_at_a_precision_equals_full_forwards_at_it(tiny_llama, precision):
    block, arch, runner, cfg = _tiny_block(tiny_llama)
    x = torch.randn(12, 32, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    staged = StagedBlock(block, arch, runner, x.clone(), batch=4, precision=precision)
    for gi, group in enumerate(arch.linear_groups):
        with bf16_stream(block, precision):
            ref = HessianCollector(block, [group[0]], precision=precision).run(
                lambda b: runner(block, b), x.split(4))[group[0]]
        got = staged.hessian(gi, group[0])
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6), group
        with torch.no_grad():
            for lin in group:
                w = block.get_submodule(lin).weight
                w.copy_(torch.round(w * 16) / 16)
    out = staged.output()
    with bf16_stream(block, precision):
        full = torch.cat([runner(block, b) for b in x.split(4)])
    assert torch.equal(out, full)
    if precision == "bf16" and bf16_supported():
        assert not torch.equal(out, torch.cat([runner(block, b) for b in x.split(4)]))


def test_plan_precision_field_default_and_errors(tmp_path):
    rules = "rules:\n  - {match: '.*', method: gptq, bits: 4, group_size: 64}\n"
    assert parse_plan(rules).calibration.precision == "bf16"
    p = parse_plan(rules + "calibration: {source: generated, precision: fp32}\n")
    assert p.calibration.precision == "fp32"
    again = parse_plan(p.to_yaml())
    assert again.calibration == p.calibration and again.digest() == p.digest()
    assert p.digest() != parse_plan(rules).digest()  # the artifact depends on it: so does the digest
    f = tmp_path / "p.yaml"
    f.write_text(rules + "calibration:\n  source: generated\n  precision: fp16\n")
    from qtool.plan import load_plan

    with pytest.raises(PlanError, match=r"p\.yaml:5: calibration\.precision: 'fp16' is not allowed; allowed: fp32, bf16"):
        load_plan(f)


@needs_bf16
def test_engine_runs_both_precisions_deterministically(tiny_llama, tmp_path):
    from importlib import resources

    from qtool.engine.run import run

    calib = tmp_path / "calib.txt"
    calib.write_text(resources.files("qtool").joinpath("data/check.txt").read_text())

    def plan(precision):
        return parse_plan("rules:\n  - {match: '.*', method: gptq, bits: 4, group_size: 64, act_order: true}\n"
                          f"calibration: {{source: '{calib}', samples: 8, seq_len: 64, seed: 0, "
                          f"precision: {precision}}}\n")

    m32 = run(open_model(tiny_llama), plan("fp32"), tmp_path / "fp32")
    m16 = run(open_model(tiny_llama), plan("bf16"), tmp_path / "bf16")
    run(open_model(tiny_llama), plan("bf16"), tmp_path / "bf16b")
    a, b = (tmp_path / "bf16" / "model.safetensors").read_bytes(), (tmp_path / "bf16b" / "model.safetensors").read_bytes()
    assert a == b  # deterministic
    assert a != (tmp_path / "fp32" / "model.safetensors").read_bytes()  # the stream really ran in bf16
    assert not m16.warnings
    assert abs(m16.check.kld - m32.check.kld) < 0.25 * m32.check.kld + 1e-3, (m16.check.kld, m32.check.kld)
