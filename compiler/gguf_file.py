"""Read a GGUF file: metadata, tensor table and (memory-mapped) tensor bytes.

The header, metadata and tensor table are parsed here, not by gguf.GGUFReader: GGUFReader
trusts every count and length in the file and builds several numpy views per array element,
so a hostile file of 2**24 empty strings takes minutes and gigabytes to open. This parser
reads with bounds-checked struct unpacks on the memory map, checks every count against the
bytes left before looping over it, keeps numeric arrays as zero-copy numpy views (no Python
object per element) and decodes strings only when a key is read. Limits far above any real
model (MAX_*) turn absurd-but-possible counts into one-line errors. The tensor table is
validated (types, dims, alignment, bounds, no two tensors sharing bytes) before any tensor is
described. Every failure is a one-line GGUFFormatError / UnsupportedError naming the file.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf.constants import GGML_QUANT_SIZES, GGUF_MAGIC
from gguf.quants import dequantize as _gguf_dequantize
from gguf.quants import quant_shape_to_byte_shape

from ggfuse.errors import GGFuseError, GGUFFormatError, UnsupportedError

__all__ = ["GGUFFile", "TensorInfo", "SUPPORTED_TYPES", "SUPPORTED_VERSIONS", "VALUE_TYPE_NAMES"]

# ggml types ggfuse can dequantize / run. llama.cpp's Q4_K_M, Q5_K_M, Q6_K,
# Q8_0 and Q4_0 files only use these (mixes fall back to Q5_0/Q8_0/Q6_K/Q4_1).
SUPPORTED_TYPES: tuple[QT, ...] = (
    QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
    QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K,
)
_SUPPORTED_NAMES = ", ".join(t.name for t in SUPPORTED_TYPES)
_TYPE_INFO = {int(t): (t, *GGML_QUANT_SIZES[t]) for t in SUPPORTED_TYPES}   # id -> (type, block, bytes)
SUPPORTED_VERSIONS = (2, 3)

GGML_MAX_DIMS = 4
# Sanity limits, far above any real model (vocabularies are ~150k-262k entries, merges
# ~500k, tensor tables a few thousand) but low enough that opening a hostile file that
# happens to fit the counts stays well under a few seconds and a few hundred MB.
MAX_ARRAY_LEN = 1 << 24          # numeric arrays (zero-copy views: cheap)
MAX_STRING_ARRAY_LEN = 1 << 21   # string arrays (walked one length prefix at a time)
MAX_STRINGS = 1 << 22            # string items in all the metadata together
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_NAME_LEN = 1 << 16           # key and tensor names (llama.cpp: GGML_MAX_NAME is 64)

# Fixed header: magic u32, version u32, tensor count u64, kv count u64.
_HEADER = struct.Struct("<IIQQ")
# Smallest possible encodings, used to reject counts the file cannot hold.
_MIN_KV_BYTES = 8 + 4 + 1            # key length, value type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
_SCALAR = {  # value type -> numpy dtype (little-endian)
    VT.UINT8: np.dtype("<u1"), VT.INT8: np.dtype("<i1"), VT.UINT16: np.dtype("<u2"),
    VT.INT16: np.dtype("<i2"), VT.UINT32: np.dtype("<u4"), VT.INT32: np.dtype("<i4"),
    VT.FLOAT32: np.dtype("<f4"), VT.BOOL: np.dtype("<u1"), VT.UINT64: np.dtype("<u8"),
    VT.INT64: np.dtype("<i8"), VT.FLOAT64: np.dtype("<f8"),
}
_SCALAR_BY_ID = {int(t): d for t, d in _SCALAR.items()}
_STRUCT = {int(t): struct.Struct("<" + d.char) for t, d in _SCALAR.items()}
VALUE_TYPE_NAMES = {int(t): t.name for t in VT}
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    type_name: str            # "Q4_K", "F32", ...
    ne: tuple[int, ...]       # ggml order: ne[0] is the contiguous row length
    shape: tuple[int, ...]    # numpy order, i.e. reversed(ne)
    offset: int               # absolute byte offset of the data in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.ne, dtype=object))


@dataclass(frozen=True)
class Field:
    """One metadata entry as stored: its value type, for arrays the item type and count, and
    where its value lies in the file. Values are decoded by GGUFFile.key() on demand."""
    name: str
    vtype: int                # GGUFValueType id
    offset: int               # where the value (after the type id) starts
    itype: int | None = None  # arrays: item type id
    count: int = 1            # arrays: number of items
    end: int = 0              # where the entry ends (the next key starts)

    @property
    def type_name(self) -> str:
        if self.vtype == VT.ARRAY:
            return f"array of {self.count} {VALUE_TYPE_NAMES[self.itype]}"
        return VALUE_TYPE_NAMES[self.vtype]


class _Parser:
    """Bounds-checked reads on the memory map; `where` names the part being read."""

    def __init__(self, path: str, buf: np.ndarray):
        self.path = path
        self.buf = buf
        self.mv = memoryview(buf)
        self.size = len(buf)
        self.where = "header"
        self.strings = 0

    def fail(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(self.path, f"bad {self.where}: {what}")

    def need(self, offset: int, n: int) -> None:
        if n < 0 or offset + n > self.size:
            raise self.fail(f"needs bytes [{offset}, {offset + n}) but the file ends at {self.size}; "
                            f"the file is truncated or corrupt")

    def u64(self, offset: int) -> int:
        self.need(offset, 8)
        return _U64.unpack_from(self.mv, offset)[0]

    def u32(self, offset: int) -> int:
        self.need(offset, 4)
        return _U32.unpack_from(self.mv, offset)[0]

    def name(self, offset: int, what: str) -> tuple[str, int]:
        """A length-prefixed name (key or tensor name) decoded now; returns (name, end)."""
        n = self.u64(offset)
        if n > MAX_NAME_LEN or offset + 8 + n > self.size:
            raise self.fail(f"{what} at byte {offset} claims length {n}, past the end of the file "
                            f"(size {self.size}) or over the limit {MAX_NAME_LEN}")
        try:
            s = bytes(self.mv[offset + 8: offset + 8 + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {offset} is not valid UTF-8") from None
        return s, offset + 8 + n

    def skip_string(self, offset: int) -> int:
        n = self.u64(offset)
        if offset + 8 + n > self.size:
            raise self.fail(f"string at byte {offset} claims length {n}, past the end of the file "
                            f"(size {self.size})")
        return offset + 8 + n

    def skip_value(self, offset: int, vtype: int) -> tuple[int, int | None, int]:
        """Skip a value of type vtype at offset: returns (end, item type, count)."""
        if vtype in _SCALAR_BY_ID:
            end = offset + _SCALAR_BY_ID[vtype].itemsize
            self.need(offset, end - offset)
            return end, None, 1
        if vtype == VT.STRING:
            return self.skip_string(offset), None, 1
        if vtype != VT.ARRAY:
            raise self.fail(f"unknown value type {vtype} at byte {offset - 4}")
        itype, count = self.u32(offset), self.u64(offset + 4)
        start, left = offset + 12, self.size - (offset + 12)
        if itype == VT.ARRAY:
            raise self.fail(f"array at byte {offset} holds arrays (nested arrays are not supported, "
                            f"as in llama.cpp)")
        if itype not in _SCALAR_BY_ID and itype != VT.STRING:
            raise self.fail(f"array at byte {offset} has unknown item type {itype}")
        least = _SCALAR_BY_ID[itype].itemsize if itype in _SCALAR_BY_ID else 8
        if count * least > left:
            raise self.fail(f"array at byte {offset} claims {count} items of type {VALUE_TYPE_NAMES[itype]} "
                            f"(at least {count * least} bytes) but only {left} bytes are left in the file")
        if itype in _SCALAR_BY_ID:
            if count > MAX_ARRAY_LEN:
                raise self.fail(f"array at byte {offset} claims {count} items, more than the sanity limit "
                                f"{MAX_ARRAY_LEN}")
            return start + count * least, itype, count
        if count > MAX_STRING_ARRAY_LEN or self.strings + count > MAX_STRINGS:
            raise self.fail(f"array at byte {offset} claims {count} STRING items, more than the sanity limit "
                            f"{MAX_STRING_ARRAY_LEN} per array / {MAX_STRINGS} in all")
        self.strings += count
        # walk the length prefixes; the loop is bounded by the limits above
        mv, size, unpack, off = self.mv, self.size, _U64.unpack_from, start
        for _ in range(count):
            if off + 8 > size:
                self.need(off, 8)
            off += 8 + unpack(mv, off)[0]
        if off > size:
            raise self.fail(f"string array at byte {offset}: its strings run past the end of the file "
                            f"(size {size})")
        return off, itype, count


_REQUIRED: Any = object()


class GGUFFile:
    """A validated, memory-mapped GGUF file. Opening reads only the header,
    metadata and tensor table; tensor data is touched only by raw()/dequantize()."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self.size, self.version = _check_header(self.path)
        try:
            self._map: np.memmap | None = np.memmap(self.path, mode="r")
        except (OSError, ValueError) as e:
            raise GGUFFormatError(self.path, f"cannot map the file: {e}") from None
        try:
            self._parse()
        except GGFuseError:
            raise
        except Exception as e:  # noqa: BLE001 -- a parser bug must still name the file
            raise GGUFFormatError(self.path, f"malformed GGUF file ({type(e).__name__}: {e})") from e
        arch = self.key("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise GGUFFormatError(self.path, f"metadata key 'general.architecture' is {arch!r}, "
                                  f"expected a non-empty string")
        self.arch: str = arch

    def _parse(self) -> None:
        buf = self._map.view(np.ndarray)
        p = _Parser(self.path, buf)
        _, _, n_tensors, n_kv = _HEADER.unpack_from(p.mv, 0)
        off = _HEADER.size
        # -- metadata
        self._fields: dict[str, Field] = {}
        self._values: dict[str, Any] = {}
        for i in range(n_kv):
            last = next(reversed(self._fields)) if self._fields else None
            p.where = f"metadata entry #{i}" + (f" (after key '{last}')" if last else "")
            key, off = p.name(off, "key")
            vtype = p.u32(off)
            end, itype, count = p.skip_value(off + 4, vtype)
            if key in self._fields:
                raise p.fail(f"duplicate metadata key '{key}'")
            self._fields[key] = Field(key, vtype, off + 4, itype, count, end)
            off = end
        self.alignment = 32
        af = self._fields.get("general.alignment")
        if af is not None:
            if af.vtype != VT.UINT32:
                raise GGUFFormatError(self.path, f"metadata key 'general.alignment' is {af.type_name}, "
                                      f"expected UINT32")
            self.alignment = int(self.key("general.alignment"))
            if self.alignment <= 0 or self.alignment & (self.alignment - 1):
                raise GGUFFormatError(self.path, f"metadata key 'general.alignment' is {self.alignment}, "
                                      f"expected a power of two")
        # -- tensor table
        raw = []
        for i in range(n_tensors):
            p.where = f"tensor table entry #{i}"
            name, off = p.name(off, "tensor name")
            n_dims = p.u32(off)
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise p.fail(f"tensor '{name}' has {n_dims} dimensions, expected 1 to {GGML_MAX_DIMS}")
            p.need(off + 4, 8 * n_dims + 12)
            ne = struct.unpack_from(f"<{n_dims}Q", p.mv, off + 4)
            tid, rel = struct.unpack_from("<IQ", p.mv, off + 4 + 8 * n_dims)
            off += 4 + 8 * n_dims + 12
            raw.append((name, ne, tid, rel))
        self.data_offset = -(-off // self.alignment) * self.alignment
        self.tensors: dict[str, TensorInfo] = self._tensor_table(raw)

    def _tensor_table(self, raw) -> dict[str, TensorInfo]:
        out: dict[str, TensorInfo] = {}
        for i, (name, ne, tid, rel) in enumerate(raw):
            if name in out:
                raise GGUFFormatError(self.path, f"duplicate tensor '{name}' in the tensor table")
            if max(ne) >= 1 << 63 or 0 in ne:
                raise GGUFFormatError(self.path, f"tensor '{name}' has absurd dimensions {list(ne)}")
            qt, block, type_size = _TYPE_INFO.get(tid, (None, 0, 0))
            if qt is None:
                try:
                    qt = QT(tid)
                except ValueError:
                    raise UnsupportedError(self.path, f"tensor '{name}' has unknown ggml type id "
                                           f"{tid}, supported: {_SUPPORTED_NAMES}") from None
                raise UnsupportedError(self.path, f"tensor '{name}' has ggml type {qt.name}, "
                                       f"supported: {_SUPPORTED_NAMES}")
            if ne[0] % block:
                raise GGUFFormatError(self.path, f"tensor '{name}' has row length ne[0]={ne[0]}, "
                                      f"not a multiple of the {qt.name} block size {block}")
            nbytes = math.prod(ne) // block * type_size
            if rel % self.alignment:
                raise GGUFFormatError(self.path, f"tensor '{name}' data offset {rel} is not "
                                      f"a multiple of the alignment {self.alignment}")
            begin = self.data_offset + rel
            if begin + nbytes > self.size:
                raise GGUFFormatError(
                    self.path, f"tensor '{name}' data [{begin}, {begin + nbytes}) lies past the "
                    f"end of the file (size {self.size}); the file is truncated or corrupt")
            out[name] = TensorInfo(name=name, ggml_type=tid, type_name=qt.name, ne=tuple(ne),
                                   shape=tuple(reversed(ne)), offset=begin, nbytes=nbytes)
        # no two tensors may share bytes: sorted by start, each ends before the next begins
        if len(out) > 1:
            infos = list(out.values())
            begin = np.array([t.offset for t in infos], dtype=np.int64)
            end = begin + np.array([t.nbytes for t in infos], dtype=np.int64)
            order = np.argsort(begin, kind="stable")
            bad = np.nonzero(end[order[:-1]] > begin[order[1:]])[0]
            if len(bad):
                a, b = infos[order[bad[0]]], infos[order[bad[0] + 1]]
                raise GGUFFormatError(self.path, f"tensors '{a.name}' [{a.offset}, {a.offset + a.nbytes}) and "
                                      f"'{b.name}' [{b.offset}, {b.offset + b.nbytes}) share bytes of the file "
                                      f"(overlapping or aliased data)")
        return out

    # -- lifetime -----------------------------------------------------------
    def close(self) -> None:
        # np.memmap has no close(); dropping the reader (and with it every
        # view we created) releases the mapping once callers drop raw() views.
        self._map = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, arch={getattr(self, 'arch', None)!r}, tensors={len(self.tensors)})"

    @property
    def _data(self) -> np.memmap:
        if self._map is None:
            raise ValueError(f"{self.path}: GGUF file is closed")
        return self._map

    # -- identity -----------------------------------------------------------
    def identity(self) -> dict:
        """Size + sha256 of everything before the tensor data (header, metadata,
        tensor table): changes when the model's structure or metadata does,
        cheap because no tensor data is read."""
        h = hashlib.sha256(self._data[: self.data_offset])
        return {"size": self.size, "header_sha256": h.hexdigest()}

    # -- metadata -----------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._fields)

    def has_key(self, name: str) -> bool:
        return name in self._fields

    def field(self, name: str) -> Field | None:
        """The stored entry of a key (its value type and count), or None."""
        return self._fields.get(name)

    def key(self, name: str, default: Any = _REQUIRED) -> Any:
        """Metadata value as Python str/int/float/bool, or a list of those."""
        if name in self._values:
            return self._values[name]
        field = self._fields.get(name)
        if field is None:
            if default is _REQUIRED:
                raise GGUFFormatError(self.path, f"missing required metadata key '{name}'")
            return default
        value = self.raw_value(name)
        if isinstance(value, np.ndarray):
            value = value.tolist()
        self._values[name] = value
        return value

    def raw_value(self, name: str) -> Any:
        """As key(), but a numeric array comes back as a read-only numpy view of the file (no
        Python object per element; ggfuse.compiler.metadata reads arrays this way). None if absent."""
        field = self._fields.get(name)
        if field is None:
            return None
        if name in self._values:
            return self._values[name]
        try:
            return self._decode(field)
        except UnicodeDecodeError:
            raise GGUFFormatError(self.path, f"metadata key '{name}' holds a string that is "
                                  f"not valid UTF-8") from None

    def _decode(self, f: Field) -> Any:
        mv = memoryview(self._data.view(np.ndarray))
        if f.vtype in _STRUCT:
            v = _STRUCT[f.vtype].unpack_from(mv, f.offset)[0]
            return bool(v) if f.vtype == VT.BOOL else v
        if f.vtype == VT.STRING:
            n = _U64.unpack_from(mv, f.offset)[0]
            return bytes(mv[f.offset + 8: f.offset + 8 + n]).decode("utf-8")
        start = f.offset + 12
        if f.itype in _SCALAR_BY_ID:
            dt = _SCALAR_BY_ID[f.itype]
            arr = self._data.view(np.ndarray)[start: start + dt.itemsize * f.count].view(dt)
            return arr.astype(bool) if f.itype == VT.BOOL else arr
        blob = bytes(mv[start: f.end])   # one copy of the array's bytes: slicing bytes is cheapest
        out, off, unpack = [], 0, _U64.unpack_from
        for _ in range(f.count):
            n = unpack(blob, off)[0]
            out.append(blob[off + 8: off + 8 + n].decode("utf-8"))
            off += 8 + n
        self._values[f.name] = out   # decoded once: vocabularies are read more than once
        return out

    def arch_key(self, suffix: str, default: Any = _REQUIRED) -> Any:
        return self.key(f"{self.arch}.{suffix}", default)

    def vocab(self) -> list[str] | None:
        from ggfuse.compiler.metadata import Metadata
        return Metadata(self).str_array("tokenizer.ggml.tokens", None)

    # -- tensors ------------------------------------------------------------
    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> TensorInfo:
        """TensorInfo for `name`; if `shape` (numpy order) is given, check it."""
        t = self.tensors.get(name)
        if t is None:
            raise GGUFFormatError(self.path, f"missing tensor '{name}'")
        if shape is not None and tuple(int(d) for d in shape) != t.shape:
            raise GGUFFormatError(self.path, f"tensor '{name}' has shape {t.shape}, expected "
                                  f"{tuple(int(d) for d in shape)} from the metadata")
        return t

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a flat uint8 view of the memory map (no copy, read-only)."""
        t = self.tensor(name)
        return self._data[t.offset: t.offset + t.nbytes].view(np.ndarray)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array in numpy shape."""
        t = self.tensor(name)
        qt = QT(t.ggml_type)
        rows = self.raw(name).reshape(quant_shape_to_byte_shape(t.shape, qt))
        out = _gguf_dequantize(rows, qt)
        if np.shares_memory(out, rows):  # F32 comes back as a view of the map
            out = out.copy()
        return out.astype(np.float32, copy=False).reshape(t.shape)


def _check_header(path: str) -> tuple[int, int]:
    """Cheap checks before the file is mapped: it exists, is a regular
    file, has the GGUF magic and a supported version, and its counts are
    possible for its size. Returns (size, version)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise GGUFFormatError(path, "no such file") from None
    except OSError as e:
        raise GGUFFormatError(path, f"cannot access the file: {e.strerror}") from None
    if not os.path.isfile(path):
        raise GGUFFormatError(path, "not a regular file (expected a .gguf model file)")
    size = st.st_size
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
    except OSError as e:
        raise GGUFFormatError(path, f"cannot read the file: {e.strerror}") from None
    if size == 0:
        raise GGUFFormatError(path, "empty file, not a GGUF model")
    if len(head) < 4 or struct.unpack_from("<I", head)[0] != GGUF_MAGIC:
        raise GGUFFormatError(path, f"not a GGUF file (starts with {head[:4]!r}, expected b'GGUF')")
    if len(head) < _HEADER.size:
        raise GGUFFormatError(path, f"truncated GGUF header ({size} bytes, need {_HEADER.size})")
    _, version, n_tensors, n_kv = _HEADER.unpack(head)
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and struct.unpack(">I", head[4:8])[0] in SUPPORTED_VERSIONS:
            raise UnsupportedError(path, "big-endian GGUF files are not supported")
        raise GGUFFormatError(path, f"unsupported GGUF version {version} "
                              f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
    left = size - _HEADER.size
    if n_kv * _MIN_KV_BYTES > left:
        raise GGUFFormatError(path, f"header claims {n_kv} metadata entries, impossible "
                              f"for a file of {size} bytes; the file is corrupt")
    if n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES > left:
        raise GGUFFormatError(path, f"header claims {n_tensors} tensors, impossible "
                              f"for a file of {size} bytes; the file is corrupt")
    if n_kv > MAX_KV:
        raise GGUFFormatError(path, f"header claims {n_kv} metadata entries, more than the sanity limit {MAX_KV}")
    if n_tensors > MAX_TENSORS:
        raise GGUFFormatError(path, f"header claims {n_tensors} tensors, more than the sanity limit {MAX_TENSORS}")
    return size, version
