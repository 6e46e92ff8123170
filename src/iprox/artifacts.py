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
from typing import Any

log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"
COMPLETE_FILE = "COMPLETE"
FORMAT_VERSION = 1

# Config fields that do not affect what a stage produces.
IGNORED_KEYS = {"out", "overwrite", "progress", "device", "checkpoint_every"}


class ConfigMismatchError(RuntimeError):
    """A stage folder holds a result made with other settings."""


def atomic_write_text(path: str | Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in IGNORED_KEYS}


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / COMPLETE_FILE).exists()


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
    meta_path = folder / STAGE_FILE
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        same = meta.get("stage") == stage and comparable(meta.get("config", {})) == comparable(config)
        if same and is_complete(folder):
            log.info("%s: complete with the same settings in %s; skipping", stage, folder)
            return True
        if not same and not resumable and not is_complete(folder) and meta.get("stage") == stage:
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
        elif overwrite:
            shutil.rmtree(folder)
    elif folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise ConfigMismatchError(f"{folder} exists, is not empty and was not written by iprox; pass --overwrite or choose another folder")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / COMPLETE_FILE).unlink(missing_ok=True)
    atomic_write_json(meta_path, {"stage": stage, "format_version": FORMAT_VERSION, "config": config})
    return False


def mark_complete(folder: str | Path) -> None:
    atomic_write_text(Path(folder) / COMPLETE_FILE, "ok\n")
