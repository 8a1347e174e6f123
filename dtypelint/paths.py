"""Paths the user names, checked with the standard library only: the command line checks its inputs and
outputs before it imports torch, so a typo costs well under a second.

Reads and writes go through here. dtypelint reads regular files only (a FIFO or ``/dev/zero`` named as a
config would hang or exhaust memory) and parses text files up to ``MAX_TEXT_BYTES``; it writes a file by
renaming a complete temporary copy into place, never on, in or around a source checkpoint.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from dtypelint.errors import LoadError, UsageError, WriteError, first_line

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
GRAPH_SUFFIXES = (".json", ".graphml", ".dot", ".gv", ".mmd", ".mermaid")
# A hub id (``gpt2``, ``meta-llama/Llama-3.1-8B``) looks like this; dtypelint never downloads it.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# Configs, shard indexes, fix plans and packs are kilobytes; a 405B shard index is about 100 KB.
MAX_TEXT_BYTES = 16 * 2**20
_FILE_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def shown(path: str | Path) -> str:
    """A path as a one-line message may show it: control characters (a newline in a name) and bytes
    that are not UTF-8 appear escaped, as Python writes them."""
    text = str(path)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def reason(error: OSError) -> str:
    return error.strerror or first_line(error)


def local_path(path: str | Path) -> Path:
    """``path`` if it exists here; otherwise a LoadError that says why: a symlink loop, a dangling
    link, a hub id (nothing is downloaded), a name the system refuses, or plainly missing."""
    path = Path(path)
    try:
        path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise LoadError(f"{shown(path)} is a symlink loop") from None
        if error.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise LoadError(f"{shown(path)}: {reason(error)}") from None
        if path.is_symlink():
            raise LoadError(f"{shown(path)} is a symlink to {shown(path.readlink())}, which does not exist") from None
        if _HUB_ID.fullmatch(str(path)) and not path.is_absolute():
            raise LoadError(f"{path} does not exist here; dtypelint downloads nothing, so pass a local directory "
                            f"(for a hub model: hf download {path} --local-dir DIR; meta mode needs only "
                            f"--include config.json)") from None
        raise LoadError(f"{shown(path)} does not exist") from None
    return path


def refuse_weights_file(path: Path) -> None:
    if path.is_file() and path.suffix.lower() in WEIGHT_SUFFIXES:
        raise LoadError(f"{shown(path)} is a weights file; pass the checkpoint directory that holds it and its "
                        f"config.json")


def unsupported_graph_suffix(suffix: str) -> UsageError:
    return UsageError(f"cannot write a graph as {suffix or 'a file without extension'!r}; "
                      "use .json, .graphml, .dot or .mmd")


def _not_regular(mode: int) -> str | None:
    """What a file of this ``st_mode`` is, when it is not a regular file."""
    return None if stat.S_ISREG(mode) else _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")


def check_regular_file(file: Path) -> None:
    """``file`` (symlinks followed) must be a regular file we may read: a LoadError otherwise."""
    local_path(file)  # a symlink loop or a dangling link, said as such
    try:
        kind = _not_regular(file.stat().st_mode)
        if kind is None and not os.access(file, os.R_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as error:
        raise LoadError(f"{shown(file)}: cannot read: {reason(error)}") from None
    if kind is not None:
        raise LoadError(f"{shown(file)} is {kind}; dtypelint reads regular files only")


@contextmanager
def open_regular(file: Path) -> Iterator[BinaryIO]:
    """``file`` opened for binary reading, if it is a regular file. It is opened without blocking and
    checked on its descriptor, so a FIFO or device swapped in after a check cannot hang a read."""
    try:
        descriptor = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise LoadError(f"{shown(file)}: cannot read: {reason(error)}") from None
    kind = _not_regular(os.fstat(descriptor).st_mode)
    if kind is not None:
        os.close(descriptor)
        raise LoadError(f"{shown(file)} is {kind}; dtypelint reads regular files only")
    with os.fdopen(descriptor, "rb") as stream:
        try:
            yield stream
        except OSError as error:
            raise LoadError(f"{shown(file)}: cannot read: {reason(error)}") from None


def read_regular(file: Path, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (``open_regular``)."""
    with open_regular(file) as stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise LoadError(f"{shown(file)} is larger than {limit} bytes, more than such a file holds")
    return data


def parse_file(file: Path, parse: Callable[[str], Any], kind: str) -> Any:
    """``parse`` (``json.loads``, ``tomllib.loads``) of a UTF-8 text file; a file that cannot be read or
    parsed is a one-line LoadError naming it."""
    data = read_regular(file)
    try:
        return parse(data.decode("utf-8"))
    except RecursionError:
        raise LoadError(f"{shown(file)}: not valid {kind}: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise LoadError(f"{shown(file)}: not valid {kind}: {first_line(error)}") from None


# Writing ------------------------------------------------------------------------------------------------


def resolved(path: str | Path) -> Path:
    """``path`` with ``~`` and every symlink resolved (a target is compared with its sources so)."""
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop (Python < 3.13)
        raise UsageError(f"cannot resolve {shown(path)}: {error}") from None


def checkpoint_directory(path: str | Path) -> Path:
    """The directory a checkpoint lives in (a source may name its config.json)."""
    real = resolved(path)
    return real.parent if real.is_file() else real


def refuse_near_sources(target: Path, sources: Sequence[str | Path], what: str) -> None:
    """The one guard of everything dtypelint writes: a resolved ``target`` equal to, inside or containing
    a source checkpoint, or containing the working directory, is a UsageError."""
    for source in map(checkpoint_directory, sources):
        if target == source:
            raise UsageError(f"refusing to write {what} over its source checkpoint {shown(source)}")
        if source in target.parents:
            raise UsageError(f"refusing to write {what} inside its source checkpoint {shown(source)}")
        if target in source.parents:
            raise UsageError(f"refusing to use {shown(target)}: it contains the source checkpoint {shown(source)}")
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise UsageError(f"refusing to use {shown(target)}: it contains the working directory")


def writable_directory(directory: Path) -> bool:
    """Whether files can be created there: try it, since permission bits say nothing for root, nor
    about read-only file systems or /proc."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def check_output_file(option: str, name: str | Path, sources: Sequence[str | Path] = ()) -> Path:
    """The resolved ``name`` if ``option`` may write a file there: not near a source
    (``refuse_near_sources``), a regular file or none yet, in an existing directory we may create files in."""
    target = resolved(name)
    refuse_near_sources(target, sources, f"{option} {shown(name)}")
    try:
        mode = target.stat().st_mode if target.exists() else None
    except OSError as error:
        raise UsageError(f"{option} {shown(name)}: {reason(error)}") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise UsageError(f"{option} {shown(name)} is a directory; name a file")
    if mode is not None and _not_regular(mode):
        raise UsageError(f"{option} {shown(name)} is {_not_regular(mode)}; dtypelint writes regular files only")
    parent = target.parent
    if not parent.is_dir():
        problem = "is not a directory" if parent.exists() else "does not exist"
        raise UsageError(f"{option} {shown(name)}: {shown(parent)} {problem}")
    if not writable_directory(parent):
        raise UsageError(f"{option} {shown(name)}: cannot write there: {shown(parent)} is not writable")
    return target


def current_umask() -> int:
    """The process's umask (new files get 0o666 less it, new directories 0o777 less it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def write_file(option: str, name: str | Path, data: str | bytes, sources: Sequence[str | Path] = ()) -> Path:
    """Write ``data`` to ``name`` whole or not at all: into a temporary file beside it, renamed over it
    once complete, so a full disk or a kill leaves the old file (or none). Checked as ``check_output_file``;
    a file that exists keeps its mode. Returns the resolved path."""
    target = check_output_file(option, name, sources)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o666 & ~current_umask()
        descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".dtypelint-partial",
                                                 dir=target.parent)
    except OSError as error:
        raise WriteError(f"{option} {shown(name)}: cannot write: {reason(error)}") from None
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise WriteError(f"{option} {shown(name)}: cannot write: {reason(error)}") from None
        raise
    return target


def find_pyproject(start: Path | None = None) -> Path | None:
    """The nearest ``pyproject.toml`` at or above ``start`` (default: the working directory)."""
    directory = (start or Path.cwd()).resolve()
    for candidate in (directory, *directory.parents):
        if (candidate / "pyproject.toml").is_file():
            return candidate / "pyproject.toml"
    return None
