"""llama.cpp's own tools as the reference GGUF client: tokenize, exact-token log-probs, KLD, speed.

The tools (`llama-perplexity`, `llama-tokenize`, `llama-bench`, and `llama-quantize`/`llama-imatrix` for the tests)
come from tests/tools/build_llama_quantize.sh (`make llama-tools`), which builds them from the llama.cpp vendored
in the llama-cpp-python sdist into ``${XDG_CACHE_HOME:-~/.cache}/qtool/llama.cpp/<version>-<ISA tag>/bin``.
`tool(name)` looks in ``$QTOOL_LLAMA_CPP_BIN`` (a bin directory; when set, only there), else in that cache directory
for this CPU's ISA tag (`isa_tag`, the same rule as the script), else on PATH.

Exact token ids. `llama-perplexity` only reads text, so `logprobs` makes text that llama.cpp tokenizes back to exactly
the given ids: it runs with ``--override-kv tokenizer.ggml.model=str:test``, llama.cpp's built-in TEST vocabulary
(src/llama-vocab.cpp, LLAMA_VOCAB_TYPE_TEST), whose tokenizer maps every 5 bytes of raw text to
``hash % n_vocab`` with ``hash = sum(b[i] * 31**(4-i))``. The vocabulary only decides how text becomes ids, never the
forward pass, so the model computes exactly what it computes for those ids under its real tokenizer. Each id gets
a 5-byte code from the 31 bytes 0x5d..0x7b (``]^_`a..z{``, no backslash, newline or ``<``), which reaches every id of
a vocabulary of up to 31**5 = 28.6M tokens. `llama-perplexity --kl-divergence-base FILE` then writes the ids it
actually evaluated and their log-probs; the ids are checked against the request, so a mismatch (e.g. a user-defined
token whose text happens to occur in the codes) is an error, never a silent shift. BOS/EOS insertion is switched off
(``tokenizer.ggml.add_bos_token=bool:false``): put a BOS into the ids yourself if the model wants one.
`perplexity_kld` needs none of this: the base file carries the ids, llama.cpp evaluates them as stored.

The base-logits file of ``llama-perplexity --kl-divergence-base`` (tools/perplexity/perplexity.cpp), little-endian:
``"_logits_"`` | u32 n_ctx | i32 n_vocab | i32 n_chunk | i32 tokens[n_chunk * n_ctx] | then per chunk
``n_ctx - 1 - n_ctx//2`` rows (positions n_ctx//2 .. n_ctx-2, the scored second half) of
``nv = 2*((n_vocab+1)//2) + 4`` u16: f32 scale, f32 min_log_prob, n_vocab u16 codes (+1 pad if n_vocab is odd).
``log p[v] = scale * code[v] + min_log_prob``, with ``min_log_prob = max(min log p, max log p - 16)`` and
``scale = (max - min_log_prob) / 65535 <= 16/65535``: codes are rounded to nearest, so a decoded log-prob is within
``scale/2 <= 1.22e-4`` nats (1.23e-4 with float32 rounding) of llama.cpp's float32 log-softmax for every token
within 16 nats of the row's top token; tokens further below are clamped up to ``max log p - 16`` (not -inf, so a
decoded row does not sum to 1 exactly). llama.cpp's KLD ignores base tokens with decoded log-prob <= -16.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import platform
import re
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from qtool.errors import ModelError, QtoolError

LLAMA_CPP_VERSION = os.environ.get("QTOOL_LLAMA_CPP_VERSION", "0.3.36")  # keep in step with the build script
BUILD_SCRIPT = "tests/tools/build_llama_quantize.sh"
BUILD_HINT = (f"build them with `make llama-tools` ({BUILD_SCRIPT}: ~10-15 min on 2 cores, needs cmake, a C++ "
              f"compiler and PyPI) or set QTOOL_LLAMA_CPP_BIN to a directory holding llama.cpp's tools")
MAGIC = b"_logits_"
LOGP_SPAN = 16.0  # nats below a row's top log-prob that llama.cpp's uint16 codes cover
_CODE_LO, _CODE_BASE, _CODE_LEN = 0x5D, 31, 5  # TEST-vocabulary codes: 5 bytes from 0x5d..0x7b
_TAIL = 4000  # characters of a failed tool's stderr kept in the error


class LlamaCppError(QtoolError):
    """A llama.cpp tool is missing, failed, timed out, or wrote something unexpected."""


# ---------------------------------------------------------------------------------------------- finding the tools

def cpu_flags() -> set[str]:
    """The `flags` of the first processor in /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if re.match(r"flags\s*:", line):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_AVX2_SET = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}
_AVX512_SET = {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}


def isa_tag(flags: set[str] | None = None, machine: str | None = None) -> str:
    """The instruction-set tag of the tool build for this CPU (the same rule as the build script).

    x86_64: ``avx512[-vbmi][-vnni][-bf16]`` when AVX-512 F/CD/VL/DQ/BW and the AVX2 set are there, ``avx2`` for
    SSE4.2 AVX AVX2 FMA F16C BMI2, else ``base``. Other machines: `uname -m`. AMX never counts (see the script).
    """
    machine = machine or platform.machine()
    if machine != "x86_64":
        return machine
    flags = cpu_flags() if flags is None else set(flags)
    if not _AVX2_SET <= flags:
        return "base"
    if not _AVX512_SET <= flags:
        return "avx2"
    return "-".join(["avx512"] + [ext for ext in ("vbmi", "vnni", "bf16") if f"avx512_{ext}" in flags])


def cache_bin_dir() -> Path:
    """Where the build script puts the tools for this CPU."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "qtool" / "llama.cpp" / f"{LLAMA_CPP_VERSION}-{isa_tag()}" / "bin"


def tool(name: str) -> Path | None:
    """Path of llama.cpp tool `name` (e.g. "llama-perplexity"), or None.

    $QTOOL_LLAMA_CPP_BIN when set (and then only there), else the build cache for this CPU's ISA tag, else PATH.
    """
    explicit = os.environ.get("QTOOL_LLAMA_CPP_BIN")
    if explicit:
        path = Path(explicit).expanduser() / name
        return path if path.is_file() and os.access(path, os.X_OK) else None
    path = cache_bin_dir() / name
    if path.is_file() and os.access(path, os.X_OK):
        return path
    found = shutil.which(name)
    return Path(found) if found else None


def require(name: str) -> Path:
    """`tool(name)`, or a LlamaCppError saying where it was looked for and how to build it."""
    path = tool(name)
    if path is None:
        where = (f"$QTOOL_LLAMA_CPP_BIN={os.environ['QTOOL_LLAMA_CPP_BIN']}" if os.environ.get("QTOOL_LLAMA_CPP_BIN")
                 else f"{cache_bin_dir()} or PATH")
        raise LlamaCppError(f"llama.cpp tool {name} not found in {where}: {BUILD_HINT}")
    return path


# ---------------------------------------------------------------------------------------------- running them

def _tail(text: str | bytes | None) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = text.strip()
    return text if len(text) <= _TAIL else "..." + text[-_TAIL:]


_LOST_LOG = ("llama.cpp's logger is asynchronous and drops its last messages when a tool exits "
             "(ggml-org/llama.cpp#22142)")
_QUICK = 60.0  # seconds: a run this short is simply repeated when its messages or results got lost


def _run(args: list, timeout: float, what: str, complete=None) -> subprocess.CompletedProcess:
    """Run a tool (no shell), capture stdout/stderr; LlamaCppError with the stderr tail on failure or timeout.

    llama.cpp's common logger writes from a background thread that the process does not wait for at exit, so the
    last lines (an error's reason, or the results llama-perplexity LOGs to stdout) can be missing. A failure
    without an error line, or a success whose stdout fails `complete(stdout)`, is run again (at most 2 more times
    when the run took under a minute, once otherwise).
    """
    argv = [str(a) for a in args]
    name = Path(argv[0]).name
    for attempt in range(3):
        t0 = time.monotonic()
        try:
            res = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout,
                                 stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired as e:
            raise LlamaCppError(f"{what}: {name} timed out after {timeout:g}s\n"
                                f"command: {' '.join(argv)}\nstderr:\n{_tail(e.stderr)}") from None
        except OSError as e:
            raise LlamaCppError(f"{what}: cannot run {argv[0]}: {e}") from None
        again = attempt < (2 if time.monotonic() - t0 < _QUICK else 1)
        if res.returncode != 0:
            said = re.search(r"(?m)^[\d.]* ?E |error", res.stderr)
            if said or not again:
                status = f"exit status {res.returncode}" if res.returncode > 0 else f"signal {-res.returncode}"
                raise LlamaCppError(
                    f"{what}: {name} failed ({status})\ncommand: {' '.join(argv)}\nstderr:\n{_tail(res.stderr)}"
                    + (f"\nstdout:\n{_tail(res.stdout)}" if res.stdout.strip() else "")
                    + ("" if said else f"\n(no error message: {_LOST_LOG}; the checks above passed)"))
        elif complete is None or complete(res.stdout):
            return res
        elif not again:
            raise LlamaCppError(f"{what}: {name} exited normally but its output is incomplete ({_LOST_LOG})\n"
                                f"command: {' '.join(argv)}\nstdout:\n{_tail(res.stdout)}")
    raise AssertionError("unreachable")


def _gguf_meta(path: Path) -> dict:
    """Metadata of a GGUF (string/long arrays as their length) after checking that every tensor lies in the file.

    A truncated or foreign file is a ModelError here, in one line, before any tool sees it.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    size = path.stat().st_size
    if size < 24:
        raise ModelError(f"{path}: not a GGUF file ({size} bytes, too short for a header)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _parse_gguf_meta(path, data, size)


def _parse_gguf_meta(path: Path, data, size: int) -> dict:
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    pos = 0

    def take(fmt: str):
        nonlocal pos
        n = struct.calcsize("<" + fmt)
        if pos + n > len(data):
            raise ModelError(f"{path}: truncated or corrupt GGUF header ({size} bytes, needed {pos + n})")
        out = struct.unpack_from("<" + fmt, data, pos)
        pos += n
        return out[0] if len(out) == 1 else out

    def string() -> str:
        nonlocal pos
        n = take("Q")
        if pos + n > len(data):
            raise ModelError(f"{path}: truncated or corrupt GGUF header (string of {n} bytes at {pos})")
        pos += n
        return data[pos - n:pos].decode("utf-8", errors="replace")

    if data[:4] != b"GGUF":
        raise ModelError(f"{path}: not a GGUF file (starts with {bytes(data[:4])!r})")
    pos = 4
    version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    if version not in (2, 3) or n_tensors > 1 << 24 or n_kv > 1 << 24:
        raise ModelError(f"{path}: corrupt GGUF header (version {version}, {n_tensors} tensors, {n_kv} keys)")
    meta: dict[str, object] = {}
    for _ in range(n_kv):
        key, vtype = string(), take("I")
        if vtype == 8:
            meta[key] = string()
        elif vtype == 9:
            etype, n = take("I"), take("Q")
            if etype == 8:
                for _ in range(n):
                    n_bytes = take("Q")  # (not `pos += take(...)`: that would lose take's own advance)
                    pos += n_bytes
                meta[key] = n
            elif etype in scalar:
                pos += struct.calcsize("<" + scalar[etype]) * n
                meta[key] = n
            else:
                raise ModelError(f"{path}: corrupt GGUF header (array of type {etype} in {key})")
        elif vtype in scalar:
            meta[key] = take(scalar[vtype])
        else:
            raise ModelError(f"{path}: corrupt GGUF header (value type {vtype} for {key})")
    if pos > len(data):
        raise ModelError(f"{path}: truncated or corrupt GGUF header ({size} bytes)")
    align = meta.get("general.alignment", 32)
    ends = []
    for _ in range(n_tensors):
        name, n_dims = string(), take("I")
        if n_dims > 4:
            raise ModelError(f"{path}: corrupt GGUF header (tensor {name} has {n_dims} dims)")
        ne = [take("Q") for _ in range(n_dims)]
        ttype, offset = take("I"), take("Q")
        ends.append((name, ne, ttype, offset))
    start = -(-pos // align) * align
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for name, ne, ttype, offset in ends:
        try:
            block, tsize = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            continue  # a type gguf-py does not know yet: let llama.cpp judge
        end = start + offset + math.prod(ne[1:]) * (ne[0] // block) * tsize if ne else start + offset
        if end > size:
            raise ModelError(f"{path}: truncated GGUF file: tensor {name} ends at byte {end}, "
                             f"the file has {size} bytes")
    return meta


def _n_vocab(model_gguf: Path) -> int:
    meta = _gguf_meta(model_gguf)
    n = meta.get("tokenizer.ggml.tokens")
    if not isinstance(n, int) or n <= 0:
        raise ModelError(f"{model_gguf}: no tokenizer.ggml.tokens list (llama.cpp's n_vocab)")
    return n


def _threads(threads: int | None) -> list[str]:
    return ["-t", str(int(threads))] if threads else []


# ---------------------------------------------------------------------------------------------- tokenize

def tokenize(model_gguf: Path | str, text: str, add_bos: bool = False, parse_special: bool = False,
             timeout: float = 300) -> list[int]:
    """Token ids of `text` under the GGUF's own tokenizer (`llama-tokenize -f FILE --ids --no-escape [--no-bos]`).

    The text is passed byte-exact through a file. `add_bos=True` adds BOS only where the GGUF asks for it
    (tokenizer.ggml.add_bos_token), like llama.cpp itself. `parse_special`: special-token text (``<|endoftext|>``)
    becomes the special token; otherwise it is tokenized as plain text. llama-tokenize 0.3.36 parses special
    tokens by default and turns that off with --no-parse-special; a build with --parse-special instead is handled.
    """
    exe = require("llama-tokenize")
    _gguf_meta(Path(model_gguf))
    args = [exe, "-m", model_gguf, "--ids", "--no-escape"]  # logs go to stderr, the id list to stdout
    if not add_bos:
        args.append("--no-bos")
    flags = _help(exe)
    if parse_special and "--parse-special" in flags:
        args.append("--parse-special")
    elif not parse_special and "--no-parse-special" in flags:
        args.append("--no-parse-special")
    elif parse_special != ("--no-parse-special" in flags):
        raise LlamaCppError(f"{exe.name} has neither --parse-special nor --no-parse-special: cannot choose "
                            f"parse_special={parse_special}")
    with tempfile.TemporaryDirectory(prefix="qtool-tok-") as d:
        f = Path(d) / "text.txt"
        f.write_bytes(text.encode("utf-8"))
        args += ["-f", f]
        res = _run(args, timeout, f"tokenize with {model_gguf}")
    m = re.search(r"\[([0-9,\s-]*)\]\s*$", res.stdout)
    if not m:
        raise LlamaCppError(f"llama-tokenize printed no id list:\n{_tail(res.stdout)}\n{_tail(res.stderr)}")
    return [int(x) for x in m.group(1).replace(",", " ").split()]


_HELP: dict[Path, str] = {}


def _help(exe: Path) -> str:
    if exe not in _HELP:
        try:
            r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, errors="replace", timeout=60,
                               stdin=subprocess.DEVNULL, check=False)
            _HELP[exe] = r.stdout + r.stderr
        except (OSError, subprocess.TimeoutExpired):
            _HELP[exe] = ""
    return _HELP[exe]


# ---------------------------------------------------------------------------------------------- the logits file

def n_scored(ctx: int) -> int:
    """Positions per chunk that llama-perplexity scores and stores: ctx//2 .. ctx-2."""
    return ctx - 1 - ctx // 2


def _row_words(n_vocab: int) -> int:
    return 2 * ((n_vocab + 1) // 2) + 4


def encode_logprobs(lp: torch.Tensor) -> np.ndarray:
    """Log-probs [rows, V] (any float dtype; normalized or not) -> llama.cpp's uint16 rows [rows, nv].

    The same arithmetic as perplexity.cpp's writer: per row, span = min(top - min, 16) nats, float32 scale =
    span / 65535, codes = round-half-even((lp - (top - span)) / scale) for lp above the floor, else 0.
    """
    lp = torch.log_softmax(lp.double(), dim=-1)
    rows, v = lp.shape
    top = lp.max(-1).values
    lo = torch.maximum(lp.min(-1).values, top - LOGP_SPAN)
    scale = ((top - lo).float() / 65535.0)
    lo32 = lo.float()
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    codes = ((lp.float() - lo32[:, None]) * inv[:, None]).double().round()  # torch.round: half to even
    codes = torch.where(lp > lo[:, None], codes, torch.zeros_like(codes)).clamp(0, 65535)
    out = np.zeros((rows, _row_words(v)), dtype=np.uint16)
    out[:, 0:2] = scale.numpy().astype(np.float32).view(np.uint16).reshape(rows, 2)
    out[:, 2:4] = lo32.numpy().astype(np.float32).view(np.uint16).reshape(rows, 2)
    out[:, 4:4 + v] = codes.to(torch.int32).numpy().astype(np.uint16)
    return out


def decode_logprobs(rows: np.ndarray, n_vocab: int) -> torch.Tensor:
    """llama.cpp's uint16 rows [..., nv] -> float32 log-probs [..., n_vocab] (scale * code + min_log_prob)."""
    rows = np.ascontiguousarray(rows)
    head = rows[..., 0:4].copy().view(np.float32)  # [..., 2]: scale, min_log_prob
    out = rows[..., 4:4 + n_vocab].astype(np.float32) * head[..., 0:1] + head[..., 1:2]
    return torch.from_numpy(out)


@dataclass(frozen=True)
class LogitsFile:
    """A llama-perplexity base-logits file: ids [n_chunks, ctx] and decoded log-probs [n_chunks, n_pos, V]."""

    ctx: int
    n_vocab: int
    tokens: torch.Tensor
    logprobs: torch.Tensor


def write_kld_base(path: Path | str, ids: torch.Tensor, logprobs: torch.Tensor) -> Path:
    """Write a `--kl-divergence-base` file in llama.cpp's format (module docstring) from our own log-probs.

    ids: int [n_chunks, ctx]; logprobs: float [n_chunks, ctx - 1 - ctx//2, V] (or a function of the chunk index
    giving one chunk's [ctx - 1 - ctx//2, V]: streamed), the distributions at positions
    ctx//2 .. ctx-2 (row j predicts ids[:, ctx//2 + j + 1]), e.g. a transformers model's log_softmax. Written to a
    temporary name and renamed.
    """
    path = Path(path)
    ids = torch.as_tensor(ids)
    if ids.dim() != 2:
        raise ValueError(f"ids must be [n_chunks, ctx], got shape {tuple(ids.shape)}")
    n_chunks, ctx = ids.shape
    if callable(logprobs):  # one chunk at a time: chunk c -> [ctx - 1 - ctx//2, V] (a whole run need not fit in memory)
        chunk = logprobs
        first = chunk(0)
        n_vocab = first.shape[-1]
        chunks = lambda c: first if c == 0 else chunk(c)  # noqa: E731
    else:
        if logprobs.dim() != 3 or logprobs.shape[:2] != (n_chunks, n_scored(ctx)):
            raise ValueError(f"logprobs must be [n_chunks={n_chunks}, ctx-1-ctx//2={n_scored(ctx)}, V], "
                             f"got {tuple(logprobs.shape)}")
        n_vocab = logprobs.shape[-1]
        chunks = lambda c: logprobs[c]  # noqa: E731
    if int(ids.min()) < 0 or int(ids.max()) >= n_vocab:
        raise ValueError(f"ids must lie in [0, {n_vocab})")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Iii", ctx, n_vocab, n_chunks))
            f.write(ids.to(torch.int32).numpy().astype("<i4").tobytes())
            for c in range(n_chunks):
                lp = chunks(c)
                if lp.shape != (n_scored(ctx), n_vocab):
                    raise ValueError(f"chunk {c}: log-probs of shape {tuple(lp.shape)}, expected {(n_scored(ctx), n_vocab)}")
                f.write(encode_logprobs(lp).astype("<u2").tobytes())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_kld_base(path: Path | str, *, decode: bool = True) -> LogitsFile:
    """Read a llama-perplexity base-logits file (its own or `write_kld_base`'s); checks the size exactly."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(20)
        if len(head) < 20 or head[:8] != MAGIC:
            raise LlamaCppError(f"{path}: not a llama-perplexity logits file (no {MAGIC!r} header)")
        ctx, n_vocab, n_chunks = struct.unpack("<Iii", head[8:])
        n_pos, nv = n_scored(ctx), _row_words(n_vocab)
        want = 20 + 4 * n_chunks * ctx + 2 * n_chunks * n_pos * nv
        if n_vocab <= 0 or n_chunks <= 0 or size != want:
            raise LlamaCppError(f"{path}: {size} bytes, expected {want} for ctx={ctx} n_vocab={n_vocab} "
                                f"n_chunks={n_chunks} (truncated or not llama.cpp's format)")
        tokens = np.frombuffer(f.read(4 * n_chunks * ctx), dtype="<i4").reshape(n_chunks, ctx).astype(np.int64)
        rows = np.frombuffer(f.read(), dtype="<u2").reshape(n_chunks, n_pos, nv)
    lp = decode_logprobs(rows, n_vocab) if decode else torch.from_numpy(rows.astype(np.int32))
    return LogitsFile(ctx, n_vocab, torch.from_numpy(tokens), lp)


# ---------------------------------------------------------------------------------------------- exact-id log-probs

def _codes(n_vocab: int) -> np.ndarray:
    """[n_vocab, 5] uint8: the 5 bytes the TEST vocabulary tokenizes to each id (module docstring)."""
    if n_vocab > _CODE_BASE ** _CODE_LEN:
        raise LlamaCppError(f"n_vocab {n_vocab} is too large for the exact-id text codes (max {_CODE_BASE ** 5})")
    h_min = _CODE_LO * (_CODE_BASE ** _CODE_LEN - 1) // (_CODE_BASE - 1)
    offset = (np.arange(n_vocab, dtype=np.int64) - h_min) % n_vocab
    digits = np.stack([(offset // _CODE_BASE ** (_CODE_LEN - 1 - i)) % _CODE_BASE for i in range(_CODE_LEN)], 1)
    return (digits + _CODE_LO).astype(np.uint8)


def ids_to_test_text(ids: torch.Tensor, n_vocab: int) -> bytes:
    """Text that llama.cpp's TEST vocabulary (n_vocab tokens) tokenizes to exactly `ids` (flattened)."""
    flat = torch.as_tensor(ids).reshape(-1).numpy().astype(np.int64)
    return _codes(n_vocab)[flat].tobytes()


def _batch_args(ctx: int, n_chunks: int) -> list[str]:
    """One llama_decode batch of whole chunks (<= 2048 tokens, llama.cpp's default batch), as llama-perplexity wants."""
    n_seq = max(1, min(n_chunks, 2048 // ctx))
    return ["-c", str(ctx), "-b", str(n_seq * ctx)]


def _kv_args(kv_type: str | None, flash_attn: str | None) -> list[str]:
    return (["-ctk", kv_type, "-ctv", kv_type] if kv_type else []) + (["-fa", flash_attn] if flash_attn else [])


def _timeout(timeout: float | None, n_tokens: int) -> float:
    return timeout if timeout is not None else 300.0 + n_tokens * 0.2  # generous: 5 tokens/s


def logprobs(model_gguf: Path | str, ids: torch.Tensor, threads: int | None = None, *, kv_type: str | None = None,
             flash_attn: str | None = None, timeout: float | None = None,
             tmp_dir: Path | str | None = None) -> torch.Tensor:
    """llama.cpp's log-probs of exactly these token ids: float32 [n_chunks, ctx - 1 - ctx//2, n_vocab].

    ids: int [n_chunks, ctx] (ctx >= 4), each row one independent chunk (KV cache cleared between chunks), fed
    as-is (no BOS is added or substituted). Row j of chunk c is llama.cpp's log-softmax at position ctx//2 + j,
    i.e. the distribution of token ids[c, ctx//2 + j + 1]: the scored second half of llama-perplexity (and of
    qtool.eval.perplexity), ctx//2 - 1 rows for an even ctx. Runs `llama-perplexity --kl-divergence-base` on text
    coded for llama.cpp's TEST vocabulary (module docstring) and checks the ids llama.cpp stored.

    Precision: the values come from llama.cpp's uint16 file format: within 1.23e-4 nats (scale/2, scale <=
    16/65535) of llama.cpp's float32 log-softmax for tokens within 16 nats of the row's top; tokens further below
    read as top - 16. kv_type: KV-cache type (-ctk/-ctv, e.g. "f32"; llama.cpp's default is f16); flash_attn:
    "on"/"off"/"auto" (-fa; llama.cpp's default auto turns it on for the CPU, whose flash attention works in F16).
    Against transformers in float32 (tiny Llama, F32 GGUF): kv_type="f32", flash_attn="off" agrees within 1.6e-4
    nats (the file's rounding plus ~4e-5), llama.cpp's defaults within 9e-3.
    Memory: the result holds n_chunks * n_pos * n_vocab float32 (e.g. 1 GB for 20 chunks of 512 at 49k vocab).
    """
    exe = require("llama-perplexity")
    model_gguf = Path(model_gguf)
    n_vocab = _n_vocab(model_gguf)
    ids = torch.as_tensor(ids)
    if ids.dim() != 2 or ids.shape[1] < 4 or ids.shape[0] < 1:
        raise ValueError(f"ids must be [n_chunks >= 1, ctx >= 4], got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or int(ids.min()) < 0 or int(ids.max()) >= n_vocab:
        raise ValueError(f"ids must be integers in [0, {n_vocab})")
    n_chunks, ctx = ids.shape
    # llama-perplexity wants at least 2 chunks of text; a padding chunk is tokenized but not evaluated (--chunks)
    feed = ids if n_chunks >= 2 else torch.cat([ids, torch.zeros_like(ids)])
    with tempfile.TemporaryDirectory(prefix="qtool-llppl-", dir=tmp_dir) as d:
        text, out = Path(d) / "ids.txt", Path(d) / "logits.bin"
        text.write_bytes(ids_to_test_text(feed, n_vocab))
        args = [exe, "-m", model_gguf, "-f", text, "--no-escape", *_batch_args(ctx, n_chunks),
                "--chunks", str(n_chunks), "--kl-divergence-base", out,
                "--override-kv", "tokenizer.ggml.model=str:test,tokenizer.ggml.add_bos_token=bool:false,"
                                 "tokenizer.ggml.add_eos_token=bool:false",
                *_kv_args(kv_type, flash_attn), *_threads(threads)]
        res = _run(args, _timeout(timeout, ids.numel()), f"log-probs of {model_gguf}")
        if not out.is_file() or out.stat().st_size <= 20:
            raise LlamaCppError(f"llama-perplexity wrote no logits for {model_gguf}\nstderr:\n{_tail(res.stderr)}")
        got = read_kld_base(out)
    if got.ctx != ctx or got.n_vocab != n_vocab or got.tokens.shape[0] != n_chunks:
        raise LlamaCppError(f"llama-perplexity stored ctx={got.ctx} n_vocab={got.n_vocab} chunks="
                            f"{got.tokens.shape[0]}, expected {ctx}, {n_vocab}, {n_chunks}")
    if not torch.equal(got.tokens, ids.to(torch.int64)):
        bad = (got.tokens != ids.to(torch.int64)).nonzero()[0].tolist()
        raise LlamaCppError(f"llama.cpp evaluated other token ids than requested (first difference at chunk "
                            f"{bad[0]} position {bad[1]}: {int(got.tokens[bad[0], bad[1]])} vs "
                            f"{int(ids[bad[0], bad[1]])}); the exact-id text coding does not work for this model")
    return got.logprobs


# ---------------------------------------------------------------------------------------------- KLD against a base

@dataclass(frozen=True)
class KLDResult:
    """`llama-perplexity --kl-divergence` output. Percentages are 0..100."""

    ppl: float
    ppl_stderr: float | None
    base_ppl: float | None
    kld_mean: float
    kld_stderr: float | None
    kld_p99: float | None  # only printed by llama.cpp for >= 100 scored positions
    kld_median: float | None
    kld_max: float | None
    rms_dp_pct: float | None
    same_top_pct: float
    n_chunks: int
    ctx: int
    n_tokens_scored: int

    def to_json(self) -> dict:
        return asdict(self)


_F = r"([-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf|-nan|-inf))"
_CHUNK_LINE = re.compile(rf"^\s*(\d+)\s+{_F}\s*±\s*{_F}\s+{_F}\s*±\s*{_F}\s+{_F}\s*±\s*{_F}\s+{_F}\s*±\s*{_F}\s*%"
                         rf"\s+{_F}\s*±\s*{_F}\s*%\s*$", re.M)


def _stat(text: str, label: str, pm: bool = False) -> tuple[float, float | None] | None:
    m = re.search(rf"^{label}\s*:\s*{_F}" + (rf"\s*±\s*{_F}" if pm else ""), text, re.M)
    if not m:
        return None
    return float(m.group(1)), (float(m.group(2)) if pm else None)


def parse_kld_output(text: str, ctx: int, n_chunks: int) -> KLDResult:
    """Parse llama-perplexity --kl-divergence stdout: the summary block when printed, else the last chunk line."""
    lines = _CHUNK_LINE.findall(text)
    if not lines:
        raise LlamaCppError(f"llama-perplexity printed no KL-divergence lines:\n{_tail(text)}")
    last = [float(x) for x in lines[-1]]
    chunk_ppl, chunk_ppl_err, _, _, chunk_kld, chunk_kld_err, chunk_rms, _, chunk_top, _ = last[1:]
    ppl = _stat(text, r"Mean PPL\(Q\)", pm=True)
    base = _stat(text, r"Mean PPL\(base\)", pm=True)
    kld = _stat(text, r"Mean\s+KLD", pm=True)
    rms = re.search(rf"^RMS Δp\s*:\s*{_F}", text, re.M)
    top = _stat(text, "Same top p", pm=True)

    def one(label):
        s = _stat(text, label)
        return s[0] if s else None

    return KLDResult(
        ppl=ppl[0] if ppl else chunk_ppl, ppl_stderr=ppl[1] if ppl else chunk_ppl_err,
        base_ppl=base[0] if base else None,
        kld_mean=kld[0] if kld else chunk_kld, kld_stderr=kld[1] if kld else chunk_kld_err,
        kld_p99=one(r"99\.0%\s+KLD"), kld_median=one(r"Median\s+KLD"), kld_max=one(r"Maximum KLD"),
        rms_dp_pct=float(rms.group(1)) if rms else chunk_rms,
        same_top_pct=top[0] if top else chunk_top,
        n_chunks=int(last[0]), ctx=ctx, n_tokens_scored=int(last[0]) * n_scored(ctx))


def perplexity_kld(model_gguf: Path | str, base_file: Path | str, threads: int | None = None, *,
                   kv_type: str | None = None, flash_attn: str | None = None,
                   timeout: float | None = None) -> KLDResult:
    """`llama-perplexity --kl-divergence` of `model_gguf` against a base-logits file (ours: `write_kld_base`,
    or llama.cpp's own), on exactly the ids stored in that file (BOS insertion switched off).

    The base side is the file's uint16 log-probs (precision in the module docstring); llama.cpp computes per
    position sum over base tokens with log p_base > -16 of p_base * (log p_base - log q), q = the model's float
    log-softmax. Returns PPL(Q), PPL(base), mean KLD (and its stderr, median, 99th percentile, max when printed),
    RMS Δp and same-top %. kv_type / flash_attn as in `logprobs` (None: llama.cpp's defaults, what users run).
    """
    exe = require("llama-perplexity")
    model_gguf, base_file = Path(model_gguf), Path(base_file)
    n_vocab = _n_vocab(model_gguf)
    with open(base_file, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:8] != MAGIC:
        raise LlamaCppError(f"{base_file}: not a llama-perplexity logits file (no {MAGIC!r} header)")
    ctx, file_vocab, n_chunks = struct.unpack("<Iii", head[8:])
    want = 20 + 4 * n_chunks * ctx + 2 * n_chunks * n_scored(ctx) * _row_words(file_vocab)
    if base_file.stat().st_size != want:
        raise LlamaCppError(f"{base_file}: {base_file.stat().st_size} bytes, expected {want} (truncated?)")
    if file_vocab != n_vocab:
        raise LlamaCppError(f"{base_file} has n_vocab {file_vocab}, {model_gguf} has {n_vocab}")
    args = [exe, "-m", model_gguf, "--kl-divergence-base", base_file, "--kl-divergence", *_batch_args(ctx, n_chunks),
            "--override-kv", "tokenizer.ggml.add_bos_token=bool:false,tokenizer.ggml.add_eos_token=bool:false",
            *_kv_args(kv_type, flash_attn), *_threads(threads)]
    def complete(stdout: str) -> bool:  # every chunk line, and the summary that llama.cpp prints from 100 positions
        lines = _CHUNK_LINE.findall(stdout)
        summary = n_chunks * n_scored(ctx) < 100 or re.search(r"^Same top p\s*:", stdout, re.M)
        return bool(lines) and int(lines[-1][0]) == n_chunks and bool(summary)

    res = _run(args, _timeout(timeout, n_chunks * ctx), f"KL divergence of {model_gguf}", complete)
    for err in ("failed reading", "does not look like", "inconsistent vocabulary", "failed to decode"):
        if err in res.stderr:
            raise LlamaCppError(f"llama-perplexity --kl-divergence: {err}\nstderr:\n{_tail(res.stderr)}")
    out = parse_kld_output(res.stdout, ctx, n_chunks)
    if out.n_chunks != n_chunks:
        raise LlamaCppError(f"llama-perplexity scored {out.n_chunks} of {n_chunks} chunks\n{_tail(res.stderr)}")
    return out


# ---------------------------------------------------------------------------------------------- speed

@dataclass(frozen=True)
class BenchResult:
    """llama-bench rates in tokens/s (mean and stddev over repetitions)."""

    prompt_tps: float
    prompt_tps_std: float
    gen_tps: float
    gen_tps_std: float
    n_prompt: int
    n_gen: int
    threads: int
    raw: list

    def to_json(self) -> dict:
        return asdict(self)


def bench(model_gguf: Path | str, n_prompt: int = 512, n_gen: int = 128, reps: int = 3, threads: int | None = None,
          *, timeout: float = 1800) -> BenchResult:
    """`llama-bench -o json`: prompt processing (n_prompt tokens) and generation (n_gen tokens) speed."""
    exe = require("llama-bench")
    model_gguf = Path(model_gguf)
    _gguf_meta(model_gguf)
    args = [exe, "-m", model_gguf, "-p", str(n_prompt), "-n", str(n_gen), "-r", str(reps), "-o", "json",
            *_threads(threads)]
    res = _run(args, timeout, f"llama-bench of {model_gguf}")
    try:
        start = res.stdout.index("[")
        rows = json.loads(res.stdout[start:])
    except ValueError:
        raise LlamaCppError(f"llama-bench printed no JSON:\n{_tail(res.stdout)}\n{_tail(res.stderr)}") from None
    pp = [r for r in rows if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0]
    tg = [r for r in rows if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0]
    if not pp or not tg:
        raise LlamaCppError(f"llama-bench JSON lacks a prompt or generation test:\n{_tail(res.stdout)}")
    return BenchResult(prompt_tps=float(pp[0]["avg_ts"]), prompt_tps_std=float(pp[0].get("stddev_ts", 0.0)),
                       gen_tps=float(tg[0]["avg_ts"]), gen_tps_std=float(tg[0].get("stddev_ts", 0.0)),
                       n_prompt=int(pp[0]["n_prompt"]), n_gen=int(tg[0]["n_gen"]),
                       threads=int(pp[0].get("n_threads", threads or 0)), raw=rows)
