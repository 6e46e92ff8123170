"""Scores against brute force from stored features; streaming; aggregation; selection; the pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import chat_records, write_jsonl, write_model_folder
from safetensors.torch import save_file

from iprox import artifacts
from iprox.loading import MANIFEST_FILE, STORE_FORMAT_VERSION, load_features, read_manifest, read_scores, shard_name
from iprox.scores import ScoreConfig, compute_scores, score
from iprox.selection import SelectConfig, rank, select


def fake_store(folder: Path, X: torch.Tensor, ids, tasks, lr=None, shard_size=4, seed=0):
    """A store written by hand, so the scores can be checked against these exact numbers."""
    folder.mkdir(parents=True)
    shards = []
    for i, a in enumerate(range(0, len(ids), shard_size)):
        save_file({"features": X[a:a + shard_size].contiguous()}, str(folder / shard_name(i)),
                  metadata={"ids": json.dumps(ids[a:a + shard_size]), "format_version": str(STORE_FORMAT_VERSION)})
        shards.append({"file": shard_name(i), "start": a, "count": len(ids[a:a + shard_size])})
    man = {"format_version": STORE_FORMAT_VERSION, "model": "m", "checkpoint": "", "epoch": 1, "lr": lr,
           "model_hash": "h", "seed": seed, "proj_dim": 4, "dim": X.shape[1], "layout": [], "ids": ids,
           "sources": ["src"] * len(ids), "tasks": tasks, "n_examples": len(ids), "shards": shards}
    (folder / MANIFEST_FILE).write_text(json.dumps(man))
    artifacts.mark_complete(folder)
    return str(folder)


@pytest.fixture
def stores(tmp_path):
    g = torch.Generator().manual_seed(0)
    n, nv, d = 10, 5, 6
    ids = [f"p{i}" for i in range(n)]
    vids = [f"v{i}" for i in range(nv)]
    vtasks = ["a", "a", "b", "b", "b"]
    out = {"train": [], "val": [], "X": [], "V": [], "lr": [2e-5, 1e-5]}
    for c, lr in enumerate(out["lr"]):
        X, V = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(nv, d, generator=g, dtype=torch.float64)
        out["train"].append(fake_store(tmp_path / f"t{c}", X, ids, ["t"] * n, lr))
        out["val"].append(fake_store(tmp_path / f"v{c}", V, vids, vtasks, lr))
        out["X"].append(X)
        out["V"].append(V)
    out.update(ids=ids, vtasks=vtasks, tmp=tmp_path)
    return out


def brute(stores, method, aggregate, damping=0.1):
    n = len(stores["ids"])
    per = {"a": torch.zeros(n, dtype=torch.float64), "b": torch.zeros(n, dtype=torch.float64)}
    for X, V, lr in zip(stores["X"], stores["V"], stores["lr"]):
        if method == "if":
            F = X.T @ X / n
            H = torch.linalg.inv(F + damping * torch.trace(F) / F.shape[0] * torch.eye(F.shape[0], dtype=F.dtype))
        for s in per:
            js = [j for j, t in enumerate(stores["vtasks"]) if t == s]
            for i in range(n):
                vals = []
                for j in js:
                    if method == "tracin":
                        vals.append(torch.dot(X[i], V[j]) / (X[i].norm() * V[j].norm()))
                    else:
                        vals.append(V[j] @ H @ X[i])
                per[s][i] += lr * sum(vals) / len(vals)
    table = torch.stack([per["a"], per["b"]], dim=1)
    return table, (table.max(1).values if aggregate == "max" else table.mean(1))


@pytest.mark.parametrize("method", ["tracin", "if"])
@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_scores_equal_brute_force(stores, method, aggregate):
    res = compute_scores(ScoreConfig(train=stores["train"], val=stores["val"], out="x", method=method,
                                     aggregate=aggregate))
    table, agg = brute(stores, method, aggregate)
    assert res.subtasks == ["a", "b"] and res.weights == stores["lr"]
    torch.testing.assert_close(res.per_subtask, table, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res.score, agg, rtol=1e-9, atol=1e-12)


def test_chunked_streaming_equals_in_memory(stores):
    a = compute_scores(ScoreConfig(train=stores["train"], val=stores["val"], out="x", chunk_rows=3, method="if"))
    b = compute_scores(ScoreConfig(train=stores["train"], val=stores["val"], out="x", chunk_rows=10_000, method="if"))
    torch.testing.assert_close(a.per_subtask, b.per_subtask, rtol=1e-12, atol=1e-14)


def test_explicit_checkpoint_weights_and_aggregation(stores):
    w = compute_scores(ScoreConfig(train=stores["train"], val=stores["val"], out="x", checkpoint_weights="1,0"))
    only_first = compute_scores(ScoreConfig(train=stores["train"][:1], val=stores["val"][:1], out="x",
                                            checkpoint_weights="1"))
    torch.testing.assert_close(w.per_subtask, only_first.per_subtask)
    # max is the larger subtask column, mean their average: they differ on this data.
    mx = compute_scores(ScoreConfig(train=stores["train"], val=stores["val"], out="x", aggregate="max"))
    mn = compute_scores(ScoreConfig(train=stores["train"], val=stores["val"], out="x", aggregate="mean"))
    assert torch.equal(mx.score, mx.per_subtask.max(1).values)
    assert not torch.allclose(mx.score, mn.score)
    with pytest.raises(ValueError, match="2 checkpoints"):
        ScoreConfig(train=stores["train"], val=stores["val"], out="x", checkpoint_weights="1")


def test_incomparable_stores_are_refused(stores, tmp_path):
    other = fake_store(tmp_path / "o", stores["V"][0], [f"v{i}" for i in range(5)], stores["vtasks"], seed=9)
    with pytest.raises(ValueError, match="seed differ"):
        compute_scores(ScoreConfig(train=stores["train"][:1], val=[other], out="x"))


def test_scores_table_and_rerun(stores):
    out = stores["tmp"] / "scores"
    path = score(ScoreConfig(train=stores["train"], val=stores["val"], out=str(out)))
    rows = read_scores(path)
    assert [r["id"] for r in rows] == stores["ids"]
    assert set(rows[0]) == {"id", "source", "task", "score", "a", "b"}
    _, agg = brute(stores, "tracin", "max")
    assert [r["score"] for r in rows] == pytest.approx(agg.tolist(), rel=1e-12)
    assert score(ScoreConfig(train=stores["train"], val=stores["val"], out=str(out))) == path
    with pytest.raises(artifacts.ConfigMismatchError):
        score(ScoreConfig(train=stores["train"], val=stores["val"], out=str(out), method="if"))


def test_select_preserves_records_byte_for_byte(tmp_path):
    lines = ['{"question": "q0", "answer":  "a0"}', '{"id": "x1", "question": "q\\u00e91", "answer": "a1", "extra": [1, 2]}',
             '{"answer": "a2",   "question": "q2"}', '{"question": "q3", "answer": "a3"}']
    pool = tmp_path / "pool.jsonl"
    pool.write_bytes(("\n".join(lines) + "\n").encode())
    ids = ["pool.jsonl:1", "x1", "pool.jsonl:3", "pool.jsonl:4"]
    scores = tmp_path / "scores.csv"
    # x1 and pool.jsonl:3 tie: the smaller id ("pool.jsonl:3") ranks first.
    scores.write_text("id,source,task,score\n" + "".join(f"{i},pool,pool,{s}\n" for i, s in zip(ids, [0.1, 0.5, 0.5, -1])))
    man = select(SelectConfig(scores=str(scores), data=[str(pool)], out=str(tmp_path / "sel.jsonl"), top_k=3))
    assert (tmp_path / "sel.jsonl").read_bytes() == (lines[2] + "\n" + lines[1] + "\n" + lines[0] + "\n").encode()
    assert man["selected"] == 3 and man["by_source"] == {"pool": 3} and man["score_min"] == 0.1
    assert json.loads((tmp_path / "sel.json").read_text())["top"][0]["id"] == "pool.jsonl:3"
    man = select(SelectConfig(scores=str(scores), data=[str(pool)], out=str(tmp_path / "f.jsonl"), fraction=0.5))
    assert man["selected"] == 2
    scores.write_text("id,score\nnope,1\n")
    with pytest.raises(ValueError, match="not in"):
        select(SelectConfig(scores=str(scores), data=[str(pool)], out=str(tmp_path / "g.jsonl"), top_k=1))
    with pytest.raises(ValueError, match="exactly one"):
        SelectConfig(scores="s", data=["d"], out="o", top_k=1, fraction=0.5)


def test_rank_is_deterministic():
    rows = [{"id": "b", "score": 1.0}, {"id": "a", "score": 1.0}, {"id": "c", "score": 2.0}]
    assert [r["id"] for r in rank(rows)] == ["c", "a", "b"]
    assert [r["id"] for r in rank(list(reversed(rows)))] == ["c", "a", "b"]


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


def _write_config(tmp_path: Path, model_dir: Path, **over) -> Path:
    write_jsonl(tmp_path / "pool.jsonl", chat_records(30, seed=1))
    write_jsonl(tmp_path / "val.jsonl", [dict(r, task="target") for r in chat_records(4, seed=2)])
    proxy = over.get("proxy", 'sparsity = 0.5\nprobe_examples = 4\nalign_examples = 4\nalign_steps = 2\nbatch_size = 4\nlr = 1e-3')
    text = f"""
[run]
out = "{tmp_path / 'run'}"
model = "{model_dir}"
selector = "{over.get('selector', 'proxy')}"
{over.get('run_extra', '')}
[data]
pool = [{{path = "pool.jsonl", sample = 24}}]
validation = ["val.jsonl"]
max_length = 96
[proxy]
{proxy}
[warmup]
examples = 6
epochs = 2
lr = 1e-3
lora_rank = 2
[features]
proj_dim = 4
batch_size = 4
shard_size = 8
[score]
method = "tracin"
[select]
top_k = 5
"""
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_pipeline_runs_skips_refuses_and_resumes(tmp_path, monkeypatch, capsys):
    import iprox.pipeline as P
    from iprox.cli import main

    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    cfg = _write_config(tmp_path, model_dir)
    real_features = P.compute_features
    calls = []

    def dies_on_val(fc, session=None):
        calls.append(Path(fc.out).name)
        if Path(fc.out).name == "val-2":
            raise KeyboardInterrupt
        return real_features(fc, session)

    monkeypatch.setattr(P, "compute_features", dies_on_val)
    assert main(["run", str(cfg), "--no-progress"]) == 130  # an interrupt is one line and exit 130, not a traceback
    run = tmp_path / "run"
    assert all(artifacts.is_complete(run / d) for d in ("pool", "compressed", "proxy", "warmup", "features/train-1",
                                                         "features/val-1", "features/train-2", "features/val-target-1",
                                                         "features/val-target-2"))
    assert not (run / "scores").exists()
    # Resume: the earlier stages are not rebuilt; features resume at val-2.
    import iprox.proxy as proxy_mod
    import iprox.warmup as warmup_mod

    def never(*a, **k):
        raise AssertionError("a finished stage was rebuilt")

    monkeypatch.setattr(proxy_mod, "_stage1", never)
    monkeypatch.setattr(warmup_mod, "_save_epoch", never)
    # a version with another default calibration size resumes it: the run keeps the 2 examples it
    # began with (its calibration stores), not a new subset beside stores of the old one
    import iprox.calibration as calibration_mod
    monkeypatch.setattr(calibration_mod, "DEFAULT_SIZE", 1)
    skipped = []

    def record(fc, session=None):
        summary = real_features(fc, session)
        skipped.append((Path(fc.out).name, summary.skipped))
        return summary

    monkeypatch.setattr(P, "compute_features", record)
    assert main(["run", str(cfg), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "selected 5 of 24" in out and "selected records:" in out
    # (the target's validation and calibration stores first, while it is resident from its warm-up;
    # val_model = "both", calibrate = auto: 2 of the 24 pool examples)
    # (then the rerank: the target's stores of the proxy's shortlist, and of what a second round adds
    # where the shortlist grows: whether this tiny proxy's order grows it differed between the full suite
    # and the test run alone)
    assert skipped[:10] == [("val-target-1", True), ("val-target-2", True), ("calib-target-1", True),
                            ("calib-target-2", True), ("train-1", True), ("val-1", True), ("train-2", True),
                            ("val-2", False), ("target-1", False), ("target-2", False)]
    assert skipped[10:] in ([], [("target-1-2", False), ("target-2-2", False)])
    assert len((run / "features" / "calibration.jsonl").read_text().splitlines()) == 2
    sel = (run / "selection" / "selected.jsonl").read_text().splitlines()
    originals = set((tmp_path / "pool.jsonl").read_text().splitlines())
    assert len(sel) == 5 and all(line in originals for line in sel)  # original records, unchanged
    ids, X = load_features(run / "features" / "train-1")
    assert len(ids) == 24 and not set(ids) & {f"val.jsonl:{i}" for i in range(1, 5)}
    meta = json.loads((run / "pipeline.json").read_text())
    assert set(meta["timings"]) == {"pool", "compress", "align", "warmup", "features", "score", "rerank", "select"}
    # Settings that change only how a stage runs are no change: everything is skipped.
    cfg.write_text(cfg.read_text().replace("lr = 1e-3\n[warmup]", "lr = 1e-3\ngradient_checkpointing = true\n"
                                           "offload_optimizer = true\ncheckpoint_every = 3\n[warmup]"))
    skipped.clear()
    assert main(["run", str(cfg), "--no-progress"]) == 0
    assert "gradient_checkpointing = true" in cfg.read_text()
    assert skipped == [("val-target-1", True), ("val-target-2", True), ("calib-target-1", True), ("calib-target-2", True),
                       ("train-1", True), ("val-1", True), ("train-2", True), ("val-2", True)]
    # A changed setting is refused, then rebuilt from that stage on with --overwrite.
    text = cfg.read_text().replace("method = \"tracin\"", "method = \"tracin\"\naggregate = \"mean\"")
    cfg.write_text(text)
    assert main(["run", str(cfg), "--no-progress"]) == 2
    assert "from stage 'score' on" in capsys.readouterr().err
    assert main(["run", str(cfg), "--no-progress", "--overwrite"]) == 0
    assert json.loads((run / "scores" / "scores.json").read_text())["aggregate"] == "mean"
    # A run whose stores another store format wrote (another projection) is refused at the features.
    import iprox.lineage as lineage

    monkeypatch.setattr(lineage, "STORE_FORMAT_VERSION", lineage.STORE_FORMAT_VERSION + 1)
    assert main(["run", str(cfg), "--no-progress"]) == 2
    assert "from stage 'features' on" in capsys.readouterr().err


def test_pipeline_with_the_model_itself_as_selector(tmp_path):
    from iprox.pipeline import load_config, run

    model_dir = write_model_folder(tmp_path / "tiny", "gpt2")
    res = run(load_config(_write_config(tmp_path, model_dir, selector="model"), {"progress": False}))
    assert res.selection["selected"] == 5 and not (tmp_path / "run" / "proxy").exists()


def test_pipeline_target_first_order(tmp_path):
    """warmup_on = "target": the target's LoRA warm-up, carried by the proxy for every store; each
    model loaded from disk once."""
    from iprox.loading import LOADS, model_key
    from iprox.pipeline import load_config, run

    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    before = LOADS[model_key(str(model_dir))]
    res = run(load_config(_write_config(tmp_path, model_dir, run_extra='warmup_on = "target"'), {"progress": False}))
    assert res.selection["selected"] == 5
    info = json.loads((tmp_path / "run" / "warmup" / "checkpoint-2" / "checkpoint.json").read_text())
    assert info["lora"] and info["model"] == str(model_dir.resolve())
    for store in ("train-1", "val-1", "train-2", "val-2"):
        man = json.loads((tmp_path / "run" / "features" / store / "manifest.json").read_text())
        assert man["trains"] == "target lora, carried" and man["model"] == str(tmp_path / "run" / "proxy")
    assert LOADS[model_key(str(model_dir))] - before == 1
    # the order is part of the warm-up's fingerprint: the other order is refused on this folder
    with pytest.raises(ValueError, match="from stage 'warmup' on"):
        run(load_config(_write_config(tmp_path, model_dir, run_extra='warmup_on = "proxy"'), {"progress": False}))
    # and it is the default
    assert load_config(_write_config(tmp_path, model_dir)).warmup_on == "target"


def test_pipeline_aligns_in_the_lora_space_of_its_own_warmup(tmp_path):
    """[proxy] align_space = "lora": the target warms up before the proxy is built, the alignment runs
    in its last checkpoint's adapters, and the features carry that same checkpoint. A changed warm-up
    is a changed alignment; the proxy-first order is refused."""
    from iprox.pipeline import load_config, run, stages

    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    proxy = 'sparsity = 0.5\nprobe_examples = 4\nalign_examples = 4\nalign_steps = 2\nbatch_size = 4\nlr = 1e-3\n' \
            'align_space = "lora"'
    cfg = load_config(_write_config(tmp_path, model_dir, proxy=proxy), {"progress": False})
    assert [st.name for st in stages(cfg)] == ["pool", "warmup", "compress", "align", "features", "score", "rerank",
                                             "select"]
    res = run(cfg)
    assert res.selection["selected"] == 5
    run_dir = tmp_path / "run"
    s2 = json.loads((run_dir / "proxy" / "proxy.json").read_text())["stage2"]
    ck = run_dir / "warmup" / "checkpoint-2"
    assert s2["space"] == "lora" and s2["checkpoint"] == str(ck.resolve())
    assert s2["checkpoint_uid"] == json.loads((ck / "checkpoint.json").read_text())["uid"]
    man = json.loads((run_dir / "features" / "train-2" / "manifest.json").read_text())
    assert man["trains"] == "target lora, carried" and man["model"] == str(run_dir / "proxy")
    # the warm-up's settings are the alignment's: a change to them is refused from the align stage on
    text = (tmp_path / "run.toml").read_text()
    (tmp_path / "run.toml").write_text(text.replace("lr = 1e-3\nlora_rank", "lr = 2e-3\nlora_rank"))
    with pytest.raises(ValueError, match="from stage 'align' on"):
        run(load_config(tmp_path / "run.toml", {"progress": False}))
    with pytest.raises(ValueError, match='align_space = "lora" aligns in the adapters of the target'):
        load_config(_write_config(tmp_path, model_dir, proxy=proxy, run_extra='warmup_on = "proxy"'))


def test_pipeline_scores_with_the_targets_validation_gradients(tmp_path):
    """[features] val_model: the target's validation gradients (it carries the same LoRA checkpoint)
    beside the proxy's pool features; ``both`` adds the two scores. The scores equal brute force from
    the stores; the target is loaded from disk once; the choice enters the features' fingerprint."""
    from iprox.loading import LOADS, model_key
    from iprox.pipeline import load_config, run

    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    before = LOADS[model_key(str(model_dir))]
    cfg = _write_config(tmp_path, model_dir)
    # (calibration off: these scores are the uncorrected features' brute force)
    cfg.write_text(cfg.read_text().replace("[features]\n", '[features]\nval_model = "both"\ncalibrate = 0\n'))
    run(load_config(cfg, {"progress": False}))
    assert LOADS[model_key(str(model_dir))] - before == 1
    r = tmp_path / "run"
    feats = {p.name: load_features(p) for p in (r / "features").iterdir()}
    assert set(feats) == {"train-1", "val-1", "val-target-1", "train-2", "val-2", "val-target-2"}
    for e in ("1", "2"):
        man = json.loads((r / "features" / f"val-target-{e}" / "manifest.json").read_text())
        assert man["trains"] == "lora" and man["model"] == str(model_dir.resolve()) and man["grad"] == "sgd"
        # the target's and the proxy's gradients of the same examples differ (the proxy is compressed)
        assert not torch.allclose(feats[f"val-{e}"][1], feats[f"val-target-{e}"][1])

    def brute(vals: tuple[str, ...]) -> torch.Tensor:
        total = 0.0
        for e in ("1", "2"):
            lr = json.loads((r / "features" / f"train-{e}" / "manifest.json").read_text())["lr"]
            X = feats[f"train-{e}"][1].double()
            X = X / X.norm(dim=1, keepdim=True)
            for v in vals:
                V = feats[f"{v}-{e}"][1].double()
                total = total + lr * (X @ (V / V.norm(dim=1, keepdim=True)).mean(0))
        return total

    got = torch.tensor([float(row["score"]) for row in read_scores(r / "scores" / "scores.csv")], dtype=torch.float64)
    torch.testing.assert_close(got, brute(("val", "val-target")), rtol=1e-6, atol=1e-9)
    # the target alone: another features stage, refused on this folder without --overwrite
    cfg.write_text(cfg.read_text().replace('val_model = "both"', 'val_model = "target"'))
    with pytest.raises(ValueError, match="from stage 'features' on"):
        run(load_config(cfg, {"progress": False}))
    run(load_config(cfg, {"progress": False}), overwrite=True)
    feats = {p.name: load_features(p) for p in (r / "features").iterdir()}
    assert set(feats) == {"train-1", "val-target-1", "train-2", "val-target-2"}
    got = torch.tensor([float(row["score"]) for row in read_scores(r / "scores" / "scores.csv")], dtype=torch.float64)
    torch.testing.assert_close(got, brute(("val-target",)), rtol=1e-6, atol=1e-9)
    # it needs the target-first order, and names its choices
    cfg.write_text(cfg.read_text().replace("[run]\n", '[run]\nwarmup_on = "proxy"\n'))
    with pytest.raises(ValueError, match='needs selector = "proxy" and warmup_on = "target"'):
        load_config(cfg)
    cfg.write_text(cfg.read_text().replace('warmup_on = "proxy"\n', "").replace('val_model = "target"', 'val_model = "x"'))
    with pytest.raises(ValueError, match="val_model must be one of"):
        load_config(cfg)


def test_pipeline_aligns_in_a_stage_of_its_own(tmp_path, monkeypatch):
    """compress → align: the aligned proxy equals build_proxy's one-folder result; a changed alignment
    setting reruns only the align stage, from the compressed proxy left as it was; a proxy without
    factors passes through align unchanged."""
    import iprox.proxy as proxy_mod
    from iprox.loading import load_proxy
    from iprox.pipeline import load_config, run
    from iprox.proxy import ProxyConfig, build_proxy

    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    cfg = _write_config(tmp_path, model_dir)
    run(load_config(cfg, {"progress": False}))
    r = tmp_path / "run"
    meta = json.loads((r / "pipeline.json").read_text())
    assert {"compress", "align"} <= set(meta["timings"])
    assert json.loads((r / "compressed" / "proxy.json").read_text())["stage2"] is None
    assert json.loads((r / "proxy" / "proxy.json").read_text())["stage2"]["steps"] == 2
    one = build_proxy(ProxyConfig(model=str(model_dir), data=[str(r / "pool" / "pool.jsonl")], out=str(tmp_path / "one"),
                                  sparsity=0.5, probe_examples=4, align_examples=4, align_steps=2, batch_size=4, lr=1e-3,
                                  max_length=96, progress=False))
    assert one.stage2["steps"] == 2
    a, b = load_proxy(r / "proxy").state_dict(), load_proxy(tmp_path / "one").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    compressed = (r / "compressed" / "model.safetensors").read_bytes()

    def never(*a, **k):
        raise AssertionError("stage 1 was rebuilt for a change of the alignment's settings")

    monkeypatch.setattr(proxy_mod, "_stage1", never)
    cfg.write_text(cfg.read_text().replace("lr = 1e-3\n[warmup]", "lr = 1e-3\nlambda_kl = 0.7\n[warmup]"))
    with pytest.raises(ValueError, match="from stage 'align' on"):
        run(load_config(cfg, {"progress": False}))
    run(load_config(cfg, {"progress": False}), overwrite=True)
    assert json.loads((r / "proxy" / "proxy.json").read_text())["stage2"]["lambda_kl"] == 0.7
    assert (r / "compressed" / "model.safetensors").read_bytes() == compressed
    # a run folder of iprox < 0.5 (one proxy stage) is refused with the reason, then rebuilt on --overwrite
    meta = json.loads((r / "pipeline.json").read_text())
    fps = meta["fingerprints"]
    meta["fingerprints"] = {"proxy": fps.pop("compress"), **{k: v for k, v in fps.items() if k != "align"}}
    (r / "pipeline.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="before 0.5"):
        run(load_config(cfg, {"progress": False}))
    # layer-drop: nothing to align, the proxy is the compressed one; in either order (target-first: its
    # kept blocks carry the target's warm-up, and the run calibrates and reranks as for any proxy)
    monkeypatch.undo()
    proxy = 'sparsity = 0.5\ninit = "layer-drop"\nprobe_examples = 4\nalign_epochs = 0.0\nbatch_size = 4'
    for order in ("target", "proxy"):
        (tmp_path / f"drop-{order}").mkdir()
        drop = _write_config(tmp_path / f"drop-{order}", model_dir, proxy=proxy, run_extra=f'warmup_on = "{order}"')
        run(load_config(drop, {"progress": False}))
        d = tmp_path / f"drop-{order}" / "run"
        assert (d / "proxy" / "model.safetensors").read_bytes() == (d / "compressed" / "model.safetensors").read_bytes()
        assert artifacts.is_complete(d / "proxy") and json.loads((d / "proxy" / "proxy.json").read_text())["stage2"] is None
        assert artifacts.is_complete(d / "selection")
        trains = read_manifest(d / "features" / "train-1")["trains"]
        assert (trains == "target lora, carried") == (order == "target"), trains


def test_bad_config_names_the_problem(tmp_path):
    from iprox.pipeline import load_config

    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    cfg = _write_config(tmp_path, model_dir, proxy="sparsity = 0.5\nbogus = 1")
    with pytest.raises(ValueError, match=r"\[proxy\] has unknown settings \['bogus'\]"):
        load_config(cfg)


def test_agreement_measures_against_hand_values():
    from iprox.agreement import kendall, overlap_at, spearman

    a = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert spearman(a, a) == pytest.approx(1.0) and kendall(a, a) == pytest.approx(1.0)
    assert spearman(a, a[::-1]) == pytest.approx(-1.0) and kendall(a, a[::-1]) == pytest.approx(-1.0)
    b = [1.0, 3.0, 2.0, 4.0, 5.0]  # one swapped pair: 9 concordant, 1 discordant of 10
    assert kendall(a, b) == pytest.approx(0.8)
    assert spearman(a, b) == pytest.approx(1 - 6 * 2 / (5 * 24))
    ov = overlap_at([5, 4, 3, 2, 1, 0, 0, 0, 0, 0], [5, 0, 4, 0, 0, 0, 0, 0, 0, 3], 30)
    assert ov == {"k": 3, "overlap": pytest.approx(2 / 3), "jaccard": pytest.approx(2 / 4)}


def test_task_share_and_head_spearman_by_hand():
    from iprox.agreement import head_spearman, task_share

    scores = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    tasks = ["a", "b", "a", "a", "b", "b", "b", "b", "b", "b"]
    assert task_share(scores, tasks, "a", percent=30) == pytest.approx(2 / 3)  # top 3: a, b, a
    assert task_share(scores, tasks, "b", percent=10) == 0.0  # top 1: a
    # Over the reference's top 20% (2 examples) the other ranks them reversed: -1; over the whole
    # pool it agrees on everything else.
    other = [8, 9, 7, 6, 5, 4, 3, 2, 1, 0]
    assert head_spearman(scores, other) == pytest.approx(-1.0)


def test_top_k_without_a_full_sort_equals_the_sorted_head():
    import random

    from iprox.selection import rank

    rng = random.Random(0)
    rows = [{"id": f"x{i:04d}", "score": float(rng.randint(0, 50))} for i in range(2000)]  # many ties
    for k in (1, 7, 100, 2000):
        assert rank(rows, k) == rank(rows)[:k]
