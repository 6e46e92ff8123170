"""bfloat16 end to end, float32 master weights, and one load per model in a pipeline run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_model_folder
from safetensors.torch import load_file
from test_scores import _write_config

from iprox.features import FeatureConfig, compute_features
from iprox.loading import load_features
from iprox.loading import LOADS, model_key
from iprox.models import resolve_dtype
from iprox.proxy import ProxyConfig, build_proxy
from iprox.training import MasterAdamW
from iprox.warmup import WarmupConfig, run_warmup


def test_dtype_names_and_auto():
    assert resolve_dtype("bf16") == "bfloat16" and resolve_dtype("FP16") == "float16"
    assert resolve_dtype("auto", "cpu") == "float32"  # bf16 buys little on a CPU
    with pytest.raises(ValueError, match="unknown"):
        resolve_dtype("bfloat8")
    assert WarmupConfig(data=["x"], out="y", dtype="bf16").dtype == "bfloat16"  # stage.json records the real name


def test_master_weights_keep_updates_bf16_would_round_away():
    w = torch.nn.Parameter(torch.full((4, 4), 1.0, dtype=torch.bfloat16))
    opt = MasterAdamW({"w": w}, lr=1e-4)
    for _ in range(10):
        w.grad = torch.ones_like(w)
        opt.step()
        opt.zero_grad()
    master = opt.named_tensors()["w"]
    # Adam moves each entry by ~lr per step: 1 - 10·1e-4 = 0.999, below bf16's resolution at 1.0 (2^-8 = 0.0039).
    assert master.dtype == torch.float32 and abs(float(master[0, 0]) - 0.999) < 1e-5
    assert float(w[0, 0]) == 1.0  # the bf16 copy alone would not have moved
    assert all(t.dtype == torch.float32 for t in opt.moments().values())
    naive = torch.nn.Parameter(torch.full((4, 4), 1.0, dtype=torch.bfloat16))
    plain = torch.optim.AdamW([naive], lr=1e-4)
    for _ in range(10):
        naive.grad = torch.ones_like(naive)
        plain.step()
    assert float(naive[0, 0]) == 1.0  # which is why the master copy exists


@pytest.fixture(scope="module")
def bf16_setup(tmp_path_factory):
    """A tiny Llama, its sparsity-0.5 proxy, and a pool."""
    from conftest import chat_records, write_jsonl

    tmp = tmp_path_factory.mktemp("bf16")
    model_dir = write_model_folder(tmp / "tiny", "llama")
    data = write_jsonl(tmp / "pool.jsonl", chat_records(24))
    build_proxy(ProxyConfig(model=str(model_dir), data=[str(data)], out=str(tmp / "proxy"), sparsity=0.5,
                            probe_examples=4, max_length=96, align_epochs=0.0, progress=False))
    return tmp, model_dir, data


def _warm(tmp, model, data, name, **kw):
    cfg = dict(model=str(model), data=[str(data)], out=str(tmp / name), examples=10, epochs=1, lr=2e-5,
               batch_size=4, lora_rank=2, lora_alpha=4, max_length=96, progress=False)
    cfg.update(kw)
    return run_warmup(WarmupConfig(**cfg))[-1]


def test_bf16_warmup_changes_the_factors_and_keeps_float32_state(bf16_setup):
    tmp, _, data = bf16_setup
    before = load_file(str(tmp / "proxy" / "model.safetensors"))
    ck = _warm(tmp, tmp / "proxy", data, "w-bf16", dtype="bfloat16", epochs=2)
    trained = load_file(str(ck / "trainable.safetensors"))
    moments = load_file(str(ck / "optimizer.safetensors"))
    assert all(t.dtype == torch.float32 for t in trained.values())
    assert all(t.dtype == torch.float32 for t in moments.values())
    # At lr 2e-5 every factor moved, by about lr per step, although bf16 could not hold the change.
    moved = [float((trained[k] - before[k].float()).abs().max()) for k in trained]
    assert min(moved) > 1e-6 and max(moved) < 1e-3
    assert all(float(moments[f"exp_avg_sq.{k}"].sum()) > 0 for k in trained)
    assert json.loads((ck / "checkpoint.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("engine,grad,model", [("kronecker", "factored-adam", "proxy"), ("dense", "adam", "proxy"),
                                               ("kronecker", "factored-adam", "lora"), ("dense", "adam", "lora")])
def test_bf16_features_agree_with_float32_features(bf16_setup, engine, grad, model):
    tmp, model_dir, data = bf16_setup
    # One checkpoint (trained in float32), featurised in float32 and in bfloat16.
    src = tmp / "proxy" if model == "proxy" else model_dir
    ck = tmp / f"w32-{model}" / "checkpoint-1"
    if not ck.exists():
        _warm(tmp, src, data, f"w32-{model}", lr=1e-3)
    rows = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp / f"f-{model}-{engine}-{dtype}"
        compute_features(FeatureConfig(checkpoint=str(ck), data=[str(data)], out=str(out), grad=grad, engine=engine,
                                       proj_dim=16, max_length=96, dtype=dtype, store_dtype="float32", progress=False))
        rows[dtype] = load_features(out)[1]
    a, b = rows["float32"], rows["bfloat16"]
    assert torch.isfinite(b).all() and b.shape == a.shape
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert float(cos.min()) >= 0.99, f"per-example cosine bf16 vs float32: min {float(cos.min()):.4f}"


@pytest.mark.parametrize("selector", ["proxy", "model"])
def test_bf16_run_completes_and_loads_each_model_once(tmp_path, selector):
    from iprox.pipeline import load_config, run

    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    before = dict(LOADS)
    res = run(load_config(_write_config(tmp_path, model_dir, selector=selector, run_extra='dtype = "bf16"'),
                          {"progress": False}))
    run_dir = tmp_path / "run"
    # The selected records are the pool's lines named by the scores' top ids ("pool.jsonl:<line>"), in order.
    pool_lines = (tmp_path / "pool.jsonl").read_text().splitlines()
    picked = (run_dir / "selection" / "selected.jsonl").read_text().splitlines()
    assert picked == [pool_lines[int(t["id"].split(":")[1]) - 1] for t in res.selection["top"][:5]]
    loads = {k: v - before.get(k, 0) for k, v in LOADS.items() if v != before.get(k, 0)}
    # The target is read from disk once. The proxy built from it, the warm-up's model, and both
    # checkpoints' train and validation features all use resident copies.
    assert loads == {model_key(str(model_dir)): 1}
    meta = json.loads((run_dir / "pipeline.json").read_text())
    assert meta["loads"] == {model_key(str(model_dir)): 1}
    for st in ("warmup", "features/train-2", "features/val-1"):
        assert json.loads((run_dir / st / "stage.json").read_text())["config"]["dtype"] == "bfloat16"
    scores = (run_dir / "scores" / "scores.csv").read_text().splitlines()[1:]
    assert len(scores) == 24 and all("nan" not in r for r in scores)


def test_a_resident_proxy_carries_no_gradients_into_the_warmup(tmp_path):
    """Found by the kill tier: a warm-up on the proxy alignment left resident started with alignment's
    last gradients on the factors, so it differed from a warm-up on the same proxy loaded from disk."""
    from conftest import chat_records, write_jsonl

    from iprox.session import Session

    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    data = write_jsonl(tmp_path / "pool.jsonl", chat_records(24))
    session = Session()
    build_proxy(ProxyConfig(model=str(model_dir), data=[str(data)], out=str(tmp_path / "proxy"), probe_examples=4,
                            align_examples=4, align_steps=2, batch_size=2, max_length=96, progress=False),
                session=session)
    resident, _ = session.model(str(tmp_path / "proxy"))
    assert all(p.grad is None for p in resident.parameters())
    # The warm-up from the resident proxy equals the warm-up from the proxy loaded from disk.
    def warm(name, s):
        return run_warmup(WarmupConfig(model=str(tmp_path / "proxy"), data=[str(data)], out=str(tmp_path / name),
                                       examples=10, epochs=1, lr=1e-3, batch_size=4, max_length=96, progress=False), s)[-1]

    a, b = warm("w-resident", session), warm("w-disk", Session())
    ta, tb = load_file(str(a / "trainable.safetensors")), load_file(str(b / "trainable.safetensors"))
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0)
