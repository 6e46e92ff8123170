"""Generated bad inputs for the fuzz tier: data files, TOML configs, CLI arguments, corrupted stores.

Each case is a command line (plus the files it needs, written by the generator) and a *needle*: the
file, line or setting that the error message must name. :func:`run_case` runs it in-process through
``iprox.cli.main`` and reports whether it failed as a user would want: a non-zero exit, no traceback,
and the needle in the message. ``tests/test_fuzz.py`` asserts that over every case;
``benchmarks/bench_reliability.py`` counts them for BENCHMARKS.md.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

GOOD = [{"question": f"q{i}: what is {i} + {i}?", "answer": f"{2 * i}"} for i in range(6)]


@dataclass
class Case:
    category: str
    what: str
    argv: list[str]
    needle: str
    out: Path | None = None  # must not exist after the failure (nothing written before the check)


@dataclass
class Outcome:
    case: Case
    code: int
    err: str
    traceback: bool
    named: bool

    @property
    def clean(self) -> bool:
        return self.code != 0 and not self.traceback and self.named and (self.case.out is None or not self.case.out.exists())


def run_case(case: Case) -> Outcome:
    from iprox.cli import main

    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        try:
            code = main(case.argv)
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 2
        except BaseException as e:  # noqa: BLE001  (an escaped exception is what this tier looks for)
            import traceback

            traceback.print_exc(file=err)
            code = -1
            _ = e
    text = err.getvalue()
    return Outcome(case, code, text, "Traceback (most recent call last)" in text, case.needle in text)


# ---------------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------------


def _line_mutations(rng: random.Random) -> list[tuple[str, bytes, bool]]:
    """(what, the bad line's bytes, whether the message names the line)."""
    r = rng.randint(0, 10**6)
    good = json.dumps(GOOD[0])
    return [
        ("truncated JSON", good[: rng.randint(1, len(good) - 2)].encode(), True),
        ("not an object", json.dumps([1, 2, r]).encode(), True),
        ("a number", str(r).encode(), True),
        ("unknown format", json.dumps({"foo": r, "bar": "x"}).encode(), True),
        ("answer not a string", json.dumps({"question": "q", "answer": r}).encode(), True),
        ("question not a string", json.dumps({"question": [r], "answer": "a"}).encode(), True),
        ("empty answer", json.dumps({"question": "q", "answer": " " * rng.randint(0, 3)}).encode(), True),
        ("invisible answer", json.dumps({"question": "q", "answer": "\u200b" * rng.randint(1, 3)}).encode(), True),
        ("bad role", json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}).encode(), True),
        ("last turn is the user's", json.dumps({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}).encode(), True),
        ("turn without content", json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}).encode(), True),
        ("messages not a list", json.dumps({"messages": "hello"}).encode(), True),
        ("empty messages", json.dumps({"messages": []}).encode(), True),
        ("id is a list", json.dumps({"id": [r], "question": "q", "answer": "a"}).encode(), True),
        ("id is an object", json.dumps({"id": {"k": r}, "question": "q", "answer": "a"}).encode(), True),
        ("id is a bool", json.dumps({"id": True, "question": "q", "answer": "a"}).encode(), True),
        ("invalid UTF-8", b'{"question": "q\xff\xfe", "answer": "a"}', True),
        ("lone surrogate", b'{"question": "q\\ud800", "answer": "a"}', True),
        ("prompt-completion with a number", json.dumps({"prompt": r, "completion": "c"}).encode(), True),
        ("alpaca input not a string", json.dumps({"instruction": "i", "input": [r], "output": "o"}).encode(), True),
    ]


def data_cases(root: Path, model_dir: Path, n: int, rng: random.Random) -> list[Case]:
    """JSONL files with one bad line among good ones, and whole-file defects; run through build-proxy."""
    cases: list[Case] = []
    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    i = 0
    while len(cases) < n:
        muts = _line_mutations(rng)
        what, bad, _ = muts[i % len(muts)]
        lines = [json.dumps(dict(r, id=f"r{j}")).encode() for j, r in enumerate(GOOD)]
        pos = rng.randint(0, len(lines))
        lines.insert(pos, bad)
        path = d / f"case{i}.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        out = root / "out" / f"data{i}"
        cases.append(Case("data files", f"{what} at line {pos + 1}", ["build-proxy", "--model", str(model_dir),
                          "--data", str(path), "--out", str(out), "--no-progress"], f"{path}:{pos + 1}", out))
        i += 1
    # Whole-file defects.
    extras = [("empty file", "case-empty.jsonl", b"", None), ("only blank lines", "case-blank.jsonl", b"\n\n  \n", None),
              ("BBH examples not a list", "case-bbh.json", b'{"examples": 5}', None),
              ("JSON scalar", "case-scalar.json", b"42", None), ("gzip file", "case.jsonl.gz", b"\x1f\x8b\x08\x00", None),
              ("malformed JSON file", "case-bad.json", b'[{"question": "q", "answer": "a"},\n{', ":2"),
              ("not UTF-8 JSON", "case-latin.json", b'[{"question": "caf\xe9", "answer": "a"}]', ":1"),
              ("a folder with no data files", "case-folder", None, None)]
    for what, name, content, suffix in extras:
        path = d / name
        if content is None:
            path.mkdir(exist_ok=True)
            (path / "notes.txt").write_text("x")
        else:
            path.write_bytes(content)
        out = root / "out" / name
        cases.append(Case("data files", what, ["build-proxy", "--model", str(model_dir), "--data", str(path),
                                              "--out", str(out), "--no-progress"], f"{path}{suffix or ''}", out))
    cases.append(Case("data files", "empty data path", ["build-proxy", "--model", str(model_dir), "--data", "",
                                                         "--out", str(root / "out" / "e"), "--no-progress"], "data path"))
    cases.append(Case("data files", "missing data path", ["warmup", "--model", str(model_dir), "--data",
                      str(d / "nope.jsonl"), "--out", str(root / "out" / "w"), "--no-progress"],
                      str(d / "nope.jsonl"), root / "out" / "w"))
    return cases


# ---------------------------------------------------------------------------------------------
# TOML configs
# ---------------------------------------------------------------------------------------------

# setting -> (section, bad values, the name the message must carry)
_BAD_SETTINGS = {
    ("proxy", "sparsity"): ['"0.5"', "1.5", "-0.1", "true", "[0.5]"],
    ("proxy", "align_steps"): ['"10"', "1.5", "-1", "true"],
    ("proxy", "lr"): ['"1e-4"', "0", "-1e-4", "false"],
    ("proxy", "probe_tokens"): ['"100"', "0", "2.5"],
    ("proxy", "init"): ['"pca"', "3", '""'],
    ("proxy", "ipsvd_form"): ['"thin"', "1"],
    ("proxy", "factor_dtype"): ['"float16"', "32"],
    ("proxy", "lambda_kl"): ['"0.1"', "-1"],
    ("proxy", "temperature"): ["0", '"2"'],
    ("proxy", "batch_size"): ["0", '"4"', "2.5"],
    ("warmup", "fraction"): ['"0.05"', "0", "1.5", "true"],
    ("warmup", "epochs"): ["1.5", '"2"', "0", "-3"],
    ("warmup", "lr"): ['"2e-5"', "0"],
    ("warmup", "lora_rank"): ["0", '"8"', "2.5"],
    ("warmup", "proxy_trains"): ['"adapters"', "1"],
    ("warmup", "batch_size"): ["0", "1.5"],
    ("features", "proj_dim"): ["16.5", '"64"', "0", "-4"],
    ("features", "train_grad"): ['"momentum"', "3"],
    ("features", "grad"): ['"sgd"', '"adam"'],
    ("features", "engine"): ['"sparse"', "1"],
    ("features", "batch_size"): ["0", '"8"'],
    ("features", "store_dtype"): ['"bfloat16"', "16"],
    ("score", "method"): ['"influence"', "1"],
    ("score", "aggregate"): ['"sum"', "1"],
    ("score", "damping"): ['"0.1"', "0", "-1"],
    ("score", "checkpoint_weights"): ["[1.0]", "[1.0, 0.5, 0.2]", '"a,b"', "[\"x\"]"],
    ("select", "fraction"): ['"0.05"', "1.5", "-0.1"],
    ("select", "top_k"): ["2.5", '"5"', "-1"],
    ("run", "selector"): ['"oracle"', "1"],
    ("run", "dtype"): ['"bf8"', "16"],
    ("run", "seed"): ['"0"', "1.5"],
    ("run", "out"): ["5", "[\"a\"]"],
    ("data", "max_length"): ['"64"', "2.5", "3"],
}


def _config_text(pool: Path, val: Path, model_dir: Path, out: Path, override: tuple[str, str, str] | None) -> str:
    sections = {
        "run": {"out": json.dumps(str(out)), "model": json.dumps(str(model_dir)), "selector": '"proxy"'},
        "data": {"pool": f"[{json.dumps(str(pool))}]", "validation": f"[{json.dumps(str(val))}]", "max_length": "96"},
        "proxy": {"sparsity": "0.5", "probe_examples": "4"},
        "warmup": {"examples": "4", "epochs": "2"},
        "features": {"proj_dim": "4"},
        "score": {"method": '"tracin"'},
        "select": {"top_k": "3"},
    }
    if override:
        sec, key, val_text = override
        sections[sec][key] = val_text
        if sec == "select" and key == "fraction":
            del sections["select"]["top_k"]
    return "".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in kv.items()) for s, kv in sections.items())


def config_cases(root: Path, model_dir: Path, n: int, rng: random.Random) -> list[Case]:
    d = root / "configs"
    d.mkdir(parents=True, exist_ok=True)
    pool = d / "pool.jsonl"
    pool.write_text("".join(json.dumps(dict(r, id=f"p{i}")) + "\n" for i, r in enumerate(GOOD)))
    val = d / "val.jsonl"
    val.write_text("".join(json.dumps(dict(r, id=f"v{i}", task="t")) + "\n" for i, r in enumerate(GOOD[:2])))
    cases = []
    items = [(sec, key, v) for (sec, key), vals in _BAD_SETTINGS.items() for v in vals]
    structural = [
        ("unknown section", "[bogus]\nx = 1\n", "bogus"),
        ("unknown key", None, "sparsity_x"),
        ("section as a value", "proxy = 5\n", "proxy"),
        ("pool not a list", None, "pool"),
        ("sample not a count", None, "sample"),
        ("missing pool file", None, "nope.jsonl"),
        ("syntax error", "[run\nout = 1\n", "line 1"),
        ("duplicate key", None, "at line"),
        ("missing out", None, "out"),
    ]
    i = 0
    while len(cases) < n:
        out = root / "out" / f"cfg{i}"
        path = d / f"case{i}.toml"
        if i % 9 == 0 and i // 9 < len(structural) * 3:
            what, text, needle = structural[(i // 9) % len(structural)]
            base = _config_text(pool, val, model_dir, out, None)
            if what == "pool not a list":
                text = base.replace(f"pool = [{json.dumps(str(pool))}]", f"pool = {json.dumps(str(pool))}")
            elif what == "sample not a count":
                text = base.replace(f"pool = [{json.dumps(str(pool))}]",
                                    f"pool = [{{path = {json.dumps(str(pool))}, sample = {rng.choice(['1.5', '-2', chr(34) + '3' + chr(34)])}}}]")
            elif what == "missing pool file":
                text = base.replace(str(pool), str(d / "nope.jsonl"))
            elif what == "duplicate key":
                text = base.replace("[run]\n", f"[run]\nout = {json.dumps(str(out))}\n", 1)
            elif what == "unknown key":
                text = base.replace("[proxy]\n", "[proxy]\nsparsity_x = 0.5\n")
            elif what == "missing out":
                text = base.replace(f"out = {json.dumps(str(out))}\n", "")
            elif text is not None:
                text = base + text if what != "syntax error" else text
            path.write_text(text)
            cases.append(Case("TOML configs", what, ["run", str(path), "--no-progress"], needle, out))
        else:
            sec, key, v = items[rng.randrange(len(items))]
            path.write_text(_config_text(pool, val, model_dir, out, (sec, key, v)))
            needle = "checkpoint_weights" if key == "checkpoint_weights" else key
            cases.append(Case("TOML configs", f"[{sec}] {key} = {v}", ["run", str(path), "--no-progress"], needle, out))
        i += 1
    return cases


# ---------------------------------------------------------------------------------------------
# CLI arguments
# ---------------------------------------------------------------------------------------------


def cli_cases(root: Path, model_dir: Path, data: Path, n: int, rng: random.Random) -> list[Case]:
    afile = root / "a-file.txt"
    afile.write_text("x")
    out = lambda i: str(root / "out" / f"cli{i}")  # noqa: E731
    templates = [
        (["build-proxy", "--model", str(model_dir), "--data", str(data), "--sparsity", "{v}"], "sparsity", ["abc", "1.5", "-0.2", "nan"]),
        (["build-proxy", "--model", str(model_dir), "--data", str(data), "--init", "{v}"], "--init", ["pca", ""]),
        (["build-proxy", "--model", str(model_dir), "--data", str(data), "--ridge", "{v}"], "ridge", ["0", "-1", "x"]),
        (["build-proxy", "--model", str(model_dir), "--data", str(data), "--align-steps", "{v}"], "align", ["1.5", "x", "-1"]),
        (["build-proxy", "--model", "{v}", "--data", str(data)], "{v}", [str(root / "no-model"), str(afile), "./x/y/z"]),
        (["build-proxy", "--model", str(model_dir), "--data", str(data), "--dtype", "{v}"], "{v}", ["bf8", "int8", "x"]),
        (["warmup", "--model", str(model_dir), "--data", str(data), "--epochs", "{v}"], "epochs", ["0", "1.5", "x"]),
        (["warmup", "--model", str(model_dir), "--data", str(data), "--fraction", "{v}"], "fraction", ["0", "2", "x"]),
        (["warmup", "--model", str(model_dir), "--data", str(data), "--proxy-trains", "{v}"], "--proxy-trains", ["adapters"]),
        (["warmup", "--model", str(model_dir), "--data", str(data), "--max-length", "{v}"], "length", ["3", "x", "-5"]),
        (["features", "--model", str(model_dir), "--data", str(data), "--proj-dim", "{v}"], "proj", ["0", "x", "2.5"]),
        (["features", "--model", str(model_dir), "--data", str(data), "--grad", "{v}"], "--grad", ["momentum"]),
        (["features", "--model", str(model_dir), "--data", str(data), "--grad", "adam"], "grad", [""]),
        (["features", "--model", str(model_dir), "--data", str(data), "--checkpoint", "{v}"], "{v}", [str(root / "no-ckpt"), str(model_dir)]),
        (["features", "--model", str(model_dir), "--data", str(data), "--store-dtype", "{v}"], "--store-dtype", ["bf16"]),
        (["score", "--train", "{v}", "--val", "{v}"], "{v}", [str(root / "no-store"), str(model_dir)]),
        (["score", "--train", str(root / "a"), "--val", str(root / "b"), "--method", "{v}"], "--method", ["influence"]),
        (["score", "--train", str(root / "a"), "--val", str(root / "b"), "--damping", "{v}"], "damping", ["0", "x"]),
        (["score", "--train", str(root / "a"), "--val", str(root / "b"), "--checkpoint-weights", "{v}"], "weights", ["a,b", "1,2,3"]),
        (["select", "--scores", "{v}", "--data", str(data), "--top-k", "2"], "{v}", [str(root / "no-scores")]),
        (["select", "--scores", str(root / "s"), "--data", str(data), "--fraction", "{v}"], "fraction", ["2", "-1", "x"]),
        (["select", "--scores", str(root / "s"), "--data", str(data)], "--fraction", [""]),
        (["run", "{v}"], "{v}", [str(root / "no-config.toml"), str(data)]),
        (["evaluate", "--model", str(model_dir), "--data", "{v}"], "{v}", [str(root / "missing.jsonl")]),
        (["fidelity", "--out", str(root / "f.json")], "--target-scores", [""]),
        (["fidelity", "--proxy", str(model_dir), "--out", str(root / "f.json")], "--data", [""]),
        (["finetune", "--model", str(model_dir), "--data", str(data), "--method", "{v}"], "--method", ["qlora"]),
        (["bogus-command"], "bogus-command", [""]),
    ]
    cases = []
    i = 0
    while len(cases) < n:
        argv_t, needle_t, values = templates[i % len(templates)]
        v = values[rng.randrange(len(values))]
        argv = [a.replace("{v}", v) for a in argv_t]
        if argv[0] in ("build-proxy", "warmup", "features", "finetune") and "--out" not in argv:
            argv += ["--out", out(i)]
        if argv[0] == "score" and "--out" not in argv:
            argv += ["--out", out(i)]
        if argv[0] == "select":
            argv += ["--out", str(root / "out" / f"sel{i}.jsonl")]
        if argv[0] in ("build-proxy", "warmup", "features", "finetune", "evaluate"):
            argv.append("--no-progress")
        cases.append(Case("CLI arguments", " ".join(a if len(a) < 30 else "…" + a[-20:] for a in argv),
                          argv, needle_t.replace("{v}", v)))
        i += 1
    return cases


# ---------------------------------------------------------------------------------------------
# Corrupted stores
# ---------------------------------------------------------------------------------------------


def build_stores(root: Path, model_dir: Path, data: Path) -> tuple[Path, Path]:
    """A real train store of several shards and a validation store, from the tiny model."""
    from iprox.features import FeatureConfig, compute_features

    train, val = root / "store-train", root / "store-val"
    for out, rows in ((train, None), (val, 2)):
        if not (out / "COMPLETE").exists():
            src = data
            if rows:
                src = root / "val-data.jsonl"
                src.write_text("".join(json.dumps(dict(r, id=f"v{i}", task="t")) + "\n" for i, r in enumerate(GOOD[:rows])))
            compute_features(FeatureConfig(model=str(model_dir), data=[str(src)], out=str(out), proj_dim=4,
                                           shard_size=4, max_length=64, store_dtype="float32", progress=False))
    return train, val


def _corruptions(store: Path, rng: random.Random):
    """(what, a function corrupting a copy of the store, the needle)."""
    shards = sorted(p.name for p in store.glob("shard-*.safetensors"))

    def truncate(d: Path):
        s = d / rng.choice(shards)
        b = s.read_bytes()
        s.write_bytes(b[: rng.randint(0, len(b) - 1)])
        return s.name

    def flip(d: Path):
        import struct

        s = d / rng.choice(shards)
        b = bytearray(s.read_bytes())
        n = struct.unpack("<Q", bytes(b[:8]))[0]
        # The header's JSON says what the file holds: damage to a character that means something
        # (not its whitespace padding, which a flip can turn into other whitespace) must not pass unseen.
        pos = [i for i in range(8, 8 + n) if b[i] not in b" \t\n\r"]
        for _ in range(rng.randint(1, 3)):
            b[rng.choice(pos)] ^= rng.randint(1, 255)  # always a different byte
        s.write_bytes(bytes(b))
        return s.name

    def flip_data(d: Path):
        import struct

        s = d / rng.choice(shards)
        b = bytearray(s.read_bytes())
        n = struct.unpack("<Q", bytes(b[:8]))[0]
        b[rng.randrange(8 + n, len(b))] ^= 1 << rng.randrange(8)  # one bit of one value: silent without a checksum
        s.write_bytes(bytes(b))
        return s.name

    def swap(d: Path):
        a, b = rng.sample(shards, 2)
        (d / a).rename(d / "tmp")
        (d / b).rename(d / a)
        (d / "tmp").rename(d / b)
        return a

    def delete(d: Path):
        s = rng.choice(shards)
        (d / s).unlink()
        return s

    def nan(d: Path):
        from safetensors.torch import load_file, save_file

        s = d / rng.choice(shards)
        t = load_file(str(s))["features"]
        from safetensors import safe_open

        with safe_open(str(s), framework="pt") as f:
            meta = f.metadata()
        t[rng.randrange(t.shape[0]), rng.randrange(t.shape[1])] = rng.choice([float("nan"), float("inf")])
        save_file({"features": t}, str(s), metadata=meta)
        return s.name

    def manifest_garbage(d: Path):
        (d / "manifest.json").write_text("{" + "x" * rng.randint(0, 5))
        return "manifest.json"

    def manifest_key(d: Path):
        m = json.loads((d / "manifest.json").read_text())
        del m[rng.choice(["ids", "shards", "dim", "layout"])]
        (d / "manifest.json").write_text(json.dumps(m))
        return "manifest.json"

    def manifest_ids(d: Path):
        m = json.loads((d / "manifest.json").read_text())
        i = rng.randrange(len(m["ids"]))
        m["ids"][i] = m["ids"][i] + "-x"
        (d / "manifest.json").write_text(json.dumps(m))
        return ".safetensors"

    def incomplete(d: Path):
        (d / "COMPLETE").unlink()
        return str(d)

    return [("truncated shard", truncate), ("damaged shard header", flip), ("one flipped bit in the values", flip_data),
            ("swapped shards", swap),
            ("deleted shard", delete), ("NaN or inf feature", nan), ("garbage manifest", manifest_garbage),
            ("manifest lacks a key", manifest_key), ("manifest ids changed", manifest_ids),
            ("no completion marker", incomplete)]


def store_cases(root: Path, train: Path, val: Path, n: int, rng: random.Random) -> list[Case]:
    d = root / "stores"
    d.mkdir(parents=True, exist_ok=True)
    cases = []
    corr = _corruptions(train, rng)
    i = 0
    while len(cases) < n:
        what, fn = corr[i % len(corr)]
        copy = d / f"s{i}"
        shutil.copytree(train, copy)
        fn(copy)
        out = root / "out" / f"score{i}"
        # The message must name the damaged store (the shard or manifest inside it). The scores
        # folder may have been started (the values are read while scoring); a rerun replaces it.
        cases.append(Case("corrupted stores", what, ["score", "--train", str(copy), "--val", str(val), "--out", str(out)],
                          str(copy)))
        i += 1
    return cases


def all_cases(root: Path, model_dir: Path, seed: int, counts: dict[str, int]) -> list[Case]:
    rng = random.Random(seed)
    data = root / "good.jsonl"
    data.write_text("".join(json.dumps(dict(r, id=f"g{i}")) + "\n" for i, r in enumerate(GOOD * 2)))
    train, val = build_stores(root, model_dir, data)
    return (data_cases(root, model_dir, counts["data"], rng) + config_cases(root, model_dir, counts["config"], rng)
            + cli_cases(root, model_dir, data, counts["cli"], rng) + store_cases(root, train, val, counts["store"], rng))
