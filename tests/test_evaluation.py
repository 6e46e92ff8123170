"""Baseline selectors, fine-tuning, accuracy, and the score-agreement fidelity report."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import chat_records, make_tokenizer, write_jsonl, write_model_folder

from iprox.cli import main
from iprox.data import collate, load_examples, tokenize_examples
from iprox.evaluation import gold_answer, is_correct
from iprox.features import FeatureConfig, compute_features
from iprox.loading import load_features


def test_representation_features_are_mean_pooled_hidden_states(tmp_path, data_file):
    model_dir = write_model_folder(tmp_path / "tiny", "qwen2")
    compute_features(FeatureConfig(model=str(model_dir), data=[str(data_file)], out=str(tmp_path / "r"),
                                   engine="representation", batch_size=5, store_dtype="float32", progress=False))
    ids, X = load_features(tmp_path / "r")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = make_tokenizer()
    tokd, _ = tokenize_examples(tok, load_examples(str(data_file)), 512)
    with torch.no_grad():
        for i in (0, 7, 23):
            enc = collate([tokd[i]], tok.pad_token_id)
            h = model(**{k: enc[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True).hidden_states[-1]
            torch.testing.assert_close(X[i], h[0].mean(0), rtol=1e-4, atol=1e-5)
    assert X.shape == (24, 32)


def test_answer_matching():
    assert gold_answer("She sold 48/2 = 24 clips.\n#### 72") == ("number", "72")
    assert gold_answer("(B)") == ("exact", "(B)")
    assert is_correct("so the total is 1,072 apples", "number", "1072")
    assert is_correct("blah 3 then #### 72", "number", "72")
    assert not is_correct("72 or maybe 71", "number", "72")  # the last number counts
    assert is_correct(" (B).", "exact", "(B)") and is_correct("True", "exact", "True")
    assert not is_correct("Truely", "exact", "True") and not is_correct("(C)", "exact", "(B)")
    assert not is_correct("The answer is (B)", "exact", "(B)")


def test_finetune_lora_and_full_then_evaluate_with_accuracy(tmp_path, data_file, capsys):
    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    for method in ("lora", "full"):
        out = tmp_path / f"ft-{method}"
        assert main(["finetune", "--model", str(model_dir), "--data", str(data_file), "--out", str(out),
                     "--method", method, "--epochs", "2", "--lr", "5e-3", "--max-length", "96"]) == 0
        meta = json.loads((out / "finetune.json").read_text())
        assert meta["n_train"] == 24 and len(meta["epoch_losses"]) == 2
        assert meta["epoch_losses"][1] < meta["epoch_losses"][0]  # it trained
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_dir)
        tuned = AutoModelForCausalLM.from_pretrained(out)  # plain folder: no peft needed to load it
        w0 = base.model.layers[0].self_attn.q_proj.weight
        w1 = tuned.model.layers[0].self_attn.q_proj.weight
        assert not torch.allclose(w0, w1)
        if method == "lora":  # merged low-rank update
            assert torch.linalg.matrix_rank(w1 - w0, atol=1e-6) <= 16
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path / "ft-lora"), "--data", str(data_file), "--limit", "4",
                 "--accuracy", "--max-new-tokens", "3", "--no-progress", "--out", str(tmp_path / "ev.json")]) == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    from iprox.evaluation import is_correct

    preds = ev["predictions"]
    assert len(preds) == 4 and ev["accuracy"] == sum(p["correct"] for p in preds) / 4
    assert all(p["correct"] == is_correct(p["prediction"], "exact", p["gold"]) for p in preds)
    assert "exact-match accuracy" in capsys.readouterr().out


def test_fidelity_report_of_two_score_tables(tmp_path, capsys):
    ids = [f"e{i}" for i in range(40)]
    g = torch.Generator().manual_seed(0)
    t = torch.randn(40, generator=g)
    p = t + 0.5 * torch.randn(40, generator=g)

    def table(path, s):
        path.mkdir()
        (path / "scores.csv").write_text("id,source,task,score,a\n" + "".join(f"{i},s,t,{x},{x}\n" for i, x in zip(ids, s.tolist())))
        return path

    table(tmp_path / "T", t)
    table(tmp_path / "P", p)
    out = tmp_path / "REPORT.json"
    assert main(["fidelity", "--target-scores", str(tmp_path / "T"), "--proxy-scores", str(tmp_path / "P"),
                 "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    from iprox.agreement import kendall, spearman

    assert rep["spearman"] == pytest.approx(spearman(t.tolist(), p.tolist()))
    assert rep["kendall"] == pytest.approx(kendall(t.tolist(), p.tolist()))
    assert 0.3 < rep["spearman"] < 0.99
    assert set(rep["overlap_at"]) == {"1", "5", "10"} and rep["overlap_at"]["10"]["k"] == 4
    assert rep["subtasks"]["a"]["spearman"] == pytest.approx(rep["spearman"])
    assert (tmp_path / "REPORT.png").stat().st_size > 1000
    # The head: Spearman over the target's top 20% (8 of 40), by hand.
    head = sorted(range(40), key=lambda i: -float(t[i]))[:8]
    assert rep["head_spearman"] == pytest.approx(spearman(t[head].tolist(), p[head].tolist()))
    # A second target run gives the ceiling, and the proxy's figures as a share of it.
    again = t + 0.2 * torch.randn(40, generator=g)
    table(tmp_path / "T2", again)
    assert main(["fidelity", "--target-scores", str(tmp_path / "T"), "--proxy-scores", str(tmp_path / "P"),
                 "--target-again-scores", str(tmp_path / "T2"), "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["ceiling"]["spearman"] == pytest.approx(spearman(t.tolist(), again.tolist()))
    assert rep["of_ceiling"]["spearman"] == pytest.approx(rep["spearman"] / rep["ceiling"]["spearman"])
    assert rep["of_ceiling"]["spearman"] < 1  # the noisier proxy is below the target's own agreement
    assert "ceiling (the target against itself" in capsys.readouterr().out
    # Different pools are refused.
    (tmp_path / "P" / "scores.csv").write_text("id,score\nzzz,1\n")
    assert main(["fidelity", "--target-scores", str(tmp_path / "T"), "--proxy-scores", str(tmp_path / "P"),
                 "--out", str(out)]) == 2
    assert "different pools" in capsys.readouterr().err


def test_fidelity_of_runs_with_other_subtasks_compares_the_shared_ones(tmp_path, capsys):
    """A run of two target tasks beside a run of one of them: their aggregates rank against other
    validation examples, so the report flags them and compares the shared subtask (also as a share
    of the ceiling); the scatter is of that subtask."""
    ids = [f"e{i}" for i in range(60)]
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(60, generator=g), torch.randn(60, generator=g)

    def table(path, cols: dict):
        path.mkdir()
        names = list(cols)
        agg = torch.stack(list(cols.values())).max(0).values
        rows = "".join(f"{i},s,t,{agg[r]}," + ",".join(str(float(cols[n][r])) for n in names) + "\n"
                       for r, i in enumerate(ids))
        (path / "scores.csv").write_text("id,source,task,score," + ",".join(names) + "\n" + rows)
        return path

    proxy_a = a + 0.6 * torch.randn(60, generator=g)
    again_a, again_b = a + 0.2 * torch.randn(60, generator=g), b + 0.2 * torch.randn(60, generator=g)
    table(tmp_path / "T", {"a": a, "b": b})
    table(tmp_path / "P", {"a": proxy_a})
    table(tmp_path / "T2", {"a": again_a, "b": again_b})
    out = tmp_path / "r.json"
    assert main(["fidelity", "--target-scores", str(tmp_path / "T"), "--proxy-scores", str(tmp_path / "P"),
                 "--target-again-scores", str(tmp_path / "T2"), "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    from iprox.agreement import spearman

    assert rep["aggregate_comparable"] is False and "the subtasks they share (a)" in rep["aggregate_note"]
    assert set(rep["subtasks"]) == {"a"}
    assert rep["subtasks"]["a"]["spearman"] == pytest.approx(spearman(a.tolist(), proxy_a.tolist()))
    assert rep["ceiling"]["aggregate_comparable"] is True
    assert "of_ceiling" not in rep  # the proxy's aggregate is not comparable, so neither is its share
    assert rep["subtasks"]["a"]["of_ceiling"]["spearman"] == pytest.approx(
        spearman(a.tolist(), proxy_a.tolist()) / spearman(a.tolist(), again_a.tolist()))
    assert rep["scatter_column"] == "a"
    printed = capsys.readouterr().out
    assert "(not comparable: the target's table scores the subtasks ['a', 'b'], the proxy's ['a']" in printed
    assert "proxy as a share of the ceiling: (the aggregates are not comparable)" in printed
    # The same subtasks: the aggregates are compared, and shares are given for both.
    table(tmp_path / "P2", {"a": proxy_a, "b": b + 0.6 * torch.randn(60, generator=g)})
    assert main(["fidelity", "--target-scores", str(tmp_path / "T"), "--proxy-scores", str(tmp_path / "P2"),
                 "--target-again-scores", str(tmp_path / "T2"), "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["aggregate_comparable"] is True and "aggregate_note" not in rep and rep["scatter_column"] == "score"
    assert set(rep["of_ceiling"]) == {"spearman", "head_spearman", "overlap_at_5"}
    assert set(rep["subtasks"]) == {"a", "b"} and all("of_ceiling" in v for v in rep["subtasks"].values())
    assert "(not comparable" not in capsys.readouterr().out


def _config(tmp_path, model_dir, selector):
    write_jsonl(tmp_path / "pool.jsonl", chat_records(20, seed=1))
    write_jsonl(tmp_path / "val.jsonl", [dict(r, task="target") for r in chat_records(3, seed=2)])
    path = tmp_path / f"{selector}.toml"
    path.write_text(f"""
[run]
out = "{tmp_path / selector}"
model = "{model_dir}"
selector = "{selector}"
[data]
pool = ["pool.jsonl"]
validation = ["val.jsonl"]
max_length = 96
[select]
top_k = 4
""")
    return path


@pytest.mark.parametrize("selector", ["random", "representation"])
def test_baseline_selectors_in_the_pipeline(tmp_path, selector):
    from iprox.pipeline import load_config, run
    from iprox.loading import read_scores

    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    res = run(load_config(_config(tmp_path, model_dir, selector), {"progress": False}))
    rows = read_scores(tmp_path / selector / "scores")
    top = [r["id"] for r in sorted(rows, key=lambda r: (-r["score"], r["id"]))[:4]]
    assert [r["id"] for r in res.selection["top"][:4]] == top  # the selection is the scores' head
    assert len(rows) == 20 and len({r["score"] for r in rows}) == 20
    if selector == "representation":
        ids, X = load_features(tmp_path / selector / "features" / "train")
        _, V = load_features(tmp_path / selector / "features" / "val")
        cos = torch.nn.functional.normalize(X.double(), dim=1) @ torch.nn.functional.normalize(V.double(), dim=1).T
        assert [r["score"] for r in rows] == pytest.approx(cos.mean(1).tolist(), rel=1e-9)
        assert not (tmp_path / selector / "warmup").exists()
