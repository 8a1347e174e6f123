"""Paths the user names, checked with the standard library only: the command line checks its inputs and
outputs before it imports torch, so a typo costs well under a second."""

from __future__ import annotations

import errno
import re
import tempfile
from pathlib import Path

from dtypelint.errors import LoadError, UsageError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
GRAPH_SUFFIXES = (".json", ".graphml", ".dot", ".gv", ".mmd", ".mermaid")
# A hub id (``gpt2``, ``meta-llama/Llama-3.1-8B``) looks like this; dtypelint never downloads it.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def local_path(path: str | Path) -> Path:
    """``path`` if it exists here; otherwise a LoadError that says why: a symlink loop, a dangling
    link, a hub id (nothing is downloaded), or plainly missing."""
    path = Path(path)
    try:
        path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise LoadError(f"{path} is a symlink loop") from None
        if path.is_symlink():
            raise LoadError(f"{path} is a symlink to {path.readlink()}, which does not exist") from None
        if _HUB_ID.fullmatch(str(path)) and not path.is_absolute():
            raise LoadError(f"{path} does not exist here; dtypelint downloads nothing, so pass a local directory "
                            f"(for a hub model: huggingface-cli download {path} --local-dir DIR)") from None
        raise LoadError(f"{path} does not exist") from None
    return path


def refuse_weights_file(path: Path) -> None:
    if path.is_file() and path.suffix.lower() in WEIGHT_SUFFIXES:
        raise LoadError(f"{path} is a weights file; pass the checkpoint directory that holds it and its config.json")


def unsupported_graph_suffix(suffix: str) -> UsageError:
    return UsageError(f"cannot write a graph as {suffix or 'a file without extension'!r}; "
                      "use .json, .graphml, .dot or .mmd")


def writable_directory(directory: Path) -> bool:
    """Whether files can be created there: try it, since permission bits say nothing for root, nor
    about read-only file systems or /proc."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def check_writable_file(option: str, name: str) -> None:
    """``name`` must be a file (new or not) in an existing directory that we may create files in."""
    target = Path(name)
    if target.is_dir():
        raise UsageError(f"{option} {target} is a directory; name a file")
    parent = target.parent
    if not parent.is_dir():
        problem = "is not a directory" if parent.exists() else "does not exist"
        raise UsageError(f"{option} {target}: {parent} {problem}")
    try:
        if not writable_directory(parent):
            raise OSError(errno.EACCES, "permission denied")
        if target.exists():
            target.open("ab").close()
    except OSError as error:
        raise UsageError(f"{option} {target}: cannot write there: {error.strerror or error}") from None
