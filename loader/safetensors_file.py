"""Safetensors files read by raw offsets.

The format is an 8-byte little-endian header length, a JSON header that maps each
tensor name to its dtype, shape and byte range, then the packed tensor bytes. We parse
the header ourselves so that every byte range is checked against the file size before
anything is read, and so that tensors can be read with ``os.preadv`` straight into the
host buffers that will hold them (no intermediate copy). Every byte read is counted.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

_HEADER_LENGTH_BYTES = 8
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
_READ_CHUNK_BYTES = 64 * 1024 * 1024

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class ModelFileError(ValueError):
    """A model file that cannot be used; the message names the file, the fault and the fix."""

    def __init__(self, path: str, fault: str, fix: str = "Re-download or re-export the file, or pick another one."):
        super().__init__(f"`{path}` is not a usable safetensors file: {fault}. {fix}")
        self.path = path
        self.fault = fault


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's place in the file; ``start``/``end`` are absolute file offsets."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class FileIdentity:
    """What tells two versions of a file apart: a changed file is a different model."""

    path: str
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: str) -> "FileIdentity":
        real = os.path.realpath(path)
        st = os.stat(real)
        return cls(real, st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    file_size: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def read_header(path: str) -> SafetensorsHeader:
    """Parse and check the header of ``path``; raise `ModelFileError` on any fault."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(_HEADER_LENGTH_BYTES)
        if len(head) < _HEADER_LENGTH_BYTES:
            raise ModelFileError(path, f"it is {file_size} bytes long, too short to hold a header")
        header_len = int.from_bytes(head, "little")
        if header_len > _MAX_HEADER_BYTES or _HEADER_LENGTH_BYTES + header_len > file_size:
            raise ModelFileError(
                path, f"the header length ({header_len} bytes) is larger than the file ({file_size} bytes); "
                "the file is truncated or not a safetensors file")
        raw = f.read(header_len)
    return parse_header(raw, file_size, path)


def parse_header(raw: bytes, file_size: int, path: str) -> SafetensorsHeader:
    """Check a raw JSON header against the size of the file it came from."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(path, f"its header is not valid JSON ({e.__class__.__name__}); "
                             "the file is corrupt or not a safetensors file") from None
    if not isinstance(doc, dict):
        raise ModelFileError(path, "its header is not a JSON object")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ModelFileError(path, "its `__metadata__` is not a JSON object")
    data_start = _HEADER_LENGTH_BYTES + len(raw)
    tensors = {name: _parse_entry(name, spec, data_start, path) for name, spec in doc.items()}
    _check_within_file(tensors, data_start, file_size - data_start, path)
    return SafetensorsHeader(path, file_size, tensors, {str(k): str(v) for k, v in metadata.items()})


def _check_within_file(tensors: dict[str, TensorEntry], data_start: int, data_size: int, path: str) -> None:
    """Every tensor must end within the data section. Tensors packed end to end (as every writer
    lays them out) that run past it mean the file was cut short; otherwise the offsets are wrong."""
    end = max((t.end - data_start for t in tensors.values()), default=0)
    if end <= data_size:
        return
    if sum(t.nbytes for t in tensors.values()) == end:
        raise ModelFileError(
            path, f"it is truncated: its header describes {end} bytes of tensor data but only {data_size} "
            f"follow it ({100 * data_size // end}%), as after an interrupted download or copy",
            "Download or copy the file again.")
    name, last = max(tensors.items(), key=lambda item: item[1].end)
    raise ModelFileError(
        path, f"tensor `{name}` ends at byte {last.end - data_start} of the data section, beyond its end "
        f"({data_size} bytes); its offsets are out of range, the file is corrupt")


def _parse_entry(name: str, spec: object, data_start: int, path: str) -> TensorEntry:
    if not isinstance(spec, dict):
        raise ModelFileError(path, f"the header entry of tensor `{name}` is not a JSON object")
    dtype_name = spec.get("dtype")
    dtype = _DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise ModelFileError(path, f"tensor `{name}` has an unsupported dtype {spec.get('dtype')!r}")
    shape, offsets = spec.get("shape"), spec.get("data_offsets")
    if not _is_int_list(shape) or any(d < 0 for d in shape):
        raise ModelFileError(path, f"tensor `{name}` has an invalid shape {shape!r}")
    if not _is_int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise ModelFileError(path, f"tensor `{name}` has invalid data offsets {offsets!r}")
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if offsets[1] - offsets[0] != expected:
        raise ModelFileError(
            path, f"tensor `{name}` spans {offsets[1] - offsets[0]} bytes but its dtype and shape need {expected}")
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _is_int_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


class ReadCounter:
    """Bytes read from disk, thread-safe; shared by every file of one ModelManager."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes_read = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n


class SafetensorsFile:
    """An opened, checked safetensors file that reads tensors into caller-given buffers."""

    def __init__(self, path: str, counter: ReadCounter):
        self.identity = FileIdentity.of(path)
        self.header = read_header(self.identity.path)
        self._counter = counter

    @property
    def path(self) -> str:
        return self.identity.path

    @contextlib.contextmanager
    def opened(self) -> Iterator[int]:
        """A read-only descriptor of this file, checked to be the version whose header we hold.

        One check per batch of reads rather than per tensor; checking the opened descriptor
        (fstat) also leaves no gap between the check and the reads.
        """
        fd = os.open(self.path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if (st.st_size, st.st_mtime_ns, st.st_ino) != (self.identity.size, self.identity.mtime_ns, self.identity.inode):
                raise ModelFileError(
                    self.path, "it changed on disk after it was opened, so its weights would be stale",
                    "Queue the workflow again: the loader then reads the new file.")
            yield fd
        finally:
            os.close(fd)

    def read_into(self, entry: TensorEntry, out: torch.Tensor, fd: int | None = None) -> None:
        """Read ``entry``'s bytes into ``out``, a contiguous CPU tensor of the same dtype and size.

        Args:
            fd: a descriptor from `opened`, to share across a batch of reads; opened here if None.
        """
        if out.dtype != entry.dtype or out.numel() * out.element_size() != entry.nbytes or not out.is_contiguous():
            raise ValueError(f"buffer for `{entry.name}` must be contiguous {entry.dtype} of {entry.nbytes} bytes")
        if entry.nbytes == 0:
            return
        if fd is None:
            with self.opened() as own_fd:
                return self.read_into(entry, out, own_fd)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < entry.nbytes:
            n = os.preadv(fd, [view[done:done + _READ_CHUNK_BYTES]], entry.start + done)
            if n == 0:
                raise ModelFileError(self.path, f"it ended while reading tensor `{entry.name}`; it was truncated")
            done += n
            self._counter.add(n)

    def read(self, entry: TensorEntry, fd: int | None = None) -> torch.Tensor:
        out = torch.empty(entry.shape, dtype=entry.dtype)
        self.read_into(entry, out, fd)
        return out
