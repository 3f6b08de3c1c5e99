"""The packed safetensors file of a library: a streaming writer and a memory-mapped reader.

The header (names, dtypes, shapes, offsets) is known before any adapter is aligned, so the file is laid out
once and rows are written in place through a memory map: bounded memory for any library size, and a build
interrupted mid-way can resume by re-opening the same file (see ``store.py``).

The reader maps the file once and wraps each tensor's bytes without touching them: on a cold page cache,
touching a tensor's first page (as ``safetensors``' ``get_tensor`` does) starts a read-ahead of up to the
device's ``read_ahead_kb`` (several MB) per tensor, which made opening a 10k-adapter library read ~0.9 GB.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._fs import reserve

ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
TORCH_DTYPES = {code: dtype for dtype, code in ST_DTYPES.items()}


class PackedFormatError(ValueError):
    """The packed file is not what its header or the manifest says (``key``: the tensor at fault)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class PackedReader:
    """Read-only view of a packed safetensors file: one shared, read-only memory map, tensors wrap its
    bytes. Opening reads the header only; nothing else is paged in until a tensor is used.

    Read-only on purpose: a writable private map (copy-on-write, as ``safetensors`` and
    ``UntypedStorage.from_file(shared=False)`` make) is charged in full against the commit limit, so a
    library larger than RAM + swap could not even be mapped. The tensors must not be written to.
    """

    def __init__(self, path: Path, dir_fd: int | None = None) -> None:
        """Open ``path`` (relative to the open folder ``dir_fd`` when given: the library's revision)."""
        with open(os.open(path, os.O_RDONLY, dir_fd=dir_fd), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise PackedFormatError(f"file too short ({size} bytes)")
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                raise PackedFormatError(f"header of {length} bytes does not fit in a file of {size} bytes")
            try:
                header = json.loads(f.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
                raise PackedFormatError(f"header is not valid JSON: {exc}") from None
            if not isinstance(header, dict):
                raise PackedFormatError("header is not a JSON object")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._header: dict[str, Any] = header
        self._start, self._size = 8 + length, size - 8 - length
        self.nbytes = size

    @property
    def keys(self) -> list[str]:
        """Tensor names in file (layout) order."""
        return sorted(self._header, key=lambda k: self._info(k).get("data_offsets", [0])[0])

    def checksum(self, start: int, end: int) -> int:
        """crc32 of rows ``start:end`` of every tensor, as :meth:`PackedWriter.checksum` computed it."""
        return block_checksum(self.raw(key, slice(start, end)) for key in self.keys)

    def check_size(self) -> None:
        """Raise :class:`PackedFormatError` if the file was truncated since it was mapped.

        Writers never modify a library file in place (a new revision is a new file), so this only catches
        outside damage; reading a page past the new end of file would otherwise kill the process (SIGBUS)."""
        size = self._mm.size()  # fstat of the mapped file
        if size < self.nbytes:
            raise PackedFormatError(f"the file shrank from {self.nbytes} to {size} bytes after it was opened "
                                    "(truncated in place)")

    def raw(self, key: str, rows: slice | None = None) -> memoryview:
        """The bytes of tensor ``key`` (rows ``rows`` of its first dimension), without copying."""
        info = self._info(key)
        lo, hi = info["data_offsets"]
        if rows is not None:
            row = (hi - lo) // max(int(info["shape"][0]), 1)
            lo, hi = lo + rows.start * row, lo + rows.stop * row
        return memoryview(self._mm)[self._start + lo:self._start + hi]

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor ``key``, backed by the map (no copy, no page touched)."""
        info = self._info(key)
        dtype, shape = TORCH_DTYPES.get(info.get("dtype")), info.get("shape")
        offsets = info.get("data_offsets")
        if dtype is None or not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
            raise PackedFormatError(f"malformed header entry {info}", key)
        lo, hi = offsets
        count = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= lo <= hi <= self._size or hi - lo != count * itemsize:
            raise PackedFormatError(f"data offsets {offsets} do not hold shape {shape} in "
                                    f"{self._size} bytes of data (truncated file?)", key)
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():  # "buffer is not writable": read-only by design (see the class)
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._mm, dtype=dtype, count=count, offset=self._start + lo)
        return flat.view(shape)

    def _info(self, key: str) -> dict[str, Any]:
        info = self._header.get(key)
        if not isinstance(info, dict):
            raise PackedFormatError("tensor missing", key)
        return info


def block_checksum(parts: Iterable[Any]) -> int:
    """crc32 over byte buffers ``parts`` in order (rows of each tensor of a chunk of adapters, in layout
    order). A library stores one per chunk written together, so the writer hashes pages it just wrote."""
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return crc


def _layout(shapes: dict[str, tuple[int, int]], n_adapters: int, r_max: int, dtype: torch.dtype
            ) -> tuple[dict[str, dict], dict[str, tuple[int, int, tuple[int, ...]]], int]:
    """Header entries, (offset, nbytes, shape) per tensor, and total data bytes of a packed file."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, dict] = {}
    slots: dict[str, tuple[int, int, tuple[int, ...]]] = {}
    offset = 0
    for module, (m, n) in shapes.items():
        for key, shape in zip(tensor_names(module), ((n_adapters, r_max, n), (n_adapters, m, r_max),
                                                     (n_adapters, n))):
            nbytes = int(np.prod(shape)) * itemsize
            header[key] = {"dtype": ST_DTYPES[dtype], "shape": list(shape),
                           "data_offsets": [offset, offset + nbytes]}
            slots[key] = (offset, nbytes, shape)
            offset += nbytes
    return header, slots, offset


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
        header, self._slots, offset = _layout(shapes, n_adapters, r_max, dtype)
        header["__metadata__"] = {"format": "pt", **(metadata or {})}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._data_start = 8 + len(raw)
        self.nbytes = self._data_start + offset
        if create:
            with open(self.path, "wb") as f:
                f.write(struct.pack("<Q", len(raw)))
                f.write(raw)
                f.truncate(self.nbytes)  # zeros: padded ranks / absent modules stay 0
                f.flush()
                # Reserve the blocks now: rows written through the memory map into a sparse file would
                # die by SIGBUS on a full disk instead of raising ENOSPC here.
                reserve(f.fileno(), self.nbytes)
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r+", offset=self._data_start,
                             shape=(max(offset, 1),))
        self._fd = os.open(self.path, os.O_RDWR)
        self._itemsize = itemsize
        self._mapped_writes = False  # rows written through the memory map since the last flush

    @staticmethod
    def size_of(shapes: dict[str, tuple[int, int]], n_adapters: int, r_max: int, dtype: torch.dtype) -> int:
        """Bytes of the tensor data of such a file (the header adds a few KB)."""
        return _layout(shapes, n_adapters, r_max, dtype)[2]

    def view(self, key: str) -> torch.Tensor:
        start, nbytes, shape = self._slots[key]
        return torch.from_numpy(self._mm[start:start + nbytes]).view(self.dtype).view(shape)

    def checksum(self, start: int, end: int) -> int:
        """crc32 of rows ``start:end`` of every tensor, in layout order (see :func:`block_checksum`)."""
        def rows(key: str) -> memoryview:
            offset, nbytes, shape = self._slots[key]
            row = nbytes // max(shape[0], 1)
            return memoryview(self._mm[offset + start * row:offset + end * row])
        return block_checksum(rows(key) for key in self._slots)

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
        self._mapped_writes = True  # set after the writes, cleared before the msync: none is missed

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
        """Make everything written so far durable (safe to call from another thread).

        ``msync`` only when rows went through the memory map: CPython's ``mmap.flush`` holds the GIL while
        it syncs (cpython#44098; on Linux that is the whole file's ``fsync``), stalling the compile's
        other threads for its duration; ``os.fsync`` releases the GIL."""
        if self._mapped_writes:
            self._mapped_writes = False
            self._mm.flush()
        os.fsync(self._fd)

    def close(self, sync: bool = True) -> None:
        """Flush (``sync``) and release the file; safe to call twice."""
        if self._fd < 0:
            return
        try:
            if sync:
                self.flush()
        finally:
            os.close(self._fd)
            self._fd = -1
            del self._mm
