"""lucid.save / lucid.load: bit-exact round trips, and files that are refused without being unpickled."""

import json
import os
import pickle
import zipfile

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
