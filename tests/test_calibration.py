"""Calibration: the proxy's pool features corrected by the target's on a few pool examples."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import write_model_folder
from test_scores import _write_config, fake_store

from iprox.agreement import spearman
from iprox.calibration import calibration_size, calibration_subset, fit_correction
from iprox.loading import CARRIED, MANIFEST_FILE, load_features, read_scores
from iprox.scores import ScoreConfig, compute_scores


def unit(X: torch.Tensor) -> torch.Tensor:
    return X / X.norm(dim=1, keepdim=True)


def primal(P: torch.Tensor, T: torch.Tensor, X: torch.Tensor, lam: float) -> torch.Tensor:
    """The correction in its primal form: ridge regression of the error ``T − P`` on the proxy's
    features, ``W = (PᵀP + λI)⁻¹ Pᵀ (T − P)`` (dim × dim), applied as ``x + x W`` (an independent
    derivation of the kernel form the library uses)."""
    P, T, X = unit(P), unit(T), unit(X)
    W = torch.linalg.solve(P.T @ P + lam * torch.eye(P.shape[1], dtype=P.dtype), P.T @ (T - P))
    return unit(X + X @ W)


def _stores(tmp_path, n=20, c=5, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    Xp = torch.randn(n, d, generator=g, dtype=torch.float64)
    calib = [1, 4, 9, 13, 18][:c] if c <= 5 else list(range(1, n, n // c))[:c]
    Tc = Xp[calib] + 0.7 * torch.randn(c, d, generator=g, dtype=torch.float64)
    ids = [f"p{i}" for i in range(n)]
    pool = fake_store(tmp_path / "pool", Xp, ids, ["t"] * n, lr=1e-5)
    cal = fake_store(tmp_path / "calib", Tc, [ids[i] for i in calib], ["t"] * c, lr=1e-5)
    return pool, cal, Xp, Tc, calib, ids


def test_correction_equals_the_primal_ridge_and_keeps_the_targets_rows(tmp_path):
    pool, cal, Xp, Tc, calib, ids = _stores(tmp_path)
    corr = fit_correction(pool, cal, ridge=0.05)
    got = corr.apply(ids, unit(Xp))
    want = primal(Xp[calib], Tc, Xp, 0.05)
    rest = [i for i in range(len(ids)) if i not in calib]
    torch.testing.assert_close(got[rest], want[rest], rtol=1e-9, atol=1e-12)
    # a calibration example's own row is the target's
    torch.testing.assert_close(got[calib], unit(Tc), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(got[rest], unit(Xp)[rest])  # it did correct something


def test_scores_with_calibration_equal_brute_force(tmp_path):
    pool, cal, Xp, Tc, calib, ids = _stores(tmp_path)
    g = torch.Generator().manual_seed(1)
    V = torch.randn(4, Xp.shape[1], generator=g, dtype=torch.float64)
    val = fake_store(tmp_path / "val", V, [f"v{i}" for i in range(4)], ["a", "a", "b", "b"], lr=1e-5)
    res = compute_scores(ScoreConfig(train=[pool], val=[val], out=str(tmp_path / "s"), calibration=[cal],
                                     calibration_ridge=0.1))
    X = primal(Xp[calib], Tc, Xp, 0.1)
    X[calib] = unit(Tc)
    U = unit(V)
    want = torch.stack([X @ U[:2].mean(0), X @ U[2:].mean(0)], dim=1) * 1e-5
    torch.testing.assert_close(res.per_subtask, want, rtol=1e-9, atol=1e-14)
    # a store paired twice ("both") with its calibration store scores as the sum of two pairs
    res2 = compute_scores(ScoreConfig(train=[pool, pool], val=[val, val], out=str(tmp_path / "s2"),
                                      calibration=[cal, cal], calibration_ridge=0.1))
    torch.testing.assert_close(res2.per_subtask, 2 * want, rtol=1e-9, atol=1e-14)


def test_a_proxy_without_error_is_left_as_it_is(tmp_path):
    g = torch.Generator().manual_seed(2)
    X = torch.randn(12, 8, generator=g, dtype=torch.float64)
    ids = [f"p{i}" for i in range(12)]
    pool = fake_store(tmp_path / "pool", X, ids, ["t"] * 12)
    cal = fake_store(tmp_path / "calib", 3.0 * X[[0, 5, 7]], [ids[i] for i in (0, 5, 7)], ["t"] * 3)  # same directions
    corr = fit_correction(pool, cal)
    torch.testing.assert_close(corr.apply(ids, unit(X)), unit(X), rtol=1e-12, atol=1e-14)


def test_a_shared_error_is_removed():
    """Proxy features = the target's + an error along one direction shared by every example + a
    little noise: corrected from 8 calibration examples, the other examples' features point closer
    to the target's and their scores rank closer to the target's."""
    import tempfile
    from pathlib import Path

    g = torch.Generator().manual_seed(3)
    n, d, c = 80, 256, 8
    T = torch.randn(n, d, generator=g, dtype=torch.float64)
    e = unit(torch.randn(1, d, generator=g, dtype=torch.float64))[0]
    amp = 20.0 * (1 + torch.rand(n, 1, generator=g, dtype=torch.float64))
    P = T + amp * e + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    v = unit(torch.randn(1, d, generator=g, dtype=torch.float64))[0] + 0.5 * e  # the task shares the direction
    ids = [f"p{i}" for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        pool = fake_store(Path(tmp) / "pool", P, ids, ["t"] * n)
        cal = fake_store(Path(tmp) / "cal", T[:c], ids[:c], ["t"] * c)
        Y = fit_correction(pool, cal).apply(ids, unit(P))
    rest = slice(c, n)
    before = (unit(P)[rest] * unit(T)[rest]).sum(1).mean()
    after = (Y[rest] * unit(T)[rest]).sum(1).mean()
    assert before < 0.5 and after > before + 0.3
    ref = (unit(T)[rest] @ v).tolist()
    assert spearman((Y[rest] @ v).tolist(), ref) > spearman((unit(P)[rest] @ v).tolist(), ref) + 0.1


def test_held_out_rows_equal_refitting_without_each_example(tmp_path):
    """The closed-form leave-one-out rows against the primal ridge refitted on the other examples."""
    pool, cal, Xp, Tc, calib, ids = _stores(tmp_path)
    held = fit_correction(pool, cal, ridge=0.05).held_out_rows()
    for j, i in enumerate(calib):
        keep = [k for k in range(len(calib)) if k != j]
        want = primal(Xp[[calib[k] for k in keep]], Tc[keep], Xp[[i]], 0.05)[0]
        torch.testing.assert_close(held[j], want, rtol=1e-9, atol=1e-12)


def _as_model(store: str, which: str) -> str:
    """A fake store relabelled as the proxy's (carrying the target's LoRA checkpoint) or the target's."""
    f = Path(store) / MANIFEST_FILE
    man = json.loads(f.read_text())
    label = {"proxy": ("proxy:p+ck", CARRIED), "target": ("t+ck", "lora")}[which]
    f.write_text(json.dumps({**man, "model_hash": label[0], "trains": label[1]}))
    return store


def test_the_agreement_estimate_equals_brute_force(tmp_path, caplog):
    """Scored "both" (the proxy's and the target's validation stores, one calibration store), the
    run's held-out scores of the calibration examples are ranked against the target's own scores
    (its rows against its validation gradients alone), per subtask; without a target's validation
    store there is no reference and no estimate."""
    import logging

    pool, cal, Xp, Tc, calib, ids = _stores(tmp_path, n=40, c=12, d=10)
    g = torch.Generator().manual_seed(5)
    Vp, Vt = (torch.randn(4, 10, generator=g, dtype=torch.float64) for _ in range(2))
    vp = _as_model(fake_store(tmp_path / "vp", Vp, [f"v{i}" for i in range(4)], ["a", "a", "b", "b"], lr=1e-5), "proxy")
    vt = _as_model(fake_store(tmp_path / "vt", Vt, [f"v{i}" for i in range(4)], ["a", "a", "b", "b"], lr=1e-5), "target")
    _as_model(pool, "proxy")
    _as_model(cal, "target")
    with caplog.at_level(logging.INFO, logger="iprox.scores"):
        res = compute_scores(ScoreConfig(train=[pool, pool], val=[vp, vt], out=str(tmp_path / "s"),
                                         calibration=[cal, cal], calibration_ridge=0.1))
    rep = res.calibration
    held = torch.stack([primal(Xp[[calib[k] for k in range(12) if k != j]], Tc[[k for k in range(12) if k != j]],
                               Xp[[i]], 0.1)[0] for j, i in enumerate(calib)])
    Up, Ut = unit(Vp), unit(Vt)
    for c, sub in enumerate(("a", "b")):
        rows = slice(2 * c, 2 * c + 2)
        u_both, u_t = Up[rows].mean(0) + Ut[rows].mean(0), Ut[rows].mean(0)
        ref = (unit(Tc) @ u_t).tolist()
        assert rep["spearman"][sub] == pytest.approx(spearman((held @ u_both).tolist(), ref))
        assert rep["uncalibrated_spearman"][sub] == pytest.approx(spearman((unit(Xp[calib]) @ u_both).tolist(), ref))
    assert rep["examples"] == 12
    assert rep["cosine"] == pytest.approx(float((unit(Xp[calib]) * unit(Tc)).sum(1).mean()))
    assert rep["held_out_cosine"] == pytest.approx(float((held * unit(Tc)).sum(1).mean()))
    assert "estimated Spearman with the target's scores over the 12 calibration examples" in caplog.text
    # the proxy's validation store alone: nothing to rank against
    assert compute_scores(ScoreConfig(train=[pool], val=[vp], out=str(tmp_path / "s2"), calibration=[cal])).calibration is None


def test_the_agreement_warning_fires_on_an_unrelated_proxy_only(tmp_path, caplog):
    """A proxy whose features have nothing to do with the target's is warned about; one whose
    features are the target's (up to scale) is not."""
    import logging

    g = torch.Generator().manual_seed(7)
    n, c, d = 60, 20, 16
    T = torch.randn(n, d, generator=g, dtype=torch.float64)
    V = torch.randn(6, d, generator=g, dtype=torch.float64)
    ids = [f"p{i}" for i in range(n)]
    val = fake_store(tmp_path / "val", V, [f"v{i}" for i in range(6)], ["a", "a", "a", "b", "b", "b"], lr=1e-5)
    cal = fake_store(tmp_path / "cal", T[:c], ids[:c], ["t"] * c, lr=1e-5)
    for name, P in (("exact", 2.0 * T), ("unrelated", torch.randn(n, d, generator=g, dtype=torch.float64))):
        pool = fake_store(tmp_path / name, P, ids, ["t"] * n, lr=1e-5)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="iprox.scores"):
            rep = compute_scores(ScoreConfig(train=[pool], val=[val], out=str(tmp_path / f"s-{name}"),
                                             calibration=[cal])).calibration
        warned = "unlikely to rank the pool as the target would" in caplog.text
        if name == "exact":
            assert rep["spearman"] == pytest.approx({"a": 1.0, "b": 1.0}) and not warned
        else:
            assert min(rep["uncalibrated_spearman"].values()) < 0.5 and min(rep["spearman"].values()) < 0.5 and warned
            assert f"from {c} examples: ±0.18 or so" in caplog.text  # 0.8 / sqrt(20)


def test_calibration_refuses_what_does_not_line_up(tmp_path):
    pool, cal, Xp, Tc, calib, ids = _stores(tmp_path)
    with pytest.raises(ValueError, match="one --calibration store per --train store"):
        ScoreConfig(train=[pool, pool], val=[pool, pool], out="x", calibration=[cal])
    with pytest.raises(ValueError, match="needs method = tracin"):
        ScoreConfig(train=[pool], val=[pool], out="x", calibration=[cal], method="if")
    with pytest.raises(ValueError, match="calibration_ridge must be > 0"):
        ScoreConfig(train=[pool], val=[pool], out="x", calibration=[cal], calibration_ridge=0.0)
    other = fake_store(tmp_path / "other-seed", Tc, [ids[i] for i in calib], ["t"] * len(calib), seed=1)
    with pytest.raises(ValueError, match="their seed differ"):
        fit_correction(pool, other)
    foreign = fake_store(tmp_path / "foreign", Tc, ["x0", *[ids[i] for i in calib[1:]]], ["t"] * len(calib))
    with pytest.raises(ValueError, match="holds 1 examples that pool store"):
        fit_correction(pool, foreign)
    man = json.loads((tmp_path / "calib" / MANIFEST_FILE).read_text())
    (tmp_path / "calib" / MANIFEST_FILE).write_text(json.dumps({**man, "layout": [{"name": "l", "k_out": 3, "k_in": 4,
                                                                                     "offset": 0}]}))
    with pytest.raises(ValueError, match="their layouts .* differ"):
        fit_correction(pool, cal)
    (tmp_path / "calib" / MANIFEST_FILE).write_text(json.dumps({**man, "model_hash": "another model"}))
    with pytest.raises(ValueError, match="different models or checkpoints.*calibration needs the target-first order"):
        fit_correction(pool, cal)


def test_calibration_subset_is_seeded_and_keeps_records(tmp_path):
    lines = [json.dumps({"id": f"e{i}", "messages": []}) for i in range(30)]
    (tmp_path / "pool.jsonl").write_text("\n".join(lines) + "\n")
    a = calibration_subset(tmp_path / "pool.jsonl", 7, 0, tmp_path / "a.jsonl").read_text().splitlines()
    b = calibration_subset(tmp_path / "pool.jsonl", 7, 0, tmp_path / "b.jsonl").read_text().splitlines()
    c = calibration_subset(tmp_path / "pool.jsonl", 7, 1, tmp_path / "c.jsonl").read_text().splitlines()
    assert a == b and a != c and len(a) == 7 and set(a) <= set(lines)
    assert [lines.index(x) for x in a] == sorted(lines.index(x) for x in a)  # pool order
    assert len(calibration_subset(tmp_path / "pool.jsonl", 99, 0, tmp_path / "d.jsonl").read_text().splitlines()) == 30
    with pytest.raises(ValueError, match="at least one example"):
        calibration_subset(tmp_path / "pool.jsonl", 0, 0, tmp_path / "e.jsonl")


def test_pipeline_calibrates_the_proxys_pool_features(tmp_path):
    """[features] calibrate = N: the target featurises N seeded pool examples at each checkpoint
    (``calib-target-<epoch>``, the same rows the target's own pool store would hold) and the scores
    are the proxy's corrected features against brute force; the setting enters the features'
    fingerprint and needs the target-first order."""
    from iprox.pipeline import load_config, run

    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    cfg = _write_config(tmp_path, model_dir)
    cfg.write_text(cfg.read_text().replace("[features]\n", "[features]\ncalibrate = 6\n"))
    result = run(load_config(cfg, {"progress": False}))
    r = tmp_path / "run"
    sub = [json.loads(x)["id"] for x in (r / "features" / "calibration.jsonl").read_text().splitlines()]
    pool_ids = [json.loads(x)["id"] for x in (r / "pool" / "pool.jsonl").read_text().splitlines()]
    assert len(sub) == 6 and set(sub) <= set(pool_ids)
    total = 0.0
    for e in ("1", "2"):
        man = json.loads((r / "features" / f"calib-target-{e}" / MANIFEST_FILE).read_text())
        assert man["trains"] == "lora" and man["model"] == str(model_dir.resolve()) and man["grad"] == "adam"
        ids, X = load_features(r / "features" / f"train-{e}")
        cids, C = load_features(r / "features" / f"calib-target-{e}")
        assert cids == sub
        at = [ids.index(i) for i in cids]
        assert not torch.allclose(X[at], C)  # the proxy's features of them are not the target's
        Y = primal(X[at].double(), C.double(), X.double(), 0.01)
        Y[at] = unit(C.double())
        lr = json.loads((r / "features" / f"train-{e}" / MANIFEST_FILE).read_text())["lr"]
        for v in ("val", "val-target"):
            _, V = load_features(r / "features" / f"{v}-{e}")
            total = total + lr * (Y @ unit(V.double()).mean(0))
    got = torch.tensor([float(row["score"]) for row in read_scores(r / "scores" / "scores.csv")], dtype=torch.float64)
    torch.testing.assert_close(got, total, rtol=1e-6, atol=1e-9)
    # the run's own estimate of its agreement with the target, over the 6 calibration examples
    est = json.loads((r / "scores" / "scores.json").read_text())["calibration"]
    assert est["examples"] == 6 and set(est["spearman"]) == set(json.loads((r / "scores" / "scores.json").read_text())["subtasks"])
    assert all(v is None or -1 <= v <= 1 for v in est["spearman"].values())
    assert result.agreement == est and "estimated over the 6 calibration examples" in result.format()
    # off again: another features stage, refused on this folder without --overwrite
    cfg.write_text(cfg.read_text().replace("calibrate = 6", "calibrate = 0"))
    with pytest.raises(ValueError, match="from stage 'features' on"):
        run(load_config(cfg, {"progress": False}))
    cfg.write_text(cfg.read_text().replace("calibrate = 0", "calibrate = -1"))
    with pytest.raises(ValueError, match="calibrate must be a number"):
        load_config(cfg)
    cfg.write_text(cfg.read_text().replace("calibrate = -1", "calibrate = 4").replace("[run]\n", '[run]\nwarmup_on = "proxy"\n'))
    with pytest.raises(ValueError, match="calibrate corrects the proxy's pool features"):
        load_config(cfg)
    cfg.write_text(cfg.read_text().replace('warmup_on = "proxy"\n', "").replace('method = "tracin"', 'method = "if"'))
    with pytest.raises(ValueError, match='needs \\[score\\] method = "tracin"'):
        load_config(cfg)


def test_the_default_size_is_128_and_at_most_a_tenth_of_the_pool():
    assert calibration_size(None, 100_000) == 128 and calibration_size(None, 1280) == 128
    assert calibration_size(None, 1000) == 100
    assert calibration_size(None, 200) == 20
    assert calibration_size(None, 9) == 0  # too small a pool: off
    assert calibration_size(50, 30) == 30 and calibration_size(7, 300) == 7


def test_a_scores_folder_made_before_calibration_existed_is_still_complete(tmp_path):
    from dataclasses import asdict

    from iprox import artifacts
    from iprox.scores import score

    pool, cal, Xp, Tc, calib, ids = _stores(tmp_path)
    cfg = ScoreConfig(train=[pool], val=[pool], out=str(tmp_path / "s"))
    score(cfg)
    meta = json.loads((tmp_path / "s" / "stage.json").read_text())
    for key in ("calibration", "calibration_ridge"):
        del meta["config"][key]
    (tmp_path / "s" / "stage.json").write_text(json.dumps(meta))
    assert artifacts.prepare_stage(tmp_path / "s", "score", asdict(cfg))
    with pytest.raises(artifacts.ConfigMismatchError, match="calibration"):
        artifacts.prepare_stage(tmp_path / "s", "score", asdict(ScoreConfig(train=[pool], val=[pool], out=str(tmp_path / "s"),
                                                                            calibration=[cal])))


def test_an_auto_sized_run_keeps_the_count_it_began_with(tmp_path, caplog):
    """``calibrate = "auto"`` is resolved when the run's features stage begins: resumed by a version
    whose default differs, it keeps its calibration.jsonl's count (and warns); an explicit count is
    the count (it enters the run's fingerprint)."""
    from iprox.pipeline import _calibration_count

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": f"p{i}"}) + "\n" for i in range(3000)))
    kept = tmp_path / "features" / "calibration.jsonl"
    assert _calibration_count("auto", pool, kept) == 128  # nothing begun: today's default
    calibration_subset(pool, 32, 0, kept)  # a run begun with 0.17's default
    with caplog.at_level(logging.WARNING, logger="iprox.pipeline"):
        assert _calibration_count("auto", pool, kept) == 32
    assert "keeping the 32 examples this run began with" in caplog.text and "calibrate = 128" in caplog.text
    assert _calibration_count(40, pool, kept) == 40


def test_several_calibration_stores_fit_as_one(tmp_path):
    """The rerank's recalibration: the calibration store and the target's stores of the shortlist
    fitted together equal one fit on all their rows; an example in two stores counts once (its first
    row), and scores take such a list per pool store."""
    pool, cal, Xp, Tc, calib, ids = _stores(tmp_path)
    g = torch.Generator().manual_seed(3)
    more = [2, 4, 7]  # p4 is in the calibration store too: its row there is the one kept
    Tm = Xp[more] + 0.5 * torch.randn(len(more), Xp.shape[1], generator=g, dtype=torch.float64)
    extra = fake_store(tmp_path / "extra", Tm, [ids[i] for i in more], ["t"] * len(more), lr=1e-5)
    corr = fit_correction(pool, [cal, extra], ridge=0.05)
    rows = calib + [2, 7]
    assert corr.ids == [ids[i] for i in rows]
    T = torch.cat([Tc, Tm[[0, 2]]])
    want = primal(Xp[rows], T, Xp, 0.05)
    got = corr.apply(ids, unit(Xp))
    rest = [i for i in range(len(ids)) if i not in rows]
    torch.testing.assert_close(got[rest], want[rest], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got[rows], unit(T), rtol=1e-12, atol=1e-14)
    V = torch.randn(2, Xp.shape[1], generator=g, dtype=torch.float64)
    val = fake_store(tmp_path / "val", V, ["v0", "v1"], ["a", "a"], lr=1e-5)
    res = compute_scores(ScoreConfig(train=[pool], val=[val], out=str(tmp_path / "s"), calibration=[[cal, extra]],
                                     calibration_ridge=0.05))
    torch.testing.assert_close(res.per_subtask[:, 0], (got @ unit(V).mean(0)) * 1e-5, rtol=1e-9, atol=1e-14)
    with pytest.raises(ValueError, match="at least one calibration store"):
        fit_correction(pool, [], ridge=0.05)
