"""Reader for the IDX files that MNIST and Fashion-MNIST ship in (raw or gzip-compressed).

The format (LeCun et al., "THE MNIST DATABASE", yann.lecun.com/exdb/mnist): a big-endian header
of two zero bytes, one type byte (0x08 unsigned byte, 0x09 signed byte, 0x0B int16, 0x0C int32,
0x0D float32, 0x0E float64) and one byte giving the number of dimensions ``d``; then ``d``
big-endian uint32 sizes; then the data in C order. Image files are ``(n, 28, 28)`` uint8, label
files ``(n,)`` uint8.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

__all__ = ["read_idx", "write_idx", "find_idx_file", "IDX_SPLITS"]

_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _DTYPES.items()}

# Standard file stems of the MNIST-format data sets: (images, labels) per split.
IDX_SPLITS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw) into a numpy array of its stored shape.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file when the
    header is not an IDX header or the data is shorter than the header says.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"IDX file not found: {p}")
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"cannot read IDX file {p}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"{p} is not an IDX file (bad magic number {raw[:4].hex()!r})")
    dtype = _DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{p}: truncated IDX header")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(raw) - header < count * dtype.itemsize:
        raise ValueError(f"{p}: IDX data holds {len(raw) - header} bytes, the header promises "
                         f"{count * dtype.itemsize} (shape {shape}); the file is truncated")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (gzip-compressed when the name ends in ``.gz``).

    Used by the tests to make miniature MNIST-format folders; returns the path.
    """
    a = np.asarray(array)
    key = a.dtype.newbyteorder("=")
    if key not in _CODES:
        raise ValueError(f"IDX cannot store dtype {a.dtype}; use one of "
                         f"{sorted(str(d) for d in _CODES)}")
    code = _CODES[key]
    header = bytes([0, 0, code, a.ndim]) + np.asarray(a.shape, dtype=">u4").tobytes()
    body = np.ascontiguousarray(a.astype(_DTYPES[code], copy=False)).tobytes()
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "wb") as fh:
        fh.write(header + body)
    return p


def find_idx_file(folder: str | os.PathLike[str], stem: str) -> Path | None:
    """The file ``stem`` in ``folder`` (or its ``raw/`` sub-folder, as torchvision lays it out),
    raw or ``.gz``; also accepts the name with a dot before ``idx`` (e.g.
    ``train-images.idx3-ubyte``, as some mirrors name them). ``None`` when absent."""
    base = Path(folder)
    names = [stem]
    parts = stem.rsplit("-", 2)
    if len(parts) == 3:
        names.append(f"{parts[0]}.{parts[1]}-{parts[2]}")
    for d in (base, base / "raw"):
        for name in names:
            for suffix in ("", ".gz"):
                cand = d / f"{name}{suffix}"
                if cand.is_file():
                    return cand
    return None
