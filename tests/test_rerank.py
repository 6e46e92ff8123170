"""The rerank stage: the target scores the proxy's shortlist again and its order tops the table."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import write_model_folder
from test_scores import _write_config

from iprox.agreement import spearman
from iprox.loading import LOADS, load_features, model_key, read_manifest, read_scores, tensor_crc
from iprox.rerank import (check_fraction, check_growth, combine, format_rerank, rerank_rounds, shortlist, shortlist_size,
                          warn_if_short, write_shortlist)
from iprox.scores import ScoreResult
from iprox.selection import rank


def _table(ids, cols: torch.Tensor, subtasks) -> ScoreResult:
    return ScoreResult(list(ids), ["s"] * len(ids), ["t"] * len(ids), list(subtasks), cols.double(),
                       cols.double().max(dim=1).values, [1.0])


def test_shortlist_size_and_fraction():
    assert shortlist_size("auto", 1000, 50) == 150
    assert shortlist_size("auto", 100, 50) == 100          # at most the pool
    assert shortlist_size(0.2, 1000, 50) == 200
    assert shortlist_size(0.01, 1000, 50) == 50            # at least the selection
    assert shortlist_size(0.15, 30, 1) == 5                # ceil(4.5)
    assert shortlist_size(0.1, 30, 1) == 3                 # 0.1 * 30 is 3, not 4
    for bad in (-0.1, 1.5, "half", True, None):
        with pytest.raises(ValueError, match="rerank\\] fraction"):
            check_fraction(bad)


def _ranked(ids, col) -> list[int]:
    """Rows of a column as the selection orders them (score down, then id)."""
    return sorted(range(len(ids)), key=lambda r: (-float(col[r]), ids[r]))


@pytest.mark.parametrize("n_subtasks", [1, 3])
def test_combine_puts_each_columns_scored_head_on_top_in_the_targets_order(n_subtasks):
    g = torch.Generator().manual_seed(n_subtasks)
    n, subtasks = 40, ["a", "b", "c"][:n_subtasks]
    ids = [f"x{i:02d}" for i in range(n)]
    raw = torch.randn(n, n_subtasks, generator=g)
    if n_subtasks > 1:
        raw[:, 0] += 1.0  # subtask a's scores run larger: the aggregate's shortlist is mostly its head
    proxy = _table(ids, raw, subtasks)
    m, k = 12, 4
    short = shortlist(proxy, m)
    # the head of each subtask's column, m / subtasks each, in pool order
    per = -(-m // n_subtasks)
    assert short == sorted({ids[r] for j in range(n_subtasks) for r in _ranked(ids, raw[:, j])[:per]})
    assert len(short) <= m
    m = len(short)
    # the target's table of the shortlist, in pool order (as its store holds it), on another scale
    at = sorted(ids.index(i) for i in short)
    target = _table([ids[a] for a in at], 5 + torch.randn(len(at), n_subtasks, generator=g), subtasks)
    res, rep = combine(proxy, target, k)
    tval = {ids[a]: j for j, a in enumerate(at)}
    reranked = {}
    for col, new, old, tgt in [("score", res.score, proxy.score, target.score)] + [
            (s, res.per_subtask[:, j], proxy.per_subtask[:, j], target.per_subtask[:, j]) for j, s in enumerate(subtasks)]:
        # brute force: the aggregate's reranked rows are the whole shortlist (in the proxy's order); a
        # column's the longest head of its own ranking that the target scored, at least its own share
        head = []
        for r in _ranked(ids, old):
            if ids[r] not in tval:
                if col == "score":
                    continue
                break
            head.append(r)
        reranked[col] = len(head)
        assert len(head) == m if col == "score" or n_subtasks == 1 else len(head) >= per
        order = _ranked(ids, new)
        # those first, in the target's order, with the target's scores
        assert order[:len(head)] == sorted(head, key=lambda r: (-float(tgt[tval[ids[r]]]), ids[r]))
        torch.testing.assert_close(new[head], tgt[[tval[ids[r]] for r in head]])
        # the rest below, in the proxy's order, their differences kept
        rest = [r for r in range(n) if r not in head]
        assert order[len(head):] == [r for r in _ranked(ids, old) if r not in head]
        assert float(new[rest].max()) < float(new[head].min())
        torch.testing.assert_close(new[rest] - old[rest], torch.full((len(rest),), rep["shift"][col], dtype=torch.float64))
        # the report, by brute force
        c = rep["columns"][col]
        assert c["reranked"] == len(head)
        if len(head) > 1:
            p, t = old[head], new[head]
            assert c["spearman"] == pytest.approx(spearman(p.tolist(), t.tolist()))
            kk = min(k, len(head))
            target_top = order[:kk]
            assert c["kept"] == len(set(head[:kk]) & set(target_top))
            assert c["deepest"] == max(head.index(r) + 1 for r in target_top)
    if n_subtasks > 1:
        assert min(reranked[s] for s in subtasks) < m  # (a column's reranked head is its own, not the whole shortlist)
    assert rep["shortlist"] == m and rep["pool"] == n and rep["k"] == k
    # a shortlist whose end the target's top k reaches is warned about; the whole pool is not
    assert (warn_if_short(rep) is None) == (rep["columns"]["score"]["deepest"] <= 0.8 * m)
    assert warn_if_short({**rep, "shortlist": n, "pool": n, "columns": {"score": {"deepest": n}}}) is None
    assert warn_if_short({**rep, "columns": {"score": {"deepest": m}}}) is not None


def _rows(table: ScoreResult, ids: list[str]) -> ScoreResult:
    at = [table.ids.index(i) for i in ids]
    return ScoreResult(list(ids), [table.sources[a] for a in at], [table.tasks[a] for a in at], table.subtasks,
                       table.per_subtask[at], table.score[at], table.weights)


@pytest.mark.parametrize("n_subtasks", [1, 3])
def test_rerank_rounds_grow_the_shortlist_where_the_targets_top_k_reach_its_end(n_subtasks):
    """Brute force: a grown run's table is :func:`combine` of the proxy and the target's scores of
    the longer shortlist; the target is asked only for examples it has not scored; the shortlist
    grows only where the target's top k reach its last fifth, and never past max_growth."""
    g = torch.Generator().manual_seed(10 + n_subtasks)
    n, k, m, subtasks = 120, 4, 24, ["a", "b", "c"][:n_subtasks]
    ids = [f"x{i:02d}" for i in range(n)]
    # the subtasks' columns share most of their order (each column's head holds much the same examples)
    base = torch.randn(n, 1, generator=g)
    truth = _table(ids, base + 0.05 * torch.randn(n, n_subtasks, generator=g), subtasks)
    calls: list[list[str]] = []

    def target(ids_: list[str], r: int) -> ScoreResult:
        assert r == len(calls)
        calls.append(ids_)
        return _rows(truth, ids_)

    # a faithful proxy (the target's order): one round, the target's top k at the proxy's top k
    res, rep = rerank_rounds(truth, k, m, 2, target)
    assert rep["rounds"] == [len(calls[0])] and calls[0] == shortlist(truth, m)
    assert rep["columns"]["score"]["deepest"] == k and warn_if_short(rep) is None
    # a proxy that puts the target's best last within the top m: the target's top k lie at the end
    # of the first shortlist, so it doubles
    order = _ranked(ids, truth.score)
    proxy_cols = truth.per_subtask.clone()
    head = order[:m]
    proxy_cols[head] = truth.per_subtask[head].flip(0)
    proxy = _table(ids, proxy_cols, subtasks)
    calls.clear()
    res, rep = rerank_rounds(proxy, k, m, 2, target)
    first, grown = shortlist(proxy, m), shortlist(proxy, 2 * m)
    assert len(rep["rounds"]) == 2 and calls[0] == first and calls[1] == [i for i in grown if i not in first]
    assert rep["rounds"] == [len(c) for c in calls] and rep["shortlist"] == len(grown)
    want, want_rep = combine(proxy, _rows(truth, first + calls[1]), k)
    torch.testing.assert_close(res.per_subtask, want.per_subtask)
    torch.testing.assert_close(res.score, want.score)
    assert {key: v for key, v in rep.items() if key != "rounds"} == want_rep
    top = [r["id"] for r in rank([{"id": i, "score": float(x)} for i, x in zip(res.ids, res.score)], k)]
    assert top == [r["id"] for r in rank([{"id": i, "score": float(truth.score[ids.index(i)])} for i in grown], k)]
    if n_subtasks == 1:  # the doubled shortlist holds the whole reversed head, so the target's own top k
        assert top == [ids[r] for r in order[:k]]
    # max_growth 1: never grows, and the run warns instead
    calls.clear()
    _, rep1 = rerank_rounds(proxy, k, m, 1, target)
    assert rep1["rounds"] == [len(first)] and len(calls) == 1 and warn_if_short(rep1) is not None
    # an uninformative proxy (the target's order upside down) grows by doubling up to max_growth * m
    calls.clear()
    worst = _table(ids, -truth.per_subtask, subtasks)
    _, rep4 = rerank_rounds(worst, k, m, 4, target)
    assert [len(shortlist(worst, s)) for s in (m, 2 * m, 4 * m)] == list(torch.tensor(rep4["rounds"]).cumsum(0))
    assert sum(len(c) for c in calls) == len({i for c in calls for i in c})  # no example scored twice
    assert warn_if_short(rep4) is not None  # still deep: the longest shortlist holds the target's top k last
    _, rep_all = rerank_rounds(worst, k, m, 100, lambda i, r: _rows(truth, i))
    assert rep_all["shortlist"] == n and warn_if_short(rep_all) is None  # (grown to the whole pool)
    for bad in (0.5, 0, True, "2"):
        with pytest.raises(ValueError, match="max_growth"):
            check_growth(bad)


def test_combine_orders_the_rest_by_other_scores_where_given():
    """``rest``: the rows below the reranked ones in its order, with its differences, below the
    reranked; the reranked rows, which rows they are, and the report as without it."""
    g = torch.Generator().manual_seed(7)
    n, k, m, subtasks = 40, 4, 12, ["a", "b"]
    ids = [f"x{i:02d}" for i in range(n)]
    proxy = _table(ids, torch.randn(n, 2, generator=g), subtasks)
    rest = _table(ids, torch.randn(n, 2, generator=g), subtasks)
    short = shortlist(proxy, m)
    at = [ids.index(i) for i in short]
    target = _table(short, 3 + torch.randn(len(at), 2, generator=g), subtasks)
    plain, rep = combine(proxy, target, k)
    res, rep_rest = combine(proxy, target, k, rest)
    assert rep_rest["columns"] == rep["columns"]
    for col, new, old, other in [("score", res.score, plain.score, rest.score)] + [
            (s_, res.per_subtask[:, j], plain.per_subtask[:, j], rest.per_subtask[:, j]) for j, s_ in enumerate(subtasks)]:
        top = _ranked(ids, old)[:rep["columns"][col]["reranked"]]
        below = [r for r in range(n) if r not in top]
        torch.testing.assert_close(new[top], old[top])                     # the reranked rows as without it
        assert _ranked(ids, new)[:len(top)] == top
        assert _ranked(ids, new)[len(top):] == [r for r in _ranked(ids, other) if r in below]   # rest's order
        assert float(new[below].max()) < float(new[top].min())
        torch.testing.assert_close(new[below] - other[below],
                                   torch.full((len(below),), rep_rest["shift"][col], dtype=torch.float64))
    with pytest.raises(ValueError, match="order the rest"):
        combine(proxy, target, k, _table(ids[::-1], rest.per_subtask, subtasks))


def test_combine_refuses_tables_that_do_not_match():
    ids = ["a", "b", "c"]
    proxy = _table(ids, torch.randn(3, 1), ["t"])
    with pytest.raises(ValueError, match="subtasks"):
        combine(proxy, _table(["a"], torch.randn(1, 1), ["u"]), 1)
    with pytest.raises(ValueError, match="not in the proxy's scores"):
        combine(proxy, _table(["z"], torch.randn(1, 1), ["t"]), 1)


def test_write_shortlist_keeps_pool_order(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": f"p{i}", "messages": []}) + "\n" for i in range(6)))
    out = write_shortlist(pool, ["p4", "p1"], tmp_path / "s" / "short.jsonl")
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["p1", "p4"]
    with pytest.raises(ValueError, match="not in the pool file"):
        write_shortlist(pool, ["p1", "q"], tmp_path / "bad.jsonl")


def test_pipeline_reranks_with_the_targets_own_less_scores(tmp_path, caplog):
    """The oracle: LESS on the target itself (selector = "model", same warm-up, projection and
    validation examples). The rerank's scores of its shortlist are that run's scores of the same
    examples, the selection is that run's top k among the shortlist, and the shortlist is the
    proxy's top m. The target is read from disk once."""
    from iprox.pipeline import load_config, run

    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    before = LOADS[model_key(str(model_dir))]
    cfg = _write_config(tmp_path, model_dir)
    # one round (whether the tiny proxy's order would grow the shortlist differed between the full
    # suite and the test run alone; the growth has its own test below)
    # (10 calibration examples: some of them in the shortlist of 15 of 24 as well)
    cfg.write_text(cfg.read_text().replace("[select]", "[rerank]\nmax_growth = 1\n[select]")
                   .replace("[features]\n", "[features]\ncalibrate = 10\n"))
    with caplog.at_level(logging.INFO, logger="iprox"):
        res = run(load_config(cfg, {"progress": False}))
    assert LOADS[model_key(str(model_dir))] - before == 1
    # the calibration's estimate is logged once, by the score stage (not again by the rerank's scoring)
    assert sum("estimated Spearman with the target" in r.getMessage() for r in caplog.records) == 1
    r = tmp_path / "run"
    meta = json.loads((r / "pipeline.json").read_text())
    assert list(meta["timings"]) == ["pool", "compress", "align", "warmup", "features", "score", "rerank", "select"]
    proxy_rows = read_scores(r / "scores")
    short = [json.loads(x)["id"] for x in (r / "rerank" / "shortlist.jsonl").read_text().splitlines()]
    assert len(short) == 15  # auto: 3 x top_k = 5
    assert set(short) == {x["id"] for x in rank(proxy_rows, 15)}
    for e in ("1", "2"):
        man = json.loads((r / "rerank" / f"target-{e}" / "manifest.json").read_text())
        assert man["trains"] == "lora" and man["model"] == str(model_dir.resolve()) and man["grad"] == "adam"
    # LESS on the target, in another folder, from the same settings
    less_cfg = tmp_path / "less.toml"
    less_cfg.write_text(cfg.read_text().replace('selector = "proxy"', 'selector = "model"')
                        .replace(str(tmp_path / "run"), str(tmp_path / "less")).replace("calibrate = 10\n", ""))
    run(load_config(less_cfg, {"progress": False}))
    less = {x["id"]: x["score"] for x in read_scores(tmp_path / "less" / "scores")}
    ids, X = load_features(r / "rerank" / "target-1")
    lids, LX = load_features(tmp_path / "less" / "features" / "train-1")
    at = [lids.index(i) for i in ids]
    # the same rows as the target's own store (fp16 stores whose examples were batched with others:
    # a rounding step at most)
    torch.testing.assert_close(X, LX[at], rtol=2e-3, atol=1e-6)
    target = {x["id"]: x["score"] for x in read_scores(r / "rerank" / "target-scores")}
    assert set(target) == set(short)
    for i in short:
        assert target[i] == pytest.approx(less[i], rel=1e-3, abs=1e-9)
    final = read_scores(r / "rerank" / "scores")
    top5 = [x["id"] for x in rank(final, 5)]
    assert top5 == [x["id"] for x in rank([{"id": i, "score": less[i]} for i in short], 5)]
    assert [t["id"] for t in res.selection["top"]] == top5
    assert res.rerank["shortlist"] == 15 and "the proxy's shortlist, 15 of 24 pool examples" in res.format()
    # below the shortlist, the pool in the order of its scores against the target's validation
    # gradients alone, corrected from the calibration examples and the shortlist (recalibrate, the
    # default; max_growth = 1 leaves it no budget for more rounds)
    from iprox.scores import ScoreConfig, compute_scores

    stage = json.loads((r / "scores" / "stage.json").read_text())["config"]
    pairs = [i for i, v in enumerate(stage["val"]) if "val-target-" in v]
    assert len(pairs) == 2 and len(stage["val"]) == 4 and stage["calibration"]  # (two checkpoints, both models' stores)

    def below(calibration) -> list[str]:
        alone = compute_scores(ScoreConfig(train=[stage["train"][i] for i in pairs], val=[stage["val"][i] for i in pairs],
                                           calibration=calibration, out="unused"))
        return [x["id"] for x in rank([{"id": i, "score": float(x)} for i, x in zip(alone.ids, alone.score)
                                       if i not in set(short)])]

    recal = [[str(r / "rerank" / f"target-{e}"), stage["calibration"][i]] for i, e in zip(pairs, ("1", "2"))]
    assert [x["id"] for x in rank(final)][15:] == below(recal)
    assert res.rerank["rest_order"] == "recalibrated" and res.rerank["recalibrated"] == {"rounds": 0, "unchecked": 0}
    assert "rerank/scores/scores.csv" in res.format()
    # without it (0.14 to 0.18): refused without --overwrite; then the order of the scores against the
    # target's validation gradients alone, corrected from the calibration examples (rest_order "target",
    # the default with val_model "both")
    cfg.write_text(cfg.read_text().replace("[rerank]\n", "[rerank]\nrecalibrate = false\n"))
    with pytest.raises(ValueError, match="from stage 'rerank' on"):
        run(load_config(cfg, {"progress": False}))
    res = run(load_config(cfg, {"progress": False}), overwrite=True)
    final = read_scores(r / "rerank" / "scores")
    assert [x["id"] for x in rank(final)][15:] == below([stage["calibration"][i] for i in pairs])
    assert res.rerank["rest_order"] == "target" and "recalibrated" not in res.rerank
    assert [t["id"] for t in res.selection["top"]] == top5
    cfg.write_text(cfg.read_text().replace("recalibrate = false\n", ""))
    # A calibration example the shortlist holds too was featurised again there, in other batches: in
    # fp16 (or bf16) its two rows may differ by a rounding step (it broke CI's bf16 run once). The
    # recalibrated scores take the rerank's row, the one its target-scores table holds: shown here
    # with calibration rows made far off.
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    again = [i for i in short if i in set(read_manifest(stage["calibration"][pairs[0]])["ids"])]
    assert again
    for i in pairs:
        store = Path(stage["calibration"][i])
        man = read_manifest(store)
        for sh in man["shards"]:
            with safe_open(store / sh["file"], "pt") as f:
                header = f.metadata()
            X = load_file(store / sh["file"])["features"].flip(1).contiguous()
            sh["crc32"] = tensor_crc(X)
            save_file({"features": X}, store / sh["file"], metadata={**header, "crc32": str(sh["crc32"])})
        (store / "manifest.json").write_text(json.dumps(man))
    res = run(load_config(cfg, {"progress": False}), overwrite=True)
    assert [x["id"] for x in rank(read_scores(r / "rerank" / "scores"))][15:] == below(recal)
    assert res.rerank["rest_order"] == "recalibrated"
    # turned off: the selection is rebuilt from the proxy's own scores, refused without --overwrite
    cfg.write_text(cfg.read_text().replace("[rerank]\n", "[rerank]\nfraction = 0\n"))
    with pytest.raises(ValueError, match="from stage 'rerank' on"):
        run(load_config(cfg, {"progress": False}))
    res = run(load_config(cfg, {"progress": False}), overwrite=True)
    assert not (r / "rerank").exists() and res.rerank is None
    assert [t["id"] for t in res.selection["top"]] == [x["id"] for x in rank(proxy_rows, 5)]
    # a run without it (as every run before 0.12) is refused at its selection when the default is back
    cfg.write_text(cfg.read_text().replace("fraction = 0\n", ""))
    with pytest.raises(ValueError, match="from stage 'select' on"):
        run(load_config(cfg, {"progress": False}))


def test_pipeline_grows_the_shortlist_to_the_targets_own_selection(tmp_path, monkeypatch):
    """With the growth forced (every shortlist shorter than the pool counts as too short) and room to
    grow to the whole pool, the selection is LESS's on the target over the whole pool; the second round
    featurises only the examples the first did not."""
    import iprox.rerank as R
    from iprox.pipeline import load_config, run

    monkeypatch.setattr(R, "DEEP_WARNING", -1.0)
    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    before = LOADS[model_key(str(model_dir))]
    cfg = _write_config(tmp_path, model_dir)
    cfg.write_text(cfg.read_text().replace("[select]", "[rerank]\nmax_growth = 4\n[select]"))
    res = run(load_config(cfg, {"progress": False}))
    assert LOADS[model_key(str(model_dir))] - before == 1
    r = tmp_path / "run" / "rerank"
    first = [json.loads(x)["id"] for x in (r / "shortlist.jsonl").read_text().splitlines()]
    second = [json.loads(x)["id"] for x in (r / "shortlist-2.jsonl").read_text().splitlines()]
    pool = [x["id"] for x in read_scores(tmp_path / "run" / "scores")]
    assert len(first) == 15 and sorted(first + second) == sorted(pool) and not set(first) & set(second)
    assert load_features(r / "target-1-2")[0] == [i for i in pool if i in set(second)]
    assert res.rerank["rounds"] == [15, 9] and res.rerank["shortlist"] == 24
    assert "grown from 15 in 1 more round(s)" in res.format()
    less_cfg = tmp_path / "less.toml"
    less_cfg.write_text(cfg.read_text().replace('selector = "proxy"', 'selector = "model"')
                        .replace("[rerank]\nmax_growth = 4\n", "").replace(str(tmp_path / "run"), str(tmp_path / "less")))
    run(load_config(less_cfg, {"progress": False}))
    less = read_scores(tmp_path / "less" / "scores")
    assert [t["id"] for t in res.selection["top"]] == [x["id"] for x in rank(less, 5)]
    # finished: a second call skips every stage
    again = run(load_config(cfg, {"progress": False}))
    assert again.rerank == res.rerank and [t["id"] for t in again.selection["top"]] == [t["id"] for t in res.selection["top"]]


def test_rerank_settings_are_checked(tmp_path):
    from iprox.pipeline import load_config, stages
    from iprox.runconfig import rerank_fraction

    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    cfg = _write_config(tmp_path, model_dir)
    text = cfg.read_text()

    def with_(rerank: str, old: str = "", new: str = "") -> str:
        cfg.write_text(text.replace(old, new).replace("[select]", f"[rerank]\n{rerank}\n[select]"))
        return cfg

    assert rerank_fraction(load_config(with_("fraction = 0.25"))) == 0.25
    with pytest.raises(ValueError, match="rerank\\] fraction"):
        load_config(with_("fraction = 2"))
    with pytest.raises(ValueError, match="unknown settings \\['factor'\\]"):
        load_config(with_("factor = 3"))
    with pytest.raises(ValueError, match="max_growth must be a number >= 1"):
        load_config(with_("max_growth = 0.5"))
    with pytest.raises(ValueError, match="rest_order must be"):
        load_config(with_('recalibrate = false\nrest_order = "proxy"'))
    with pytest.raises(ValueError, match='need \\[features\\] val_model = "both" or "target"'):
        load_config(with_('recalibrate = false\nrest_order = "target"', "[features]\n", '[features]\nval_model = "proxy"\n'))
    with pytest.raises(ValueError, match="rest_order applies with recalibrate = false only"):
        load_config(with_('rest_order = "target"'))
    with pytest.raises(ValueError, match="recalibrate must be true or false"):
        load_config(with_('recalibrate = "yes"'))
    from iprox.runconfig import rerank_options

    assert rerank_options(load_config(with_(""))) == {"max_growth": 2, "recalibrate": True}
    assert rerank_options(load_config(with_("recalibrate = false"))) == {"max_growth": 2, "rest_order": "target"}
    from iprox.runconfig import rerank_rest

    assert rerank_rest(load_config(with_(""))) == "target"   # the default: val_model "both"
    assert rerank_rest(load_config(with_("", "[features]\n", '[features]\nval_model = "proxy"\n'))) == "run"
    with pytest.raises(ValueError, match='needs selector = "proxy" and warmup_on = "target"'):
        load_config(with_("fraction = 0.2", "[run]\n", '[run]\nwarmup_on = "proxy"\n'))
    with pytest.raises(ValueError, match='needs selector = "proxy" and warmup_on = "target"'):
        load_config(with_("fraction = 0.2", 'selector = "proxy"', 'selector = "model"'))
    with pytest.raises(ValueError, match='rerank\\] needs \\[score\\] method = "tracin"'):
        load_config(with_("fraction = 0.2", 'method = "tracin"', 'method = "if"'))
    # the default: on where the order allows it, and its stage runs before the selection
    for extra, on in (("", True), ('[run]\nwarmup_on = "proxy"\n', False)):
        c = load_config(with_("", "[run]\n", extra or "[run]\n"))
        assert bool(rerank_fraction(c)) is on and ("rerank" in [st.name for st in stages(c)]) is on
    c = load_config(with_("", 'selector = "proxy"', 'selector = "model"'))
    assert rerank_fraction(c) == 0 and [st.name for st in stages(c)] == ["pool", "warmup", "features", "score", "select"]


def test_plan_costs_the_rerank(tmp_path):
    from iprox.plan import PlanConfig, plan

    p = plan(PlanConfig(model="tiny", pool=1000))
    s = p["stages"]["features (target, rerank)"]
    assert s["examples"] == {"shortlist": 150} and "features (target, rerank)" in p["pipelines"]["iprox"]
    off = plan(PlanConfig(model="tiny", pool=1000, rerank=0))
    assert "features (target, rerank)" not in off["stages"]
    assert p["proxy_flops"] - off["proxy_flops"] == pytest.approx(s["flops"])
    # the target stays resident while the proxy featurises the pool
    assert p["stages"]["features (proxy)"]["peak_gib"] == pytest.approx(
        off["stages"]["features (proxy)"]["peak_gib"] + p["weights_gib"])
    # where the target's top k reach its end the shortlist grows, by default to at most twice its length
    from iprox.plan import format_plan

    assert s["max_examples"] == 300 and "grows to at most 300" in format_plan(p)
    once = plan(PlanConfig(model="tiny", pool=1000, rerank_growth=1))
    assert once["stages"]["features (target, rerank)"]["max_examples"] == 150 and "grows" not in format_plan(once)
    assert plan(PlanConfig(model="tiny", pool=200, rerank=80, rerank_growth=4))["stages"]["features (target, rerank)"][
        "max_examples"] == 200  # (at most the pool)
    with pytest.raises(ValueError, match="max_growth"):
        PlanConfig(model="tiny", pool=1000, rerank_growth=0.5)
    assert plan(PlanConfig(model="tiny", pool=1000, rerank=40))["stages"]["features (target, rerank)"]["examples"] == \
        {"shortlist": 40}
    assert "features (target, rerank)" not in plan(PlanConfig(model="tiny", pool=1000, warmup_on="proxy"))["stages"]
    with pytest.raises(ValueError, match="target-first"):
        PlanConfig(model="tiny", pool=1000, warmup_on="proxy", rerank=10)


def _block_case(n=60, k=5, m=15):
    """A pool whose best examples (rows 40-47, a block of alike examples) the proxy places at the bottom,
    all but row 40, which it places in its shortlist; elsewhere the proxy ranks as the target does."""
    g = torch.Generator().manual_seed(7)
    ids = [f"x{i:02d}" for i in range(n)]
    truth = torch.rand(n, 1, generator=g, dtype=torch.float64)
    block = list(range(40, 48))
    truth[block, 0] = 2 + torch.rand(len(block), generator=g, dtype=torch.float64)
    proxy = truth.clone()
    proxy[block, 0] = -1.0
    proxy[40, 0] = 1.5
    return ids, truth, proxy, block, k, m


def _recalibrate_oracle(ids, truth, proxy, block, calls):
    """A stand-in for the refitted calibration: the target's score where it scored, and for the rest
    the target's where an alike example (one of the block) was scored, else the proxy's."""
    def recalibrate(scored):
        calls.append(list(scored))
        pos = {i: r for r, i in enumerate(ids)}
        known = {pos[i] for i in scored}
        col = proxy.clone()
        col[list(known)] = truth[list(known)]
        if known & set(block):
            col[block] = truth[block]
        return _table(ids, col, ["a"])
    return recalibrate


def test_recalibrated_rounds_find_a_block_the_proxy_placed_low():
    ids, truth, proxy_cols, block, k, m = _block_case()
    scored_rounds = []

    def target(new, r):
        scored_rounds.append(list(new))
        return _rows(_table(ids, truth, ["a"]), new)

    proxy = _table(ids, proxy_cols, ["a"])
    calls = []
    res, rep = rerank_rounds(proxy, k, m, 2, target, recalibrate=_recalibrate_oracle(ids, truth, proxy_cols, block, calls))
    # without it the shortlist holds one of the block, and the selection misses the rest
    _, plain = rerank_rounds(proxy, k, m, 2, lambda new, r: _rows(_table(ids, truth, ["a"]), new))
    best = [ids[r] for r in _ranked(ids, truth[:, 0])[:k]]
    assert plain["shortlist"] == m and plain["columns"]["score"]["deepest"] <= 0.8 * m  # nothing looked deep
    # with it: one more round, the block's other seven, and the target's own top k is selected
    assert rep["rounds"] == [m, 7] and sorted(scored_rounds[1]) == sorted(ids[r] for r in block if r != 40)
    assert rep["recalibrated"] == {"rounds": 1, "unchecked": 0} and warn_if_short(rep) is None
    assert "22 of 60 pool examples (36.7%, grown from 15 in 1 more round(s), 1 of them recalibrated)" in format_rerank(rep)
    assert [x["id"] for x in rank(_as_rows(res), k)] == best
    assert [ids[r] for r in _ranked(ids, res.per_subtask[:, 0])[:k]] == best
    assert len(calls) == 2 and set(calls[1]) == set(scored_rounds[0]) | set(scored_rounds[1])


def test_recalibrated_rounds_stop_at_once_when_nothing_moves_and_at_the_budget():
    ids, truth, proxy_cols, block, k, m = _block_case()
    tgt = lambda new, r: _rows(_table(ids, truth, ["a"]), new)  # noqa: E731
    # the proxy already right: no round is added, and the table is the plain rerank's head
    same = _table(ids, truth, ["a"])
    calls = []
    res, rep = rerank_rounds(same, k, m, 2, tgt, recalibrate=_recalibrate_oracle(ids, truth, truth, [], calls))
    assert rep["rounds"] == [m] and rep["recalibrated"] == {"rounds": 0, "unchecked": 0} and len(calls) == 1
    # no budget left (max_growth 1): nothing added, the examples still predicted to enter are reported
    res, rep = rerank_rounds(_table(ids, proxy_cols, ["a"]), k, m, 1, tgt,
                             recalibrate=_recalibrate_oracle(ids, truth, proxy_cols, block, []))
    assert rep["rounds"] == [m] and rep["recalibrated"] == {"rounds": 0, "unchecked": 7}
    assert "7 examples the target did not score are still predicted to enter" in warn_if_short(rep)
    # a budget of 18: three of the seven, the most promising first; the selection is the target's top k
    # among what it scored
    rounds = []
    res, rep = rerank_rounds(_table(ids, proxy_cols, ["a"]), k, m, 18 / m, lambda new, r: rounds.append(new) or tgt(new, r),
                             recalibrate=_recalibrate_oracle(ids, truth, proxy_cols, block, []))
    left = sorted((r for r in block if r != 40), key=lambda r: -float(truth[r, 0]))
    assert rep["rounds"] == [m, 3] and rep["shortlist"] == 18 and rep["recalibrated"]["unchecked"] == 4
    assert rounds[1] == [ids[r] for r in left[:3]]
    scored = [ids.index(i) for i in rounds[0] + rounds[1]]
    want = [ids[r] for r in sorted(scored, key=lambda r: (-float(truth[r, 0]), ids[r]))[:k]]
    assert [x["id"] for x in rank(_as_rows(res), k)] == want


def test_recalibrated_scores_must_be_on_the_targets_scale():
    ids, truth, proxy_cols, block, k, m = _block_case()
    tgt = lambda new, r: _rows(_table(ids, truth, ["a"]), new)  # noqa: E731
    with pytest.raises(ValueError, match="not on one scale"):
        rerank_rounds(_table(ids, proxy_cols, ["a"]), k, m, 2, tgt, recalibrate=lambda s: _table(ids, 2 * truth, ["a"]))
    with pytest.raises(ValueError, match="other examples or subtasks"):
        rerank_rounds(_table(ids, proxy_cols, ["a"]), k, m, 2, tgt, recalibrate=lambda s: _table(ids, truth, ["b"]))


def _as_rows(res: ScoreResult) -> list[dict]:
    return [{"id": i, "score": float(x)} for i, x in zip(res.ids, res.score)]
