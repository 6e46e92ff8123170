"""Stage folders: resolved config beside the artifact, a completion marker, skip / refuse on rerun.

Every stage writes into its own folder:

* ``stage.json``: the stage name, the format version and the resolved config, written when the
  stage starts;
* its artifacts, each written atomically (temporary name, then rename);
* ``COMPLETE``: written last.

A rerun with the same config finds ``COMPLETE`` and skips; a rerun with a different config is
refused unless the caller asks to overwrite. Settings that do not change the result (the output
folder itself, progress bars, the device, how often to checkpoint) are left out of the comparison.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"
COMPLETE_FILE = "COMPLETE"
FORMAT_VERSION = 1

# Config fields that do not affect what a stage produces.
IGNORED_KEYS = {"out", "overwrite", "progress", "device", "checkpoint_every", "probe_blocks_per_pass",
                "gradient_checkpointing", "offload_optimizer"}


class ConfigMismatchError(ValueError):
    """A stage folder holds a result made with other settings."""


class ArtifactError(RuntimeError):
    """An artifact on disk is unreadable, incomplete or inconsistent; the message names the file."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def set_umask_mode(path: str | Path) -> None:
    """Gives a file the mode a plain ``open()`` would have (0666 less the umask).

    ``tempfile.mkstemp`` creates 0600 files, and so do some writers; a result renamed into place
    would otherwise be unreadable to the user's group whatever their umask says.
    """
    os.chmod(path, 0o666 & ~_umask())


def atomic_write_text(path: str | Path, text: str | Iterable[str]) -> None:
    """Writes ``text`` (a string, or pieces written one after another, so a large table need not be
    held whole) to ``path`` through a temporary file and a rename (mode from the umask)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if isinstance(text, str):
                f.write(text)
            else:
                f.writelines(text)
        set_umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written atomically (temporary name, rename) with the umask's mode."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    save_file(tensors, str(tmp), metadata=metadata)
    set_umask_mode(tmp)
    os.replace(tmp, path)


def set_umask_modes(folder: str | Path) -> None:
    """:func:`set_umask_mode` on every file in ``folder`` (after a library wrote it, e.g. save_pretrained)."""
    for p in Path(folder).iterdir():
        if p.is_file():
            set_umask_mode(p)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# Settings added after folders were first written, with the default that reproduces the older
# behaviour: a folder that lacks one and a config that holds its default compare equal.
ADDED_WITH_DEFAULT = {"probe_statistics": "moments", "probe_balance": "loss", "align_cosine": "batch",
                      "align_micro_batch": 1,
                      "depth_slope": 0.0, "align_space": "factors", "align_checkpoint": "",
                      "calibration": [], "calibration_ridge": 0.01}


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items()
            if k not in IGNORED_KEYS and not (k in ADDED_WITH_DEFAULT and v == ADDED_WITH_DEFAULT[k])}


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / COMPLETE_FILE).exists()


def read_json(path: str | Path, what: str = "file") -> Any:
    """JSON from an artifact file; an unreadable one is an :class:`ArtifactError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: this {what} is not valid JSON ({e.msg}, line {e.lineno}); "
                            f"remove it, or pass --overwrite to rebuild the stage") from None
    except UnicodeDecodeError:
        raise ArtifactError(f"{path}: this {what} is not UTF-8 text; remove it, or pass --overwrite") from None


# Files a stage writes before any of its real work: a folder holding only these has nothing to resume.
_BOOKKEEPING = {STAGE_FILE, "train_ids.json"}


def _holds_only_bookkeeping(folder: Path) -> bool:
    return all(p.name in _BOOKKEEPING or p.name.startswith(".") for p in folder.iterdir())


def prepare_stage(folder: str | Path, stage: str, config: dict[str, Any], overwrite: bool = False,
                  resumable: bool = False) -> bool:
    """Gets ``folder`` ready for ``stage`` with ``config``.

    Returns:
        True when the folder already holds a complete result with the same config (skip the
        stage), False when the stage must run (the folder then exists and holds ``stage.json``).

    Args:
        resumable: the stage resumes from partial work. An unfinished folder of a stage that does
            not resume holds nothing worth keeping and is replaced whatever its settings.

    Raises:
        ConfigMismatchError: the folder holds another stage's or another config's result and
            ``overwrite`` is False.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder; choose another output folder")
    meta_path = folder / STAGE_FILE
    if meta_path.exists():
        meta = read_json(meta_path, "stage settings file")
        if not isinstance(meta, dict):
            raise ArtifactError(f"{meta_path} is not an iprox stage settings file; remove it or pass --overwrite")
        same = meta.get("stage") == stage and comparable(meta.get("config", {})) == comparable(config)
        if same and is_complete(folder):
            log.info("%s: complete with the same settings in %s; skipping", stage, folder)
            return True
        unfinished_here = not is_complete(folder) and meta.get("stage") == stage
        if not same and unfinished_here and (not resumable or _holds_only_bookkeeping(folder)):
            # Nothing of value: an earlier attempt that stopped before any work (a typo'd path,
            # say) must not lock the folder to its settings.
            log.warning("%s: replacing the unfinished result in %s", stage, folder)
            shutil.rmtree(folder)
        elif not same:
            if not overwrite:
                old, new = comparable(meta.get("config", {})), comparable(config)
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise ConfigMismatchError(
                    f"{folder} holds a {meta.get('stage')} result made with other settings "
                    f"(differs in: {', '.join(diff) or 'stage'}); pass --overwrite to replace it, "
                    f"or choose another output folder"
                )
            log.warning("%s: overwriting %s (settings changed)", stage, folder)
            shutil.rmtree(folder)
        elif overwrite and not resumable:
            shutil.rmtree(folder)
        # same settings, unfinished, resumable: keep the partial work (even with --overwrite, which
        # is about replacing results made with *other* settings)
    elif folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise ConfigMismatchError(f"{folder} exists, is not empty and was not written by iprox; pass --overwrite or choose another folder")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / COMPLETE_FILE).unlink(missing_ok=True)
    atomic_write_json(meta_path, {"stage": stage, "format_version": FORMAT_VERSION, "config": config})
    return False


class LockedError(RuntimeError):
    """Another process holds a folder's lock."""


class FolderLock:
    """An exclusive lock on a folder for the length of a ``with`` block (``fcntl.flock`` on ``.lock``).

    The kernel drops the lock when its holder exits, however it exits (a kill -9 included), so a
    lock never outlives its process. The holder's PID is written into the file for the message.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self._f = None

    def __enter__(self):
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise LockedError(f"{self.folder} is in use by another iprox process (PID {holder}); wait for it to "
                              f"finish or choose another folder") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._f = f
        return self

    def __exit__(self, *exc):
        import fcntl

        if self._f is not None:
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None


def mark_complete(folder: str | Path) -> None:
    atomic_write_text(Path(folder) / COMPLETE_FILE, "ok\n")


def copy_finished(src: str | Path, dst: str | Path, src_root: str | Path, dst_root: str | Path) -> None:
    """Copies a finished stage's folder (or file) ``src`` to ``dst`` as another run folder's: JSON records
    are rewritten with ``src_root`` replaced by ``dst_root`` (they name their run's paths), every
    other file is hard-linked where the file system allows (stages never change a finished file in
    place: they replace it), else copied."""
    src, dst = Path(src), Path(dst)
    old, new = str(Path(src_root).resolve()), str(Path(dst_root).resolve())
    for f in ([src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())):
        if f.name.startswith("."):  # the run's lock, temporaries of an interrupted write
            continue
        to = dst if f == src else dst / f.relative_to(src)
        to.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix == ".json":
            text = f.read_text(encoding="utf-8")
            for a, b in {(old, new), (json.dumps(old)[1:-1], json.dumps(new)[1:-1])}:  # (as JSON escapes it)
                text = text.replace(a, b)
            atomic_write_text(to, text)
        else:
            try:
                os.link(f, to)
            except OSError:
                shutil.copy2(f, to)
