"""Open a GGUF file safely: the header is walked here first, every count and length checked
against the file's size, so a damaged file fails with one line naming the field (or saying
"truncated") instead of whatever gguf-py's GGUFReader raises, and a huge length field fails
before anything is allocated.

GGUF layout (v2/v3): magic "GGUF", uint32 version, uint64 tensor count, uint64 kv count;
each kv is a string key (uint64 length + UTF-8 bytes), a uint32 value type and the value
(arrays: uint32 item type, uint64 count, items); each tensor info is a string name, uint32
n_dims, uint64 dims, uint32 GGML type, uint64 offset into the data section, which starts at
the next multiple of general.alignment (default 32) after the tensor infos.
"""

from __future__ import annotations

import struct
from pathlib import Path

from ..errors import LowbitError

# value type -> byte size (fixed-size scalars); 8 = string, 9 = array
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 8
_MAX_NESTING = 4


class _Cursor:
    def __init__(self, f, size: int, path: Path, endian: str):
        self.f, self.size, self.path, self.endian = f, size, path, endian
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise LowbitError(f"{self.path} is truncated ({what} needs {n} bytes at offset {self.pos}, the file has {self.size})")

    def read(self, n: int, what: str) -> bytes:
        self.need(n, what)
        data = self.f.read(n)
        if len(data) != n:
            raise LowbitError(f"{self.path} is truncated (short read of {what})")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n
        self.f.seek(self.pos)

    def uint(self, fmt: str, what: str) -> int:
        return struct.unpack(self.endian + fmt, self.read(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> bytes:
        n = self.uint("Q", f"length of {what}")
        return self.read(n, what)


def _skip_value(c: _Cursor, vtype: int, what: str, depth: int = 0) -> object:
    """Skip one value of type ``vtype``; returns it when it is a scalar uint (for alignment)."""
    if vtype in _SCALAR:
        raw = c.read(_SCALAR[vtype], what)
        return struct.unpack(c.endian + "I", raw)[0] if vtype == 4 else None
    if vtype == _STRING:
        c.string(what)
        return None
    if vtype == _ARRAY:
        if depth >= _MAX_NESTING:
            raise LowbitError(f"{c.path}: corrupt GGUF header field {what} (arrays nested too deep)")
        itype = c.uint("I", f"item type of {what}")
        count = c.uint("Q", f"item count of {what}")
        if itype in _SCALAR:
            c.skip(count * _SCALAR[itype], what)
            return None
        if itype not in (_STRING, _ARRAY):
            raise LowbitError(f"{c.path}: corrupt GGUF header field {what} (unknown item type {itype})")
        c.need(count * 8, what)  # every string or array item takes at least 8 bytes
        for _ in range(count):
            _skip_value(c, itype, what, depth + 1)
        return None
    raise LowbitError(f"{c.path}: corrupt GGUF header field {what} (unknown value type {vtype})")


def _name(raw: bytes, c: _Cursor, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LowbitError(f"{c.path}: corrupt GGUF header field {what} (not UTF-8)") from None


def _start(f, size: int, path: Path) -> tuple[_Cursor, int]:
    """A cursor past the magic and the version (its byte order found), and the version."""
    c = _Cursor(f, size, path, "<")
    if c.read(4, "magic") != b"GGUF":
        raise LowbitError(f"{path} is not a GGUF file (bad magic)")
    version = c.uint("I", "version")
    if version & 0xFFFF == 0:  # written big-endian
        c.endian = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    return c, version


def precheck_gguf(path: Path) -> None:
    """Walk the GGUF header and tensor table, checking every length against the file size."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"GGUF file {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        c, version = _start(f, size, path)
        if version not in (2, 3):
            raise LowbitError(f"{path}: corrupt GGUF header field version ({version}; lowbit reads 2 and 3)")
        n_tensors = c.uint("Q", "tensor count")
        n_kv = c.uint("Q", "kv count")
        # smallest kv: 8-byte key length + 4-byte type + 1-byte value; smallest tensor info: 8+4+4+8
        c.need(n_kv * 13 + n_tensors * 24, f"{n_kv} kv pairs and {n_tensors} tensor infos")
        alignment = 32
        for i in range(n_kv):
            key = _name(c.string(f"key of kv pair {i}"), c, f"key of kv pair {i}")
            vtype = c.uint("I", f"type of {key}")
            value = _skip_value(c, vtype, key)
            if key == "general.alignment":
                if vtype != 4 or not value or value & (value - 1):
                    raise LowbitError(f"{path}: corrupt GGUF header field general.alignment")
                alignment = value
        spans = []
        for i in range(n_tensors):
            name = _name(c.string(f"name of tensor {i}"), c, f"name of tensor {i}")
            n_dims = c.uint("I", f"n_dims of tensor {name}")
            if n_dims > _MAX_DIMS:
                raise LowbitError(f"{path}: corrupt GGUF header field n_dims of tensor {name} ({n_dims})")
            dims = [c.uint("Q", f"dims of tensor {name}") for _ in range(n_dims)]
            ttype = c.uint("I", f"type of tensor {name}")
            offset = c.uint("Q", f"offset of tensor {name}")
            try:
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                raise LowbitError(f"{path}: corrupt GGUF header field type of tensor {name} ({ttype})") from None
            count = 1
            for d in dims:
                count *= d
            if dims and dims[0] % block:
                raise LowbitError(f"{path}: corrupt GGUF header field dims of tensor {name} ({dims} not in blocks of {block})")
            spans.append((offset, count // block * type_size, name))
        data_start = -(-c.pos // alignment) * alignment
        for offset, nbytes, name in spans:
            if data_start + offset + nbytes > size:
                raise LowbitError(f"{path} is truncated (tensor {name} needs bytes up to {data_start + offset + nbytes}, the file has {size})")


_SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_scalar(path: str | Path, key: str):
    """The value of one scalar header field (None where the file has no such field), read
    by walking the header alone: gguf-py's GGUFReader maps every tensor as it opens a file
    and leaves 0.7 GB resident for Gemma-3-270M, to read one flag."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        c, _ = _start(f, size, path)
        c.uint("Q", "tensor count")
        n_kv = c.uint("Q", "kv count")
        c.need(n_kv * 13, f"{n_kv} kv pairs")
        for i in range(n_kv):
            name = _name(c.string(f"key of kv pair {i}"), c, f"key of kv pair {i}")
            vtype = c.uint("I", f"type of {name}")
            if name == key and vtype in _SCALAR_FMT:
                return c.uint(_SCALAR_FMT[vtype], name)
            _skip_value(c, vtype, name)
    return None


def open_gguf(path: str | Path):
    """A gguf.GGUFReader for ``path``, after precheck_gguf; any error is one LowbitError line."""
    from gguf import GGUFReader

    path = Path(path)
    precheck_gguf(path)
    try:
        return GGUFReader(str(path))
    except Exception as e:  # gguf raises a mix of ValueError, struct and index errors
        msg = str(e).splitlines()[0] if str(e) else ""
        raise LowbitError(f"{path}: corrupt GGUF file ({type(e).__name__}: {msg})") from None
