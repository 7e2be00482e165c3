"""Checkpoint files that cannot execute code: ``lucid.save`` / ``lucid.load``.

The format is a NumPy ``.npz`` archive: an uncompressed zip with one ``.npy``
member per array (``arr_0``, ``arr_1``, ...) and a JSON header (``__lucid__``,
a plain unicode array) holding the format version and, in order, every
array's name and dtype. Names therefore need not be valid file names, and
dtypes NumPy cannot store (``bfloat16``, the float8 types) are saved as their
raw bits in an unsigned integer of the same width and viewed back on load, so
a round trip is bit-exact. Arrays are stored in native byte order.

lucid writes the members with ``zipfile`` and ``np.lib.format.write_array``
(``allow_pickle=False``), so the bytes on disk do not depend on the NumPy
version, and reads them with its own strict reader, built for files from
anyone:

- Pickles are never read: a file that is not a lucid archive is refused
  before anything is deserialized.
- Every malformed file (truncated, corrupted, crafted) raises ``ValueError``
  naming the file: the first bytes must be a zip signature (only those are
  read to decide), the zip structures must agree with each other (central
  directory, local headers, zip64 fields), member names must be unique,
  members must be stored or deflated, and each ``.npy`` member must hold a
  plain numeric array whose header-declared size is exactly the member's.
- Memory is bounded by the sizes the file declares, never by what a stream
  produces: every size is checked before anything is allocated, members
  are decompressed in bounded chunks into buffers that grow with the data
  actually produced, and a stream that yields more or less than declared,
  or fails its CRC, is refused. The declared sizes are bounded too: stored
  members lie within the file, and deflated ones (lucid.save does not
  write them, other zip tools do) may expand the file at most 100 times
  (64 MiB for files under 671 KB), so a small file cannot make ``load``
  allocate much.
"""

from __future__ import annotations

import ast
import errno
import json
import math
import os
import stat
import struct
import sys
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, BinaryIO, NamedTuple

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

    Every value is checked before anything is written. The archive is
    written to a temporary file with a short random name in the target's
    directory and renamed over the target, so a failed save leaves an
    existing file intact (and removes the temporary file), and a long file
    name works as long as the file system takes it. ``path`` is used as
    given (no suffix is added); if it is a symbolic link, the file it points
    to is replaced and the link is kept. The new file gets the permissions
    of any newly created file (``0o666`` less the umask): the mode and owner
    of a file it replaces are not carried over.

    Args:
        state_dict: names to arrays (NumPy, JAX, lucid Tensor or torch),
            e.g. ``module.state_dict()``. Any numeric or boolean dtype,
            bfloat16 included, in either byte order (stored native-endian,
            values unchanged).
        path: the file to write.

    Raises:
        TypeError: ``state_dict`` is not a mapping with str keys, or a value
            is not a numeric array (or is a tracer, inside ``jax.jit``).
        OSError: the file cannot be written (as the operating system reports it).

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
    # Through a symbolic link to the file it names, so that the rename below replaces that file and not the link.
    target = os.path.realpath(os.fsdecode(path))
    # A short name, so that a target name near the file system's limit (255 bytes) still leaves room; created
    # exclusively with default permissions, beside the target so that the rename stays on one file system.
    tmp = os.path.join(os.path.dirname(target), f".lucid-{uuid.uuid4().hex[:16]}.tmp")
    created = False
    try:
        with open(tmp, "xb") as f:
            created = True
            _write_npz(f, members)
        os.replace(tmp, target)
    except BaseException:
        if created and os.path.lexists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------------- reading

_LOCAL_SIG, _CENTRAL_SIG, _END_SIG = b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06"
_ZIP64_END_SIG, _ZIP64_LOCATOR_SIG = b"PK\x06\x06", b"PK\x06\x07"
_LOCAL = struct.Struct("<4s5H3L2H")  # signature, version, flags, method, time, date, crc, sizes, name/extra lengths
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # ... comment length, disk, attributes, local header offset
_END = struct.Struct("<4s4H2LH")  # signature, disks, entry counts, directory size and offset, comment length
_ZIP64_LOCATOR = struct.Struct("<4sLQL")  # signature, disk, offset of the zip64 end record, number of disks
_ZIP64_END = struct.Struct("<4sQ2H2L4Q")  # signature, record size, versions, disks, counts, size, offset
_SATURATED = 0xFFFFFFFF  # a 32-bit size or offset whose value is in the zip64 extra field
_STORED, _DEFLATED = 0, 8
_ALLOWED_FLAGS = 0x0806  # deflate level hints (bits 1, 2) and UTF-8 names (bit 11): nothing that changes the data
# Deflate's densest code spends 1 bit on a 258-byte match and 1 on its distance: no stream expands further.
_DEFLATE_MAX_RATIO = 1032
# lucid.save stores arrays uncompressed, so only an archive rezipped by another tool has deflated members. Its
# arrays may take up to this many times the file's size (or _EXPANSION_FLOOR, when that is more): what a small
# file can make load allocate, even when its sizes are true (constant data deflates up to 1032 times).
_MAX_EXPANSION = 100
_EXPANSION_FLOOR = 64 << 20
_CHUNK = 1 << 20
_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER_MAX = 10_000  # NumPy's own bound on a .npy header it parses without trusting the file
_NPY_KEYS = {"descr", "fortran_order", "shape"}
_Want = Callable[[np.dtype, tuple[int, ...]], None]  # refuses a member's dtype and shape before its data is read


class _Member(NamedTuple):
    """A zip entry as the central directory declares it; ``start`` (of the data) once its local header is read."""

    name: bytes
    flags: int
    method: int
    crc: int
    compressed: int
    size: int
    offset: int
    start: int = -1


class _Archive:
    """Bounded reads of a regular file whose size was taken once: nothing is read past that size."""

    def __init__(self, file: BinaryIO, size: int) -> None:
        self.file, self.size = file, size

    def read(self, offset: int, count: int, what: str) -> bytes:
        if offset + count > self.size:
            raise ValueError(f"{what} lies beyond the end of the file ({self.size} bytes): truncated or corrupted")
        self.file.seek(offset)
        data = self.file.read(count)
        if len(data) != count:
            raise ValueError(f"{what}: the file ended early")
        return data


def _open_regular(path: str) -> BinaryIO:
    """``path`` opened for reading, if it is a regular file; a FIFO does not block the open."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(mode):
            raise ValueError(
                f"{path!r} is not a regular file (a device, FIFO or socket): a checkpoint is read from a file, "
                "whose end it needs to find first."
            )
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _extra_fields(extra: bytes, where: str) -> dict[int, bytes]:
    """The (tag, data) blocks of a zip extra field, which must tile it exactly, each tag once."""
    fields: dict[int, bytes] = {}
    at = 0
    while at < len(extra):
        if at + 4 > len(extra):
            raise ValueError(f"{where}: truncated extra field")
        tag, size = struct.unpack_from("<HH", extra, at)
        if at + 4 + size > len(extra) or tag in fields:
            raise ValueError(f"{where}: malformed extra field (block {tag:#06x})")
        fields[tag] = extra[at + 4:at + 4 + size]
        at += 4 + size
    return fields


def _widened(values: list[int], extra: bytes, where: str) -> list[int]:
    """``values`` with each saturated one replaced, in order, by the next 8 bytes of the zip64 extra field."""
    zip64 = _extra_fields(extra, where).get(0x0001, b"")
    at, out = 0, []
    for value in values:
        if value == _SATURATED:
            if at + 8 > len(zip64):
                raise ValueError(f"{where}: a size or offset is 0xFFFFFFFF but its zip64 extra field is missing")
            value = int.from_bytes(zip64[at:at + 8], "little")
            at += 8
        out.append(value)
    return out


def _agrees(small: int, big: int, saturated: int) -> bool:
    """A field of the classic end record matches the zip64 one: equal, or saturated (writers do either)."""
    return small in (big, saturated)


def _directory(archive: _Archive) -> tuple[dict[bytes, _Member], int]:
    """The members the central directory declares, in its order, and where it starts.

    The end record must end the file (after its comment), the directory must
    end exactly where the end records begin, and names must be unique.
    """
    tail_size = min(archive.size, _END.size + 0xFFFF)
    tail = archive.read(archive.size - tail_size, tail_size, "the end of the archive")
    at = len(tail)
    while True:
        at = tail.rfind(_END_SIG, 0, at)
        if at < 0:
            raise ValueError("no end-of-central-directory record (truncated or not a zip archive)")
        if at + _END.size <= len(tail) and at + _END.size + _END.unpack_from(tail, at)[-1] == len(tail):
            break
    end = archive.size - tail_size + at
    _, disk, directory_disk, disk_count, count, size, offset, _ = _END.unpack_from(tail, at)
    directory_end = end
    if end >= _ZIP64_LOCATOR.size and archive.read(end - _ZIP64_LOCATOR.size, 4, "zip64 locator") == \
            _ZIP64_LOCATOR_SIG:
        locator = end - _ZIP64_LOCATOR.size
        _, record_disk, record, disks = _ZIP64_LOCATOR.unpack(archive.read(locator, _ZIP64_LOCATOR.size, "locator"))
        if record_disk != 0 or disks != 1 or record + _ZIP64_END.size > locator:
            raise ValueError("malformed zip64 end-of-central-directory locator")
        fields = _ZIP64_END.unpack(archive.read(record, _ZIP64_END.size, "the zip64 end record"))
        signature, record_size, _, _, disk64, directory_disk64, disk_count64, count64, size64, offset64 = fields
        if signature != _ZIP64_END_SIG or record + 12 + record_size != locator or not (
            _agrees(disk, disk64, 0xFFFF) and _agrees(directory_disk, directory_disk64, 0xFFFF)
            and _agrees(disk_count, disk_count64, 0xFFFF) and _agrees(count, count64, 0xFFFF)
            and _agrees(size, size64, _SATURATED) and _agrees(offset, offset64, _SATURATED)
        ):
            raise ValueError("the zip64 end record is malformed or disagrees with the end record")
        disk, directory_disk, disk_count, count, size, offset = disk64, directory_disk64, disk_count64, count64, \
            size64, offset64
        directory_end = record
    if disk or directory_disk or disk_count != count:
        raise ValueError("a multi-disk archive (lucid writes one file)")
    if offset + size != directory_end or count > size // _CENTRAL.size:
        raise ValueError(
            f"the end record declares {count} entries in {size} bytes at offset {offset}, but the central "
            f"directory must end at {directory_end}"
        )
    directory = archive.read(offset, size, "the central directory")
    members: dict[bytes, _Member] = {}
    at = 0
    for _ in range(count):
        if at + _CENTRAL.size > size or directory[at:at + 4] != _CENTRAL_SIG:
            raise ValueError(f"central directory entry {len(members)} is malformed")
        fields = _CENTRAL.unpack_from(directory, at)
        _, _, _, flags, method, _, _, crc, compressed, length, name_size, extra_size, comment_size = fields[:13]
        entry_disk, local = fields[13], fields[16]
        name = directory[at + _CENTRAL.size:at + _CENTRAL.size + name_size]
        extra = directory[at + _CENTRAL.size + name_size:at + _CENTRAL.size + name_size + extra_size]
        at += _CENTRAL.size + name_size + extra_size + comment_size
        if at > size:
            raise ValueError(f"central directory entry {len(members)} runs past the directory")
        if name in members:
            raise ValueError(f"the member name {name!r} appears twice")
        if entry_disk:
            raise ValueError("a multi-disk archive (lucid writes one file)")
        length, compressed, local = _widened([length, compressed, local], extra, f"entry {name!r}")
        members[name] = _Member(name, flags, method, crc, compressed, length, local)
    if at != size:
        raise ValueError(f"{size - at} bytes after the last central directory entry")
    return members, offset


def _located(archive: _Archive, members: dict[bytes, _Member], directory: int) -> dict[bytes, _Member]:
    """``members`` checked against lucid's format and their local headers, each with where its data starts.

    Only stored and deflated members without encryption or data descriptors
    are accepted, a deflated one declaring no more than deflate can produce
    and all together no more than ``_MAX_EXPANSION`` times the file; every
    local header must repeat the central directory, and the members' bytes
    may neither overlap nor reach into the central directory.
    """
    located: dict[bytes, _Member] = {}
    for member in members.values():
        where = f"member {member.name!r}"
        if member.flags & ~_ALLOWED_FLAGS:
            raise ValueError(f"{where} uses zip features lucid does not read (flags {member.flags:#06x}, such as "
                             "encryption or a data descriptor)")
        if member.method not in (_STORED, _DEFLATED):
            raise ValueError(f"{where} uses compression method {member.method}; only stored (0) and deflate (8) "
                             "members are read")
        if member.method == _STORED and member.size != member.compressed:
            raise ValueError(f"{where} is stored but declares {member.size} bytes in {member.compressed}")
        if member.method == _DEFLATED and member.size > member.compressed * _DEFLATE_MAX_RATIO:
            raise ValueError(f"{where} declares {member.size} bytes from {member.compressed} deflated bytes, "
                             f"more than deflate can expand to ({_DEFLATE_MAX_RATIO}x)")
        header = archive.read(member.offset, _LOCAL.size, f"the local header of {where}")
        signature, _, flags, method, _, _, crc, compressed, size, name_size, extra_size = _LOCAL.unpack(header)
        if signature != _LOCAL_SIG:
            raise ValueError(f"{where}: no local header at offset {member.offset}")
        name_extra = archive.read(member.offset + _LOCAL.size, name_size + extra_size, f"the local header of {where}")
        size, compressed = _widened([size, compressed], name_extra[name_size:], where)
        if (name_extra[:name_size], flags, method, crc, compressed, size) != (
            member.name, member.flags, member.method, member.crc, member.compressed, member.size
        ):
            raise ValueError(f"{where}: the local header disagrees with the central directory")
        located[member.name] = member._replace(start=member.offset + _LOCAL.size + name_size + extra_size)
    previous_end, previous = 0, None
    for member in sorted(located.values(), key=lambda m: m.offset):
        if member.offset < previous_end:
            raise ValueError(f"member {member.name!r} overlaps member {previous!r}")
        previous_end, previous = member.start + member.compressed, member.name
    if previous_end > directory:
        raise ValueError(f"member {previous!r} runs into the central directory")
    declared = sum(member.size for member in located.values())
    if declared > max(_EXPANSION_FLOOR, _MAX_EXPANSION * archive.size):
        raise ValueError(f"its members declare {declared} bytes in a {archive.size}-byte file, more than "
                         f"{_MAX_EXPANSION} times its size (lucid.save stores arrays uncompressed)")
    return located


class _Stream:
    """One member's bytes in pieces of at most ``_CHUNK``, never more than it declares.

    :meth:`finish` then checks that the data ends exactly there (a deflate
    stream that would produce more is refused after one extra byte) and that
    the CRC matches.
    """

    def __init__(self, archive: _Archive, member: _Member) -> None:
        self._archive, self._member = archive, member
        self._where = f"member {member.name!r}"
        self._position, self._compressed_left, self._left, self._crc = member.start, member.compressed, member.size, 0
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS) if member.method == _DEFLATED else None
        self._pending = b""

    def read(self, count: int) -> bytes:
        return b"".join(self.pieces(count))

    def pieces(self, count: int) -> Iterator[bytes]:
        if count > self._left:
            raise ValueError(f"{self._where} is shorter than its contents declare")
        while count:
            piece = self._next(min(count, _CHUNK))
            self._crc = zlib.crc32(piece, self._crc)
            self._left -= len(piece)
            count -= len(piece)
            yield piece

    def _raw(self, count: int) -> bytes:
        data = self._archive.read(self._position, count, f"the data of {self._where}")
        self._position += count
        self._compressed_left -= count
        return data

    def _inflate(self, limit: int) -> bytes:
        """Up to ``limit`` (> 0) more bytes; empty if the input so far yields none."""
        assert self._inflater is not None and limit > 0  # (a limit of 0 would mean no limit to zlib)
        if not self._pending:
            if not self._compressed_left:
                raise ValueError(f"{self._where}: the deflate stream is truncated")
            self._pending = self._raw(min(_CHUNK, self._compressed_left))
        before = len(self._pending)
        try:
            piece = self._inflater.decompress(self._pending, limit)
        except zlib.error as error:
            raise ValueError(f"{self._where} holds corrupt deflate data ({error})") from None
        self._pending = self._inflater.unconsumed_tail
        if not piece and not self._inflater.eof and len(self._pending) == before:
            raise ValueError(f"{self._where}: the deflate stream makes no progress")
        return piece

    def _next(self, count: int) -> bytes:
        if self._inflater is None:
            return self._raw(count)
        while True:
            if self._inflater.eof:
                raise ValueError(f"{self._where} inflates to fewer than the {self._member.size} bytes it declares")
            piece = self._inflate(count)
            if piece:
                return piece

    def finish(self) -> None:
        if self._left:
            raise ValueError(f"{self._where} holds {self._left} bytes more than its contents declare")
        if self._inflater is not None:
            while not self._inflater.eof:
                if self._inflate(1):
                    raise ValueError(f"{self._where} inflates to more than the {self._member.size} bytes it declares")
            if self._pending or self._inflater.unused_data or self._compressed_left:
                raise ValueError(f"{self._where} has bytes after the end of its deflate stream")
        if self._crc != self._member.crc:
            raise ValueError(f"{self._where} fails its CRC check")


def _npy_header(text: str, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype from a ``.npy`` header, which must be a plain literal dict."""
    try:
        header = ast.literal_eval(text)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as error:
        raise ValueError(f"{where} has an unreadable .npy header ({type(error).__name__})") from None
    if not isinstance(header, dict) or set(header) != _NPY_KEYS:
        raise ValueError(f"{where}: the .npy header is not a dict with the keys {sorted(_NPY_KEYS)}")
    descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    if not (isinstance(descr, str) and isinstance(fortran, bool) and isinstance(shape, tuple) and len(shape) <= 64
            and all(type(n) is int and 0 <= n <= sys.maxsize for n in shape)):
        raise ValueError(f"{where} has a malformed .npy header {text.strip()[:200]!r}")
    try:
        dtype = np.dtype(descr)
    except (TypeError, ValueError, SyntaxError, OverflowError) as error:
        raise ValueError(f"{where}: the .npy header's dtype {descr[:100]!r} is not valid ({error})") from None
    if dtype.itemsize == 0:
        raise ValueError(f"{where} has dtype {dtype}, of size 0")
    return shape, fortran, dtype


def _read_npy(archive: _Archive, member: _Member, want: _Want) -> tuple[tuple[int, ...], bool, np.dtype, bytearray]:
    """A ``.npy`` member's shape, order, dtype and data, its size checked before the data is read.

    ``want(dtype, shape)`` refuses a dtype or shape before any data is read;
    the data size the ``.npy`` header declares must be exactly the rest of
    what the zip entry declares.
    """
    where = f"member {member.name!r}"
    stream = _Stream(archive, member)
    if member.size < 10:
        raise ValueError(f"{where} is too short ({member.size} bytes) for a .npy array")
    preamble = stream.read(10)
    if preamble[:6] != _NPY_MAGIC:
        raise ValueError(f"{where} is not a .npy array")
    version = (preamble[6], preamble[7])
    if version == (1, 0):
        start, length = 10, struct.unpack("<H", preamble[8:])[0]
    elif version == (2, 0):
        if member.size < 12:
            raise ValueError(f"{where} is too short ({member.size} bytes) for a .npy array")
        start, length = 12, struct.unpack("<I", preamble[8:] + stream.read(2))[0]
    else:
        raise ValueError(f"{where} has .npy format version {version[0]}.{version[1]}; lucid reads 1.0 and 2.0")
    if length > _NPY_HEADER_MAX or start + length > member.size:
        raise ValueError(f"{where} declares a {length}-byte .npy header in {member.size} bytes")
    shape, fortran, dtype = _npy_header(stream.read(length).decode("latin-1"), where)
    want(dtype, shape)
    size = math.prod(shape) * dtype.itemsize
    if start + length + size != member.size:
        raise ValueError(f"{where}: its .npy header declares {shape} {dtype} ({size} bytes of data), its zip entry "
                         f"{member.size - start - length} bytes")
    data = bytearray()
    for piece in stream.pieces(size):
        data += piece
    stream.finish()
    return shape, fortran, dtype, data


def _header_entries(archive: _Archive, member: _Member) -> list[list[str]]:
    """The ``[name, dtype name]`` entries of the JSON header, checked."""
    def want(dtype: np.dtype, shape: tuple[int, ...]) -> None:
        if dtype.kind != "U" or shape != ():
            raise ValueError(f"the {_HEADER} header is a {dtype} array of shape {shape}, not a unicode scalar")

    _, _, dtype, data = _read_npy(archive, member, want)
    encoding = "utf-32-be" if dtype.str[0] == ">" else "utf-32-le"
    try:
        header = json.loads(data.decode(encoding).rstrip("\x00"))  # (NumPy's str arrays drop trailing NULs)
    except RecursionError:
        raise ValueError(f"the {_HEADER} header nests too deeply") from None
    if not isinstance(header, dict):
        raise ValueError(f"the {_HEADER} header is not a JSON object")
    if header.get("format") != _FORMAT or header.get("version") != _VERSION:
        raise ValueError(f"unsupported format {header.get('format')!r} version {header.get('version')!r}")
    entries = header.get("entries")
    if not isinstance(entries, list) or not all(
        isinstance(e, list) and len(e) == 2 and all(isinstance(s, str) for s in e) for e in entries
    ):
        raise ValueError(f"the {_HEADER} header's entries are not a list of [name, dtype] string pairs")
    names = [name for name, _ in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"the {_HEADER} header names an array twice")
    return entries


def _wants(stored: np.dtype, name: str, dtype: np.dtype) -> _Want:
    """The check of an array member's dtype, which must be ``stored`` (in either byte order)."""
    def want(found: np.dtype, shape: tuple[int, ...]) -> None:
        if found.newbyteorder("=") != stored.newbyteorder("="):
            raise ValueError(f"{name!r} was saved as {dtype} but its member holds {found}")

    return want


def _state(archive: _Archive, members: dict[bytes, _Member]) -> dict[str, np.ndarray]:
    """The arrays of a lucid archive whose directory has been read."""
    entries = _header_entries(archive, members[f"{_HEADER}.npy".encode()])
    expected = {f"arr_{i}.npy".encode() for i in range(len(entries))} | {f"{_HEADER}.npy".encode()}
    if set(members) != expected:
        extra, missing = sorted(set(members) - expected), sorted(expected - set(members))
        raise ValueError(f"unexpected members {extra}, missing {missing}")
    out: dict[str, np.ndarray] = {}
    for i, (name, dtype_name) in enumerate(entries):
        try:
            dtype = jnp.dtype(dtype_name)
        except (TypeError, ValueError):
            raise ValueError(f"{name!r} has an unknown dtype {dtype_name[:100]!r}") from None
        if not _supported(dtype):
            raise ValueError(f"{name!r} has unsupported dtype {dtype_name}")
        bits = _bits_dtype(dtype)
        stored = dtype if bits is None else bits

        shape, fortran, found, data = _read_npy(archive, members[f"arr_{i}.npy".encode()], _wants(stored, name, dtype))
        array = np.frombuffer(data, found, count=len(data) // found.itemsize)
        array = _native(array.reshape(shape, order="F" if fortran else "C"))
        out[name] = array if bits is None else array.view(dtype)
    return out


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a file written by :func:`save`, without ever unpickling.

    Arrays come back as NumPy arrays with their saved dtype and values, bit
    for bit (JAX would narrow float64/int64 to 32 bits unless
    ``jax_enable_x64`` is on), in native byte order: a big-endian ``>f4``
    array saved comes back as a native ``float32`` array of the same values.
    Pass the dict to ``module.load_state_dict`` or ``jnp.asarray`` what you
    need.

    The file may come from anyone. Its first 4 bytes decide whether it is
    parsed at all, only a regular file is read (a device or FIFO is refused
    without reading from it), and any malformation raises ``ValueError``.
    Memory use is bounded by the array sizes the file declares, which are
    checked against each other and against the bytes that hold them before
    anything is allocated; data is decompressed in bounded chunks and never
    past the declared size. An archive with deflated members (another zip
    tool's; lucid writes them stored) is refused if its arrays would take
    more than 100 times the file's size (and more than 64 MiB).

    Args:
        path: a file written by :func:`save`.

    Returns:
        A dict from name to ``np.ndarray``, in the saved order.

    Raises:
        ValueError: the file is not a lucid archive (a pickle, a PyTorch
            checkpoint, a plain ``.npz``, a file that is not a regular file)
            or is malformed: truncated, corrupted or crafted (inconsistent zip
            structures, duplicate member names, compression other than
            stored or deflate, encryption, a failed CRC, deflated members
            expanding the file over 100 times, an ``.npy`` member whose
            header disagrees with its size or holds a non-numeric dtype).
            The message names the file.
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a directory.
        PermissionError: ``path`` cannot be read (other ``OSError`` s, such
            as a read error, as the operating system reports them).

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
    with _open_regular(path) as f:
        magic = f.read(4)
        if magic not in (_LOCAL_SIG, _END_SIG):  # (an archive without members starts with its end record)
            kind = "a pickle" if magic[:1] == b"\x80" else "not an .npz archive"
            raise ValueError(f"{path!r} is {kind}. {_PICKLE_HINT}")
        archive = _Archive(f, os.fstat(f.fileno()).st_size)
        try:
            members, directory = _directory(archive)
            lucid = f"{_HEADER}.npy".encode() in members
            if lucid:
                state = _state(archive, _located(archive, members, directory))
        except ValueError as error:
            raise ValueError(f"{path!r} is not a valid lucid checkpoint: {error}") from None
    if not lucid:
        raise ValueError(f"{path!r} is a zip archive but not a lucid checkpoint (no {_HEADER} header). {_PICKLE_HINT}")
    return state
