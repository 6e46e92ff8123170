"""Reading instruction data in its common formats, and tokenising it for response-only loss.

Every record becomes an :class:`Example`: chat ``messages`` plus a stable ``id``, a ``source`` and a
``task`` tag, and the record's original text (so a selection can be written back unchanged).

Formats, detected per record:

===========================  ==========================================================
``messages``                 list of ``{"role", "content"}`` turns (TRL, open-instruct)
``prompt`` + ``completion``  strings, or lists of turns (TRL prompt-completion)
``instruction`` + ``output``  Alpaca, with optional ``input``
``instruction`` + ``response``  Dolly, with optional ``context`` (and ``category`` as task)
``question`` + ``answer``    GSM8K
``{"examples": [...]}``      a BIG-Bench Hard task file (``input`` + ``target``); the file
                             name is the task, the source is ``bbh``
===========================  ==========================================================

Files may be JSONL, JSON (a list of records, or a BBH task object) or Parquet; a folder is read
file by file in sorted order. ``hf:NAME[:CONFIG][:SPLIT]`` loads a hub dataset through the
``datasets`` package when it is installed and a hub is reachable.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

log = logging.getLogger(__name__)

_GENERIC_STEMS = {"train", "test", "dev", "valid", "validation", "val", "data", "eval"}
_SUFFIXES = {".jsonl", ".json", ".parquet"}


class DataError(ValueError):
    """Bad input data; the message names the file and line (or record index)."""


@dataclass
class Example:
    """One instruction example.

    Attributes:
        id: the record's own ``id`` field, else ``"<file>:<line>"``.
        source: dataset tag (record ``source`` field, else the file's name; ``bbh`` for BBH files).
        task: task tag (record ``task``/``category`` field, BBH file name, else the source).
        messages: chat turns ``[{"role": ..., "content": ...}]`` ending with an assistant turn.
        raw: the record exactly as it was in its file (a JSONL line without its newline, or the JSON
            text of a record from a JSON/Parquet file).
        origin: ``"<file>:<line>"`` or ``"<file>#<index>"``, for error messages.
    """

    id: str
    source: str
    task: str
    messages: list[dict[str, str]]
    raw: str = ""
    origin: str = ""
    id_is_default: bool = False  # no id field: the id names the file and line


@dataclass
class TokenizedExample:
    """Token ids and labels of one example (labels are -100 outside assistant turns)."""

    id: str
    source: str
    task: str
    input_ids: list[int]
    labels: list[int]

    @property
    def n_response_tokens(self) -> int:
        return sum(1 for x in self.labels if x != -100)


# ---------------------------------------------------------------------------------------------
# Normalisation of one record
# ---------------------------------------------------------------------------------------------


# Characters that print nothing: a response made of them is empty.
_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff"


def _blank(text: str) -> bool:
    return not text.strip().strip(_INVISIBLE).strip()


def _need_str(rec: dict, key: str, where: str, allow_empty: bool = False) -> str:
    val = rec.get(key)
    if not isinstance(val, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(val).__name__}")
    if not allow_empty and _blank(val):
        raise DataError(f"{where}: field {key!r} is empty")
    return val


def _check_turns(turns: Any, where: str, key: str) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of turns")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("role"), str) or not isinstance(t.get("content"), str):
            raise DataError(f"{where}: {key}[{i}] must be an object with string 'role' and 'content'")
        if t["role"] not in ("system", "user", "assistant"):
            raise DataError(f"{where}: {key}[{i}] has role {t['role']!r}; expected system, user or assistant")
        out.append({"role": t["role"], "content": t["content"]})
    return out


def normalize_record(rec: Any, where: str) -> tuple[list[dict[str, str]], str | None]:
    """Chat messages of one record, and its format's task tag if it has one.

    Raises:
        DataError: unknown format, missing or wrongly typed fields, or an empty response.
    """
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    task = None
    if "messages" in rec:
        msgs = _check_turns(rec["messages"], where, "messages")
    elif "prompt" in rec and "completion" in rec:
        p, c = rec["prompt"], rec["completion"]
        prompt = [{"role": "user", "content": _need_str(rec, "prompt", where)}] if isinstance(p, str) else _check_turns(p, where, "prompt")
        comp = [{"role": "assistant", "content": _need_str(rec, "completion", where)}] if isinstance(c, str) else _check_turns(c, where, "completion")
        msgs = prompt + comp
    elif "instruction" in rec and ("output" in rec or "response" in rec):
        out_key = "output" if "output" in rec else "response"
        ctx_key = "input" if out_key == "output" else "context"
        user = _need_str(rec, "instruction", where)
        ctx = rec.get(ctx_key)
        if ctx is not None and not isinstance(ctx, str):
            raise DataError(f"{where}: field {ctx_key!r} must be a string")
        if ctx and ctx.strip():
            user = f"{user}\n\n{ctx}"
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": _need_str(rec, out_key, where)}]
        if out_key == "response" and isinstance(rec.get("category"), str):
            task = rec["category"]
    elif "question" in rec and "answer" in rec:
        msgs = [{"role": "user", "content": _need_str(rec, "question", where)},
                {"role": "assistant", "content": _need_str(rec, "answer", where)}]
    elif "input" in rec and "target" in rec:
        msgs = [{"role": "user", "content": _need_str(rec, "input", where)},
                {"role": "assistant", "content": _need_str(rec, "target", where)}]
    else:
        raise DataError(
            f"{where}: unknown record format with keys {sorted(rec)[:8]}; expected one of: messages; "
            f"prompt+completion; instruction+output[+input]; instruction+response[+context]; "
            f"question+answer; input+target (BBH)"
        )
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last turn must be the assistant's response")
    if _blank(msgs[-1]["content"]):
        raise DataError(f"{where}: empty response")
    for m in msgs:
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{where}: a {m['role']} turn holds an unpaired surrogate (an invalid \\ud8xx escape); "
                            f"fix the text") from None
    return msgs, task


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _source_name(path: Path) -> str:
    stem = path.stem
    if stem.lower() in _GENERIC_STEMS and path.parent.name:
        return path.parent.name
    return stem


def _make_example(rec: dict, raw: str, origin: str, default_id: str, source: str, task: str | None) -> Example:
    msgs, fmt_task = normalize_record(rec, origin)
    rid = rec.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise DataError(f"{origin}: field 'id' must be a string or a whole number, got {type(rid).__name__}")
    has_id = rid is not None and str(rid).strip() != ""
    ex_id = str(rid) if has_id else default_id
    src = rec["source"] if isinstance(rec.get("source"), str) else source
    tsk = rec["task"] if isinstance(rec.get("task"), str) else (task or fmt_task or src)
    return Example(id=ex_id, source=src, task=tsk, messages=msgs, raw=raw, origin=origin, id_is_default=not has_id)


def _read_jsonl(path: Path) -> list[Example]:
    out = []
    source = _source_name(path)
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                text = line.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM is accepted
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (byte {e.start} of the line)") from None
            text = text.rstrip("\n").rstrip("\r")
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            out.append(_make_example(rec, text, where, f"{path.name}:{lineno}", source, None))
    return out


def _read_json(path: Path) -> list[Example]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict) and "examples" in obj:  # BIG-Bench Hard task file
        if not isinstance(obj["examples"], list):
            raise DataError(f"{path}: 'examples' must be a list")
        task = path.stem
        return [
            _make_example(rec, json.dumps(rec, ensure_ascii=False), f"{path}#{i}", f"{task}:{i}", "bbh", task)
            for i, rec in enumerate(obj["examples"])
        ]
    if isinstance(obj, list):
        source = _source_name(path)
        return [
            _make_example(rec, json.dumps(rec, ensure_ascii=False), f"{path}#{i}", f"{path.name}:{i}", source, None)
            for i, rec in enumerate(obj)
        ]
    raise DataError(f"{path}: a JSON file must hold a list of records or a BBH task object with 'examples'")


def _read_parquet(path: Path) -> list[Example]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    source = _source_name(path)
    return [
        _make_example(rec, json.dumps(rec, ensure_ascii=False, default=str), f"{path}#{i}", f"{path.name}:{i}", source, None)
        for i, rec in enumerate(rows)
    ]


def _read_hub(spec: str) -> list[Example]:
    try:
        import datasets  # noqa: F401  (optional dependency)
    except ImportError:
        raise DataError(f"{spec}: hub datasets need the `datasets` package (pip install datasets)") from None
    parts = spec[len("hf:"):].split(":")
    name, config, split = parts[0], (parts[1] if len(parts) > 2 else None), parts[-1] if len(parts) > 1 else "train"
    ds = datasets.load_dataset(name, config, split=split)
    source = name.split("/")[-1]
    return [
        _make_example(rec, json.dumps(rec, ensure_ascii=False, default=str), f"{spec}#{i}", f"{source}:{i}", source, None)
        for i, rec in enumerate(ds)
    ]


def read_file(path: str | Path) -> list[Example]:
    """Examples of one file (``.jsonl``, ``.json`` or ``.parquet``, in any letter case).

    Raises:
        DataError: unsupported type, malformed content, or a file that holds no record.
    """
    path = Path(path)
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    suffix = path.suffix.lower()
    if suffix not in readers:
        hint = " (decompress it first)" if suffix in (".gz", ".zst", ".bz2", ".xz") else ""
        raise DataError(f"{path}: unsupported file type {path.suffix!r}{hint}; use .jsonl, .json or .parquet")
    try:
        out = readers[suffix](path)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001  (pyarrow's and the OS's errors: name the file)
        raise DataError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    if not out:
        raise DataError(f"{path}: holds no records")
    return out


def _file_of(origin: str) -> str:
    return origin.rsplit("#", 1)[0] if "#" in origin else origin.rsplit(":", 1)[0]


def _qualify_colliding_default_ids(examples: list[Example]) -> list[Example]:
    """Files of the same name in different folders give the same file-and-line ids; those (and only
    those) are renamed to their path relative to the files' common folder (``a/train.jsonl:3``), so
    inputs that never collided keep their ids."""
    import os

    files_of: dict[str, set[str]] = {}
    for e in examples:
        if e.id_is_default:
            files_of.setdefault(e.id, set()).add(_file_of(e.origin))
    clashing = {f for files in files_of.values() if len(files) > 1 for f in files}
    if not clashing:
        return examples
    root = os.path.commonpath([str(Path(f).resolve().parent) for f in clashing])
    for e in examples:
        f = _file_of(e.origin)
        if e.id_is_default and f in clashing:
            rel = Path(os.path.relpath(Path(f).resolve(), root)).as_posix()
            e.id = f"{rel}:{e.id.rsplit(':', 1)[1]}"
    return examples


def load_examples(specs: str | Sequence[str]) -> list[Example]:
    """Reads one or more files, folders or ``hf:`` specs into examples, in the order given.

    Raises:
        DataError: a path does not exist, a file is malformed, or two examples share an id.
    """
    if isinstance(specs, (str, Path)):
        specs = [str(specs)]
    out: list[Example] = []
    for spec in specs:
        spec = str(spec)
        if spec.startswith("hf:"):
            out.extend(_read_hub(spec))
            continue
        if not spec.strip():
            raise DataError("an empty data path; give a file or folder")
        p = Path(spec).expanduser()
        if p.is_dir():
            entries = sorted(p.iterdir())
            files = [f for f in entries if f.is_file() and f.suffix.lower() in _SUFFIXES]
            skipped = [f.name for f in entries if f not in files and not f.name.startswith(".")]
            if skipped:
                log.warning("%s: skipping %d entries that are not .jsonl/.json/.parquet files (subfolders are not "
                            "read): %s", p, len(skipped), ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
            if not files:
                raise DataError(f"{p}: folder holds no .jsonl, .json or .parquet files")
            for f in files:
                out.extend(read_file(f))
        elif p.is_file():
            out.extend(read_file(p))
        else:
            raise DataError(f"{spec}: no such file or folder")
    out = _qualify_colliding_default_ids(out)
    dup = [k for k, v in Counter(e.id for e in out).items() if v > 1]
    if dup:
        where = [e.origin for e in out if e.id == dup[0]][:2]
        raise DataError(f"duplicate example ids (first: {dup[0]!r} at {' and '.join(where)}; {len(dup)} in all); "
                        f"ids must be unique across inputs (give records an 'id' field)")
    counts = Counter(e.source for e in out)
    log.info("read %d examples (%s)", len(out), ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    return out


def find_shared_data() -> Path:
    """The benchmark/demo data folder: ``$IPROX_DATA``, else ``../shared/data`` from here or the repo."""
    import os

    cands = [os.environ.get("IPROX_DATA", ""), "../shared/data",
             str(Path(__file__).resolve().parents[3] / "shared" / "data")]
    for c in cands:
        if c and (Path(c) / "gsm8k").is_dir():
            return Path(c).resolve()
    raise FileNotFoundError("demo data not found: set IPROX_DATA to the folder holding gsm8k/ and bbh/")


# ---------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------


@dataclass
class TokenizeStats:
    """What tokenisation cut or dropped, for the log and the artifacts."""

    total: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    dropped_no_response: int = 0
    dropped_ids: list[str] = field(default_factory=list)


def _assistant_char_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Full chat text and the character spans of assistant turns (content + end-of-turn marker)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not text.startswith(upto) or not upto.startswith(before):
            raise ValueError(
                "the tokenizer's chat template does not render conversations prefix by prefix, so "
                "assistant tokens cannot be located; give the tokenizer a standard template"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def tokenize_example(tokenizer, ex: Example, max_length: int, stats: TokenizeStats | None = None) -> TokenizedExample | None:
    """Tokenises one example with the chat template; labels cover assistant tokens only.

    When the sequence is longer than ``max_length`` the prompt is cut from the left first (the
    response is what the loss sees); only a response longer than the whole budget is cut at its
    end, keeping a quarter of the budget for the prompt.

    Returns:
        The tokenised example, or None when no response token survives (counted in ``stats``).
    """
    text, spans = _assistant_char_spans(tokenizer, ex.messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [-100] * len(ids)
    for j, (a, b) in enumerate(offsets):
        if b > a and any(a < e and b > s for s, e in spans):
            labels[j] = ids[j]
    if stats is not None:
        stats.total += 1
    if len(ids) > max_length:
        first = next((j for j, l in enumerate(labels) if l != -100), len(ids))
        resp_len = len(ids) - first
        keep_prompt = min(first, max(max_length - resp_len, max_length // 4))
        start = first - keep_prompt
        if stats is not None:
            stats.prompt_truncated += int(start > 0)
            stats.response_truncated += int(start + max_length < len(ids))
        ids, labels = ids[start : start + max_length], labels[start : start + max_length]
    if not any(l != -100 for l in labels):
        if stats is not None:
            stats.dropped_no_response += 1
            stats.dropped_ids.append(ex.id)
        return None
    return TokenizedExample(ex.id, ex.source, ex.task, list(ids), labels)


def tokenize_examples(tokenizer, examples: Iterable[Example], max_length: int = 512) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenises many examples, logging what was truncated or dropped."""
    if max_length < 8:
        raise ValueError(f"max_length {max_length} is too small to hold a prompt and a response")
    stats = TokenizeStats()
    out = [t for ex in examples if (t := tokenize_example(tokenizer, ex, max_length, stats)) is not None]
    if stats.prompt_truncated or stats.response_truncated or stats.dropped_no_response:
        log.warning(
            "tokenised %d examples at max_length %d: %d prompts cut, %d responses cut, %d dropped (no response token)",
            stats.total, max_length, stats.prompt_truncated, stats.response_truncated, stats.dropped_no_response,
        )
    return out, stats


def collate(batch: Sequence[TokenizedExample], pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """Right-pads a batch: ``input_ids``, ``attention_mask`` and ``labels`` (B, T) int64, on ``device``
    when given (else the CPU)."""
    T = max(len(b.input_ids) for b in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    labels = torch.full((len(batch), T), -100, dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b.input_ids)
        ids[i, :n] = torch.tensor(b.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(b.labels)
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return out if device is None else {k: v.to(device) for k, v in out.items()}


def batches(items: Sequence[TokenizedExample], batch_size: int, sort_by_length: bool = False) -> list[list[TokenizedExample]]:
    """Splits items into batches; optionally groups similar lengths to cut padding."""
    order = list(range(len(items)))
    if sort_by_length:
        order.sort(key=lambda i: len(items[i].input_ids))
    return [[items[i] for i in order[k : k + batch_size]] for k in range(0, len(order), batch_size)]


def probe_split(n: int, seed: int) -> list[int]:
    """A seeded permutation of ``range(n)``; the probe set is its head (later stages take the next
    slices, so probe and alignment sets never overlap)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g).tolist()
