"""llama.cpp itself is the oracle: its `llama-quantize` must accept (and use) the imatrix files qtool writes, refuse
broken ones, and qtool must read back what llama.cpp's own `llama-imatrix` writes.

The tools come from tests/tools/build_llama_quantize.sh (cached under ~/.cache/qtool/llama.cpp/<version>/bin) or
$QTOOL_LLAMA_QUANTIZE; without them these tests skip. The model is conftest's tiny Llama written as an F32 GGUF.
"""

from __future__ import annotations

import subprocess
from importlib import resources
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_tiny import BUILD_HINT, hf_to_gguf, imatrix_kv, llama_tool, write_raw_gguf

from qtool.calib.imatrix import hf_to_gguf_name, read_imatrix, write_imatrix_dat, write_imatrix_gguf
from qtool.errors import ModelError

QUANTIZE, IMATRIX = llama_tool("llama-quantize"), llama_tool("llama-imatrix")
needs_quantize = pytest.mark.skipif(QUANTIZE is None, reason=f"llama-quantize not found: {BUILD_HINT}")
needs_imatrix = pytest.mark.skipif(IMATRIX is None, reason=f"llama-imatrix not found: {BUILD_HINT}")
IN_FEATURES = {"attn_q": 256, "attn_k": 256, "attn_v": 256, "attn_output": 256, "ffn_gate": 256, "ffn_up": 256, "ffn_down": 512}
LINEARS = {f"blk.{i}.{k}.weight" for i in range(2) for k in IN_FEATURES}


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory) -> Path:
    return hf_to_gguf(tiny_llama, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf")


def entries(seed: int) -> dict[str, tuple[torch.Tensor, int]]:
    """Positive sums of x^2 for every linear of the tiny model, 1024 tokens each."""
    g = torch.Generator().manual_seed(seed)
    return {f"blk.{i}.{k}.weight": (torch.rand(n, generator=g) * 100 + 1, 1024)
            for i in range(2) for k, n in IN_FEATURES.items()}


def gguf_imatrix(path: Path, e: dict) -> Path:
    write_imatrix_gguf(path, e, datasets=["calib.txt"], chunk_count=2, chunk_size=512)
    return path


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], check=False, capture_output=True, text=True, errors="replace", timeout=120)


def quantize(model: Path, out: Path, ftype: str, imatrix: Path | None = None) -> subprocess.CompletedProcess:
    return run(QUANTIZE, *(["--imatrix", imatrix] if imatrix else []), model, out, ftype, 1)


def tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in r.tensors}


@needs_quantize
@pytest.mark.parametrize("ftype, ffn_up, linear_types", [
    ("IQ2_XS", "IQ2_XS", {"IQ2_XS", "Q2_K"}),  # attn_v gets Q2_K in this mix; ~4 s, the slowest here
    ("Q2_K_S", "Q2_K", {"Q2_K", "Q4_K"}),
    ("Q4_K_M", "Q4_K", {"Q4_K", "Q6_K"}),
    ("IQ4_XS", "IQ4_XS", {"IQ4_XS"}),
])
def test_llama_quantize_accepts_qtool_gguf_imatrix(tiny_gguf, tmp_path, ftype, ffn_up, linear_types):
    imatrix = gguf_imatrix(tmp_path / "imatrix.gguf", entries(0))
    out = tmp_path / f"{ftype}.gguf"
    res = quantize(tiny_gguf, out, ftype, imatrix)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"loaded {len(LINEARS)} importance matrix entries" in res.stdout + res.stderr
    got = tensors(out)
    assert {got[n][0] for n in LINEARS} <= linear_types and got["blk.0.ffn_up.weight"][0] == ffn_up
    meta = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items() if k.startswith("quantize.imatrix")}
    assert meta == {"quantize.imatrix.file": str(imatrix), "quantize.imatrix.dataset": "calib.txt",
                    "quantize.imatrix.entries_count": len(LINEARS), "quantize.imatrix.chunks_count": 2}


@needs_quantize
@pytest.mark.parametrize("ftype", ["IQ2_XS", "Q2_K_S"])
def test_some_types_need_an_imatrix(tiny_gguf, tmp_path, ftype):
    """The control for the test above: without an imatrix llama-quantize refuses these types."""
    res = quantize(tiny_gguf, tmp_path / "out.gguf", ftype)
    assert res.returncode != 0 and "requires an imatrix" in res.stdout + res.stderr


@needs_quantize
@pytest.mark.parametrize("ftype", ["Q2_K_S", "Q4_K_M"])
def test_values_are_used_and_dat_equals_gguf(tiny_gguf, tmp_path, ftype):
    """The same statistics as GGUF and as legacy .dat quantize bit-identically; other statistics change every linear."""
    e = entries(0)
    write_imatrix_dat(tmp_path / "im.dat", e, chunk_count=2, dataset="calib.txt")
    outs = {}
    for name, imatrix in (("gguf", gguf_imatrix(tmp_path / "im.gguf", e)), ("dat", tmp_path / "im.dat"),
                          ("other", gguf_imatrix(tmp_path / "other.gguf", entries(1)))):
        res = quantize(tiny_gguf, tmp_path / f"{name}.gguf", ftype, imatrix)
        assert res.returncode == 0, res.stderr[-2000:]
        outs[name] = tensors(tmp_path / f"{name}.gguf")
    assert outs["gguf"] == outs["dat"]
    assert {n for n in outs["gguf"] if outs["gguf"][n] != outs["other"][n]} == LINEARS


def broken_imatrices(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what llama-quantize says); each one breaks a single rule."""
    e = entries(0)
    good = gguf_imatrix(tmp_path / "good.gguf", e)
    raw = {f"{n}{sfx}": v for n, (s, c) in sorted(e.items())
           for sfx, v in ((".in_sum2", s.numpy()), (".counts", np.full(1, c, np.float32)))}
    short = dict(e, **{"blk.0.attn_q.weight": (e["blk.0.attn_q.weight"][0][:255], 1024)})
    missing = {n: v for n, v in e.items() if n != "blk.1.ffn_up.weight"}
    (tmp_path / "cut.gguf").write_bytes(good.read_bytes()[:-8])  # only the last tensor's padding is missing
    return {
        "no chunk_size": (write_raw_gguf(tmp_path / "nosize.gguf", imatrix_kv(chunk_size=None), raw), "missing imatrix metadata"),
        "no datasets": (write_raw_gguf(tmp_path / "nods.gguf", imatrix_kv(datasets=None), raw), "missing imatrix metadata"),
        "255 of 256 columns": (gguf_imatrix(tmp_path / "short.gguf", short),
                               "imatrix size 255 is different from tensor size 256 for blk.0.attn_q.weight"),
        "entry missing": (gguf_imatrix(tmp_path / "missing.gguf", missing), "Missing importance matrix for tensor blk.1.ffn_up.weight"),
        "padding cut": (tmp_path / "cut.gguf", "failed to read tensor data"),
    }


@needs_quantize
def test_llama_quantize_refuses_broken_imatrices(tiny_gguf, tmp_path):
    for case, (path, message) in broken_imatrices(tmp_path).items():
        res = quantize(tiny_gguf, tmp_path / "out.gguf", "Q2_K_S", path)  # needs an imatrix for every linear
        assert res.returncode != 0, case
        assert message in res.stdout + res.stderr, (case, res.stdout[-1500:], res.stderr[-1500:])
        if case in ("no chunk_size", "no datasets", "padding cut"):  # qtool's reader refuses the same files
            with pytest.raises(ModelError):
                read_imatrix(path)


@pytest.fixture(scope="module")
def llama_imatrix_files(tiny_gguf, tmp_path_factory) -> dict[str, Path]:
    """llama-imatrix over qtool's check text: 12 chunks of 128 tokens, output.weight included, GGUF and .dat."""
    if IMATRIX is None:
        pytest.skip(f"llama-imatrix not found: {BUILD_HINT}")
    d = tmp_path_factory.mktemp("llama-imatrix")
    text = d / "text.txt"
    text.write_text(resources.files("qtool").joinpath("data/check.txt").read_text())
    files = {}
    for fmt in ("gguf", "dat"):  # -t 1: ggml's threads spin at barriers, so -t 2 on a busy 2-core box takes 100x longer
        files[fmt] = d / f"imatrix.{fmt}"
        res = run(IMATRIX, "-m", tiny_gguf, "-f", text, "-c", 128, "-b", 128, "-t", 1, "--no-ppl", "--process-output",
                  "--output-format", fmt, "-o", files[fmt])
        assert res.returncode == 0 and files[fmt].is_file(), res.stderr[-2000:]
    return files


@needs_imatrix
def test_reads_llama_imatrix_output_byte_exactly(llama_imatrix_files, tmp_path):
    im = read_imatrix(llama_imatrix_files["gguf"])
    text = str(llama_imatrix_files["gguf"].with_name("text.txt"))
    assert (im.datasets, im.chunk_count, im.chunk_size, im.legacy) == ((text,), 12, 128, False)
    assert set(im.means) == LINEARS | {"output.weight"} and set(im.counts.values()) == {12 * 128}
    again = tmp_path / "again.gguf"
    write_imatrix_gguf(again, im.entries(), datasets=list(im.datasets), chunk_count=im.chunk_count, chunk_size=im.chunk_size)
    assert again.read_bytes() == llama_imatrix_files["gguf"].read_bytes()
    dat = read_imatrix(llama_imatrix_files["dat"])
    assert (dat.datasets, dat.chunk_count, dat.legacy) == ((text,), 12, True) and set(dat.counts.values()) == {12}
    for name, mean in im.means.items():
        torch.testing.assert_close(dat.means[name], mean, rtol=1e-6, atol=0)


@needs_imatrix
def test_llama_imatrix_matches_torch_activations(llama_imatrix_files, tiny_llama):
    """What llama.cpp collected per GGUF name equals the sum of x^2 over the inputs of the HF module that
    hf_to_gguf_name maps to it, computed by transformers on the same 12 chunks of 128 tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(tiny_llama)(resources.files("qtool").joinpath("data/check.txt").read_text(),
                                                    add_special_tokens=False)["input_ids"]
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(hook(hf_to_gguf_name(name, model.config.num_hidden_layers)))
    with torch.no_grad():  # one batch of the 12 chunks: each is its own sequence, as in llama-imatrix
        model(torch.tensor([ids[c * 128:(c + 1) * 128] for c in range(12)]))
    im = read_imatrix(llama_imatrix_files["gguf"])
    assert set(sums) == set(im.sums)
    for name, ref in sums.items():
        err = (im.sums[name].double() - ref).abs().max() / ref.abs().max()
        assert err < 2e-3, (name, float(err))


@needs_quantize
def test_qtool_calibrate_imatrix_drives_llama_quantize(tiny_llama, tiny_gguf, tmp_path):
    """End to end: `qtool calibrate --imatrix` on the HF model, then llama-quantize on its GGUF twin."""
    from typer.testing import CliRunner

    from qtool.calib.stats import HEAD_INPUT, load as load_stats
    from qtool.cli.app import app

    text = resources.files("qtool").joinpath("data/check.txt")
    r = CliRunner().invoke(app, ["calibrate", str(tiny_llama), "--data", str(text), "--samples", "8", "--seq-len", "64",
                                 "--out", str(tmp_path / "stats"), "--imatrix", str(tmp_path / "imatrix.gguf")])
    assert r.exit_code == 0, r.output
    im, stats = read_imatrix(tmp_path / "imatrix.gguf"), load_stats(tmp_path / "stats")
    assert set(im.means) == LINEARS and im.chunk_count == 8 and im.chunk_size == 64
    for lin in set(stats.inputs) - {HEAD_INPUT}:  # the head's input stats stay out of the imatrix, as llama-imatrix does
        mean = im.means[hf_to_gguf_name(lin, 2)]
        assert torch.allclose(torch.as_tensor(mean), stats.of(lin).sq_mean, rtol=1e-5), lin
    res = quantize(tiny_gguf, tmp_path / "iq2.gguf", "IQ2_XS", tmp_path / "imatrix.gguf")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"loaded {len(LINEARS)} importance matrix entries" in res.stdout + res.stderr
