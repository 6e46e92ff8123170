"""Settings that every model-running stage shares: warm-up, features and fine-tuning.

Each stage's config subclasses :class:`ModelStageConfig` and adds its own fields; the shared ones are
keyword-only, so a stage's own fields keep their order.
"""

from __future__ import annotations

import types
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
    if origin is typing.Literal:
        return value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}, value
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
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        (arm,) = typing.get_args(tp) or (object,)
        if typing.get_origin(arm) in (typing.Union, types.UnionType):
            return f"a list, each {_describe(arm)}"
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


PATH_FIELDS = ("data", "out", "model", "checkpoint", "train", "val", "scores")


def section_config(section: str, cls, values: dict, **given):
    """A stage's settings object from a config section: ``values`` are the user's settings (a key
    ``cls`` does not have, or one of its paths, is refused with the section's name), ``given`` what
    the caller supplies (paths, which a section never sets). Errors name the section."""
    names = {f.name for f in fields(cls)} - set(PATH_FIELDS)
    bad = sorted(set(values) - names)
    if bad:
        raise ValueError(f"[{section}] has unknown settings {bad}; known: {sorted(names)}")
    try:
        return cls(**{**given, **values})
    except (ValueError, TypeError) as e:
        raise ValueError(f"[{section}] {e}") from None


# ---------------------------------------------------------------------------------------------
# One source of settings: command-line flags generated from the settings dataclasses
# ---------------------------------------------------------------------------------------------


def field_help(cls) -> dict[str, str]:
    """Help text per field, read from the ``Attributes:`` sections of ``cls``'s and its bases' docstrings.

    A line ``name: text`` (or ``a / b: text``, ``a, b: text`` for fields described together) starts
    an entry; deeper-indented lines continue it.
    """
    import inspect
    import re

    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = inspect.getdoc(klass) or ""
        if "Attributes:" not in doc or klass.__doc__ is None:
            continue
        body = doc.split("Attributes:", 1)[1].splitlines()
        names, text, indent = [], [], None
        for line in body:
            if not line.strip():
                continue
            m = re.match(r"^(\s*)([a-z_][a-z0-9_]*(?:\s*[/,]\s*[a-z_][a-z0-9_]*)*):\s*(.*)$", line)
            ind = len(line) - len(line.lstrip())
            if m and (indent is None or ind <= indent):
                for n in names:
                    out[n] = " ".join(text)
                indent = ind
                names = [n.strip() for n in re.split(r"[/,]", m.group(2))]
                text = [m.group(3).strip()]
            elif names and ind > (indent or 0):
                text.append(line.strip())
            elif not m and indent is not None and ind <= indent:
                break  # the section ended
        for n in names:
            out[n] = " ".join(text)
    return out


def add_config_args(parser, cls, *, skip: tuple[str, ...] = (), required: tuple[str, ...] = (),
                    overrides: dict[str, dict] | None = None, groups: dict[str, tuple[str, ...]] | None = None) -> None:
    """Adds one flag per field of the settings dataclass ``cls`` to ``parser``.

    Flags are ``--field-name``; types, choices (``Literal``) and defaults come from the dataclass,
    help from its docstring, so settings are declared once. Booleans that default to False are
    switches (``--overwrite``); ``progress`` becomes ``--no-progress``; ``list[str]`` fields repeat
    (``--data a --data b``).

    Args:
        skip: fields that get no flag.
        required: fields whose flag is required.
        overrides: extra or replacing ``add_argument`` keywords per field.
        groups: argument-group title -> fields, to structure ``--help``.
    """
    from dataclasses import MISSING

    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    overrides = overrides or {}
    where = {}
    for title, names in (groups or {}).items():
        g = parser.add_argument_group(title)
        for n in names:
            where[n] = g
    for f in fields(cls):
        if f.name in skip:
            continue
        target = where.get(f.name, parser)
        tp = hints[f.name]
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else None)
        text = helps.get(f.name, "")
        kw: dict = {}
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            if default:  # on unless the flag turns it off: the help says what the flag does
                flag, kw = "--no-" + f.name.replace("_", "-"), {"action": "store_false", "dest": f.name}
                text = f"off: {text}" if text else ""
            else:
                kw = {"action": "store_true"}
        elif typing.get_origin(tp) is list:
            kw = {"action": "append", "default": [], "metavar": f.name.split("_")[0].upper()}
            text += " (repeatable)"
        elif typing.get_origin(tp) is typing.Literal:
            kw = {"choices": list(typing.get_args(tp)), "default": default}
            text += f" (default: {default})"
        else:
            base = tp if tp in (int, float, str) else str
            kw = {"type": base, "default": default}
            if default not in ("", None):
                text += f" (default: {default})"
        if f.name in required:
            kw["required"] = True
            kw.pop("default", None)
        kw.update(overrides.get(f.name, {}))
        text = kw.pop("help", text)
        # argparse expands %-formats in help; the docstrings say "1% of the data"
        target.add_argument(flag, help=text.strip().replace("%", "%%") or None, **kw)


def config_from_args(args, cls) -> dict:
    """The parsed values of the fields of ``cls`` (as :func:`add_config_args` named them)."""
    vals = vars(args)
    return {f.name: vals[f.name] for f in fields(cls) if f.name in vals}


def options_table(cls, skip: tuple[str, ...] = ("data", "out", "model", "checkpoint", "train", "val", "scores",
                                                "overwrite", "progress")) -> str:
    """A Markdown table of a settings dataclass: each setting, its type or choices, its default and its
    help from the docstring; the README's option tables are these (``make docs`` rewrites them, and a
    test fails when they drift)."""
    from dataclasses import MISSING

    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    rows = ["| setting | type | default | meaning |", "|---|---|---|---|"]
    for f in fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else "")
        kind = _describe(hints[f.name]).replace("|", "\\|")
        text = helps.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{f.name}` | {kind} | `{default!r}` | {text} |")
    return "\n".join(rows)


def readme_options(readme: str, tables: dict[str, str]) -> str:
    """``readme`` with each block between ``<!-- options:NAME -->`` and ``<!-- /options:NAME -->``
    replaced by ``tables[NAME]``."""
    import re

    for name, table in tables.items():
        start, end = f"<!-- options:{name} -->", f"<!-- /options:{name} -->"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        if not pattern.search(readme):
            raise ValueError(f"the README has no {start} ... {end} block")
        readme = pattern.sub(lambda _: f"{start}\n{table}\n{end}", readme)
    return readme
