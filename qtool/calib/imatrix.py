"""llama.cpp importance-matrix files: the GGUF imatrix and the legacy `.dat`, both written and read.

Layouts: docs/formats.md 3.3. GGUF: keys `general.type = "imatrix"`, `imatrix.datasets`, `imatrix.chunk_count`,
`imatrix.chunk_size` (llama-quantize refuses a file lacking one); per weight F32 `<weight>.in_sum2` ne={n_cols}
(raw sum of x^2) and `<weight>.counts` ne={1} (tokens, as float); llama-quantize uses in_sum2 / counts.
Legacy: i32 n; per entry i32 len, name, i32 ncall, i32 nval, f32 mean*ncall[nval]; optional trailer i32
chunk_count, i32 len, dataset. Only dense entries are handled (per-expert MoE entries are refused).
Writers sort names (byte-identical reruns; the GGUF bytes equal llama-imatrix's own) and write atomically.
"""

from __future__ import annotations

import math
import os
import secrets
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np
import torch

from qtool.errors import ModelError
from qtool.io.arch import ARCHS

SUM_SUFFIX, COUNT_SUFFIX = ".in_sum2", ".counts"
_GGML_MAX_NAME = 64  # ggml keeps tensor names in char[64], NUL included
_U32_MAX, _I32_MAX = 2**32 - 1, 2**31 - 1
_KEYS = gguf.Keys.IMatrix


@dataclass(frozen=True)
class Imatrix:
    """An importance matrix as llama-quantize sees it. Names are GGUF weight names (`blk.0.attn_q.weight`).

    means:  mean of x^2 per input column (float32, shape (n_cols,)): what llama-quantize weights errors by.
    sums:   the values as stored: GGUF raw sum of x^2; legacy mean * ncall.
    counts: GGUF: tokens seen; legacy `.dat`: ncall (the legacy file holds no token count).
    chunk_size is 0 for legacy files (they do not record it).
    """

    means: dict[str, torch.Tensor]
    sums: dict[str, torch.Tensor]
    counts: dict[str, int]
    datasets: tuple[str, ...]
    chunk_count: int
    chunk_size: int
    legacy: bool

    def entries(self) -> dict[str, tuple[torch.Tensor, int]]:
        """(sums, count) per name: what the writers take, so a GGUF imatrix is rewritten byte-identically."""
        return {name: (self.sums[name], self.counts[name]) for name in self.sums}


# ---------------------------------------------------------------- names


@lru_cache(maxsize=16)
def _name_map(n_layers: int) -> gguf.TensorNameMap:
    return gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, n_layers)


def hf_to_gguf_name(module: str, n_layers: int) -> str:
    """`model.layers.3.mlp.down_proj` (or with `.weight`) -> `blk.3.ffn_down.weight` (Llama, Mistral, Qwen2)."""
    name = _name_map(n_layers).get_name(module.removesuffix(".weight"))
    if name is None:
        raise ModelError(f"no llama.cpp tensor name for module {module!r} "
                         f"(not a Llama-family weight, or its layer index is not below n_layers={n_layers})")
    return name + ".weight"


@lru_cache(maxsize=16)
def _reverse_map(n_layers: int) -> dict[str, str]:
    arch = ARCHS["LlamaForCausalLM"]
    modules = [arch.block_prefix(i) + lin for i in range(n_layers) for lin in arch.linears]
    modules += [arch.embed.removesuffix(".weight"), arch.lm_head.removesuffix(".weight")]
    return {hf_to_gguf_name(m, n_layers): m for m in modules}


def gguf_to_hf_name(name: str, n_layers: int) -> str:
    """`blk.3.ffn_down.weight` (or without `.weight`) -> `model.layers.3.mlp.down_proj` (linears and embeddings)."""
    key = name if name.endswith(".weight") else name + ".weight"
    try:
        return _reverse_map(n_layers)[key]
    except KeyError:
        raise ModelError(f"no Hugging Face Llama module for llama.cpp tensor {name!r} "
                         f"(not a linear/embedding weight, or its block index is not below n_layers={n_layers})") from None


# ---------------------------------------------------------------- writers


def _checked(entries: Mapping[str, tuple[torch.Tensor, int]]) -> list[tuple[str, np.ndarray, int]]:
    """Entries sorted by name as (name, float32 sums, count); contract violations raise ValueError."""
    if not entries:
        raise ValueError("an imatrix needs at least one entry (llama.cpp refuses an empty one)")
    out = []
    for name in sorted(entries):
        sums, count = entries[name]
        if not isinstance(name, str) or not name.endswith(".weight") or name == ".weight":
            raise ValueError(f"imatrix entry names are GGUF weight names like 'blk.0.attn_q.weight', got {name!r}")
        if len((name + SUM_SUFFIX).encode()) >= _GGML_MAX_NAME:
            raise ValueError(f"imatrix entry name {name!r} is too long for ggml ({_GGML_MAX_NAME - 1} bytes with {SUM_SUFFIX!r})")
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 1 <= count <= _I32_MAX:
            raise ValueError(f"imatrix entry {name!r}: token count must be an int in [1, 2^31), got {count!r}")
        arr = torch.as_tensor(sums).detach().to("cpu", torch.float32).numpy()
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"imatrix entry {name!r}: sums must be a non-empty 1-D vector (one per input column), "
                             f"got shape {tuple(arr.shape)}")
        if not np.isfinite(arr).all():
            raise ModelError(f"imatrix entry {name!r}: calibration produced non-finite sums of x^2 (overflow?)")
        if (arr < 0).any():
            raise ValueError(f"imatrix entry {name!r}: sums of x^2 cannot be negative")
        out.append((name, np.ascontiguousarray(arr), int(count)))
    return out


def _u32(what: str, value: int, top: int = _U32_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= top:
        raise ValueError(f"{what} must be an int in [0, {top}], got {value!r}")
    return int(value)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) for a fresh file in path's directory, fsync it, then rename it over path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_imatrix_gguf(path, entries: Mapping[str, tuple[torch.Tensor, int]], *, datasets: Sequence[str],
                       chunk_count: int, chunk_size: int) -> None:
    """Write a GGUF imatrix: per GGUF weight name, (sum of x^2 per input column, tokens seen)."""
    checked = _checked(entries)
    if isinstance(datasets, str) or not datasets or not all(isinstance(d, str) for d in datasets):
        # gguf-py silently drops an empty array, and llama-quantize then refuses the file ("missing imatrix metadata")
        raise ValueError(f"datasets must be a non-empty list of strings, got {datasets!r}")
    chunk_count, chunk_size = _u32("chunk_count", chunk_count), _u32("chunk_size", chunk_size)

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(tmp, arch="imatrix")
        del w.kv_data[0][gguf.Keys.General.ARCHITECTURE]  # llama-imatrix writes no architecture
        w.add_type(gguf.GGUFType.IMATRIX)
        w.add_array(_KEYS.DATASETS, list(datasets))
        w.add_uint32(_KEYS.CHUNK_COUNT, chunk_count)
        w.add_uint32(_KEYS.CHUNK_SIZE, chunk_size)
        for name, sums, count in checked:
            # 1-D, as ggml's writer drops trailing ne of 1 (so the bytes match llama-imatrix's own file)
            w.add_tensor(name + SUM_SUFFIX, sums)
            w.add_tensor(name + COUNT_SUFFIX, np.full((1,), count, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    _atomic_write(Path(path), write)


def write_imatrix_dat(path, entries: Mapping[str, tuple[torch.Tensor, int]], *, chunk_count: int, dataset: str) -> None:
    """Write a legacy `.dat` imatrix with ncall = 1, so each stored vector is the mean of x^2."""
    checked = _checked(entries)
    chunk_count = _u32("chunk_count", chunk_count, _I32_MAX)
    parts = [struct.pack("<i", len(checked))]
    for name, sums, count in checked:
        raw = name.encode()
        means = sums / np.float32(count)  # float32 / float32, as llama.cpp divides the GGUF form
        parts += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", 1, means.size), means.astype("<f4").tobytes()]
    ds = dataset.encode()
    parts += [struct.pack("<ii", chunk_count, len(ds)), ds]
    _atomic_write(Path(path), lambda tmp: tmp.write_bytes(b"".join(parts)))


# ---------------------------------------------------------------- reader
# A small bounds-checked parser, not gguf.GGUFReader: on a corrupt array count that reader loops without
# advancing and eats all memory, and on truncation it fails with numpy errors that name nothing.

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY, _UINT32, _F32 = 8, 9, 4, 0


class _Cursor:
    """Little-endian reads over the file's bytes; running past the end is a ModelError naming the field."""

    def __init__(self, path: Path, data: bytes, kind: str):
        self.path, self.data, self.kind, self.pos = path, data, kind, 0

    def fail(self, problem: str) -> ModelError:
        return ModelError(f"{self.path}: corrupt {self.kind}: {problem}")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ModelError(f"{self.path}: truncated {self.kind}: {what} needs {n} bytes at byte {self.pos}, "
                             f"the file has {len(self.data)}")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def text(self, n: int, what: str) -> str:
        try:
            return self.take(n, what).decode()
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, vtype: int, key: str) -> tuple[list[int], object]:
        """A GGUF metadata value and its type chain ([ARRAY, element type] for arrays)."""
        if vtype in _SCALAR:
            return [vtype], self.unpack(_SCALAR[vtype], f"the value of {key!r}")
        if vtype == _STRING:
            return [vtype], self.text(self.unpack("<Q", f"the length of {key!r}"), f"the value of {key!r}")
        if vtype != _ARRAY:
            raise self.fail(f"key {key!r} has unknown value type {vtype}")
        etype, n = self.unpack("<I", f"the array type of {key!r}"), self.unpack("<Q", f"the array length of {key!r}")
        if etype == _ARRAY or n > len(self.data) - self.pos:  # ggml refuses nested arrays; elements take >= 1 byte
            raise self.fail(f"array {key!r} of element type {etype} claims {n} elements")
        return [vtype, etype], [self.value(etype, key)[1] for _ in range(n)]


def read_imatrix(path) -> Imatrix:
    """Read a GGUF or legacy `.dat` imatrix (told apart by the GGUF magic), validating everything."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelError(f"{path}: cannot read imatrix file: {e.strerror or e}") from None
    if data[:4] == b"GGUF":
        return _read_gguf(_Cursor(path, data, "GGUF imatrix"))
    return _read_dat(_Cursor(path, data, "legacy imatrix"))


def _imatrix(path: Path, raw: dict[str, tuple[np.ndarray, float]], **meta) -> Imatrix:
    """Validate values and divide as llama-quantize does (a zero count gives means of 1.0)."""
    if not raw:
        raise ModelError(f"{path}: imatrix has no entries")
    means, sums, counts = {}, {}, {}
    for name in sorted(raw):
        values, count = raw[name]
        if not np.isfinite(values).all() or (values < 0).any():
            raise ModelError(f"{path}: imatrix entry {name!r} holds NaN, infinite or negative sums of x^2")
        if not np.isfinite(count) or count < 0:
            raise ModelError(f"{path}: imatrix entry {name!r} has an invalid count {count}")
        n = math.floor(count + 0.5)  # llama.cpp lround()s the stored float count
        values = values.astype(np.float32)
        mean = values / np.float32(n) if n > 0 else np.ones_like(values)
        sums[name], means[name], counts[name] = torch.from_numpy(values), torch.from_numpy(mean), n
    return Imatrix(means=means, sums=sums, counts=counts, **meta)


def _read_gguf(c: _Cursor) -> Imatrix:
    c.pos = 4
    if (version := c.unpack("<I", "the version")) not in (2, 3):
        raise c.fail(f"GGUF version {version} (2 and 3 are read)")
    n_tensors, n_kv = c.unpack("<Q", "the tensor count"), c.unpack("<Q", "the key count")
    if n_tensors > len(c.data) // 24 or n_kv > len(c.data) // 13:
        raise ModelError(f"{c.path}: truncated or corrupt GGUF imatrix: {n_tensors} tensors and {n_kv} keys "
                         f"cannot fit in {len(c.data)} bytes")
    kv: dict[str, tuple[list[int], object]] = {}
    for _ in range(n_kv):
        key = c.text(c.unpack("<Q", "a key length"), "a key")
        kv[key] = c.value(c.unpack("<I", f"the type of {key!r}"), key)
    if kv.get("general.type", ([_STRING], "imatrix")) != ([_STRING], "imatrix"):
        raise ModelError(f"{c.path}: GGUF file is not an imatrix (general.type is {kv['general.type'][1]!r})")
    meta = {}
    for key, want in ((_KEYS.DATASETS, [_ARRAY, _STRING]), (_KEYS.CHUNK_COUNT, [_UINT32]), (_KEYS.CHUNK_SIZE, [_UINT32])):
        if key not in kv:
            raise ModelError(f"{c.path}: GGUF imatrix lacks the {key!r} metadata (llama-quantize refuses such a file)")
        if kv[key][0] != want:
            got, exp = ("/".join(gguf.GGUFValueType(t).name for t in ts) for ts in (kv[key][0], want))
            raise ModelError(f"{c.path}: GGUF imatrix key {key!r} has type {got}, expected {exp}")
        meta[key.split(".")[1]] = kv[key][1]
    align_type, alignment = kv.get("general.alignment", ([_UINT32], 32))
    if align_type != [_UINT32] or alignment <= 0 or alignment & (alignment - 1):
        raise c.fail(f"general.alignment {alignment!r} is not a u32 power of two")
    infos = []
    for _ in range(n_tensors):
        name = c.text(c.unpack("<Q", "a tensor name length"), "a tensor name")
        if not 1 <= (n_dims := c.unpack("<I", f"the dims of {name!r}")) <= 4:
            raise c.fail(f"tensor {name!r} has {n_dims} dimensions")
        ne = [c.unpack("<Q", f"the shape of {name!r}") for _ in range(n_dims)]
        infos.append((name, ne, c.unpack("<I", f"the type of {name!r}"), c.unpack("<Q", f"the offset of {name!r}")))
    start, expect, tensors = -(-c.pos // alignment) * alignment, 0, {}
    for name, ne, ttype, offset in infos:  # offsets are relative to the aligned end of the infos
        if ttype != _F32:
            raise ModelError(f"{c.path}: imatrix tensor {name!r} has GGML type {ttype}; imatrix tensors must be F32")
        if name in tensors or offset != expect:  # ggml requires the running sum of padded sizes
            raise c.fail(f"tensor {name!r} is repeated or has offset {offset} where {expect} was expected")
        expect += -(-4 * math.prod(ne) // alignment) * alignment
        tensors[name] = (ne, start + offset)
    if start + expect > len(c.data):  # llama.cpp reads every tensor's padding too
        raise ModelError(f"{c.path}: truncated GGUF imatrix: tensor data needs bytes up to {start + expect}, "
                         f"the file has {len(c.data)}")
    raw = {}
    for sname in sorted(n for n in tensors if n.endswith(SUM_SUFFIX)):  # other tensors are ignored, as in llama.cpp
        name = sname.removesuffix(SUM_SUFFIX)
        (ne, at), counts = tensors[sname], tensors.get(name + COUNT_SUFFIX)
        if counts is None:
            raise ModelError(f"{c.path}: imatrix entry {name!r} has {SUM_SUFFIX} but no {COUNT_SUFFIX} tensor")
        n_mat, n_counts = math.prod(ne[1:]), math.prod(counts[0])
        if n_counts != n_mat or ne[0] == 0:
            raise ModelError(f"{c.path}: imatrix entry {name!r}: {SUM_SUFFIX} ne={ne} does not match {n_counts} count(s)")
        if n_mat != 1:
            raise ModelError(f"{c.path}: imatrix entry {name!r} has {n_mat} per-expert (MoE) vectors; "
                             "only dense entries are read")
        raw[name] = (np.frombuffer(c.data, "<f4", ne[0], at), float(np.frombuffer(c.data, "<f4", 1, counts[1])[0]))
    for cname in tensors:
        if cname.endswith(COUNT_SUFFIX) and cname.removesuffix(COUNT_SUFFIX) not in raw:
            raise ModelError(f"{c.path}: imatrix tensor {cname!r} has no matching {SUM_SUFFIX} tensor")
    return _imatrix(c.path, raw, datasets=tuple(meta["datasets"]), chunk_count=meta["chunk_count"],
                    chunk_size=meta["chunk_size"], legacy=False)


def _read_dat(c: _Cursor) -> Imatrix:
    n_entries = c.unpack("<i", "the entry count")
    if not 1 <= n_entries <= len(c.data) // 12:
        raise ModelError(f"{c.path}: not an imatrix: implausible legacy entry count {n_entries} (and no GGUF magic)")
    raw = {}
    for i in range(n_entries):
        where = f"entry {i + 1}/{n_entries}"
        name_len = c.unpack("<i", f"the name length of {where}")
        if not 0 < name_len < 4096:
            raise c.fail(f"{where} has name length {name_len}")
        name = c.text(name_len, f"the name of {where}")
        ncall, nval = c.unpack("<i", f"ncall of {name!r}"), c.unpack("<i", f"nval of {name!r}")
        if ncall < 0 or nval < 1:
            raise c.fail(f"entry {name!r} has ncall={ncall}, nval={nval}")
        if name in raw:
            raise c.fail(f"it names {name!r} twice")
        values = np.frombuffer(c.take(4 * nval, f"the {nval} values of {name!r}"), dtype="<f4")
        raw[name] = (values, float(ncall or 1))  # ncall 0: llama-quantize uses the values as stored
    chunk_count, datasets = 0, ()
    if c.pos < len(c.data):  # the trailer, and the dataset name in it, are optional
        chunk_count = c.unpack("<i", "the chunk count")
        if c.pos < len(c.data):
            dataset = c.take(c.unpack("<i", "the dataset name length"), "the dataset name")
            datasets = (dataset.decode("utf-8", errors="replace"),) if dataset else ()
    if c.pos != len(c.data) or chunk_count < 0:
        raise c.fail(f"{len(c.data) - c.pos} unexpected bytes after the entries, or chunk count {chunk_count}")
    return _imatrix(c.path, raw, datasets=datasets, chunk_count=chunk_count, chunk_size=0, legacy=True)
