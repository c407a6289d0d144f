"""ltransform.io: what lt.load (and every other reader) says about files that are not checkpoints,
atomic writes, and safetensors."""

from __future__ import annotations

import pickle
import random
import sys
import zipfile

import pytest
import torch

import ltransform as lt
from helpers import make_model
from ltransform import io


class Custom:
    """A class outside torch's weights_only allowlist."""


def text_file(path):
    # "he": torch's weights_only unpickler read this as BINGET 101 and raised a bare KeyError: 101
    path.write_text("hello, this is a README\n\nltransform trains PyTorch models.\n")


def random_bytes(path):
    data = random.Random(0).randbytes(200)
    assert not data.startswith((b"\x80", b"PK"))  # what makes these bytes "random" to a reader
    path.write_bytes(data)


def empty(path):
    path.write_bytes(b"")


def truncated_checkpoint(path):
    lt.save(path, lt.State(model=make_model(seed=7)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zip_not_torch(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "not a tensor in sight")


def plain_pickle_of_a_custom_class(path):  # not torch.save's format: weights_only=False would not read it either
    path.write_bytes(pickle.dumps({"x": Custom()}, protocol=2))


def torch_save_of_tensors(path):
    torch.save(make_model(seed=7).state_dict(), path)


def torch_save_of_a_custom_class(path):
    torch.save({"meta": {}, "x": Custom()}, path)


def legacy_torch_save_of_a_custom_class(path):
    torch.save({"x": Custom()}, path, _use_new_zipfile_serialization=False)


NOT_CHECKPOINTS = [
    (text_file, "README.md", io.FileFormatError,
     r"README.md' is not an ltransform checkpoint .*starts with b'hello, t'"),
    (random_bytes, "random.bin", io.FileFormatError, r"random.bin' is not an ltransform checkpoint .*starts with b'"),
    (empty, "empty.pt", io.FileFormatError, r"empty.pt' is empty \(0 bytes\): truncated or corrupt"),
    (truncated_checkpoint, "ckpt.pt", io.FileFormatError, r"ckpt.pt' is truncated or corrupt and cannot be read"),
    (zip_not_torch, "notes.zip", io.FileFormatError,
     r"notes.zip' is not an ltransform checkpoint: it is a zip archive, but not one torch.save wrote"),
    (plain_pickle_of_a_custom_class, "custom.pkl", io.FileFormatError,
     r"custom.pkl' is not an ltransform checkpoint .*a pickle, but not one torch.save wrote"),
    (torch_save_of_tensors, "weights.pt", ValueError, r"weights.pt' is not an ltransform checkpoint .*use lt.load_raw"),
    (torch_save_of_a_custom_class, "custom.pt", pickle.UnpicklingError,
     r"refusing to load .*custom.pt'.*global '\w*\.?Custom'.*torch.load\(path, weights_only=False\)"),
    (legacy_torch_save_of_a_custom_class, "legacy.pt", pickle.UnpicklingError,
     r"refusing to load .*legacy.pt'.*global '\w*\.?Custom'.*torch.load\(path, weights_only=False\)"),
]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("write, name, error, match", NOT_CHECKPOINTS, ids=[c[0].__name__ for c in NOT_CHECKPOINTS])
def test_lt_load_of_a_file_that_is_not_a_checkpoint_names_it_and_why_and_changes_nothing(
        tmp_path, write, name, error, match):
    write(tmp_path / name)
    model = make_model(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match) as raised:
        lt.load(tmp_path / name, lt.State(model=model))
    # the advice to drop weights_only only where torch's unpickler refused a class it does not allow
    advised = "weights_only=False" in str(raised.value)
    assert advised == (error is pickle.UnpicklingError), str(raised.value)
    if error is io.FileFormatError:
        assert isinstance(raised.value, ValueError) and isinstance(raised.value, RuntimeError)
        assert "KeyError" not in str(raised.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_other_readers_give_the_same_errors(tmp_path):
    text_file(tmp_path / "README.md")
    with pytest.raises(io.FileFormatError, match="README.md' is not an ltransform checkpoint"):
        lt.load_raw(tmp_path / "README.md", make_model())
    with pytest.raises(io.FileFormatError, match="README.md' is not an ltransform checkpoint"):
        io.read_file(tmp_path / "README.md")
    (tmp_path / "w.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(io.FileFormatError, match=r"safetensors file .*w.safetensors' is truncated or corrupt"):
        lt.load_raw(tmp_path / "w.safetensors", make_model())
    with pytest.raises(io.FileFormatError, match=r"safetensors file .*w.safetensors' is truncated or corrupt"):
        with io.open_safetensors(tmp_path / "w.safetensors"):
            pass


def test_a_legacy_format_file_is_read_without_mmap(tmp_path):
    weights = make_model().state_dict()
    torch.save(weights, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    loaded = io.read_file(tmp_path / "old.pt")  # mmap=True is the default: only zip files can be mapped
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())


def test_write_file_is_atomic_and_leaves_no_partial_file_on_failure(tmp_path):
    path = io.write_file(tmp_path / "sub" / "x.pt", {"w": torch.ones(2)})
    assert io.read_file(path)["w"].tolist() == [1.0, 1.0]

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle this"):
        io.write_file(path, {"w": torch.zeros(2), "bad": Unpicklable()})
    assert io.read_file(path)["w"].tolist() == [1.0, 1.0]  # the previous file, untouched
    assert not io.partial_path(path).exists()
    assert io.partial_path(path).name == ".x.pt.partial"


def test_safetensors_round_trip_and_the_pip_hint(tmp_path, monkeypatch):
    weights = make_model().state_dict()
    path = io.write_safetensors(weights, tmp_path / "w.safetensors")
    assert not io.partial_path(path).exists()
    assert all(torch.equal(io.read_safetensors(path)[k], v) for k, v in weights.items())
    with io.open_safetensors(path) as handle:
        assert set(handle.keys()) == set(weights)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"pip install 'ltransform\[safetensors\]'"):
        io.read_safetensors(path)


def test_safe_unpickler_refuses_what_the_allowlist_does_not_name():
    import io as stdlib_io

    from collections import OrderedDict

    unpickler = io.safe_unpickler({("collections", "OrderedDict"): OrderedDict})

    assert unpickler(stdlib_io.BytesIO(pickle.dumps(OrderedDict(a=1)))).load() == OrderedDict(a=1)
    with pytest.raises(pickle.UnpicklingError, match=r"global '.*Custom' is not allowed"):
        unpickler(stdlib_io.BytesIO(pickle.dumps(Custom()))).load()
    # protocol 4's dotted names are not walked (STACK_GLOBAL 'collections' 'OrderedDict.fromkeys')
    dotted = b"\x80\x04\x8c\x0bcollections\x8c\x14OrderedDict.fromkeys\x93."
    assert pickle.loads(dotted) == OrderedDict.fromkeys
    with pytest.raises(pickle.UnpicklingError, match=r"global 'collections.OrderedDict.fromkeys' is not allowed"):
        unpickler(stdlib_io.BytesIO(dotted)).load()


def _with_record(path, name, data, compress_type):
    """A copy of torch.save's zip ``path`` with one more record."""
    out = path.with_name("with-record.pt")
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(out, "w") as target:
        prefix = source.namelist()[0].split("/")[0]
        for info in source.infolist():
            target.writestr(info, source.read(info))
        target.writestr(f"{prefix}/{name}", data, compress_type=compress_type)
    return out


def test_a_compressed_record_is_refused_before_it_is_inflated(tmp_path):
    """torch.save never compresses a record; one that is could inflate to any size (a zip bomb:
    8 MiB of zeros deflate to 8 KiB), so it is refused before anything reads it."""
    torch.save({"w": torch.ones(2)}, tmp_path / "x.pt")
    bomb = _with_record(tmp_path / "x.pt", "zz", b"\0" * (8 << 20), zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 64 << 10
    with pytest.raises(io.FileFormatError, match=r"with-record.pt': record '\w+/zz' is compressed, which torch.save "
                                                 r"never does: the file is corrupt or crafted"):
        io.read_file(bomb)


def test_a_record_claiming_more_bytes_than_its_file_is_refused(tmp_path):
    import struct

    torch.save({"w": torch.ones(2)}, tmp_path / "x.pt")
    data = bytearray((tmp_path / "x.pt").read_bytes())
    central = data.index(b"PK\x01\x02")  # the first record's central directory entry: data.pkl
    struct.pack_into("<II", data, central + 20, 1 << 30, 1 << 30)  # its compressed and uncompressed sizes
    (tmp_path / "x.pt").write_bytes(bytes(data))
    with pytest.raises(io.FileFormatError, match=r"x.pt': record '\w+/data.pkl' claims 1073741824 bytes, more than "
                                                 rf"the file's {len(data)}"):
        io.read_file(tmp_path / "x.pt")


def test_a_record_is_checked_against_its_crc_as_it_is_streamed(tmp_path):
    torch.save({"w": torch.ones(2), "name": "x" * 100}, tmp_path / "x.pt")
    data = bytearray((tmp_path / "x.pt").read_bytes())
    data[data.index(b"x" * 100) + 50] ^= 0x01  # in the pickle (data.pkl)
    (tmp_path / "x.pt").write_bytes(bytes(data))
    with pytest.raises(io.ChecksumError, match=r"x.pt': record '\w+/data.pkl' does not match its CRC-32"):
        io.read_file(tmp_path / "x.pt")


def test_no_two_tensors_share_a_checksum_path_whatever_their_keys():
    """Keys that spell the same with "/" joining them (the integer 0 and the string "0"; "a/b" and
    "a" then "b") get distinct paths, so no tensor goes unchecked behind another."""
    t = torch.zeros(1)
    payload = {"models": {"m": {"0.weight": t}}, "ranks": [{"rng": t}],
               "extra": {0: t, "0": t, "a/b": t, "a": {"b": t}, None: t, "None": t, "'x": t, "": t}}
    paths = list(io.tensor_checksums(payload))
    assert len(paths) == len(set(paths)) == 10
    assert paths[:2] == ["models/m/0.weight", "ranks/0/rng"]  # ordinary keys read as they always did
    assert paths[2:] == ["extra/0", "extra/'0'", "extra/'a/b'", "extra/a/b", "extra/!'None'", "extra/None",
                         "extra/\"'x\"", "extra/''"]


def test_files_ltransform_writes_get_the_usual_mode(tmp_path):
    """0666 less the umask, whatever the writer (safetensors' own made them 0600)."""
    import os
    import stat

    pytest.importorskip("safetensors")
    from ltransform import io as ltio

    old = os.umask(0o022)
    try:
        pt = ltio.write_file(tmp_path / "a.pt", {"x": torch.ones(2)})
        st = ltio.write_safetensors({"x": torch.ones(2)}, tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(pt.stat().st_mode) == 0o644
    assert stat.S_IMODE(st.stat().st_mode) == 0o644
