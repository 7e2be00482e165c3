"""Checkpoint files that cannot execute code: ``lucid.save`` / ``lucid.load``.

The format is a NumPy ``.npz`` archive: an uncompressed zip with one ``.npy``
member per array (``arr_0``, ``arr_1``, ...) and a JSON header (``__lucid__``,
a plain unicode array) holding the format version and, in order, every
array's name and dtype. Names therefore need not be valid file names, and
dtypes NumPy cannot store (``bfloat16``, the float8 types) are saved as their
raw bits in an unsigned integer of the same width and viewed back on load, so
a round trip is bit-exact. Arrays are stored in native byte order.

lucid writes and reads the members itself (``zipfile`` and
``np.lib.format.write_array``/``read_array``, always with
``allow_pickle=False``), so the bytes on disk do not depend on the NumPy
version. Pickles are never read: a file that is not a lucid archive is
refused before anything is deserialized.
"""

from __future__ import annotations

import json
import os
import uuid
import zipfile
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from ._tensor import stored_array

__all__ = ["save", "load"]

_HEADER = "__lucid__"
_FORMAT = "lucid-state-dict"
_VERSION = 1
_PICKLE_HINT = (
    "lucid.load reads only archives written by lucid.save; it never unpickles, because unpickling can run "
    "arbitrary code. For a PyTorch checkpoint, load it with torch.load(path, weights_only=True) and pass "
    "the state dict to module.load_state_dict."
)


def _to_numpy(value: Any, name: str) -> np.ndarray:
    array = np.asarray(stored_array(value, f"state[{name!r}]"))
    if not _supported(array.dtype):
        raise TypeError(f"state[{name!r}] has dtype {array.dtype}; only numeric and boolean arrays can be saved.")
    return _native(array)


def _native(array: np.ndarray) -> np.ndarray:
    """``array`` in the machine's byte order: the same values, swapped bytes (exact, NaN payloads included)."""
    if array.dtype.isnative:
        return array
    return array.byteswap().view(array.dtype.newbyteorder("="))


def _supported(dtype: np.dtype) -> bool:
    """Numbers and booleans, JAX's extra float types (bfloat16, float8) included."""
    return dtype == np.bool_ or (dtype.names is None and jnp.issubdtype(dtype, np.number))


def _bits_dtype(dtype: np.dtype) -> np.dtype | None:
    """The unsigned integer that holds ``dtype``'s bits, for dtypes ``.npy`` cannot name."""
    if dtype.kind in "biufc" and dtype.type.__module__ == "numpy":
        return None
    return np.dtype(f"u{dtype.itemsize}")


def _write_npz(file: Any, members: Mapping[str, np.ndarray]) -> None:
    """An ``.npz`` archive as ``np.savez`` lays it out: uncompressed zip, one ``.npy`` member per array."""
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in members.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def save(state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a state dict to ``path`` in lucid's safe ``.npz`` format.

    Every value is checked before anything is written, and the file is
    replaced atomically, so a failed save leaves an existing file intact.
    ``path`` is used as given (no suffix is added).

    Args:
        state_dict: names to arrays (NumPy, JAX, lucid Tensor or torch),
            e.g. ``module.state_dict()``. Any numeric or boolean dtype,
            bfloat16 included, in either byte order (stored native-endian,
            values unchanged).
        path: the file to write.

    Raises:
        TypeError: ``state_dict`` is not a mapping with str keys, or a value
            is not a numeric array (or is a tracer, inside ``jax.jit``).

    Example:
        >>> import os, tempfile
        >>> import lucid, lucid.nn as nn
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "norm.npz")
        ...     lucid.save(nn.InstanceNorm2d(3).state_dict(), path)
        ...     state = lucid.load(path)
        >>> list(state), state["num_batches_tracked"].dtype
        (['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked'], dtype('int32'))
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping from str to arrays, got {type(state_dict).__name__}.")
    entries, arrays = [], []
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"state_dict keys must be str, got {name!r}.")
        array = _to_numpy(value, name)
        bits = _bits_dtype(array.dtype)
        entries.append([name, array.dtype.name])
        array = np.array(array, order="C", copy=None)  # (ascontiguousarray would make 0-d arrays 1-d)
        arrays.append(array if bits is None else array.view(bits))
    header = json.dumps({"format": _FORMAT, "version": _VERSION, "entries": entries})
    members = {f"arr_{i}": a for i, a in enumerate(arrays)}
    members[_HEADER] = np.array(header)
    path = os.fspath(path)
    # A fresh file beside the target (default permissions), renamed over it once complete.
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb") as f:
            _write_npz(f, members)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a file written by :func:`save`, without ever unpickling.

    Arrays come back as NumPy arrays with their saved dtype and values, bit
    for bit (JAX would narrow float64/int64 to 32 bits unless
    ``jax_enable_x64`` is on), in native byte order: a big-endian ``>f4``
    array saved comes back as a native ``float32`` array of the same values.
    Pass the dict to ``module.load_state_dict`` or ``jnp.asarray`` what you
    need.

    Args:
        path: a file written by :func:`save`.

    Returns:
        A dict from name to ``np.ndarray``, in the saved order.

    Raises:
        ValueError: the file is not a lucid archive (a pickle, a PyTorch
            checkpoint, a plain ``.npz``, a corrupted file).
        FileNotFoundError: ``path`` does not exist.

    Example:
        Dtypes survive the round trip, 64-bit ones included:

        >>> import os, pickle, tempfile
        >>> import numpy as np, lucid
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "state.npz")
        ...     lucid.save({"w": np.array([1.5, 2.0]), "step": np.int64(7)}, path)
        ...     state = lucid.load(path)
        >>> {name: (a.dtype.name, a.tolist()) for name, a in state.items()}
        {'w': ('float64', [1.5, 2.0]), 'step': ('int64', 7)}

        A pickle is refused before anything in it is deserialized:

        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "model.pt")
        ...     with open(path, "wb") as f:
        ...         pickle.dump({"w": [1.0]}, f)
        ...     lucid.load(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: '...model.pt' is a pickle. lucid.load reads only archives written by lucid.save; ...
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:1] == b"\x80" or not zipfile.is_zipfile(path):
        kind = "a pickle" if magic[:1] == b"\x80" else "not an .npz archive"
        raise ValueError(f"{path!r} is {kind}. {_PICKLE_HINT}")
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        if f"{_HEADER}.npy" not in names:
            raise ValueError(
                f"{path!r} is a zip archive but not a lucid checkpoint (no {_HEADER} header). {_PICKLE_HINT}"
            )

        def read(member: str) -> np.ndarray:
            with archive.open(f"{member}.npy") as f:
                return _native(np.lib.format.read_array(f, allow_pickle=False))

        try:
            header = json.loads(str(read(_HEADER)[()]))
            entries = header["entries"]
            if header.get("format") != _FORMAT or header.get("version") != _VERSION:
                raise ValueError(f"unsupported format {header.get('format')!r} version {header.get('version')!r}")
            expected = {f"arr_{i}.npy" for i in range(len(entries))} | {f"{_HEADER}.npy"}
            if names != expected:
                raise ValueError(f"unexpected members {sorted(names - expected)}")
            out: dict[str, np.ndarray] = {}
            for i, (name, dtype_name) in enumerate(entries):
                dtype = jnp.dtype(dtype_name)
                if not _supported(dtype):
                    raise ValueError(f"{name!r} has unsupported dtype {dtype_name}")
                array = read(f"arr_{i}")
                out[name] = array if _bits_dtype(dtype) is None else array.view(dtype)
                if out[name].dtype != dtype:
                    raise ValueError(f"{name!r} was saved as {dtype_name} but reads as {out[name].dtype}")
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as error:
            raise ValueError(f"{path!r} is not a valid lucid checkpoint: {error}") from None
    return out
