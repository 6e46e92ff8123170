"""Another target task over the same pool: `iprox run --from` and a changed validation set keep the
proxy, the warm-up and the pool's features, and select what a fresh run selects."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import chat_records, write_jsonl, write_model_folder
from test_scores import _write_config

from iprox import artifacts


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run for task a; a fresh run for task b (validation examples from another file, so the pool is
    the same); the config files of both."""
    from iprox.cli import main

    tmp = tmp_path_factory.mktemp("reuse")
    model_dir = write_model_folder(tmp / "tiny", "llama")
    cfg_a = _write_config(tmp, model_dir)
    write_jsonl(tmp / "valb.jsonl", [dict(r, task="b") for r in chat_records(4, seed=3)])
    cfg_b = tmp / "b.toml"
    cfg_b.write_text(cfg_a.read_text().replace('validation = ["val.jsonl"]', 'validation = ["valb.jsonl"]'))
    assert main(["run", str(cfg_a), "--no-progress"]) == 0
    assert main(["run", str(cfg_b), "--out", str(tmp / "fresh-b"), "--no-progress"]) == 0
    return tmp, cfg_a, cfg_b


def _no_rebuild(monkeypatch):
    import iprox.proxy as proxy_mod
    import iprox.warmup as warmup_mod

    def never(*a, **k):
        raise AssertionError("a stage that reads only the pool was rebuilt")

    monkeypatch.setattr(proxy_mod, "_stage1", never)
    monkeypatch.setattr(warmup_mod, "_save_epoch", never)


def _same_selection(a: Path, b: Path) -> None:
    assert (a / "selection" / "selected.jsonl").read_bytes() == (b / "selection" / "selected.jsonl").read_bytes()
    for f in ("scores/scores.csv", "rerank/scores/scores.csv"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_from_an_earlier_run_reuses_what_reads_only_the_pool(runs, monkeypatch, capsys):
    from iprox.cli import main

    tmp, cfg_a, cfg_b = runs
    _no_rebuild(monkeypatch)
    out = tmp / "b-from-a"
    assert main(["run", str(cfg_b), "--out", str(out), "--from", str(tmp / "run"), "--no-progress"]) == 0
    assert f"started from {(tmp / 'run').resolve()}: its compress, align, warmup, features reused" in capsys.readouterr().out
    _same_selection(out, tmp / "fresh-b")
    meta = json.loads((out / "pipeline.json").read_text())
    assert meta["reused"] == ["compress", "align", "warmup", "features"]  # the pool stage names the validation set
    assert meta["reused_from"] == str((tmp / "run").resolve()) and meta["fingerprint_version"] == 2
    src = tmp / "run"
    # finished files are shared, not recomputed: the proxy, the pool and calibration stores
    for f in ("proxy/model.safetensors", "compressed/model.safetensors", "warmup/checkpoint-1/trainable.safetensors"):
        assert os.path.samefile(src / f, out / f), f
    for store in ("train-1", "train-2", "calib-target-1"):
        shard = next((out / "features" / store).glob("*.safetensors"))
        assert os.path.samefile(shard, src / "features" / store / shard.name)
        assert str(src) not in (out / "features" / store / "stage.json").read_text()  # its records name this run
    # the validation stores are this task's own
    assert not os.path.samefile(next((out / "features" / "val-1").glob("*.safetensors")),
                                next((src / "features" / "val-1").glob("*.safetensors")))
    # a run folder that holds a run already is not started over
    capsys.readouterr()
    assert main(["run", str(cfg_b), "--out", str(out), "--from", str(src), "--no-progress"]) == 2
    assert "holds a run already" in capsys.readouterr().err
    assert main(["run", str(cfg_b), "--out", str(tmp / "x"), "--from", str(tmp / "nowhere"), "--no-progress"]) == 2
    assert "no pipeline.json" in capsys.readouterr().err


def test_other_validation_examples_in_the_same_folder_rescore_only(runs, monkeypatch, capsys):
    from iprox.cli import main

    tmp, cfg_a, cfg_b = runs
    run = tmp / "same-folder"
    artifacts.copy_finished(tmp / "run", run, tmp / "run", run)  # (task a's run, as if made there)
    inode = {f: (run / f).stat().st_ino for f in ("proxy/model.safetensors", "features/train-1/stage.json")}
    _no_rebuild(monkeypatch)
    capsys.readouterr()
    assert main(["run", str(cfg_b), "--out", str(run), "--no-progress"]) == 2
    assert "other validation examples" in capsys.readouterr().err
    assert main(["run", str(cfg_b), "--out", str(run), "--no-progress", "--overwrite"]) == 0
    _same_selection(run, tmp / "fresh-b")
    assert {f: (run / f).stat().st_ino for f in inode} == inode  # kept, not rewritten
    assert "features" in json.loads((run / "pipeline.json").read_text())["timings"]


def test_validation_drawn_from_the_pool_changes_the_pool_and_rebuilds(runs, capsys):
    from iprox.cli import main

    tmp, cfg_a, _ = runs
    # the pool's own records as validation examples: the pool loses them, so nothing downstream matches
    (tmp / "c.toml").write_text(cfg_a.read_text().replace('validation = ["val.jsonl"]',
                                                          'validation = [{path = "pool.jsonl", sample = 4}]'))
    assert main(["run", str(tmp / "c.toml"), "--out", str(tmp / "c"), "--from", str(tmp / "run"), "--no-progress"]) == 0
    meta = json.loads((tmp / "c" / "pipeline.json").read_text())
    assert "reused" not in meta
    assert not os.path.samefile(tmp / "c" / "proxy" / "model.safetensors", tmp / "run" / "proxy" / "model.safetensors")


def test_a_record_of_fingerprint_version_1_is_read_and_brought_up_to_date(runs, monkeypatch):
    import iprox.pipeline as P
    from iprox.lineage import fingerprints
    from iprox.cli import main

    tmp, cfg_a, _ = runs
    run = tmp / "v1"
    artifacts.copy_finished(tmp / "run", run, tmp / "run", run)
    cfg = P.load_config(cfg_a, {"out": str(run), "progress": False})
    rec = json.loads((run / "pipeline.json").read_text())
    rec.pop("fingerprint_version")
    rec["fingerprints"] = fingerprints(cfg, run, version=1)
    assert rec["fingerprints"]["compress"] != fingerprints(cfg, run)["compress"]
    artifacts.atomic_write_json(run / "pipeline.json", rec)
    _no_rebuild(monkeypatch)
    assert main(["run", str(cfg_a), "--out", str(run), "--no-progress"]) == 0  # nothing refused, nothing rebuilt
    rec = json.loads((run / "pipeline.json").read_text())
    assert rec["fingerprint_version"] == 2 and rec["fingerprints"] == fingerprints(cfg, run)
    assert "validation" in rec["fingerprints"]
