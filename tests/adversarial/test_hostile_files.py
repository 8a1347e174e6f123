"""Attack table: checkpoint folders whose files would hang a read (a FIFO), never end (``/dev/zero``),
exhaust memory or reach outside the folder. Each is exit code 2 and one line, in well under a minute,
and the folder's bytes are unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from dtypelint.cli import main

DEADLINE_S = 60


class Hung(Exception):
    pass


@pytest.fixture(autouse=True)
def deadline() -> Iterator[None]:
    """A read that blocks fails the test (the alarm interrupts it) instead of stalling the suite."""

    def expire(signum: int, frame: object) -> None:
        raise Hung(f"no answer in {DEADLINE_S} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(DEADLINE_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def digest(root: Path) -> dict[str, str]:
    """Hashes of the regular files under ``root``, and the kind of everything else (read nothing else)."""
    result = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            result[name] = f"-> {os.readlink(path)}"
        elif path.is_file():
            result[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            result[name] = "dir" if path.is_dir() else "special"
    return result


def _safetensors(file: Path, header: dict, data_bytes: int) -> None:
    encoded = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"\0" * data_bytes)


def _copy(tiny: Path, target: Path, *, weights: bool = True) -> Path:
    target.mkdir(parents=True)
    shutil.copy(tiny / "config.json", target)
    if weights:
        shutil.copy(tiny / "model.safetensors", target)
    return target


def _replace(file: Path, make) -> None:
    file.unlink(missing_ok=True)
    make(file)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, tiny_llama_path: Path) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    tiny = tiny_llama_path
    _replace(_copy(tiny, root / "fifo-config") / "config.json", os.mkfifo)
    _replace(_copy(tiny, root / "fifo-config-meta", weights=False) / "config.json", os.mkfifo)
    _replace(_copy(tiny, root / "zero-config") / "config.json", lambda f: f.symlink_to("/dev/zero"))
    _replace(_copy(tiny, root / "fifo-weights") / "model.safetensors", os.mkfifo)
    _replace(_copy(tiny, root / "fifo-preprocessor") / "preprocessor_config.json", os.mkfifo)
    _replace(_copy(tiny, root / "fifo-generation-config") / "generation_config.json", os.mkfifo)
    _replace(_copy(tiny, root / "zero-weights") / "model.safetensors", lambda f: f.symlink_to("/dev/zero"))
    _replace(_copy(tiny, root / "fifo-index", weights=False) / "model.safetensors.index.json", os.mkfifo)
    nested = _copy(tiny, root / "nested-config")
    (nested / "config.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    huge = _copy(tiny, root / "huge-config")
    config = json.loads((tiny / "config.json").read_text())
    (huge / "config.json").write_text(json.dumps({**config, "padding": "x" * (17 * 2**20)}))
    # Shard indexes that reach outside the folder, or name nothing.
    outside = _copy(tiny, root / "other")
    for name, shard in (("index-parent", "../other/model.safetensors"),
                        ("index-absolute", str(outside / "model.safetensors"))):
        folder = _copy(tiny, root / name, weights=False)
        index = {"metadata": {}, "weight_map": {"model.norm.weight": shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    empty_index = _copy(tiny, root / "index-empty", weights=False)
    (empty_index / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    # safetensors headers that a load rejects: --static rejects them too.
    f16 = {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}
    _safetensors(_copy(tiny, root / "overlapping-tensors", weights=False) / "model.safetensors",
                 {"a": f16, "b": f16}, 8)
    _safetensors(_copy(tiny, root / "trailing-bytes", weights=False) / "model.safetensors", {"a": f16}, 100)
    _safetensors(_copy(tiny, root / "shape-mismatch", weights=False) / "model.safetensors",
                 {"a": {**f16, "shape": [100]}}, 8)
    return root


REGULAR_ONLY = "dtypelint reads regular files only"
ROWS = [
    # (id, arguments, what the one line must say)
    ("fifo-config", ["check", "{root}/fifo-config"], f"config.json is a FIFO; {REGULAR_ONLY}"),
    ("fifo-config-meta", ["check", "{root}/fifo-config-meta", "--mode", "meta"], f"config.json is a FIFO; {REGULAR_ONLY}"),
    ("fifo-config-file", ["check", "{root}/fifo-config-meta/config.json"], f"config.json is a FIFO; {REGULAR_ONLY}"),
    ("zero-config", ["check", "{root}/zero-config"], f"config.json is a character device; {REGULAR_ONLY}"),
    ("fifo-weights-static", ["check", "{root}/fifo-weights", "--static"], f"model.safetensors is a FIFO; {REGULAR_ONLY}"),
    ("fifo-weights-value", ["check", "{root}/fifo-weights"], f"model.safetensors is a FIFO; {REGULAR_ONLY}"),
    ("zero-weights", ["check", "{root}/zero-weights"], f"model.safetensors is a character device; {REGULAR_ONLY}"),
    ("fifo-preprocessor", ["check", "{root}/fifo-preprocessor"], f"preprocessor_config.json is a FIFO; {REGULAR_ONLY}"),
    ("fifo-generation-config", ["check", "{root}/fifo-generation-config"], f"generation_config.json is a FIFO; {REGULAR_ONLY}"),
    ("fifo-index", ["check", "{root}/fifo-index"], f"model.safetensors.index.json is a FIFO; {REGULAR_ONLY}"),
    ("nested-config", ["check", "{root}/nested-config"], "config.json: not valid JSON: nested too deeply"),
    ("huge-config", ["check", "{root}/huge-config"], "config.json is larger than 16777216 bytes"),
    ("index-parent", ["check", "{root}/index-parent"], "names shard(s) outside"),
    ("index-absolute", ["check", "{root}/index-absolute"], "names shard(s) outside"),
    ("index-empty", ["check", "{root}/index-empty"], "'weight_map' names no shard"),
    ("static-overlapping", ["check", "{root}/overlapping-tensors", "--static"], "tensor data overlaps or leaves gaps"),
    ("static-trailing-bytes", ["check", "{root}/trailing-bytes", "--static"], "describes 8 bytes of data, the file holds 100"),
    ("static-shape-mismatch", ["check", "{root}/shape-mismatch", "--static"], "its offsets do not hold its shape"),
    ("name-too-long", ["check", "{root}/" + "n" * 300], "File name too long"),
    ("newline-in-missing-path", ["check", "{root}/no\nsuch"], "no\\nsuch does not exist"),
]


@pytest.mark.parametrize(("arguments", "message"), [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_a_hostile_folder_is_exit_2_and_one_line_and_left_as_it_was(arguments, message, folders, capfd):
    before = digest(folders)
    assert main([*[a.format(root=folders) for a in arguments], "-q"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dtypelint: error: ") and message in err, err
    assert digest(folders) == before


def test_an_unreadable_folder_is_one_line(tmp_path, tiny_llama_path, monkeypatch, capfd):
    """A mode-000 folder (root reads it anyway, so the refusal is simulated)."""
    folder = _copy(tiny_llama_path, tmp_path / "locked")
    real_iterdir = Path.iterdir

    def refuse(path: Path):
        if path == folder:
            raise PermissionError(13, "Permission denied", str(path))
        return real_iterdir(path)

    monkeypatch.setattr(Path, "iterdir", refuse)
    assert main(["check", str(folder), "-q"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and f"{folder}: cannot read: Permission denied" in err, err


def test_an_unreadable_weights_file_says_so_not_no_such_file(tmp_path, tiny_llama_path, monkeypatch, capfd):
    """A mode-000 model.safetensors (root reads it anyway, so the permission is simulated)."""
    folder = _copy(tiny_llama_path, tmp_path / "locked-weights")
    weights = folder / "model.safetensors"
    real_access = os.access
    monkeypatch.setattr("dtypelint.paths.os.access", lambda path, mode: Path(path) != weights and real_access(path, mode))
    assert main(["check", str(folder), "-q"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and f"{weights}: cannot read: Permission denied" in err, err
