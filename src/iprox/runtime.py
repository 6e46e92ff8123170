"""Settings that every model-running stage shares: warm-up, features and fine-tuning.

Each stage's config subclasses :class:`ModelStageConfig` and adds its own fields; the shared ones are
keyword-only, so a stage's own fields keep their order.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from .models import EMBEDDED_MODEL, resolve_dtype, resolve_model


def check_data_paths(data: list[str]) -> None:
    """Every data path exists (``hf:`` specs excepted); raises FileNotFoundError naming the first that does not."""
    for d in data:
        d = str(d)
        if not d.strip():
            raise ValueError("an empty data path; give a file or folder")
        if not d.startswith("hf:") and not Path(d).expanduser().exists():
            raise FileNotFoundError(f"data path {d} does not exist")


def _type_ok(value, tp) -> tuple[bool, object]:
    """Whether ``value`` fits the annotation ``tp``; returns ``(ok, value)`` with ints widened to float
    where a float is wanted and integral floats narrowed to int where an int is."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arm in typing.get_args(tp):
            ok, v = _type_ok(value, arm)
            if ok:
                return True, v
        return False, value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        return (isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else value)
    if tp is int:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return isinstance(value, int), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    if origin is list:
        (arm,) = typing.get_args(tp) or (object,)
        if not isinstance(value, list):
            return False, value
        out = []
        for v in value:
            ok, v2 = _type_ok(v, arm)
            if not ok:
                return False, value
            out.append(v2)
        return True, out
    return True, value


_TYPE_WORDS = {float: "a number", int: "a whole number", bool: "true or false", str: "a string"}


def _describe(tp) -> str:
    if typing.get_origin(tp) is list:
        (arm,) = typing.get_args(tp) or (object,)
        return f"a list of {_describe(arm).removeprefix('a ')}s"
    if typing.get_args(tp) and typing.get_origin(tp) not in (list,):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return _TYPE_WORDS.get(tp, getattr(tp, "__name__", str(tp)))


def check_types(obj) -> None:
    """Checks (and gently coerces) every field of a settings dataclass against its annotation.

    A quoted number (``sparsity = "0.5"``), a fraction where a count is wanted (``epochs = 1.5``) or
    a number where a path is wanted (``out = 5``) is refused with the setting's name; an int where a
    float is wanted and ``2.0`` where an int is are accepted.

    Raises:
        ValueError: naming the setting, its value and the expected type.
    """
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        tp = hints.get(f.name)
        if tp is None:
            continue
        value = getattr(obj, f.name)
        if typing.get_origin(tp) is list and isinstance(value, str):
            continue  # one path where a list is wanted: each config accepts it
        ok, coerced = _type_ok(value, tp)
        if not ok:
            raise ValueError(f"setting {f.name} must be {_describe(tp)}, got {value!r} ({type(value).__name__})")
        setattr(obj, f.name, coerced)


@dataclass(kw_only=True)
class ModelStageConfig:
    """Attributes:
        data: the stage's input records (files or folders).
        out: the folder the stage writes.
        model: a proxy folder, or any model spec ``load_model`` accepts.
        max_length: tokens per example (a longer prompt is cut from the left first).
        seed: the stage's seed (data order, LoRA init, projections).
        dtype / device: how the model is loaded ("" device: CUDA when present, else CPU; dtype also
            bf16, fp16 or auto, resolved when the config is made so that stage.json records it).
        trust_remote_code: passed to transformers for hub models with custom code.
        overwrite: replace an output folder that holds a result with other settings.
        progress: show progress bars.
    """

    data: list[str] = field(default_factory=list)
    out: str = ""
    model: str = EMBEDDED_MODEL
    max_length: int = 512
    seed: int = 0
    dtype: str = "float32"
    device: str = ""
    trust_remote_code: bool = False
    overwrite: bool = False
    progress: bool = True

    def check_io(self, stage: str, data_hint: str, out_hint: str) -> None:
        """Accepts one path for ``data``; refuses a missing ``data`` or ``out`` with the stage's words."""
        check_types(self)
        self.dtype = resolve_dtype(self.dtype, self.device)
        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.data:
            raise ValueError(f"{stage} needs --data ({data_hint})")
        if any(not str(d).strip() for d in self.data):
            raise ValueError(f"{stage}: an empty --data path; give a file or folder")
        if not str(self.out).strip():
            raise ValueError(f"{stage} needs --out ({out_hint})")
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8 (a prompt and a response), got {self.max_length}")

    def check_inputs(self) -> None:
        """Fails on a missing data path or an unloadable model *before* the stage writes anything."""
        check_data_paths(self.data)
        if self.model:
            from .loading import is_proxy_folder

            if not is_proxy_folder(self.model):
                resolve_model(self.model)
