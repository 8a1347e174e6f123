"""The end of the fix stage: write the fixed model into a new directory, never over its source.

The checkpoint is written to a hidden staging directory beside the target and renamed into place, so a
reader never sees half a checkpoint. A staging directory of a killed run is removed by the next save.
Paths are compared after resolving symlinks: a target equal to, inside or containing the source is
refused, with or without ``force``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dtypelint.errors import UsageError
from dtypelint.paths import writable_directory

if TYPE_CHECKING:
    import torch

    from dtypelint.fix import FixPlan

PLAN_FILE = "dtypelint-fixes.json"
_STAGING = ".dtypelint-staging."  # staging directories: .<target name>.dtypelint-staging.<pid>.<random>


def _real(path: str | Path) -> Path:
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop (Python < 3.13)
        raise UsageError(f"cannot resolve {path}: {error}") from None


def _checkpoint_directory(path: str | Path) -> Path:
    """The directory a checkpoint lives in (``source`` may name its config.json)."""
    real = _real(path)
    return real.parent if real.is_file() else real


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_save_target(target: str | Path, *, sources: Sequence[str | Path] = (), force: bool = False) -> Path:
    """The resolved ``target`` if a fixed checkpoint may be written there, else a ``UsageError``.

    Refused with or without ``force``: a target equal to, inside or containing a source checkpoint, or
    containing the working directory. ``force`` replaces only a directory that an earlier save wrote
    (it holds the fix plan), so it cannot delete unrelated files. Cheap: call it before loading anything.
    """
    resolved = _real(target)
    for source in map(_checkpoint_directory, sources):
        if resolved == source:
            raise UsageError(f"refusing to write the fixed model over its source checkpoint {source}")
        if source in resolved.parents:
            raise UsageError(f"refusing to write the fixed model inside its source checkpoint {source}")
        if resolved in source.parents:
            raise UsageError(f"refusing to use {resolved}: it contains the source checkpoint {source}")
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise UsageError(f"refusing to use {resolved}: it contains the working directory")
    if resolved.exists():
        if not resolved.is_dir():
            raise UsageError(f"{resolved} exists and is not a directory")
        if any(resolved.iterdir()):
            if not force:
                raise UsageError(f"{resolved} exists and is not empty; pass force=True / --force to replace "
                                 f"a fixed checkpoint saved there before")
            if not (resolved / PLAN_FILE).is_file():
                raise UsageError(f"refusing to replace {resolved}: --force replaces only a directory that an "
                                 f"earlier save wrote (it holds {PLAN_FILE}), and this one holds other files")
    _check_writable(_existing_ancestor(resolved.parent), resolved)
    return resolved


def _check_writable(directory: Path, target: Path) -> None:
    if not writable_directory(directory):
        raise UsageError(f"cannot write {target}: {directory} is not a writable directory")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_staging(directory: Path) -> list[Path]:
    """Remove the staging directories that saves killed before they finished left in ``directory``."""
    removed = []
    for path in directory.glob(f".*{_STAGING}*"):
        pid = path.name.partition(_STAGING)[2].split(".")[0]
        if path.is_dir() and not path.is_symlink() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def model_source(model: torch.nn.Module) -> Path | None:
    """The local directory the model was loaded from (``name_or_path``), when there is one."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not isinstance(name, str) or not name:
        return None
    try:
        path = Path(name).expanduser()
        return path if path.is_dir() else None
    except OSError:
        return None


def _write_checkpoint(model: torch.nn.Module, directory: Path) -> None:
    """ipex-llm low-bit models in their own format (``load_low_bit`` reads it back), others as
    ``save_pretrained`` writes them."""
    if getattr(getattr(model, "config", None), "bigdl_transformers_low_bit", None):
        # load_low_bit does not attach save_low_bit to the model it returns; the function takes any.
        from ipex_llm.transformers.model import save_low_bit

        save_low_bit(model, str(directory))
    else:
        model.save_pretrained(directory)


def _move_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        os.replace(staging, target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}{_STAGING}{os.getpid()}.", dir=target.parent))
    os.replace(target, retired / target.name)
    os.replace(staging, target)
    shutil.rmtree(retired)


def save_fixed(
    model: torch.nn.Module, target: str | Path, plan: FixPlan, *, source: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Save the fixed model into a new directory with the fix plan beside it (``inv_freq`` is a
    non-persistent buffer: no checkpoint stores it, so the plan must be re-applied after every load).

    ``source`` (and the directory the model was loaded from) is protected: see ``check_save_target``.
    Staging directories left by killed saves are removed, with a warning that says so.
    """
    if not callable(getattr(model, "save_pretrained", None)):
        raise UsageError(f"{type(model).__name__} has no save_pretrained, so no checkpoint can be written; "
                         f"keep the fix plan (--write-plan) and apply it where the model is built")
    sources = [path for path in (source, model_source(model)) if path is not None]
    target = check_save_target(target, sources=sources, force=force)
    target.parent.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_staging(target.parent)
    if removed:
        warnings.warn(f"removed {len(removed)} staging director{'ies' if len(removed) > 1 else 'y'} left by an "
                      f"interrupted save: {', '.join(path.name for path in removed)}", stacklevel=2)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{_STAGING}{os.getpid()}.", dir=target.parent))
    try:
        _write_checkpoint(model, staging)
        plan.write(staging / PLAN_FILE)
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
