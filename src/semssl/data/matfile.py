"""A minimal reader of MATLAB level-5 MAT-files (the ``.mat`` format of MATLAB 5 to 7.2, compressed or not).

Enough for the numeric arrays of a dataset's ground truth (MSRC-v2's cleaned segmentations, :mod:`semssl.data.get`)
without SciPy: numeric and logical matrices of any dimension, real part only, little- or big-endian, with or
without zlib compression (``miCOMPRESSED``). Cells, structs, objects, sparse and character arrays are skipped;
MATLAB 7.3 files (HDF5) are refused with a clear error. Arrays come back in MATLAB's shape (column-major data,
so ``dims`` (H, W) gives an H x W array), with the dtype of their MATLAB class.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from semssl.errors import DataError

__all__ = ["load_mat"]

# data types of a data element's tag (miINT8 ...) and the numpy type they hold
_MI = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MI_MATRIX, _MI_COMPRESSED = 14, 15
# array classes (mxDOUBLE_CLASS ...) and the dtype of the array MATLAB means
_MX = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}
_LOGICAL_FLAG = 0x0200


class _Reader:
    def __init__(self, data: bytes, endian: str, where: str) -> None:
        self.data, self.endian, self.where = data, endian, where

    def _u32(self, offset: int) -> int:
        return int(np.frombuffer(self.data, dtype=self.endian + "u4", count=1, offset=offset)[0])

    def elements(self, start: int = 0, end: int | None = None):
        """Yield ``(type, payload bytes)`` of the data elements between ``start`` and ``end``."""
        pos, end = start, len(self.data) if end is None else end
        while pos + 8 <= end:
            first = self._u32(pos)
            if first >> 16:  # small data element: type and size in the first 4 bytes, data in the next 4
                mtype, size = first & 0xFFFF, first >> 16
                yield mtype, self.data[pos + 4: pos + 4 + size]
                pos += 8
                continue
            mtype, size = first, self._u32(pos + 4)
            if pos + 8 + size > end:
                raise DataError(f"{self.where}: truncated MAT-file (an element of {size} bytes runs past the end)")
            yield mtype, self.data[pos + 8: pos + 8 + size]
            pos += 8 + size
            if mtype != _MI_COMPRESSED:
                pos += (-size) % 8  # uncompressed elements are padded to 8 bytes

    def numbers(self, mtype: int, payload: bytes) -> np.ndarray:
        if mtype not in _MI:
            raise DataError(f"{self.where}: unsupported MAT data type {mtype}")
        return np.frombuffer(payload, dtype=self.endian + _MI[mtype])

    def matrix(self, payload: bytes) -> tuple[str, np.ndarray | None]:
        """The name and array of one ``miMATRIX`` element (None for a class this reader skips)."""
        sub = _Reader(payload, self.endian, self.where)
        parts = list(sub.elements())
        if len(parts) < 3:
            return "", None
        flags = sub.numbers(*parts[0])
        mx_class, logical = int(flags[0]) & 0xFF, bool(int(flags[0]) & _LOGICAL_FLAG)
        dims = tuple(int(d) for d in sub.numbers(*parts[1]))
        name = parts[2][1].decode("ascii", "replace")
        if mx_class not in _MX or len(parts) < 4:
            return name, None  # cell, struct, object, char or sparse: not needed here
        values = sub.numbers(*parts[3]).astype(_MX[mx_class])
        if values.size != int(np.prod(dims)):
            raise DataError(f"{self.where}: variable '{name}' has {values.size} values for dimensions {dims}")
        array = values.reshape(dims, order="F")
        return name, array.astype(bool) if logical else array


def load_mat(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The numeric variables of a level-5 MAT-file, by name (module docstring)."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 128:
        raise DataError(f"{path}: not a MAT-file (shorter than its 128-byte header)")
    if data[:8] == b"\x89HDF\r\n\x1a\n" or data[512:520] == b"\x89HDF\r\n\x1a\n":
        raise DataError(f"{path}: a MATLAB 7.3 (HDF5) MAT-file, which this reader does not read")
    marker = data[126:128]
    if marker not in (b"IM", b"MI"):
        raise DataError(f"{path}: not a level-5 MAT-file (no endian marker in its header)")
    reader = _Reader(data, "<" if marker == b"IM" else ">", str(path))
    out: dict[str, np.ndarray] = {}
    for mtype, payload in reader.elements(128):
        if mtype == _MI_COMPRESSED:
            try:
                payload = zlib.decompress(payload)
            except zlib.error as err:
                raise DataError(f"{path}: a compressed variable cannot be inflated ({err})") from None
            inner = _Reader(payload, reader.endian, str(path))
            items = list(inner.elements())
            reader_of = inner
        else:
            items, reader_of = [(mtype, payload)], reader
        for itype, ipayload in items:
            if itype == _MI_MATRIX:
                name, array = reader_of.matrix(ipayload)
                if array is not None:
                    out[name] = array
    return out
