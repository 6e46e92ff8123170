"""The rerank stage: the target scores the proxy's shortlist again and its order tops the table."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_model_folder
from test_scores import _write_config

from iprox.agreement import spearman
from iprox.loading import LOADS, load_features, model_key, read_scores
from iprox.rerank import check_fraction, combine, shortlist, shortlist_size, warn_if_short, write_shortlist
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


def test_pipeline_reranks_with_the_targets_own_less_scores(tmp_path):
    """The oracle: LESS on the target itself (selector = "model", same warm-up, projection and
    validation examples). The rerank's scores of its shortlist are that run's scores of the same
    examples, the selection is that run's top k among the shortlist, and the shortlist is the
    proxy's top m. The target is read from disk once."""
    from iprox.pipeline import load_config, run

    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    before = LOADS[model_key(str(model_dir))]
    cfg = _write_config(tmp_path, model_dir)
    res = run(load_config(cfg, {"progress": False}))
    assert LOADS[model_key(str(model_dir))] - before == 1
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
                        .replace(str(tmp_path / "run"), str(tmp_path / "less")))
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
    assert "rerank/scores/scores.csv" in res.format()
    # turned off: the selection is rebuilt from the proxy's own scores, refused without --overwrite
    cfg.write_text(cfg.read_text().replace("[select]", "[rerank]\nfraction = 0\n[select]"))
    with pytest.raises(ValueError, match="from stage 'rerank' on"):
        run(load_config(cfg, {"progress": False}))
    res = run(load_config(cfg, {"progress": False}), overwrite=True)
    assert not (r / "rerank").exists() and res.rerank is None
    assert [t["id"] for t in res.selection["top"]] == [x["id"] for x in rank(proxy_rows, 5)]
    # a run without it (as every run before 0.12) is refused at its selection when the default is back
    cfg.write_text(cfg.read_text().replace("[rerank]\nfraction = 0\n", ""))
    with pytest.raises(ValueError, match="from stage 'select' on"):
        run(load_config(cfg, {"progress": False}))


def test_rerank_settings_are_checked(tmp_path):
    from iprox.pipeline import load_config, rerank_fraction, stages

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
    assert plan(PlanConfig(model="tiny", pool=1000, rerank=40))["stages"]["features (target, rerank)"]["examples"] == \
        {"shortlist": 40}
    assert "features (target, rerank)" not in plan(PlanConfig(model="tiny", pool=1000, warmup_on="proxy"))["stages"]
    with pytest.raises(ValueError, match="target-first"):
        PlanConfig(model="tiny", pool=1000, warmup_on="proxy", rerank=10)
