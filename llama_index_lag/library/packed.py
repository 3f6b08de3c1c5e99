"""Streaming writer for the packed safetensors file of a library.

The header (names, dtypes, shapes, offsets) is known before any adapter is aligned, so the file is laid out
once and rows are written in place through a memory map: bounded memory for any library size, and a build
interrupted mid-way can resume by re-opening the same file (see ``store.py``).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def tensor_names(module: str) -> tuple[str, str, str]:
    """Keys of a module's packed tensors: A* [N, r, n], B* [N, m, r], prototypes [N, n]."""
    return f"{module}.A", f"{module}.B", f"{module}.proto"


class PackedWriter:
    """Lay out ``{module}.A/.B/.proto`` tensors in one safetensors file and fill rows in place."""

    def __init__(
        self,
        path: Path,
        shapes: dict[str, tuple[int, int]],  # module -> (out_features m, in_features n)
        n_adapters: int,
        r_max: int,
        dtype: torch.dtype,
        *,
        create: bool = True,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path, self.dtype = Path(path), dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        header: dict[str, dict] = {}
        self._slots: dict[str, tuple[int, int, tuple[int, ...]]] = {}
        offset = 0
        for module, (m, n) in shapes.items():
            for key, shape in zip(tensor_names(module), ((n_adapters, r_max, n), (n_adapters, m, r_max),
                                                         (n_adapters, n))):
                nbytes = int(np.prod(shape)) * itemsize
                header[key] = {"dtype": ST_DTYPES[dtype], "shape": list(shape),
                               "data_offsets": [offset, offset + nbytes]}
                self._slots[key] = (offset, nbytes, shape)
                offset += nbytes
        header["__metadata__"] = {"format": "pt", **(metadata or {})}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._data_start = 8 + len(raw)
        self.nbytes = self._data_start + offset
        if create:
            with open(self.path, "wb") as f:
                f.write(struct.pack("<Q", len(raw)))
                f.write(raw)
                f.truncate(self.nbytes)  # sparse zeros: padded ranks / absent modules stay 0
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r+", offset=self._data_start,
                             shape=(max(offset, 1),))
        self._fd = os.open(self.path, os.O_RDWR)
        self._itemsize = itemsize

    def view(self, key: str) -> torch.Tensor:
        start, nbytes, shape = self._slots[key]
        return torch.from_numpy(self._mm[start:start + nbytes]).view(self.dtype).view(shape)

    def write_rows(self, module: str, rows: torch.Tensor | slice, a_star: torch.Tensor, b_star: torch.Tensor,
                   proto: torch.Tensor) -> None:
        """Write adapter rows ``rows`` [K] of one module: A* [K, r, n], B* [K, m, r], proto [K, n].

        Ranks beyond the given r are written as zeros (they may hold an older, larger rank on resume).
        Consecutive rows are one contiguous byte range per tensor, written with ``pwrite`` (no page fault
        per 4 KB page, as writing a fresh file through the memory map costs); others through the map.
        """
        ka, kb, kp = tensor_names(module)
        r, r_max = a_star.shape[1], self._slots[ka][2][1]
        if rows.numel() and bool((rows == torch.arange(int(rows[0]), int(rows[0]) + rows.numel())).all()):
            first = int(rows[0])
            if r < r_max:  # zero-pad the rank to the packed width
                a_star = torch.nn.functional.pad(a_star, (0, 0, 0, r_max - r))
                b_star = torch.nn.functional.pad(b_star, (0, r_max - r))
            for key, value in ((ka, a_star), (kb, b_star), (kp, proto)):
                self._pwrite(key, first, value)
            return
        a_view, b_view = self.view(ka), self.view(kb)
        a_view[rows, :r] = a_star.to(self.dtype)
        a_view[rows, r:] = 0
        b_view[rows, :, :r] = b_star.to(self.dtype)
        b_view[rows, :, r:] = 0
        self.view(kp)[rows] = proto.to(self.dtype)

    def _pwrite(self, key: str, first: int, value: torch.Tensor) -> None:
        """Write rows ``first:first+len(value)`` of tensor ``key`` (full rows) at their file offset."""
        start, _, shape = self._slots[key]
        row_bytes = int(np.prod(shape[1:])) * self._itemsize
        data = value.to(self.dtype).contiguous().view(torch.uint8).numpy()
        offset = self._data_start + start + first * row_bytes
        view = memoryview(data).cast("B")
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written

    def flush(self) -> None:
        """Make everything written so far durable (safe to call from another thread)."""
        self._mm.flush()
        os.fsync(self._fd)

    def close(self) -> None:
        self.flush()
        os.close(self._fd)
        del self._mm
