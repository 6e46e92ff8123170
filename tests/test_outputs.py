"""Outputs other tools read: peft adapters, a proxy folder plain transformers refuses, chat-format
selections, Parquet scores, the umask's file modes, and the one-run-per-folder lock."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from conftest import write_model_folder
from safetensors.torch import load_file

from iprox.proxy import ProxyConfig, build_proxy, load_proxy
from iprox.warmup import WarmupConfig, run_warmup


def test_lora_checkpoint_is_a_peft_adapter(tmp_path, data_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    ck = run_warmup(WarmupConfig(model=str(model_dir), data=[str(data_file)], out=str(tmp_path / "w"), examples=8,
                                 epochs=1, lr=1e-2, lora_rank=2, lora_alpha=4, max_length=96, progress=False))[-1]
    assert (ck / "adapter_config.json").is_file()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), ck)
    ours = load_file(str(ck / "trainable.safetensors"))
    theirs = {n: p for n, p in peft_model.named_parameters() if ".lora_" in n}
    assert len(theirs) == len(ours) > 0
    for n, t in ours.items():
        torch.testing.assert_close(theirs[n], t)
    assert any(float(t.abs().max()) > 0 for n, t in ours.items() if "lora_B" in n)  # trained, not the zero init


def test_proxy_folder_is_refused_by_plain_from_pretrained(tmp_path, data_file):
    from transformers import AutoModelForCausalLM

    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    out = tmp_path / "proxy"
    build_proxy(ProxyConfig(model=str(model_dir), data=[str(data_file)], out=str(out), probe_examples=4,
                            max_length=96, align_epochs=0.0, progress=False))
    with pytest.raises((ValueError, KeyError), match="iprox_proxy"):
        AutoModelForCausalLM.from_pretrained(out)
    proxy = load_proxy(out)
    assert any(n.endswith(".A.weight") for n, _ in proxy.named_parameters())


def test_select_messages_format(tmp_path):
    from iprox.loading import read_scores
    from iprox.selection import SelectConfig, select

    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"id": "a", "question": "q1", "answer": "a1"}) + "\n"
                    + json.dumps({"id": "b", "instruction": "do", "input": "x", "output": "done"}) + "\n"
                    + json.dumps({"id": "c", "messages": [{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": "yo"}]}) + "\n")
    scores = tmp_path / "scores.csv"
    scores.write_text("id,source,task,score\na,s,t,0.1\nb,s,t,0.9\nc,s,t,0.5\n")
    select(SelectConfig(scores=str(scores), data=[str(pool)], out=str(tmp_path / "sel.jsonl"), top_k=2,
                        format="messages"))
    rows = [json.loads(line) for line in (tmp_path / "sel.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["b", "c"] and all(set(r) == {"id", "messages"} for r in rows)
    assert rows[0]["messages"] == [{"role": "user", "content": "do\n\nx"}, {"role": "assistant", "content": "done"}]
    assert len(read_scores(scores)) == 3


def test_a_run_folder_names_the_scores_its_selection_takes(tmp_path, capsys):
    """`iprox select` and `iprox fidelity` given a run folder read its final scores: the rerank's where
    the run reranks (not the proxy's scores before it), else the scores stage's; an unfinished stage is
    refused, not passed over."""
    from iprox.cli import main
    from iprox.loading import read_scores

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": i, "question": "q", "answer": "a"}) + "\n" for i in "abcd"))
    run = tmp_path / "run"

    def table(folder, order):
        folder.mkdir(parents=True)
        (folder / "scores.csv").write_text("id,source,task,score\n" + "".join(f"{i},s,t,{4 - r}\n" for r, i in enumerate(order)))
        (folder / "COMPLETE").touch()

    table(run / "scores", "abcd")
    (run / "pipeline.json").write_text("{}")
    assert [r["id"] for r in read_scores(run)][:1] == ["a"]  # no rerank: the scores stage's
    (run / "rerank").mkdir()
    with pytest.raises(FileNotFoundError, match="has not finished its rerank stage.*before the rerank"):
        read_scores(run)
    table(run / "rerank" / "scores", "dcba")
    assert main(["select", "--scores", str(run), "--data", str(pool), "--out", str(tmp_path / "sel.jsonl"),
                 "--top-k", "1"]) == 0
    assert json.loads((tmp_path / "sel.jsonl").read_text())["id"] == "d"
    # fidelity reads the run's rerank table, here against its scores stage's (the proxy's order before
    # the rerank, reversed here)
    out = tmp_path / "f.json"
    assert main(["fidelity", "--target-scores", str(run), "--proxy-scores", str(run / "scores"), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["spearman"] == pytest.approx(-1.0)
    # a finished selection says which table it read: here the scores stage's, the rerank's folder left over
    (run / "selection").mkdir()
    (run / "selection" / "stage.json").write_text(json.dumps({"config": {"scores": str(run / "scores" / "scores.csv")}}))
    (run / "selection" / "COMPLETE").touch()
    assert [r["id"] for r in read_scores(run)][:1] == ["a"]
    (run / "selection" / "stage.json").write_text(json.dumps({"config": {"scores": "elsewhere/rerank/scores/scores.csv"}}))
    assert [r["id"] for r in read_scores(run)][:1] == ["d"]
    (run / "selection" / "COMPLETE").unlink()
    (run / "scores" / "COMPLETE").unlink()
    (run / "rerank" / "scores" / "COMPLETE").unlink()
    assert main(["select", "--scores", str(run), "--data", str(pool), "--out", str(tmp_path / "sel.jsonl"),
                 "--top-k", "1"]) == 2
    assert "has not finished its rerank stage" in capsys.readouterr().err


def test_files_get_the_umask_mode_and_scores_have_a_parquet_copy(tmp_path):
    import pyarrow.parquet as pq

    from iprox.pipeline import load_config, run
    from test_scores import _write_config

    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    old = os.umask(0o022)
    try:
        run(load_config(_write_config(tmp_path, model_dir), {"progress": False}))
    finally:
        os.umask(old)
    run_dir = tmp_path / "run"
    files = [p for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"]
    modes = {oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert modes == {"0o644"}, {str(p.relative_to(run_dir)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
                                if stat.S_IMODE(p.stat().st_mode) != 0o644}
    table = pq.read_table(run_dir / "scores" / "scores.parquet").to_pylist()
    csv_rows = (run_dir / "scores" / "scores.csv").read_text().splitlines()[1:]
    assert [r["id"] for r in table] == [line.split(",")[0] for line in csv_rows]
    assert [repr(r["score"]) for r in table] == [line.split(",")[3] for line in csv_rows]


def test_scores_without_pyarrow_keep_the_csv_and_say_so(tmp_path, monkeypatch, caplog):
    import importlib.util

    from iprox.scores import ScoreResult, write_scores_folder

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    col = torch.tensor([0.5, -1.0], dtype=torch.float64)
    res = ScoreResult(ids=["a", "b"], sources=["s", "s"], tasks=["t", "t"], subtasks=["t"], per_subtask=col[:, None],
                      score=col, weights=[1.0])
    out = tmp_path / "scores"
    out.mkdir()
    with caplog.at_level("WARNING"):
        write_scores_folder(out, res, {"method": "tracin"})
    assert (out / "scores.csv").read_text().splitlines()[1].startswith("a,s,t,0.5")
    assert not (out / "scores.parquet").exists() and (out / "COMPLETE").exists()
    assert "pyarrow is not installed" in caplog.text


def test_a_held_folder_lock_refuses_a_second_holder(tmp_path):
    import subprocess
    import sys

    from iprox.artifacts import FolderLock

    with FolderLock(tmp_path / "run"):
        code = ("import sys; sys.path.insert(0, %r)\nfrom iprox.artifacts import FolderLock, LockedError\n"
                "try:\n    FolderLock(%r).__enter__()\nexcept LockedError as e:\n    print(e); sys.exit(3)\n"
                % (str(__import__("iprox").__path__[0].rsplit("/", 1)[0]), str(tmp_path / "run")))
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 3 and f"PID {os.getpid()}" in r.stdout
    with FolderLock(tmp_path / "run"):  # released: taken again
        pass
