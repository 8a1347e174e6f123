"""The end of the fix stage: write the fixed model into a new directory, never over its source.

The checkpoint is written to a hidden staging directory beside the target and renamed into place, so a
reader never sees half a checkpoint. A staging directory of a killed run is removed by the next save.
Paths are compared after resolving symlinks: a target equal to, inside or containing the source is
refused, with or without ``force``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dtypelint.errors import DtypelintError, UsageError
from dtypelint.paths import current_umask, parse_file, refuse_near_sources, resolved, shown, writable_directory

if TYPE_CHECKING:
    import torch

    from dtypelint.advisor import PrecisionPlan
    from dtypelint.plan import FixPlan

PLAN_FILE = "dtypelint-fixes.json"
SAVED_FILES = "saved_files"  # the plan's record of what the save wrote: relative path -> SHA-256
_STAGING = ".dtypelint-staging."  # staging directories: .<target name>.dtypelint-staging.<pid>.<random>


def check_save_target(target: str | Path, *, sources: Sequence[str | Path] = (), force: bool = False) -> Path:
    """The resolved ``target`` if a fixed checkpoint may be written there, else a ``UsageError``.

    Refused with or without ``force``: a target equal to, inside or containing a source checkpoint, or
    containing the working directory (``dtypelint.paths.refuse_near_sources``). ``force`` replaces only a
    directory that an earlier save wrote, proven by content: its fix plan lists the files the save wrote
    with their hashes, and the directory holds those files unchanged and nothing else. Call it before
    loading anything (it hashes the files of a directory to replace).
    """
    target_path = resolved(target)
    refuse_near_sources(target_path, sources, "the fixed model")
    if target_path.exists():
        if not target_path.is_dir():
            raise UsageError(f"{shown(target_path)} exists and is not a directory")
        if any(target_path.iterdir()):
            if not force:
                raise UsageError(f"{shown(target_path)} exists and is not empty; pass force=True / --force to "
                                 f"replace a fixed checkpoint saved there before")
            _check_written_by_a_save(target_path)
    _check_writable(_existing_ancestor(target_path.parent), target_path)
    return target_path


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _file_hash(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as stream:
        while block := stream.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def _manifest(directory: Path) -> dict[str, str]:
    """Each file under ``directory`` (but the plan) by relative path, with its SHA-256."""
    return {str(file.relative_to(directory)): _file_hash(file)
            for file in sorted(directory.rglob("*")) if file.is_file() and file.name != PLAN_FILE}


def _check_written_by_a_save(directory: Path) -> None:
    """``directory`` holds what one ``save_fixed`` wrote, unchanged, and nothing else; else a UsageError
    that names the first thing ``--force`` would destroy."""
    refusal = f"refusing to replace {shown(directory)}: --force replaces only a directory that an earlier save wrote"
    plan = directory / PLAN_FILE
    if not plan.is_file() or plan.is_symlink():
        raise UsageError(f"{refusal}, and it holds no {PLAN_FILE}")
    try:
        written = parse_file(plan, json.loads, "JSON").get(SAVED_FILES)
    except (DtypelintError, AttributeError):
        written = None
    if not isinstance(written, dict):
        raise UsageError(f"{refusal}; its {PLAN_FILE} does not list the files a save wrote")
    for entry in sorted(directory.rglob("*")):
        name = str(entry.relative_to(directory))
        if name == PLAN_FILE or (entry.is_dir() and not entry.is_symlink()):
            continue
        if name not in written or entry.is_symlink() or not entry.is_file():
            raise UsageError(f"{refusal}, and no save wrote {shown(name)}")
        if _file_hash(entry) != written[name]:
            raise UsageError(f"{refusal}, and {shown(name)} changed after the save wrote it")


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
    model: torch.nn.Module, target: str | Path, plan: FixPlan | PrecisionPlan, *, source: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Save the fixed model into a new directory with the fix plan beside it (``inv_freq`` is a
    non-persistent buffer: no checkpoint stores it, so the plan must be re-applied after every load). A
    precision plan (``dtypelint.advisor``) is stored the same way: ``apply_plan`` reads either.

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
        staging.chmod(0o777 & ~current_umask())  # as save_pretrained creates a directory, not mkdtemp's 0700
        _write_checkpoint(model, staging)
        from dtypelint.advisor import json_safe

        record = {**json_safe(plan.to_dict()), SAVED_FILES: _manifest(staging)}
        (staging / PLAN_FILE).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
