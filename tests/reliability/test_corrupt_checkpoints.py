"""No checkpoint file, however corrupt or crafted, crashes lt.load, hangs it, runs code, loads as
different values, or changes the state: a fuzz of over 1,000 corrupted full and sharded
checkpoints, each loaded in a child process, and each known pickle exploit of DCP's metadata.

The child processes are this file run as a script: ``python test_corrupt_checkpoints.py KIND DIR``.
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import random
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import ltransform as lt
from ltransform.checkpoint import sharded
from ltransform.checkpoint.sharded import MANIFEST, allowed_globals, write_manifest

SHARDED_FILES = (".metadata", "__0_0.distcp", "common.pt", "rank-0.pt", MANIFEST)


# -- pickles that run `touch MARKER` when unpickled by a plain pickle.load -------------------------

def _text(value: str) -> bytes:  # SHORT_BINUNICODE (protocol 4)
    data = value.encode()
    return b"\x8c" + bytes([len(data)]) + data


def _global(module: str, name: str) -> bytes:  # GLOBAL, resolved with the pickle's protocol (4)
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _stack_global(module: str, name: str) -> bytes:  # STACK_GLOBAL
    return _text(module) + _text(name) + b"\x93"


def exploits(marker: Path) -> dict[str, bytes]:
    """Each form by name: a callable the pickle names, called with one string argument. Every one
    runs its command under a plain ``pickle.load`` (protocol 4 walks dotted names attribute by
    attribute: ``torch`` + ``os.system`` is ``os.system``)."""
    command, code = f"touch {marker}", f"import os; os.system('touch {marker}')"
    forms = {
        "GLOBAL metadata os.system": (_global("torch.distributed.checkpoint.metadata", "os.system"), command),
        "STACK_GLOBAL metadata os.system": (_stack_global("torch.distributed.checkpoint.metadata", "os.system"),
                                            command),
        "GLOBAL filesystem os.system": (_global("torch.distributed.checkpoint.filesystem", "os.system"), command),
        "GLOBAL torch os.system": (_global("torch", "os.system"), command),
        "STACK_GLOBAL torch os.system": (_stack_global("torch", "os.system"), command),
        "GLOBAL torch serialization.os.system": (_global("torch", "serialization.os.system"), command),
        "GLOBAL posix system": (_global("posix", "system"), command),
        "STACK_GLOBAL builtins exec": (_stack_global("builtins", "exec"), code),
    }
    return {name: b"\x80\x04" + call + _text(argument) + b"\x85R." for name, (call, argument) in forms.items()}


# -- the state saved, and the state loaded into --------------------------------------------------

def build(seed: int, *, hidden: int = 8, depth: int = 1, groups: int = 1, optimizer: bool = True,
          extra: dict | None = None) -> lt.State:
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(4, hidden), torch.nn.Tanh()] + [torch.nn.Linear(hidden, hidden)] * (depth - 1)
    model = torch.nn.Sequential(*layers, torch.nn.Linear(hidden, 2))
    params = list(model.parameters())
    optim = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:]}] if groups == 2 else params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optim, 2, 0.5)
    model(torch.randn(3, 4)).square().mean().backward()
    optim.step()
    scheduler.step()
    fields = {"optimizer": optim, "scheduler": scheduler} if optimizer else {}
    return lt.State(model=model, **fields, step=3 + seed, epoch=seed,
                    extra={"note": f"run {seed}", "best": torch.tensor(float(seed)), **(extra or {})})


def snapshot(state: lt.State) -> dict:
    """Everything a load may change: tensors cloned, the process's RNG states included."""
    return {"model": {k: v.clone() for k, v in state.model.state_dict().items()},
            "optimizer": _clone(state.optimizer.state_dict()) if state.optimizer else None,
            "scheduler": state.scheduler.state_dict() if state.scheduler else None,
            "extra objects": {k: _clone(v.state_dict()) for k, v in state.extra.items() if hasattr(v, "state_dict")},
            "counters": (state.step, state.micro_step, state.epoch), "extra": _clone(dict(state.extra)),
            "rng": (random.getstate(), torch.get_rng_state().clone())}


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


# -- corruptions ---------------------------------------------------------------------------------

def flip(data: bytes, position: int, mask: int) -> bytes:
    out = bytearray(data)
    out[position] ^= mask
    return bytes(out)


def rezip(data: bytes, change) -> bytes:
    """The zip ``data`` rewritten record by record, ``change(name, bytes) -> [(name, bytes)]`` each."""
    import io

    source, target = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for info in source.infolist():
            for name, content in change(info.filename, source.read(info)):
                archive.writestr(name, content)
    return target.getvalue()


def full_variants(data: bytes, marker: Path, rng: random.Random):
    """(name, bytes | "dir" | None) for a full checkpoint file: None removes it."""
    yield "unchanged", data
    yield "rezipped unchanged", rezip(data, lambda n, c: [(n, c)])
    yield "empty", b""
    yield "directory", "dir"
    yield "FIFO", "fifo"
    yield "symlink to a copy (the user's own link: loads)", ("symlink", data)
    yield "missing", None
    for cut in sorted({0, 1, 4, 30, len(data) - 1, len(data) - 22, *rng.sample(range(len(data)), 80)}):
        yield f"truncated at {cut}", data[:cut]
    records = zipfile.ZipFile(_bytes_file(data)).infolist()
    regions = {"anywhere": [(0, len(data))]}
    for info in records:
        kind = "tensor data" if "/data/" in info.filename and not info.filename.endswith(".pkl") else "records"
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        regions.setdefault(kind, []).append((start, start + info.file_size))
        regions.setdefault("zip headers", []).append((info.header_offset, start))
    regions["zip headers"].append((records[-1].header_offset + 30, len(data)))  # central directory, end record
    pickle_start, pickle_end = regions["records"][0]
    regions["pickle"] = [(pickle_start, pickle_end)]
    for kind, count in (("anywhere", 150), ("pickle", 120), ("tensor data", 150), ("records", 20),
                        ("zip headers", 100)):
        for _ in range(count):
            start, end = rng.choice([r for r in regions[kind] if r[1] > r[0]])
            position = rng.randrange(start, end)
            yield f"flip in {kind} at {position}", flip(data, position, rng.randrange(1, 256))
    names = [info.filename for info in records]
    for name in names:
        yield f"removed record {name}", rezip(data, lambda n, c, name=name: [] if n == name else [(n, c)])
        yield f"renamed record {name}", rezip(data, lambda n, c, name=name: [(n + "x" if n == name else n, c)])
    sizes: dict[int, list[str]] = {}
    for info in records:
        if "/data/" in info.filename:
            sizes.setdefault(info.file_size, []).append(info.filename)
    pairs = [(a, b) for group in sizes.values() for i, a in enumerate(group) for b in group[i + 1:]]
    for a, b in rng.sample(pairs, min(30, len(pairs))):
        swap = {a: b, b: a}
        yield f"swapped records {a} {b}", rezip(data, lambda n, c, swap=swap: [(swap.get(n, n), c)])
        # the same swap in place: names swapped in the local and central headers, CRCs left as they were
        short_a, short_b = a.encode(), b.encode()
        if len(short_a) == len(short_b):
            yield f"swapped names in place {a} {b}", (
                data.replace(short_a, b"\0" * len(short_a)).replace(short_b, short_a).replace(b"\0" * len(short_a),
                                                                                              short_b))
    for form, payload in exploits(marker).items():
        yield f"malicious data.pkl: {form}", rezip(data, lambda n, c, p=payload: [
            (n, p if n.endswith("/data.pkl") else c)])
        yield f"malicious plain pickle: {form}", payload


def _bytes_file(data: bytes):
    import io

    return io.BytesIO(data)


def sharded_variants(directory: Path, marker: Path, rng: random.Random):
    """(name, {file: bytes | "dir" | None}, resign) for a sharded checkpoint directory."""
    originals = {name: (directory / name).read_bytes() for name in SHARDED_FILES}
    yield "unchanged", {}, False
    for name, data in originals.items():
        yield f"{name} empty", {name: b""}, False
        yield f"{name} directory", {name: "dir"}, False
        yield f"{name} FIFO", {name: "fifo"}, False
        yield f"{name} symlink to a copy", {name: ("symlink", data)}, False
        yield f"{name} missing", {name: None}, False
        yield f"{name} renamed", {name: None, name + ".bak": data}, False
        for cut in sorted({0, 1, len(data) - 1, *rng.sample(range(len(data)), 20)}):
            yield f"{name} truncated at {cut}", {name: data[:cut]}, False
        for _ in range(60):
            position = rng.randrange(len(data))
            yield f"{name} flip at {position}", {name: flip(data, position, rng.randrange(1, 256))}, False
    yield "rank-0.pt renamed rank-1.pt", {"rank-0.pt": None, "rank-1.pt": originals["rank-0.pt"]}, False
    names = list(originals)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            yield f"swapped {a} {b}", {a: originals[b], b: originals[a]}, False
    for form, payload in exploits(marker).items():
        yield f"malicious .metadata (manifest re-signed): {form}", {".metadata": payload}, True
    evil = _torch_saved_evil(marker)
    for name in ("common.pt", "rank-0.pt"):
        yield f"malicious {name} (manifest re-signed)", {name: evil}, True
    yield f"malicious {MANIFEST}", {MANIFEST: evil}, False
    yield ".metadata not DCP's (manifest re-signed)", {".metadata": pickle.dumps({"a": 1})}, True


class _Evil:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def _torch_saved_evil(marker: Path) -> bytes:
    import io

    _Evil.marker = str(marker)
    buffer = io.BytesIO()
    torch.save({"meta": {}, "x": _Evil()}, buffer)
    return buffer.getvalue()


def _write(path: Path, content) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    if content == "dir":
        path.mkdir()
    elif content == "fifo":  # reading one blocks until a writer comes: a load that opens it hangs
        os.mkfifo(path)
    elif isinstance(content, tuple):  # ("symlink", bytes): a link to a copy outside
        target = path.parent.parent / f"linked-{path.parent.name}-{path.name}"
        target.write_bytes(content[1])
        path.symlink_to(target)
    elif content is not None:
        path.write_bytes(content)


# -- the child: load every variant, report what went wrong ---------------------------------------

def fuzz(kind: str, workdir: Path) -> dict:
    rng = random.Random(12 if kind == "full" else 13)
    marker = workdir / "code-ran"
    saved = build(0)
    torch.manual_seed(5), random.seed(5)
    expected = snapshot(saved)
    path = lt.save(workdir / ("saved.pt" if kind == "full" else "saved"), saved, sharded=kind == "sharded")
    if kind == "full":
        variants = ((name, {path.name: content}, False) for name, content in
                    full_variants(path.read_bytes(), marker, rng))
    else:
        variants = sharded_variants(path, marker, rng)
    report = {"variants": 0, "loaded": 0, "errors": {}, "problems": []}
    progress = workdir / f"{kind}.progress"
    for name, changes, resign in variants:
        progress.write_text(name)  # the variant a crash or hang stopped at
        target_path = workdir / f"v-{kind}"
        if target_path.exists():
            shutil.rmtree(target_path) if target_path.is_dir() else target_path.unlink()
        if kind == "full":
            target_path = workdir / "v-full.pt"
            _write(target_path, changes[path.name])
        else:
            shutil.copytree(path, target_path)
            for file, content in changes.items():
                _write(target_path / file, content)
            if resign:
                (target_path / MANIFEST).unlink()
                write_manifest(target_path)
        report["variants"] += 1
        target = build(1)
        before = snapshot(target)
        try:
            loaded = lt.load(target_path, target)
        except lt.CheckpointError as error:
            report["errors"][type(error).__name__] = report["errors"].get(type(error).__name__, 0) + 1
            message = str(error)
            touched = [f for f in changes if f != path.name] or [path.name]
            if str(target_path) not in message or (kind == "sharded" and not any(f in message for f in touched)):
                report["problems"].append(f"{name}: the error does not name the file: {message}")
            if not equal(snapshot(target), before):
                report["problems"].append(f"{name}: the state changed in a failed load ({message})")
        except BaseException as error:  # noqa: BLE001 - every other error is a finding
            report["problems"].append(f"{name}: escaped {type(error).__name__}: {error}")
        else:
            report["loaded"] += 1
            if not equal(snapshot(loaded), expected):
                report["problems"].append(f"{name}: loaded silently different values")
        if marker.exists():
            report["problems"].append(f"{name}: CODE RAN")
            marker.unlink()
    return report


def run_fuzz(kind: str, workdir: Path) -> subprocess.Popen:
    workdir.mkdir()
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, __file__, kind, str(workdir)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=root, env=env)


@pytest.mark.timeout(300)
def test_a_fuzz_of_over_1000_corrupt_checkpoints_crashes_hangs_runs_changes_and_hides_nothing(tmp_path):
    children = {kind: run_fuzz(kind, tmp_path / kind) for kind in ("full", "sharded")}
    reports = {}
    for kind, child in children.items():
        try:
            output, _ = child.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            pytest.fail(f"{kind}: hung at variant {(tmp_path / kind / f'{kind}.progress').read_text()!r}")
        assert child.returncode == 0, (f"{kind}: crashed (rc {child.returncode}) at variant "
                                       f"{(tmp_path / kind / f'{kind}.progress').read_text()!r}:\n{output[-3000:]}")
        reports[kind] = json.loads(output.strip().splitlines()[-1])
    for kind, report in reports.items():
        print(kind, {k: v for k, v in report.items() if k != "problems"})
        assert report["problems"] == [], "\n".join(report["problems"][:30])
        assert report["loaded"] >= 1 and report["errors"]  # both outcomes were exercised
    assert sum(r["variants"] for r in reports.values()) >= 1000


class Counter:
    """A user's object kept in state.extra, saved by its state_dict."""

    def __init__(self, n: int = 0) -> None:
        self.n = n

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]


def rewrite(path: Path, file: str, change) -> None:
    """Change a saved checkpoint's content as a writer with a bug would: checksums made to match."""
    from ltransform.checkpoint.read import CHECKSUMS, write_full
    from ltransform import io

    if path.is_dir():
        payload = torch.load(path / file, weights_only=True)
        change(payload)
        io.write_file(path / file, payload)
        (path / MANIFEST).unlink()
        write_manifest(path)
    else:
        payload = torch.load(path, weights_only=True)
        change(payload)
        write_full(path, {k: v for k, v in payload.items() if k != CHECKSUMS})


def _bad_rng(payload: dict) -> None:
    (payload["ranks"][0] if "ranks" in payload else payload)["rng"]["torch"] = torch.zeros(3, dtype=torch.uint8)


def _newer(payload: dict) -> None:
    payload["meta"]["version"] = 99


FAILURES = {  # what a load is given -> (saved state, target state, rewrite, error, message)
    "shape": (lambda: build(0), lambda: build(1, hidden=9), None, lt.CheckpointError,
              r"model 'model': entry '0.weight' has shape \[8, 4\] in the checkpoint, \[9, 4\] in the model; build the "
              r"model as it was saved"),
    "keys": (lambda: build(0), lambda: build(1, depth=2), None, KeyError,
             r"model 'model' does not match the checkpoint: missing keys \['3.bias', '3.weight'\], "
             r"unexpected keys \[\]; pass strict=False"),
    "optimizer groups": (lambda: build(0), lambda: build(1, groups=2), None, ValueError,
                         r"optimizer 'optimizer': the optimizer has parameter groups of \[2, 2\] parameters, "
                         r"the checkpoint \[4\]; build the optimizer as it was saved"),
    "no optimizer saved": (lambda: build(0, optimizer=False), lambda: build(1), None, KeyError,
                           r"the checkpoint has no optimizer 'optimizer'"),
    "extra object missing": (lambda: build(0, extra={"counter": Counter(5)}), lambda: build(1), None, RuntimeError,
                             r"the checkpoint has state.extra\['counter'\] .*prepare the step first"),
    "RNG state": (lambda: build(0, extra={"counter": Counter(5)}), lambda: build(1, extra={"counter": Counter(1)}),
                  ("rank-0.pt", _bad_rng), ValueError,
                  r"rank-0.pt'\)?: the saved random generator states cannot be restored"),
    "newer format": (lambda: build(0), lambda: build(1), ("common.pt", _newer), ValueError,
                     r"has checkpoint format version 99, newer than this ltransform \(2\) reads; upgrade"),
}


@pytest.mark.parametrize("sharded", [False, True], ids=["full", "sharded"])
@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_load_that_fails_for_any_reason_leaves_the_whole_state_as_it_was(tmp_path, failure, sharded):
    saved, target, change, error, match = FAILURES[failure]
    saved, target = saved(), target()
    if failure == "RNG state" and not sharded:
        match = match.replace("rank-0.pt", "ckpt.pt")
    path = lt.save(tmp_path / ("ckpt" if sharded else "ckpt.pt"), saved, sharded=sharded)
    if change:
        rewrite(path, change[0], change[1])
    random.seed(3), torch.manual_seed(3)
    before = snapshot(target)
    with pytest.raises(error, match=match) as raised:
        lt.load(path, target)
    assert isinstance(raised.value, lt.CheckpointError) and str(path) in str(raised.value)
    assert equal(snapshot(target), before)


def test_a_format_1_sharded_checkpoint_with_a_bad_shard_fails_without_changing_the_state(tmp_path):
    """Format 1 has no manifest, so nothing checks the shards before DCP reads them: they are read
    into a copy, and a shard that fails half-way leaves the parameters as they were."""
    path = lt.save(tmp_path / "ckpt", build(0), sharded=True)
    (path / MANIFEST).unlink()
    rewrite_common = torch.load(path / "common.pt", weights_only=True)
    rewrite_common["meta"]["version"] = 1
    torch.save(rewrite_common, path / "common.pt")
    items = sharded.reader(path).read_metadata().storage_data  # where DCP stored each tensor
    last = max((info.offset, info.relative_path) for index, info in items.items() if index.fqn.startswith("models."))
    shard = path / last[1]
    shard.write_bytes(flip(shard.read_bytes(), last[0], 0xFF))  # the model's last tensor unreadable
    state = build(1)
    before = snapshot(state)
    with pytest.raises(lt.CheckpointError, match=r"ckpt': its DCP files \['.metadata', '__0_0.distcp'\] cannot be "
                                                 r"read \(UnpicklingError: .*\); they are corrupt or incomplete"):
        lt.load(path, state)
    assert equal(snapshot(state), before)


def _sharded_state(seed: int) -> lt.State:
    torch.manual_seed(seed)
    model = lt.shard(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)), policy={torch.nn.Linear})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).square().mean().backward()
    optimizer.step()
    return lt.State(model=model, optimizer=optimizer, step=seed)


def corrupt_on_two_ranks(directory: str) -> list[list[str]]:
    """On each of 2 ranks: save a sharded (FSDP2) state, corrupt one file, load; every rank's errors."""
    from torch.distributed.tensor import DTensor

    path = lt.save(Path(directory) / "ckpt", _sharded_state(0), sharded=True)
    originals = {name: (path / name).read_bytes() for name in ("__1_0.distcp", "rank-1.pt")}
    outcomes = []
    for name, data in originals.items():
        lt.barrier()
        if lt.rank() == 0:
            (path / name).write_bytes(flip(data, len(data) // 2, 0xFF))
        lt.barrier()
        target = _sharded_state(1)
        before = [p.to_local().clone() for p in target.model.parameters() if isinstance(p, DTensor)]
        try:
            lt.load(path, target)
            outcome = "loaded"
        except lt.CheckpointError as error:
            unchanged = all(torch.equal(a, p.to_local()) for a, p in zip(before, target.model.parameters()))
            outcome = f"{type(error).__name__} unchanged={unchanged}: {error}"
        outcomes.append(outcome)
        lt.barrier()
        if lt.rank() == 0:
            (path / name).write_bytes(data)
    from ltransform.distributed import env

    return env.all_gather_objects(outcomes)


@pytest.mark.timeout(180)
def test_a_file_corrupt_on_two_ranks_is_one_error_on_every_rank_not_a_hang(tmp_path):
    """Each rank checks a share of the files (the ranks agree on the verdict), so a corrupt
    shard of rank 1, or rank 1's own RNG file, stops both ranks with the same error."""
    by_rank = lt.launch(corrupt_on_two_ranks, str(tmp_path), devices=2, timeout=120)
    for index, name in enumerate(("__1_0.distcp", "rank-1.pt")):
        first, second = by_rank[0][index], by_rank[1][index]
        assert first == second, (first, second)
        assert first.startswith("ChecksumError unchanged=True: the sharded checkpoint"), first
        assert f"its file {name!r} does not match its checksum" in first


@pytest.mark.parametrize("form", sorted(exploits(Path("/m"))))
def test_each_pickle_exploit_form_in_dcp_metadata_is_refused_and_runs_nothing(tmp_path, form):
    marker = tmp_path / "code-ran"
    payload = exploits(marker)[form]
    proof = tmp_path / "proof"
    pickle.loads(exploits(proof)[form])  # the payload is live: a plain pickle.load runs it
    assert proof.exists()
    path = lt.save(tmp_path / "ckpt", build(0), sharded=True)
    (path / ".metadata").write_bytes(payload)
    write_manifest(path)  # a crafted checkpoint carries a manifest that matches
    state = build(1)
    before = snapshot(state)
    refused = (r"refusing to load the sharded checkpoint .*its file '.metadata' holds objects other than DCP's own "
               r"records")
    with pytest.raises(lt.CheckpointError, match=refused + r" .*is not allowed") as raised:
        lt.load(path, state)
    assert isinstance(raised.value, pickle.UnpicklingError)
    assert not marker.exists()
    assert equal(snapshot(state), before)


def test_the_allowlist_holds_every_global_a_real_dcp_metadata_names(tmp_path):
    """Derived from this torch's DCP, not written by hand: every (module, name) the .metadata of a
    real sharded checkpoint (AdamW state, scheduler, extras) names is in it, and nothing dotted."""
    path = lt.save(tmp_path / "ckpt", build(0), sharded=True)
    ops = list(pickletools.genops((path / ".metadata").read_bytes()))
    memo, stack, named = {}, [], set()
    for op, arg, _ in ops:  # enough of a pickle machine to follow STACK_GLOBAL's memoized strings
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            stack.append(arg)
        elif op.name == "MEMOIZE" and stack:
            memo[len(memo)] = stack[-1]
        elif op.name in ("BINGET", "LONG_BINGET") and arg in memo:
            stack.append(memo[arg])
        elif op.name == "STACK_GLOBAL":
            named.add((stack[-2], stack[-1]))
        elif op.name == "GLOBAL":
            named.add(tuple(arg.split(" ", 1)))
    table = allowed_globals()
    assert named and named <= set(table), named - set(table)
    assert not any("." in name for _, name in table)
    assert lt.load(path, build(1)).step == 3


# -- what a checkpoint names: only its own regular files, within their bounds ---------------------

def load_in_child(path: Path, timeout: float = 60) -> dict:
    """Load ``path`` into ``build(1)`` in a child process (a load that opens a FIFO never returns):
    the error's kind and message, and whether the state stayed as it was."""
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run([sys.executable, __file__, "load", str(path)], capture_output=True, text=True,
                              cwd=root, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"lt.load({str(path)!r}) hung")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _load_report(path: Path) -> dict:
    target = build(1)
    before = snapshot(target)
    try:
        lt.load(path, target)
    except lt.CheckpointError as error:
        return {"error": type(error).__name__, "message": str(error), "unchanged": equal(snapshot(target), before)}
    except Exception as error:  # noqa: BLE001 - reported
        return {"error": f"escaped {type(error).__name__}", "message": str(error), "unchanged": False}
    return {"error": None, "message": "", "unchanged": equal(snapshot(target), before)}


def _format_1(path: Path) -> None:
    """Make a saved sharded checkpoint one of format 1: no manifest, nothing verified before DCP reads."""
    (path / MANIFEST).unlink()
    common = torch.load(path / "common.pt", weights_only=True)
    common["meta"]["version"] = 1
    torch.save(common, path / "common.pt")


@pytest.mark.parametrize("form", ["format 2", "format 1"])
@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata"])
def test_a_fifo_in_a_sharded_checkpoint_is_refused_naming_it_not_read_forever(tmp_path, name, form):
    path = lt.save(tmp_path / "ckpt", build(0), sharded=True)
    if form == "format 1":
        _format_1(path)
    (path / name).unlink()
    os.mkfifo(path / name)
    outcome = load_in_child(path)
    assert outcome["error"] == "FileFormatError" and outcome["unchanged"], outcome
    # (format 1 has no manifest: DCP's metadata check finds it, naming the entry stored there)
    named = rf"{re.escape(repr(str(path)))}: its file ('.metadata': entry '[\w.]+' stores its data in )?{name!r}"
    assert re.search(named + r",? (which )?is a FIFO \(named pipe\), not a regular file", outcome["message"]), outcome


def test_a_fifo_given_as_a_full_checkpoint_is_refused_not_read_forever(tmp_path):
    os.mkfifo(tmp_path / "ckpt.pt")
    outcome = load_in_child(tmp_path / "ckpt.pt")
    assert outcome["error"] == "FileFormatError", outcome
    assert "ckpt.pt' is a FIFO (named pipe), not a regular file" in outcome["message"]


def test_a_symlink_inside_a_sharded_checkpoint_is_refused_even_to_identical_bytes(tmp_path):
    path = lt.save(tmp_path / "ckpt", build(0), sharded=True)
    elsewhere = tmp_path / "elsewhere.distcp"
    (path / "__0_0.distcp").rename(elsewhere)
    (path / "__0_0.distcp").symlink_to(elsewhere)
    state = build(1)
    before = snapshot(state)
    with pytest.raises(lt.CheckpointError, match=r"its file '__0_0.distcp' is a symbolic link, not a regular file"):
        lt.load(path, state)
    assert equal(snapshot(state), before)


def test_a_manifest_naming_a_path_outside_the_checkpoint_is_refused(tmp_path):
    from ltransform import io

    path = lt.save(tmp_path / "ckpt", build(0), sharded=True)
    (tmp_path / "outside").write_bytes(b"a file beside the checkpoint")
    manifest = torch.load(path / MANIFEST, weights_only=True)
    manifest["files"]["../outside"] = io.file_checksum(tmp_path / "outside")
    io.write_file(path / MANIFEST, manifest)
    with pytest.raises(lt.CheckpointError, match=r"ckpt': its 'manifest.pt' is not a manifest ltransform wrote"):
        lt.load(path, build(1))


def craft_metadata(path: Path, change) -> None:
    """Rewrite a sharded checkpoint's DCP ``.metadata`` with ``change(fqn, storage info)`` applied to
    each entry, and re-sign the manifest (a crafted checkpoint carries one that matches)."""
    metadata = pickle.loads((path / ".metadata").read_bytes())
    for index, info in metadata.storage_data.items():
        change(index.fqn, info)
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    (path / MANIFEST).unlink()
    write_manifest(path)


def _entry_is(fqn: str, **changes):
    def change(name, info):
        if name == fqn:
            for key, value in changes.items():
                setattr(info, key, value(info) if callable(value) else value)
    return change


CRAFTED = {  # how .metadata stores models.model.0.weight -> (error, message)
    "absolute path to another checkpoint": (
        lambda other: _entry_is("models.model.0.weight", relative_path=str(other / "__0_0.distcp")),
        pickle.UnpicklingError,
        r"refusing to load .*ckpt': its file '.metadata': entry 'models.model.0.weight' stores its data in "
        r"'/.*other/__0_0.distcp', which is not a file of the checkpoint"),
    "relative path out of the directory": (
        lambda other: _entry_is("models.model.0.weight", relative_path="../other/__0_0.distcp"),
        pickle.UnpicklingError, r"entry 'models.model.0.weight' stores its data in '../other/__0_0.distcp', which "
                                r"is not a file of the checkpoint"),
    "a file the manifest does not record": (
        lambda other: _entry_is("models.model.0.weight", relative_path="extra.distcp"),
        ValueError, r"entry 'models.model.0.weight' stores its data in 'extra.distcp', which its 'manifest.pt' "
                    r"does not record"),
    "bytes past the end of its file": (
        lambda other: _entry_is("models.model.0.weight", offset=lambda info: info.offset + 10**6),
        ValueError, r"entry 'models.model.0.weight': its bytes \d+\+\d+ lie outside its file '__0_0.distcp'"),
    "a stream transform": (
        lambda other: _entry_is("models.model.0.weight", transform_descriptors=["stream.zstandard"]),
        ValueError, r"entry 'models.model.0.weight' is stored through stream transforms \['stream.zstandard'\], "
                    r"which ltransform never writes"),
}


@pytest.mark.parametrize("crafted", list(CRAFTED))
def test_a_crafted_metadata_cannot_make_a_load_read_outside_its_files(tmp_path, crafted):
    change, error, match = CRAFTED[crafted]
    other = lt.save(tmp_path / "other", build(7), sharded=True)  # what a crafted path could read
    path = lt.save(tmp_path / "ckpt", build(0), sharded=True)
    shutil.copy(other / "__0_0.distcp", path / "extra.distcp")
    craft_metadata(path, change(other))
    (path / MANIFEST).unlink()
    (path / "extra.distcp").rename(tmp_path / "aside")  # the manifest is re-signed without it
    write_manifest(path)
    (tmp_path / "aside").rename(path / "extra.distcp")
    state = build(1)
    before = snapshot(state)
    with pytest.raises(error, match=match) as raised:
        lt.load(path, state)
    assert isinstance(raised.value, lt.CheckpointError)
    assert equal(snapshot(state), before)


def test_a_chunk_stored_in_fewer_bytes_than_its_data_is_refused_before_reading(tmp_path):
    saved = build(0, hidden=256)  # 0.weight: 4 KiB of data; 0.bias: 1 KiB (in a blob of ~2 KiB)
    path = lt.save(tmp_path / "ckpt", saved, sharded=True)
    metadata = pickle.loads((path / ".metadata").read_bytes())
    bias = next(info for index, info in metadata.storage_data.items() if index.fqn == "models.model.0.bias")
    craft_metadata(path, _entry_is("models.model.0.weight", offset=bias.offset, length=bias.length))
    state = build(1, hidden=256)
    with pytest.raises(lt.CheckpointError, match=rf"entry 'models.model.0.weight': its stored chunk has "
                                                 rf"{bias.length} bytes for 4096 of data"):
        lt.load(path, state)


@pytest.mark.parametrize("form", ["format 2", "format 1"])
def test_a_chunk_that_does_not_fit_its_tensor_fails_the_load_before_anything_changes(tmp_path, form):
    """The crafted entry lies within its file and holds enough bytes, so only reading it shows that
    it is another tensor's: DCP reads every chunk into buffers first, so a chunk that fails half-way
    through the read (the model's last tensor) leaves the parameters, optimizer, scheduler,
    counters and RNG states as they were."""
    path = lt.save(tmp_path / "ckpt", build(0), sharded=True)
    metadata = pickle.loads((path / ".metadata").read_bytes())
    first = next(info for index, info in metadata.storage_data.items() if index.fqn == "models.model.0.weight")
    craft_metadata(path, _entry_is("models.model.2.bias", offset=first.offset, length=first.length))
    if form == "format 1":
        _format_1(path)
    state = build(1)
    random.seed(3), torch.manual_seed(3)
    before = snapshot(state)
    with pytest.raises(lt.CheckpointError, match=r"ckpt': its DCP files \['.metadata', '__0_0.distcp'\] cannot be "
                                                 r"read \(AssertionError: .*models.model.2.bias"):
        lt.load(path, state)
    assert equal(snapshot(state), before)


class Refuses(Counter):
    """A user's object whose load_state_dict refuses a state it does not know (as many do)."""

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"n", "kind"}:
            raise ValueError(f"expected keys n and kind, got {sorted(state)}")
        self.n = state["n"]

    def state_dict(self) -> dict:
        return {"n": self.n, "kind": "refuses"}


def _lambda_state(seed: int) -> lt.State:
    state = build(seed, extra={"counter": Counter(seed)})
    scheduler = torch.optim.lr_scheduler.LambdaLR(state.optimizer, lambda step: 0.5 ** step)
    return lt.State(model=state.model, optimizer=state.optimizer, scheduler=scheduler, step=state.step,
                    extra=dict(state.extra))


USER_OBJECTS = {  # saved, target, what refuses
    "an extra": (lambda: build(0, extra={"counter": Counter(5), "z": Counter(6)}),
                 lambda: build(1, extra={"counter": Counter(1), "z": Refuses(2)}),
                 r"state.extra\['z'\] cannot load its saved state \(ValueError: expected keys n and kind, "
                 r"got \['n'\]\)"),
    "a scheduler": (lambda: build(0, extra={"counter": Counter(5)}), lambda: _lambda_state(1),
                    r"scheduler 'scheduler' cannot load its saved state \(KeyError: 'lr_lambdas'\)"),
}


@pytest.mark.parametrize("sharded", [False, True], ids=["full", "sharded"])
@pytest.mark.parametrize("refuser", list(USER_OBJECTS))
def test_a_user_object_that_refuses_its_state_fails_the_load_and_everything_is_put_back(tmp_path, refuser, sharded):
    saved, target, match = USER_OBJECTS[refuser]
    saved_state = saved()
    for _ in range(3):
        saved_state.optimizer.step(), saved_state.scheduler.step()
    path = lt.save(tmp_path / ("ckpt" if sharded else "ckpt.pt"), saved_state, sharded=sharded)
    state = target()
    before = snapshot(state)
    with pytest.raises(lt.CheckpointError, match=match + r"; the state is as it was before the load") as raised:
        lt.load(path, state)
    assert isinstance(raised.value, ValueError) and str(path) in str(raised.value)
    assert equal(snapshot(state), before)


@pytest.mark.parametrize("keys", [(0, "0"), ("a/b", "a")], ids=["0 and '0'", "'a/b' and 'a' then 'b'"])
def test_a_flipped_tensor_is_found_even_beside_a_key_that_spells_the_same(tmp_path, keys):
    """Checksums are recorded by each tensor's path; with "/" joining keys, the integer 0 and the
    string "0" (or "a/b" and "a" then "b") shared one, and the first tensor went unchecked."""
    first, second = torch.full((16,), 1234.5), torch.full((16,), -7.25)
    pair = {keys[0]: first, keys[1]: second} if keys[0] == 0 else {keys[0]: first, keys[1]: {"b": second}}
    path = lt.save(tmp_path / "ckpt.pt", build(0, extra={"pair": pair}))
    data = bytearray(path.read_bytes())
    data[data.index(first.numpy().tobytes()) + 5] ^= 0x10
    path.write_bytes(bytes(data))
    state = build(1, extra={"pair": {}})
    before = snapshot(state)
    entry = "extra/pair/value/" + ("0" if keys[0] == 0 else "'a/b'")
    with pytest.raises(lt.CheckpointError, match=rf"ckpt.pt': entry {re.escape(repr(entry))} does not match its "
                                                 r"checksum"):
        lt.load(path, state)
    assert equal(snapshot(state), before)


if __name__ == "__main__":
    if sys.argv[1] == "load":
        print(json.dumps(_load_report(Path(sys.argv[2]))))
    else:
        print(json.dumps(fuzz(sys.argv[1], Path(sys.argv[2]))))
