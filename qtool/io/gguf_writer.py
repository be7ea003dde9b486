"""Writes a GGUF file llama.cpp loads: streaming, atomic, deterministic.

Tensors arrive one at a time under their Hugging Face names (float tensors, or `QTensor`s of a GGUF codec)
and go straight to a spill file next to the output (memory holds no tensor after `add` returns). `finish`
writes the container with the `gguf` package's `GGUFWriter` (header, metadata, tensor infos in a fixed order,
then each tensor's bytes read back from the spill file), into a temporary sibling renamed into place only when
complete; `abort` (or an exception) removes everything. No timestamps: the same inputs give identical bytes.

What the writer knows of the model comes from the architecture row (`io/arch.py`): the GGUF architecture
name, the HF -> GGUF tensor names (gguf-py's `TensorNameMap`), and whether q/k rows are permuted for ggml's
NORM rope (llama; formats.md §1.5: a row permutation, so it is applied to the packed rows of any block type).
1-D tensors and norms are written as F32 (what llama.cpp's converter does); other float tensors in the float
type the caller asks for.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch

from qtool.formats.base import QTensor
from qtool.io.hf_writer import prepare_output

ALIGNMENT = 32
_FLOAT_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                "bf16": gguf.GGMLQuantizationType.BF16}
GGUF_FLOAT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}  # torch dtype -> GGUF float type


def permute_rows(rows: torch.Tensor, n_groups: int) -> torch.Tensor:
    """HF rotate-half row order -> ggml NORM rope row order (per head: [2, hd/2] -> [hd/2, 2]) of any (rows, ...) tensor."""
    n = rows.shape[0]
    hd = n // n_groups
    return rows.reshape(n_groups, 2, hd // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def float_bytes(t: torch.Tensor, ftype: str) -> np.ndarray:
    """A float tensor as the bytes of GGUF float type `ftype` (BF16 rounds to nearest even, as ggml does)."""
    a = t.detach().float().contiguous().numpy()
    if ftype == "f32":
        return a.astype(np.float32, copy=False)
    if ftype == "f16":
        return a.astype(np.float16)
    return gguf.quants.quantize(a, gguf.GGMLQuantizationType.BF16)


class GGUFFileWriter:
    """The GGUF writer (`add`, `add_kv`, `finish`, `abort`); see the module doc."""

    def __init__(self, out: Path | None, *, arch_name: str, names: "callable", permute: dict[str, int] | None = None,
                 force: bool = False, inputs: tuple[Path, ...] = ()):
        """`out` None: a dry writer that only predicts sizes (`predicted_size`); it opens no file."""
        self.arch_name = arch_name
        self._gguf_name = names  # HF parameter name -> GGUF tensor name
        self._permute = permute or {}  # HF name suffix (e.g. "self_attn.q_proj.weight") -> rope groups
        self._spill = None
        if out is not None:
            prepare_output(out, force, inputs)
            self.out = Path(out)
            self.tmp = self.out.parent / f".{self.out.name}.qtool-tmp-{os.getpid()}"
            self._spill_path = self.out.parent / f".{self.out.name}.qtool-spill-{os.getpid()}"
            self._spill = open(self._spill_path, "w+b")
        self._tensors: list[tuple[str, list[int], int, int, int]] = []  # gguf name, byte shape, type, offset, n
        self._names: set[str] = set()
        # metadata goes straight into gguf-py's writer (its add_* helpers type every key as llama.cpp expects);
        # no file is opened before `finish`
        self.meta = gguf.GGUFWriter(None, arch_name)
        self.total_bytes = 0

    # ---- tensors
    def add(self, name: str, t: torch.Tensor | QTensor, float_type: str = "f32") -> int:
        """Add the HF parameter `name`; returns the bytes it takes in the file (padding excluded)."""
        gname = self._gguf_name(name)
        if gname in self._names:
            raise ValueError(f"tensor {gname} ({name}) written twice")
        self._names.add(gname)
        groups = next((g for suffix, g in self._permute.items() if name.endswith(suffix)), None)
        if isinstance(t, QTensor):
            gtype = int(t.codec.ggml_type)
            if groups is None:  # packed a row chunk at a time: a vocabulary-sized tensor's pack temporaries stay small
                from qtool.formats.gguf_base import row_chunks

                nbytes = 0
                for r in row_chunks(*t.shape):
                    nbytes += self._spill.write(t.codec.pack(t.take_rows(r)).contiguous().numpy().tobytes())
                self._tensors.append((gname, [t.shape[0], nbytes // t.shape[0]], gtype, self.total_bytes, nbytes))
                self.total_bytes += nbytes
                return nbytes
            data = t.codec.pack(t)  # uint8 (rows, row_bytes); float codecs give their own bytes too
        else:
            if t.ndim == 1 or "norm" in name:
                float_type = "f32"
            raw = np.ascontiguousarray(float_bytes(t, float_type)).view(np.uint8)
            data = torch.from_numpy(raw.reshape(t.shape[0], -1) if t.ndim > 1 else raw.reshape(1, -1))
            gtype = int(_FLOAT_TYPES[float_type])
        if groups is not None:
            data = permute_rows(data, groups)
        buf = data.contiguous().numpy().tobytes()
        self._spill.write(buf)
        shape = [len(buf)] if (not isinstance(t, QTensor) and t.ndim == 1) else [*data.shape]
        self._tensors.append((gname, shape, gtype, self.total_bytes, len(buf)))
        self.total_bytes += len(buf)
        return len(buf)

    def float_entry(self, name: str, shape: tuple[int, ...], float_type: str = "f32") -> tuple[str, list[int], int, int]:
        """The (HF name, byte shape, ggml type, nbytes) `add` gives a float tensor of `shape` (without its data)."""
        if len(shape) == 1 or "norm" in name:
            float_type = "f32"
        size = {"f32": 4, "f16": 2, "bf16": 2}[float_type]
        nbytes = size
        for n in shape:
            nbytes *= n
        byte_shape = [nbytes] if len(shape) == 1 else [shape[0], nbytes // shape[0]]
        return name, byte_shape, int(_FLOAT_TYPES[float_type]), nbytes

    def predicted_size(self, planned: list[tuple[str, list[int], int, int]] = ()) -> int:
        """The exact size `finish` will write: the metadata so far plus the tensors added so far and `planned`
        ones ((HF name, byte shape, ggml type, nbytes), not added): see `file_size`."""
        infos = [(g, shape, nbytes) for g, shape, _, _, nbytes in self._tensors]
        infos += [(self._gguf_name(n), shape, nbytes) for n, shape, _, nbytes in planned]
        return file_size(self.meta, infos)

    def finish(self) -> Path:
        """Write the container (tensors ordered: non-block tensors by name, then by block and name) and rename."""
        self._spill.flush()
        w = self.meta
        order = sorted(self._tensors, key=lambda e: _order(e[0]))
        for gname, shape, gtype, _, nbytes in order:
            w.add_tensor_info(gname, shape, np.dtype(np.uint8), nbytes, raw_dtype=gguf.GGMLQuantizationType(gtype))
        w.write_header_to_file(self.tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, _, _, offset, nbytes in order:
            self._spill.seek(offset)
            w.write_tensor_data(np.frombuffer(self._spill.read(nbytes), dtype=np.uint8))
        w.close()
        self._close_spill()
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        self._close_spill()
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass

    def _close_spill(self) -> None:
        if self._spill is not None and not self._spill.closed:
            self._spill.close()
        try:
            self._spill_path.unlink()
        except FileNotFoundError:
            pass


def file_size(meta: gguf.GGUFWriter, tensors: list[tuple[str, list[int], int]]) -> int:
    """Exact bytes of the GGUF file gguf-py's writer makes from `meta`'s keys and `tensors` ((GGUF name, byte
    shape, nbytes)): header (magic, version, counts: 24 bytes) + KV pairs + tensor infos, padded to ALIGNMENT,
    then every tensor's bytes padded to ALIGNMENT (GGUFWriter's layout; tested equal to written files)."""
    head = 24
    for key, val in meta.kv_data[0].items():
        head += len(meta._pack_val(key, gguf.GGUFValueType.STRING, add_vtype=False))
        head += len(meta._pack_val(val.value, val.type, add_vtype=True, sub_type=val.sub_type))
    for name, shape, _ in tensors:
        head += 8 + len(name.encode("utf-8")) + 4 + 8 * len(shape) + 4 + 8  # name, n_dims, dims, type, offset
    return _pad(head) + sum(_pad(n) for _, _, n in tensors)


def _pad(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _order(name: str):
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
        return (1, int(parts[1]), name)
    return (0, 0, name)
