"""lucid.save / lucid.load: bit-exact round trips, and files that are refused without being unpickled."""

import io
import json
import os
import pickle
import re
import stat
import struct
import subprocess
import sys
import tracemalloc
import zipfile
import zlib

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import lucid
import lucid.nn as nn
from lucid import Tensor

DTYPES = [np.float32, np.float16, jnp.bfloat16, np.float64, np.int8, np.int32, np.int64, np.uint8, np.uint64,
          np.bool_, np.complex64, ml_dtypes.float8_e4m3fn, ">f4", ">i8"]  # the last two big-endian


def _bits(a):
    """The raw bytes of an array, so NaN payloads and signed zeros count."""
    a = np.ascontiguousarray(a)
    return a.dtype, a.shape, a.view(np.uint8).tobytes()


def _random(rng, dtype, shape):
    dtype = np.dtype(dtype)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    if dtype == np.bool_:
        return (raw % 2).astype(np.bool_).reshape(shape)
    return raw.view(dtype).reshape(shape)  # arbitrary bit patterns: NaNs, infs, -0.0, subnormals


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).str)
def test_round_trip_is_bit_exact(tmp_path, rng, dtype):
    """Values and bits come back; the byte order comes back native (regression: '>f4' and '>i8'
    arrays were saved as they were and then refused by load as a dtype mismatch)."""
    state = {"a": _random(rng, dtype, (3, 4)), "scalar": _random(rng, dtype, ()), "empty": _random(rng, dtype, (0, 2))}
    path = tmp_path / "state.npz"
    lucid.save(state, path)
    loaded = lucid.load(path)
    assert list(loaded) == list(state)
    for k in state:
        assert isinstance(loaded[k], np.ndarray) and loaded[k].dtype.isnative
        native = state[k].astype(state[k].dtype.newbyteorder("="))  # NumPy's own byte-order conversion
        assert _bits(loaded[k]) == _bits(native), k


def test_values_of_every_kind_and_any_key(tmp_path, rng):
    w = rng.normal(size=3).astype(np.float32)
    state = {
        "jax.bf16": jnp.asarray(w, jnp.bfloat16),
        "tensor": Tensor(w),
        "torch/int64": torch.tensor([2**40, -1]),
        "torch.bf16": torch.tensor(w).bfloat16(),
        "file": np.float64(1.5),  # names that np.savez would take as its own arguments
        "allow_pickle": np.arange(2),
        "ünï cödé": np.zeros(1),
    }
    path = os.fspath(tmp_path / "x.npz")
    lucid.save(state, path)
    loaded = lucid.load(path)
    assert list(loaded) == list(state)
    assert loaded["jax.bf16"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(loaded["jax.bf16"], np.asarray(jnp.asarray(w, jnp.bfloat16)))
    np.testing.assert_array_equal(loaded["tensor"], w)
    assert loaded["torch/int64"].dtype == np.int64 and loaded["torch/int64"].tolist() == [2**40, -1]
    assert loaded["torch.bf16"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(loaded["torch.bf16"].astype(np.float32), torch.tensor(w).bfloat16().float().numpy())
    assert loaded["file"].dtype == np.float64 and loaded["file"] == 1.5


def test_path_is_used_as_given_and_overwritten(tmp_path):
    path = tmp_path / "checkpoint.lucid"
    lucid.save({"a": np.ones(2)}, path)
    lucid.save({"b": np.zeros(3)}, path)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.lucid"]
    assert list(lucid.load(path)) == ["b"]


def test_module_round_trip_gives_identical_outputs(tmp_path, rng):
    norm = nn.InstanceNorm2d(3, dtype=jnp.bfloat16)
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    norm(jnp.asarray(x, jnp.bfloat16))  # a training step: non-trivial running statistics
    norm.weight.data = jnp.asarray(rng.normal(size=3), jnp.bfloat16)
    lucid.save(norm.state_dict(), tmp_path / "norm.npz")
    loaded = lucid.load(tmp_path / "norm.npz")
    assert loaded["running_mean"].dtype == jnp.bfloat16 and loaded["num_batches_tracked"].dtype == np.int32
    copy = nn.InstanceNorm2d(3, dtype=jnp.bfloat16)
    copy.load_state_dict(loaded)
    for k, v in norm.state_dict().items():
        assert _bits(np.asarray(copy.state_dict()[k])) == _bits(np.asarray(v)), k
    norm.eval()
    copy.eval()
    xb = jnp.asarray(x, jnp.bfloat16)
    assert _bits(np.asarray(copy(xb))) == _bits(np.asarray(norm(xb)))  # arrays in, arrays out


def test_a_torch_state_dict_saved_with_lucid_loads_into_a_module(tmp_path, rng):
    theirs = torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    with torch.no_grad():
        theirs.running_mean.copy_(torch.tensor(rng.normal(size=3).astype(np.float32)))
        theirs.num_batches_tracked.fill_(5)
    lucid.save(theirs.state_dict(), tmp_path / "t.npz")
    loaded = lucid.load(tmp_path / "t.npz")
    assert loaded["num_batches_tracked"].dtype == np.int64  # kept as saved
    ours = nn.InstanceNorm2d(3)
    ours.load_state_dict(loaded)
    np.testing.assert_array_equal(ours.running_mean.numpy(), theirs.running_mean.numpy())
    assert ours.num_batches_tracked.item() == 5


class _Trap:
    """Unpickling this creates a marker file: proof that a loader ran code from the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.npz"
    with open(path, "wb") as f:
        pickle.dump({"weight": _Trap(os.fspath(marker))}, f)
    with pytest.raises(ValueError, match="never unpickles"):
        lucid.load(path)
    assert not marker.exists()


def test_a_torch_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"weight": torch.ones(2), "trap": _Trap(os.fspath(marker))}, path)  # a zip holding a pickle
    with pytest.raises(ValueError, match="not a lucid checkpoint"):
        lucid.load(path)
    assert not marker.exists()


def test_object_arrays_inside_a_lucid_archive_are_refused(tmp_path):
    """A tampered archive: the lucid header, but a member that is a pickled object array."""
    good = tmp_path / "good.npz"
    lucid.save({"weight": np.ones(2)}, good)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.npz"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        dst.writestr("__lucid__.npy", src.read("__lucid__.npy"))
        with dst.open("arr_0.npy", "w") as f:
            np.lib.format.write_array(f, np.array([_Trap(os.fspath(marker))], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a valid lucid checkpoint"):
        lucid.load(evil)
    assert not marker.exists()


def test_other_files_are_refused(tmp_path):
    plain = tmp_path / "plain.npz"
    np.savez(plain, weight=np.ones(2))
    with pytest.raises(ValueError, match="not a lucid checkpoint"):
        lucid.load(plain)
    text = tmp_path / "notes.txt"
    text.write_text("weight = 1")
    with pytest.raises(ValueError, match="not an .npz archive"):
        lucid.load(text)
    with pytest.raises(FileNotFoundError):
        lucid.load(tmp_path / "missing.npz")


def test_bad_state_is_refused_before_writing(tmp_path):
    path = tmp_path / "state.npz"
    lucid.save({"a": np.ones(2)}, path)
    for bad, error in [
        ({"a": np.array([object()])}, "dtype object"),
        ({"a": "text"}, "must be a NumPy array"),
        ({1: np.ones(2)}, "keys must be str"),
        ([("a", np.ones(2))], "mapping"),
    ]:
        with pytest.raises(TypeError, match=error):
            lucid.save(bad, path)
    assert list(lucid.load(path)) == ["a"]  # the existing file is intact
    assert sorted(os.listdir(tmp_path)) == ["state.npz"]  # and no temporary file is left


def test_big_endian_members_of_an_existing_archive_load_native(tmp_path, rng):
    """Archives that earlier versions wrote from big-endian arrays (members '>f4', '>i8') load, native-endian."""
    w, step = rng.normal(size=3).astype(">f4"), np.array([2**40, -3], ">i8")
    header = json.dumps({"format": "lucid-state-dict", "version": 1, "entries": [["w", "float32"], ["step", "int64"]]})
    path = tmp_path / "old.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in (("__lucid__", np.array(header)), ("arr_0", w), ("arr_1", step)):
            with archive.open(f"{name}.npy", "w") as f:
                np.lib.format.write_array(f, array, allow_pickle=False)
    loaded = lucid.load(path)
    assert loaded["w"].dtype == np.dtype("=f4") and loaded["step"].dtype == np.dtype("=i8")
    np.testing.assert_array_equal(loaded["w"], w)
    np.testing.assert_array_equal(loaded["step"], step)


def _savez_numpy_1_26(file, *args, **kwds):
    """``np.savez`` as NumPy 1.26 (lucid's floor) has it: no ``allow_pickle`` keyword, so every
    keyword, ``allow_pickle=False`` included, is stored as an array member."""
    members = {**{f"arr_{i}": a for i, a in enumerate(args)}, **kwds}
    with zipfile.ZipFile(file, "w", allowZip64=True) as archive:
        for name, value in members.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=True)


def test_archive_does_not_depend_on_the_numpy_savez_signature(tmp_path, monkeypatch, rng):
    """Regression: save called np.savez(..., allow_pickle=False); on NumPy 1.26 that wrote an extra
    'allow_pickle.npy' member and load refused the file. The members are now written by lucid."""
    monkeypatch.setattr(np, "savez", _savez_numpy_1_26)
    state = {"weight": rng.normal(size=3).astype(np.float32), "num_batches_tracked": np.int64(4)}
    path = tmp_path / "state.npz"
    lucid.save(state, path)
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ["__lucid__.npy", "arr_0.npy", "arr_1.npy"]
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}
        with archive.open("arr_0.npy") as f:  # NumPy's own reader, pickles refused, is the oracle
            np.testing.assert_array_equal(np.lib.format.read_array(f, allow_pickle=False), state["weight"])
    with np.load(path, allow_pickle=False) as archive:
        assert archive["arr_1"].dtype == np.int64 and archive["arr_1"] == 4
    loaded = lucid.load(path)
    np.testing.assert_array_equal(loaded["weight"], state["weight"])
    assert loaded["num_batches_tracked"].dtype == np.int64 and loaded["num_batches_tracked"] == 4


# ------------------------------------------------------------------------------------------ adversarial files
# Every file below is malformed, truncated, corrupted or crafted: load must return exactly the saved values
# (when the change does not touch anything the values depend on) or raise ValueError naming the file, and
# never anything else.


def _reference():
    rng = np.random.default_rng(7)
    return {
        "weight": rng.normal(size=(3, 4)).astype(np.float32),
        "half": np.asarray(jnp.asarray(rng.normal(size=5), jnp.bfloat16)),
        "step": np.int64(7),
        "empty": np.zeros((0, 2), np.float16),
    }


def _exact_or_value_error(path, state):
    """True if ``load`` gives exactly ``state``, False if it raises ValueError naming the file."""
    try:
        loaded = lucid.load(path)
    except ValueError as error:
        assert repr(os.fspath(path)) in str(error)
        return False
    assert list(loaded) == list(state)
    for k, v in state.items():
        assert _bits(loaded[k]) == _bits(np.asarray(v)), k
    return True


def _deflate(data):
    squeeze = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return squeeze.compress(data) + squeeze.flush()


def _members(path):
    """The members of an archive as ``_zip`` takes them, read by Python's zipfile."""
    with zipfile.ZipFile(path) as archive:
        return [{"name": info.filename.encode(), "payload": archive.read(info)} for info in archive.infolist()]


def _with(members, index, **changes):
    """``members`` with the one at ``index`` changed."""
    return [{**m, **changes} if i == index else m for i, m in enumerate(members)]


def _zip(members, *, comment=b"", zip64_end=False, end=None, classic_end=None):
    """A zip archive built field by field, so that any field can lie.

    Each member is a dict with ``name`` and ``payload`` (its uncompressed bytes) and optionally ``method``
    (0 stored, 8 deflate), ``data`` (the bytes stored, else the payload stored or deflated), declared
    ``size``/``compressed``/``crc``/``flags``/``offset`` (else the true ones), ``zip64`` (the fields among
    size, compressed, offset that are saturated and given in a zip64 extra field) and ``local``/``central``
    (overrides of the fields of one header only). ``end`` overrides the end record's count, size, offset
    (the zip64 one with ``zip64_end``); ``classic_end`` those of the classic record after a zip64 one.
    """
    body, directory = bytearray(), bytearray()
    for m in members:
        method = m.get("method", 0)
        data = m.get("data", m["payload"] if method == 0 else _deflate(m["payload"]))
        true = {"size": m.get("size", len(m["payload"])), "compressed": m.get("compressed", len(data)),
                "offset": m.get("offset", len(body))}
        crc, flags, name = m.get("crc", zlib.crc32(m["payload"])), m.get("flags", 0), m["name"]
        wide = m.get("zip64", ())

        def fields(keys, true=true, wide=wide):
            shown = {k: 0xFFFFFFFF if k in wide else true[k] for k in keys}
            extra = b"".join(struct.pack("<Q", true[k]) for k in keys if k in wide)
            return shown, (struct.pack("<HH", 1, len(extra)) + extra if extra else b"")

        shown, extra = fields(("size", "compressed"))
        h = {"flags": flags, "method": method, "crc": crc, "name": name, "extra": extra, **shown}
        h.update(m.get("local", {}))
        body += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, h["flags"], h["method"], 0, 0x21, h["crc"],
                            h["compressed"], h["size"], len(h["name"]), len(h["extra"])) + h["name"] + h["extra"] + data
        shown, extra = fields(("size", "compressed", "offset"))
        h = {"flags": flags, "method": method, "crc": crc, "name": name, "extra": extra, **shown}
        h.update(m.get("central", {}))
        directory += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, h["flags"], h["method"], 0, 0x21, h["crc"],
                                 h["compressed"], h["size"], len(h["name"]), len(h["extra"]), 0, 0, 0, 0,
                                 h["offset"]) + h["name"] + h["extra"]
    e = {"count": len(members), "size": len(directory), "offset": len(body), **(end or {})}
    tail = b""
    if zip64_end:
        tail = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, e["count"], e["count"], e["size"],
                           e["offset"]) + struct.pack("<4sLQL", b"PK\x06\x07", 0, len(body) + len(directory), 1)
        e = {"count": 0xFFFF, "size": 0xFFFFFFFF, "offset": 0xFFFFFFFF, **(classic_end or {})}
    return bytes(body + directory + tail) + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, e["count"], e["count"],
                                                         e["size"], e["offset"], len(comment)) + comment


@pytest.fixture
def saved(tmp_path):
    """``(state, path, members)``: a file written by lucid.save and its members."""
    state = _reference()
    path = tmp_path / "ref.npz"
    lucid.save(state, path)
    return state, path, _members(path)


def _write(tmp_path, blob, name="crafted.npz"):
    """``blob`` in one file, rewritten in place: emptying a file first costs milliseconds on some file systems."""
    path = tmp_path / name
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.write(blob)
        f.truncate()
    return path


@pytest.mark.parametrize("layout", ["stored", "deflated", "zip64", "zip64 offsets and end, comment"])
def test_the_crafting_tool_rebuilds_loadable_archives(tmp_path, saved, layout):
    """The builder behind the crafted files: without lies, its archives load exactly, and Python's zipfile
    (an independent reader) finds every CRC right."""
    state, _, members = saved
    options = {
        "stored": ({}, {}),
        "deflated": ({"method": 8}, {}),
        "zip64": ({"zip64": ("size", "compressed")}, {}),
        "zip64 offsets and end, comment": ({"zip64": ("size", "compressed", "offset")},
                                           {"zip64_end": True, "comment": b"a comment"}),
    }[layout]
    path = _write(tmp_path, _zip([{**m, **options[0]} for m in members], **options[1]))
    assert _exact_or_value_error(path, state)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None


def test_archives_past_the_zip64_limits_load(tmp_path, monkeypatch, saved):
    """Files over 4 GiB or with over 65535 arrays get zip64 sizes, offsets and end records from zipfile's
    writer; its limits lowered, the same writer emits every one of them for a small file."""
    state, _, _ = saved
    path = tmp_path / "zip64.npz"
    with monkeypatch.context() as patch:
        patch.setattr(zipfile, "ZIP64_LIMIT", 100)
        patch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 2)
        lucid.save(state, path)
    blob = path.read_bytes()
    assert b"PK\x06\x06" in blob and b"PK\x06\x07" in blob  # the zip64 end record and its locator
    with zipfile.ZipFile(path) as archive:  # and central directory entries whose offsets are in zip64 fields
        assert sum(info.header_offset > 100 for info in archive.infolist()) >= 3
    assert _exact_or_value_error(path, state)


def test_a_comment_that_holds_the_end_signature_is_read_as_a_comment(tmp_path, saved):
    state, _, members = saved
    for comment in (b"PK\x05\x06", b"PK\x05\x06\x00\x00", b"x" * 65535):
        assert _exact_or_value_error(_write(tmp_path, _zip(members, comment=comment)), state)


def _regions(blob):
    """Byte positions of an archive by kind: zip structures, .npy headers and array data."""
    regions = {"local header": [], "npy header": [], "data": []}
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        for info in archive.infolist():
            name_size, extra_size = struct.unpack_from("<2H", blob, info.header_offset + 26)
            start = info.header_offset + 30 + name_size + extra_size
            regions["local header"] += range(info.header_offset, start)
            npy = 10 + struct.unpack_from("<H", blob, start + 8)[0] if info.compress_type == zipfile.ZIP_STORED else 0
            regions["npy header"] += range(start, start + npy)
            regions["data"] += range(start + npy, start + info.compress_size)
    directory = max(regions["data"]) + 1
    end = blob.rfind(b"PK\x06\x06") if b"PK\x06\x06" in blob else len(blob) - 22  # (the zip64 end record first)
    regions["central directory"] = list(range(directory, end))
    regions["end records"] = list(range(end, len(blob)))
    return {k: v for k, v in regions.items() if v}


_LAYOUTS = {
    "stored": lambda path, members: path.read_bytes(),  # as lucid.save wrote it
    "deflated": lambda path, members: _zip([{**m, "method": 8} for m in members]),
    "zip64": lambda path, members: _zip([{**m, "zip64": ("size", "compressed", "offset")} for m in members],
                                        zip64_end=True),
}


@pytest.mark.parametrize("layout", _LAYOUTS)
def test_byte_flips_anywhere_give_the_saved_values_or_value_error(tmp_path, saved, layout):
    state, path, members = saved
    blob = _LAYOUTS[layout](path, members)
    regions = _regions(blob)
    assert len(regions) == (4 if layout == "deflated" else 5)  # deflated members have no .npy header in the clear
    outcomes = []
    for seed in range(400):
        rng = np.random.default_rng(seed)
        for positions in regions.values():
            flipped = bytearray(blob)
            for position in rng.choice(positions, size=rng.integers(1, 4)):
                flipped[position] ^= int(rng.integers(1, 256))
            outcomes.append(_exact_or_value_error(_write(tmp_path, flipped), state))
    assert not all(outcomes)  # (flips in fields that change nothing, e.g. timestamps, load exactly)


@pytest.mark.parametrize("layout", _LAYOUTS)
def test_every_truncation_and_extension_is_refused(tmp_path, saved, layout):
    state, path, members = saved
    blob = _LAYOUTS[layout](path, members)
    for length in range(len(blob)):
        with pytest.raises(ValueError, match=re.escape(repr(os.fspath(tmp_path / "crafted.npz")))):
            lucid.load(_write(tmp_path, blob[:length]))
    for extra in (b"\x00", b"PK\x05\x06", b"junk" * 100):
        with pytest.raises(ValueError):
            lucid.load(_write(tmp_path, blob + extra))
        with pytest.raises(ValueError):
            lucid.load(_write(tmp_path, extra + blob))


def test_mutated_npy_headers_with_valid_crcs_load_as_numpy_reads_them_or_are_refused(tmp_path, saved):
    """Mutations inside the members' .npy headers, repackaged with correct CRCs and sizes: what load returns
    must be what NumPy's own reader (pickles refused) reads from the member."""
    state, _, members = saved
    names = list(state)
    alphabet = np.frombuffer(b"0123456789(), '<>|=fiubcOUVS:{}[]Tx\n", np.uint8)
    loaded_some = 0
    for seed in range(600):
        rng = np.random.default_rng(seed)
        i = int(rng.integers(len(names)))
        payload = bytearray(members[i]["payload"])
        header = 10 + struct.unpack_from("<H", payload, 8)[0]
        for position in rng.integers(0, header, size=rng.integers(1, 3)):
            payload[position] = int(rng.choice(alphabet))
        path = _write(tmp_path, _zip(_with(members, i, payload=bytes(payload))))
        try:
            loaded = lucid.load(path)
        except ValueError as error:
            assert repr(os.fspath(path)) in str(error)
            continue
        loaded_some += 1
        ref = np.lib.format.read_array(io.BytesIO(bytes(payload)), allow_pickle=False)
        ref = ref.astype(ref.dtype.newbyteorder("="))
        assert _bits(loaded[names[i]].view(ref.dtype)) == _bits(ref)
        for k in names[:i] + names[i + 1:]:
            assert _bits(loaded[k]) == _bits(state[k])
    assert loaded_some


def _npy(array=None, *, header=None, data=b""):
    """A .npy member: ``array`` as NumPy writes it, or a header dict (any shape/dtype) followed by ``data``."""
    out = io.BytesIO()
    if header is None:
        np.lib.format.write_array(out, array, allow_pickle=False)
    else:
        np.lib.format.write_array_header_1_0(out, header)
        out.write(data)
    return out.getvalue()


def _lucid_members(arrays, dtypes=None):
    """Members of a lucid archive for ``arrays`` (name to array), payloads as lucid writes them."""
    entries = [[name, (dtypes or {}).get(name, np.asarray(a).dtype.name)] for name, a in arrays.items()]
    header = json.dumps({"format": "lucid-state-dict", "version": 1, "entries": entries})
    members = [{"name": f"arr_{i}.npy".encode(), "payload": _npy(np.asarray(a))} for i, a in enumerate(arrays.values())]
    return members + [{"name": b"__lucid__.npy", "payload": _npy(np.array(header))}]


def _raw_header(text, dtype="<U"):
    """A __lucid__ member holding ``text`` as NumPy stores a str array (UTF-32), without NumPy checking it."""
    data = text.encode("utf-32-le") if isinstance(text, str) else text
    return {"name": b"__lucid__.npy", "payload": _npy(header={"descr": f"{dtype}{len(data) // 4}",
                                                              "fortran_order": False, "shape": ()}, data=data)}


_W = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
_HUGE = {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
_W_NPY = len(_npy(_W["w"]))


def _entries(*entries, version=1):
    return _raw_header(json.dumps({"format": "lucid-state-dict", "version": version, "entries": [*entries]}))


def _case(change, match, **options):
    """A crafted archive: ``change`` maps the members of a lucid archive of ``_W`` to the ones written."""
    return lambda: _zip(change(_lucid_members(_W)), **options), match


CRAFTED = {
    # sizes, offsets and checksums that lie, in one header or in both
    "stored size above its bytes": _case(lambda m: _with(m, 0, size=_W_NPY + 1), "stored but declares"),
    "local size disagrees": _case(lambda m: _with(m, 0, local={"size": 5}), "local header disagrees"),
    "local name disagrees": _case(lambda m: _with(m, 0, local={"name": b"arr_9.npy"}), "local header disagrees"),
    "local crc disagrees": _case(lambda m: _with(m, 0, local={"crc": 1}), "local header disagrees"),
    "wrong crc": _case(lambda m: _with(m, 0, crc=12345), "CRC"),
    "overlapping members": _case(lambda m: _with(m, 0, size=_W_NPY + 40, compressed=_W_NPY + 40), "overlaps"),
    "sizes beyond the file": _case(lambda m: m[:1] + [{**m[1], "size": 2**31, "compressed": 2**31}],
                                   "central directory"),
    "deflated size beyond deflate's reach": _case(lambda m: _with(m, 0, method=8, size=10**9), "more than deflate"),
    "deflated size below the .npy header": _case(lambda m: _with(m, 0, method=8, size=60), "header in 60 bytes"),
    "offset into another member": _case(lambda m: _with(m, 1, offset=0), "local header disagrees"),
    "end record count too high": _case(lambda m: m, "end record declares 3 entries", end={"count": 3}),
    "end record count too low": _case(lambda m: m, "after the last central directory entry", end={"count": 1}),
    "end record offset": _case(lambda m: m, "must end at", end={"offset": 3}),
    # compression and flags lucid never writes
    "bzip2": _case(lambda m: _with(m, 0, method=12), "compression method 12"),
    "lzma": _case(lambda m: _with(m, 0, method=14), "compression method 14"),
    "aes": _case(lambda m: _with(m, 0, method=99), "compression method 99"),
    "shrink": _case(lambda m: _with(m, 0, method=1), "compression method 1;"),
    "encrypted": _case(lambda m: _with(m, 0, flags=1), "flags 0x0001"),
    "data descriptor": _case(lambda m: _with(m, 0, flags=8), "flags 0x0008"),
    # names
    "duplicate array": _case(lambda m: m[:1] + m, "b'arr_0.npy' appears twice"),
    "duplicate header": _case(lambda m: m + m[-1:], "b'__lucid__.npy' appears twice"),
    "extra member": _case(lambda m: m + [{**m[0], "name": b"arr_7.npy"}], "unexpected members"),
    "missing member": _case(lambda m: m[1:], "missing"),
    # zip64 fields
    "zip64 size lies": _case(lambda m: _with(m, 0, zip64=("size", "compressed"), central={
        "extra": struct.pack("<HHQQ", 1, 16, 10**15, _W_NPY)}), "stored but declares"),
    "zip64 field missing": _case(lambda m: _with(m, 0, central={"size": 0xFFFFFFFF}), "zip64 extra field is missing"),
    "zip64 field truncated": _case(lambda m: _with(m, 0, central={"extra": b"\x01\x00\x10\x00\x00"}),
                                   "malformed extra field"),
    "zip64 offset lies": _case(lambda m: _with(m, 0, zip64=("offset",), central={
        "extra": struct.pack("<HHQ", 1, 8, 2**62)}), "beyond the end"),
    "zip64 end count lies": _case(lambda m: m, "end record declares 5", zip64_end=True, end={"count": 5}),
    "zip64 end disagrees": _case(lambda m: m, "disagrees with the end record", zip64_end=True,
                                 classic_end={"count": 1}),
    # .npy members
    "huge shape, true zip sizes": _case(lambda m: _with(m, 0, payload=_npy(header=_HUGE, data=bytes(24))),
                                        "4000000000000 bytes of data"),
    "huge shape, deflated": _case(lambda m: _with(m, 0, payload=_npy(header=_HUGE, data=bytes(24)), method=8),
                                  "4000000000000 bytes of data"),
    "negative shape": _case(lambda m: _with(m, 0, payload=_npy(header={**_HUGE, "shape": (-6,)}, data=bytes(24))),
                            "malformed .npy header"),
    "object dtype": _case(lambda m: _with(m, 0, payload=_npy(header={**_HUGE, "descr": "|O", "shape": (3,)},
                                                               data=bytes(24))), "holds object"),
    "structured dtype": _case(lambda m: _with(m, 0, payload=_npy(np.zeros(6, [("a", "<f4")]))),
                              "malformed .npy header"),
    "structured dtype string": _case(lambda m: _with(m, 0, payload=_npy(
        header={**_HUGE, "descr": "<f4,<f4", "shape": (3,)}, data=bytes(24))), "holds"),
    "other dtype": _case(lambda m: _with(m, 0, payload=_npy(np.arange(6, dtype=np.int32))), "holds int32"),
    "npy version 3": _case(lambda m: _with(m, 0, payload=m[0]["payload"][:6] + b"\x03" + m[0]["payload"][7:]),
                           "version 3.0"),
    "npy header too long": _case(lambda m: _with(m, 0, payload=b"\x93NUMPY\x02\x00\xff\xff\xff\x00"),
                                 "16777215-byte .npy header"),
    "npy header unhashable": _case(lambda m: _with(m, 0, payload=b"\x93NUMPY\x01\x00\x08\x00{[]: 1}\n"),
                                   "unreadable .npy header"),
    "npy header too complex": _case(lambda m: _with(m, 0, payload=b"\x93NUMPY\x01\x00\x10\x27" + b"-" * 9999 + b"1"),
                                    "unreadable .npy header"),
    "not npy": _case(lambda m: _with(m, 0, payload=b"PK\x03\x04 a zip in a zip"), "not a .npy array"),
    # the JSON header
    "header nests deeply": _case(lambda m: m[:-1] + [_raw_header("[" * 100_000 + "]" * 100_000)], "nests too deeply"),
    "header beyond unicode": _case(lambda m: m[:-1] + [_raw_header(b"\x00\x00\x11\x00")], "utf-32"),
    "header surrogate": _case(lambda m: m[:-1] + [_raw_header(b"\x00\xd8\x00\x00")], "utf-32"),
    "header not JSON": _case(lambda m: m[:-1] + [_raw_header("{'format': 1}")], "Expecting property name"),
    "header not an object": _case(lambda m: m[:-1] + [_raw_header("[1]")], "not a JSON object"),
    "header entries malformed": _case(lambda m: m[:-1] + [_entries(["w", 4])], "string pairs"),
    "header names twice": _case(lambda m: [m[0], {**m[0], "name": b"arr_1.npy"},
                                           _entries(["w", "float32"], ["w", "float32"])], "names an array twice"),
    "header dtype unknown": _case(lambda m: m[:-1] + [_entries(["w", "no such type"])], "unknown dtype"),
    "header dtype object": _case(lambda m: m[:-1] + [_entries(["w", "object"])], "unsupported dtype"),
    "header is an array": _case(lambda m: m[:-1] + [{"name": b"__lucid__.npy", "payload": _npy(np.zeros(3))}],
                                "not a unicode scalar"),
    "format version 2": _case(lambda m: m[:-1] + [_entries(["w", "float32"], version=2)], "version 2"),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_archives_are_refused_with_the_reason(tmp_path, case):
    build, match = CRAFTED[case]
    path = _write(tmp_path, build())
    with pytest.raises(ValueError, match=re.escape(f"{os.fspath(path)!r} is not a valid lucid checkpoint")) as error:
        lucid.load(path)
    assert re.search(match, str(error.value)), str(error.value)


def _peak_allocation(function):
    """The most memory Python and NumPy hold at once while ``function`` runs (tracemalloc sees both)."""
    tracemalloc.start()
    try:
        function()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def _refused(path, match):
    def load():
        with pytest.raises(ValueError, match=match):
            lucid.load(path)
    return load


def test_a_deflate_bomb_under_a_small_declared_size_is_refused_after_that_size(tmp_path):
    """The zip headers (both) declare a 1 KB member whose deflate stream goes on to 64 MB of zeros."""
    npy = _npy(np.zeros(1000, np.uint8))
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = squeeze.compress(npy) + b"".join(squeeze.compress(bytes(1 << 20)) for _ in range(64)) + squeeze.flush()
    members = _lucid_members({"x": np.zeros(1000, np.uint8)})
    path = _write(tmp_path, _zip(_with(members, 0, method=8, data=stream)))
    assert os.path.getsize(path) < (1 << 20)
    peak = _peak_allocation(_refused(path, "inflates to more than the 1128 bytes it declares"))
    assert peak < 4 << 20, peak


def test_a_small_file_declaring_a_huge_true_size_is_refused_before_inflating(tmp_path):
    """80 MiB of zeros really are in this 370 KB file, as its headers say: more than 100 times the file."""
    header = _npy(header={"descr": "|u1", "fortran_order": False, "shape": (80 << 20,)})
    squeeze, zeros = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS), bytes(1 << 20)
    stream = squeeze.compress(header) + b"".join(squeeze.compress(zeros) for _ in range(80)) + squeeze.flush()
    crc = zlib.crc32(header)
    for _ in range(80):
        crc = zlib.crc32(zeros, crc)
    members = _lucid_members({"x": np.zeros(1, np.uint8)})
    path = _write(tmp_path, _zip(_with(members, 0, method=8, payload=header, data=stream, crc=crc,
                                       size=len(header) + (80 << 20))))
    assert os.path.getsize(path) < 400_000
    peak = _peak_allocation(_refused(path, "declare 8388[0-9]{4} bytes in a [0-9]+-byte file, more than 100 times"))
    assert peak < 1 << 20, peak


def test_a_member_declaring_more_than_its_stream_holds_allocates_what_the_stream_gives(tmp_path):
    """Headers (zip and .npy) agree on 60 MB, within deflate's reach of the member's bytes and under the
    64 MiB any archive may declare, but the stream ends after 1000 bytes: refused, having allocated about
    what it produced, not the declared size."""
    size = 60_000_000
    header = {"descr": "|u1", "fortran_order": False, "shape": (size,)}
    npy = _npy(header=header, data=bytes(1000))
    declared = len(npy) - 1000 + size
    stream = _deflate(npy)
    padding = bytes(declared // 1032 + 1 - len(stream))  # compressed bytes enough to expand to the declared size
    members = _lucid_members({"x": np.zeros(1, np.uint8)})
    path = _write(tmp_path, _zip(_with(members, 0, method=8, payload=npy, data=stream + padding, size=declared)))
    peak = _peak_allocation(_refused(path, f"inflates to fewer than the {declared} bytes it declares"))
    assert peak < 4 << 20, peak


def test_a_true_highly_compressed_member_loads_within_its_declared_size(tmp_path):
    """16 MB of zeros in 16 KB: legitimate, and the memory load needs is the array's, not more."""
    state = {"zeros": np.zeros(1 << 22, np.float32)}
    lucid.save(state, tmp_path / "zeros.npz")
    path = _write(tmp_path, _zip([{**m, "method": 8} for m in _members(tmp_path / "zeros.npz")]))
    assert os.path.getsize(path) < 32 << 10

    loaded = []
    assert _peak_allocation(lambda: loaded.append(lucid.load(path))) < 1.25 * (16 << 20) + (2 << 20)
    assert _bits(loaded[0]["zeros"]) == _bits(state["zeros"])


def test_files_that_must_fail_without_being_read_in_full(tmp_path):
    """A sparse 1 GiB file that starts like a zip archive: only its first bytes and its last 64 KiB are read."""
    path = tmp_path / "sparse.npz"
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04")
        f.truncate(1 << 30)
    assert _peak_allocation(_refused(path, "no end-of-central-directory record")) < 1 << 20
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="not an .npz archive"):
        lucid.load(tmp_path / "empty.npz")
    (tmp_path / "no members.npz").write_bytes(_zip([]))  # an empty archive starts with its end record
    with pytest.raises(ValueError, match="a zip archive but not a lucid checkpoint"):
        lucid.load(tmp_path / "no members.npz")
    with pytest.raises(IsADirectoryError):
        lucid.load(tmp_path)


def test_devices_and_fifos_are_refused_without_reading_or_blocking(tmp_path):
    """/dev/zero is endless and a FIFO without a writer blocks whoever opens it; in a subprocess, so that a
    regression fails on the timeout instead of hanging the suite."""
    fifo = tmp_path / "checkpoint.fifo"
    os.mkfifo(fifo)
    script = (
        "import sys, lucid\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        lucid.load(path)\n"
        "    except ValueError as error:\n"
        "        print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, "/dev/zero", os.fspath(fifo)], capture_output=True,
                            text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(lucid.__file__)))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all("is not a regular file" in line for line in lines), result.stdout
    assert lines[0].startswith("'/dev/zero'") and lines[1].startswith(repr(os.fspath(fifo)))


def test_a_fortran_order_member_loads_with_its_values(tmp_path):
    """lucid writes C order, but a member that NumPy wrote in Fortran order holds the same values."""
    w = np.arange(12, dtype=np.float64).reshape(3, 4)
    members = _lucid_members({"w": w})
    path = _write(tmp_path, _zip(_with(members, 0, payload=_npy(np.asfortranarray(w)))))
    assert b"'fortran_order': True" in path.read_bytes()
    loaded = lucid.load(path)
    assert loaded["w"].dtype == w.dtype
    np.testing.assert_array_equal(loaded["w"], w)


# ------------------------------------------------------------------------------------------ writing


def test_save_writes_through_a_symlink_and_keeps_it(tmp_path):
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "real.npz"
    lucid.save({"a": np.ones(2)}, target)
    link = tmp_path / "link.npz"
    link.symlink_to(os.path.join("store", "real.npz"))
    lucid.save({"b": np.zeros(3)}, link)
    assert link.is_symlink() and os.readlink(link) == os.path.join("store", "real.npz")
    assert list(lucid.load(target)) == ["b"]
    assert sorted(os.listdir(tmp_path / "store")) == ["real.npz"] and sorted(os.listdir(tmp_path)) == ["link.npz",
                                                                                                        "store"]
    dangling = tmp_path / "dangling.npz"
    dangling.symlink_to("store/new.npz")  # a link to a file not there yet: the file is created
    lucid.save({"c": np.ones(1)}, dangling)
    assert dangling.is_symlink() and list(lucid.load(tmp_path / "store" / "new.npz")) == ["c"]


@pytest.mark.parametrize("length", [244, 250, 255])
def test_save_takes_file_names_up_to_the_file_system_limit(tmp_path, length):
    path = tmp_path / ("n" * (length - 4) + ".npz")
    lucid.save({"a": np.arange(3)}, path)
    lucid.save({"a": np.arange(4)}, path)
    assert os.listdir(tmp_path) == [path.name]
    np.testing.assert_array_equal(lucid.load(path)["a"], np.arange(4))


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, monkeypatch, error):
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "state.npz"
    lucid.save({"a": np.ones(2)}, target)
    (tmp_path / "link.npz").symlink_to(target)
    before = target.read_bytes()

    def fail_midway(file, members):
        file.write(b"PK\x03\x04 half an archive")
        raise error

    monkeypatch.setattr(lucid._io, "_write_npz", fail_midway)
    for path in (target, tmp_path / "link.npz"):
        with pytest.raises(type(error)):
            lucid.save({"b": np.zeros(3)}, path)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path / "store") == ["state.npz"]


def test_a_replaced_file_gets_default_permissions(tmp_path):
    """The rename puts a new file in place: the old file's mode is not carried over (documented)."""
    path = tmp_path / "state.npz"
    path.write_bytes(b"old")
    os.chmod(path, 0o600)
    umask = os.umask(0)
    os.umask(umask)
    lucid.save({"a": np.ones(2)}, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


# ------------------------------------------------------------------------------------------ load_state_dict


@pytest.mark.parametrize("value", [
    np.array([None, 1, 2], dtype=object),
    np.array(["1", "2", "3"]),
    np.array([b"1", b"2", b"3"]),
    np.array([1 + 0j, 2, 3], np.complex64),
    jnp.array([1 + 0j, 2, 3], jnp.complex64),
    torch.tensor([1 + 0j, 2, 3]),
    np.zeros(3, [("a", "<f4")]),
    np.zeros(3, "V4"),
    np.zeros(3, "m8[s]"),
], ids=lambda v: str(v.dtype))
def test_load_state_dict_refuses_values_that_are_not_real_numbers_and_changes_nothing(value):
    norm = nn.InstanceNorm1d(3)
    before = {k: np.asarray(v) for k, v in norm.state_dict().items()}
    state = {k: v + 1 for k, v in before.items()}  # every other value valid, and different
    state["running_mean"] = value
    with pytest.raises(TypeError, match=r"'running_mean' (has|must be a numeric array, got) dtype") as error:
        norm.load_state_dict(state)
    assert str(np.asarray(value).dtype) in str(error.value)
    for k, v in norm.state_dict().items():
        assert _bits(np.asarray(v)) == _bits(before[k]), k  # nothing assigned, the valid values included


def test_load_state_dict_takes_every_real_dtype(rng):
    """Booleans, integers and floats of every width, JAX's narrow floats included, load as the target's dtype
    (the oracle: NumPy's cast of the same values)."""
    for dtype in (np.bool_, np.int8, np.uint16, np.int64, np.float16, jnp.bfloat16, ml_dtypes.float8_e4m3fn,
                  np.float64):
        value = rng.integers(0, 2, size=3).astype(dtype)
        norm = nn.InstanceNorm1d(3)
        norm.load_state_dict({**norm.state_dict(), "running_var": value})
        np.testing.assert_array_equal(np.asarray(norm.running_var.data), value.astype(np.float32))
