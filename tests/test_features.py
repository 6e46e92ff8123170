"""Per-example projected gradients against explicit autograd oracles; the sharded, resumable store."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FACTORIES, chat_records, make_tokenizer, write_jsonl, write_model_folder

from iprox.data import Example, collate, tokenize_examples
from iprox.evaluation import per_example_loss
from iprox.features import FeatureConfig, compute_features
from iprox.loading import STORE_FORMAT_VERSION, iter_features, load_features, read_manifest
from iprox.projection import (DenseEngine, KroneckerEngine, Preconditioner, feature_modules, make_preconditioners,
                              make_projection, make_projections, out_in, side_dims)


def _examples(n: int, seed: int = 0):
    tok = make_tokenizer()
    exs = [Example(id=f"e{i}", source="s", task="t", messages=[{"role": "user", "content": r["question"]},
                                                                {"role": "assistant", "content": r["answer"]}])
           for i, r in enumerate(chat_records(n, seed))]
    tokd, _ = tokenize_examples(tok, exs, 128)
    return tok, tokd


def _proxy_of(model):
    """A factorised copy (ranks below full) so A/B layers are featurised too."""
    from iprox.lowrank import FactorizedLinear
    from iprox.models import compressible_modules, get_submodule_parent, projection_weight

    for name, mod in list(compressible_modules(model).items()):
        W = projection_weight(mod).detach()
        m, n = W.shape
        r = max(1, min(m, n) // 3)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        f = FactorizedLinear(n, m, r, bias=mod.bias is not None, dtype=W.dtype)
        f.set_factors(U[:, :r] * S[:r], Vh[:r], mod.bias.detach() if mod.bias is not None else None)
        parent, child = get_submodule_parent(model, name)
        setattr(parent, child, f)
    return model


def oracle_grads(model, modules, item, pad_id):
    """One example alone (no padding): its weight gradients by plain autograd, as (out, in)."""
    enc = collate([item], pad_id)
    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    loss = per_example_loss(logits, enc["labels"]).sum()
    ws = [m.weight for m in modules.values()]
    for w in ws:
        w.requires_grad_(True)
    gs = torch.autograd.grad(loss, ws)
    return {n: out_in(m, g) for (n, m), g in zip(modules.items(), gs)}


def project(projections, grads):
    return torch.cat([(projections[n].P_out @ g @ projections[n].P_in.T).reshape(-1) for n, g in grads.items()])


@pytest.mark.parametrize("family", ["llama", "gpt2", "proxy"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_kronecker_equals_projected_autograd_gradients(family, batch_size):
    model = FACTORIES["gpt2" if family == "gpt2" else "llama"](seed=1, dtype=torch.float64)
    if family == "proxy":
        model = _proxy_of(model)
    tok, items = _examples(8)
    assert len({len(t.input_ids) for t in items}) > 3  # mixed lengths, so batches are padded
    modules = feature_modules(model)
    if family == "proxy":
        assert any(n.endswith(".A") for n in modules) and any(n.endswith(".B") for n in modules)
    proj = make_projections(modules, 16, seed=3, dtype=torch.float64)
    eng = KroneckerEngine(model, modules, proj, make_preconditioners("sgd", modules))
    got = torch.cat([eng(collate(items[i:i + batch_size], tok.pad_token_id)) for i in range(0, 8, batch_size)])
    want = torch.stack([project(proj, oracle_grads(model, modules, it, tok.pad_token_id)) for it in items])
    assert got.shape == (8, eng.dim)
    assert want.abs().max() > 1e-3  # gradients are not trivially zero
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # The engine leaves the caller's requires_grad flags as they were.
    assert all(p.requires_grad for p in model.parameters())


def test_padding_contributes_nothing():
    model = FACTORIES["llama"](seed=2, dtype=torch.float64)
    tok, items = _examples(6)
    modules = feature_modules(model)
    eng = KroneckerEngine(model, modules, make_projections(modules, 16, 0, torch.float64), make_preconditioners("sgd", modules))
    short = min(items, key=lambda t: len(t.input_ids))
    long_ = max(items, key=lambda t: len(t.input_ids))
    alone = eng(collate([short], tok.pad_token_id))
    padded = eng(collate([short, long_], tok.pad_token_id))[0]
    torch.testing.assert_close(padded, alone[0], rtol=1e-10, atol=1e-13)


def test_inner_products_survive_projection_at_large_k():
    """Stated tolerance: with 64×64 Kronecker projections of rank-8 'gradients' (as from 8 tokens),
    every normalised inner product <Pa, Pb>/(|a||b|) is within 0.1 of the true one."""
    g = torch.Generator().manual_seed(0)
    m = n = 384
    base_u, base_v = torch.randn(m, 8, generator=g, dtype=torch.float64), torch.randn(n, 8, generator=g, dtype=torch.float64)
    grads = []
    for i in range(6):  # correlated examples: shared token directions plus their own
        u = base_u + 0.7 * torch.randn(m, 8, generator=g, dtype=torch.float64)
        v = base_v + 0.7 * torch.randn(n, 8, generator=g, dtype=torch.float64)
        grads.append(u @ v.T)
    pr = make_projection("layer", m, n, 4096, seed=5, dtype=torch.float64)
    assert (pr.P_out.shape[0], pr.P_in.shape[0]) == (64, 64)
    flat = torch.stack([G.reshape(-1) for G in grads])
    proj = torch.stack([(pr.P_out @ G @ pr.P_in.T).reshape(-1) for G in grads])
    norms = flat.norm(dim=1)
    true = flat @ flat.T / torch.outer(norms, norms)
    got = proj @ proj.T / torch.outer(norms, norms)
    assert true.min() < 0.9  # the examples are not all alike, so the check has something to preserve
    assert (got - true).abs().max() < 0.1


def test_a_side_the_budget_covers_is_kept_exactly():
    """A LoRA matrix's rank side is not projected: the identity, so nothing random distorts it; a
    layer small enough for the budget on both sides is stored as its exact gradient."""
    pr = make_projection("x.lora_A", 8, 384, 64, seed=0, dtype=torch.float64)
    assert torch.equal(pr.P_out, torch.eye(8, dtype=torch.float64)) and pr.P_in.shape == (8, 384)
    pr = make_projection("x.lora_B", 384, 8, 64, seed=0, dtype=torch.float64)
    assert torch.equal(pr.P_in, torch.eye(8, dtype=torch.float64)) and pr.P_out.shape == (8, 384)
    small = make_projection("tiny", 4, 6, 64, seed=0, dtype=torch.float64)
    G = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(small.P_out @ G @ small.P_in.T, G, rtol=0, atol=0)


def test_kept_rank_side_distorts_inner_products_less_than_a_square_gaussian():
    """Over 20 projection seeds, rank-8 'lora_A' gradients (8 × 384) of correlated examples: the
    normalised inner products after projection (rank side kept, 384 → 8 on the other) are closer
    to the true ones than with an 8×8 Gaussian on the rank side as well (the scheme before store
    format 3)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 384, generator=g, dtype=torch.float64)
    grads = torch.stack([base + torch.randn(8, 384, generator=g, dtype=torch.float64) for _ in range(6)])
    flat = grads.reshape(6, -1)
    norms = flat.norm(dim=1)
    true = flat @ flat.T / torch.outer(norms, norms)
    err_kept, err_square = [], []
    for seed in range(20):
        pr = make_projection("layer.lora_A", 8, 384, 64, seed=seed, dtype=torch.float64)
        square = torch.randn(8, 8, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64) / math.sqrt(8)
        for P_out, errs in ((pr.P_out, err_kept), (square, err_square)):
            f = torch.stack([(P_out @ G @ pr.P_in.T).reshape(-1) for G in grads])
            errs.append((f @ f.T / torch.outer(norms, norms) - true).abs().mean())
    assert torch.stack(err_kept).mean() < 0.75 * torch.stack(err_square).mean()


def test_side_dims_and_determinism():
    assert side_dims(576, 576, 64) == (8, 8)
    assert side_dims(8, 576, 64) == (8, 8)
    assert side_dims(576, 8, 256) == (32, 8)  # a LoRA B: its rank side whole, the rest to the other
    assert side_dims(8, 576, 256) == (8, 32)
    assert side_dims(4, 6, 64) == (4, 6)  # a small layer: both sides whole, fewer dims than asked
    assert side_dims(576, 1536, 128) == (8, 16)
    a = make_projection("x.q_proj", 20, 30, 16, seed=1)
    b = make_projection("x.q_proj", 20, 30, 16, seed=1, dtype=torch.float64)
    torch.testing.assert_close(a.P_in, b.P_in.float())
    c = make_projection("x.k_proj", 20, 30, 16, seed=1)
    assert not torch.equal(a.P_in, c.P_in)


def _fake_adam(modules, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = {f"{n}.weight": 1e-3 * torch.randn(mod.weight.shape, generator=g, dtype=mod.weight.dtype) for n, mod in modules.items()}
    v = {f"{n}.weight": 1e-6 * torch.rand(mod.weight.shape, generator=g, dtype=mod.weight.dtype) + 1e-8 for n, mod in modules.items()}
    return m, v


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dense_adam_equals_hand_computation(family):
    model = FACTORIES[family](seed=3, dtype=torch.float64)
    tok, items = _examples(3)
    modules = feature_modules(model)
    proj = make_projections(modules, 16, 7, torch.float64)
    m, v = _fake_adam(modules)
    b1, b2, eps = 0.8, 0.99, 1e-8
    eng = DenseEngine(model, modules, proj, make_preconditioners("adam", modules, m, v, (b1, b2), eps))
    got = eng(collate(items, tok.pad_token_id))
    for row, it in zip(got, items):
        grads = oracle_grads(model, modules, it, tok.pad_token_id)
        parts = []
        for n, G in grads.items():
            mod = modules[n]
            M, V = out_in(mod, m[f"{n}.weight"]), out_in(mod, v[f"{n}.weight"])
            # LESS: (β1 m + (1-β1) g) / sqrt(β2 v + (1-β2) g² + eps), written out element by element.
            num = b1 * M + (1 - b1) * G
            den = torch.sqrt(b2 * V + (1 - b2) * G ** 2 + eps)
            parts.append((proj[n].P_out @ (num / den) @ proj[n].P_in.T).reshape(-1))
        torch.testing.assert_close(row, torch.cat(parts), rtol=1e-9, atol=1e-12)


def test_factored_adam_kronecker_equals_dense():
    model = FACTORIES["llama"](seed=4, dtype=torch.float64)
    tok, items = _examples(4)
    modules = feature_modules(model)
    proj = make_projections(modules, 16, 2, torch.float64)
    m, v = _fake_adam(modules, 1)
    pc = make_preconditioners("factored-adam", modules, m, v)
    enc = collate(items, tok.pad_token_id)
    kron = KroneckerEngine(model, modules, proj, pc)(enc)
    dense = DenseEngine(model, modules, proj, pc)(enc)
    torch.testing.assert_close(kron, dense, rtol=1e-8, atol=1e-12)
    # And it is a real preconditioner: not the sgd features.
    sgd = KroneckerEngine(model, modules, proj, make_preconditioners("sgd", modules))(enc)
    assert (kron - sgd).abs().max() > 1e-3 * kron.abs().max()


def test_factored_adam_is_exact_for_rank_one_second_moment():
    g = torch.Generator().manual_seed(0)
    r, c = torch.rand(5, generator=g, dtype=torch.float64) + 0.1, torch.rand(7, generator=g, dtype=torch.float64) + 0.1
    v = torch.outer(r, c)
    p = Preconditioner("factored-adam", m=torch.zeros(5, 7, dtype=torch.float64), v=v, beta1=0.0, beta2=1.0, eps=0.0)
    G = torch.randn(5, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(p.apply(G), G / v.sqrt())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_exact_adam_kronecker_equals_dense_and_hand_computation(family):
    """The fast engine's elementwise Adam: equal to the dense per-example loop (itself checked against
    the formula written out above), also when the examples go through the hooks one chunk at a time."""
    model = FACTORIES[family](seed=5, dtype=torch.float64)
    tok, items = _examples(5)
    modules = feature_modules(model)
    proj = make_projections(modules, 16, 3, torch.float64)
    m, v = _fake_adam(modules, 2)
    pc = make_preconditioners("adam", modules, m, v, (0.8, 0.99), 1e-8)
    enc = collate(items, tok.pad_token_id)
    dense = DenseEngine(model, modules, proj, pc)(enc)
    kron = KroneckerEngine(model, modules, proj, pc)
    torch.testing.assert_close(kron(enc), dense, rtol=1e-8, atol=1e-12)
    kron.exact_chunk_bytes = 1  # one example at a time
    torch.testing.assert_close(kron(enc), dense, rtol=1e-8, atol=1e-12)
    # and elementwise Adam is not what the factored form gives on the same moments
    fac = KroneckerEngine(model, modules, proj, make_preconditioners("factored-adam", modules, m, v, (0.8, 0.99), 1e-8))(enc)
    assert (fac - dense).abs().max() > 1e-2 * dense.abs().max()


def test_preconditioned_features_need_a_checkpoint():
    FeatureConfig(data=["x"], out="y", grad="adam", engine="kronecker", checkpoint="c")  # allowed: exact
    with pytest.raises(ValueError, match="checkpoint"):
        FeatureConfig(data=["x"], out="y", grad="factored-adam")


# ---------------------------------------------------------------------------------------------
# The store: resume, sharding, torchrun
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def setup_store(tmp_path):
    model_dir = write_model_folder(tmp_path / "model", "llama", seed=0)
    data = write_jsonl(tmp_path / "pool.jsonl", chat_records(11))
    return model_dir, data


def _cfg(model_dir, data, out, **kw):
    base = dict(model=str(model_dir), data=[str(data)], out=str(out), proj_dim=16, batch_size=3, shard_size=3,
                store_dtype="float32", progress=False)
    base.update(kw)
    return FeatureConfig(**base)


def test_store_round_trip_and_manifest(setup_store, tmp_path):
    model_dir, data = setup_store
    s = compute_features(_cfg(model_dir, data, tmp_path / "store"))
    ids, X = load_features(tmp_path / "store")
    man = read_manifest(tmp_path / "store")
    assert ids == [f"pool.jsonl:{i + 1}" for i in range(11)] == man["ids"]
    assert X.shape == (11, s.dim) and len(man["shards"]) == 4
    assert man["dim"] == sum(l["k_out"] * l["k_in"] for l in man["layout"])
    assert len(man["model_hash"]) == 64 and man["bytes_per_example"] == 4 * s.dim
    # Streaming in chunks gives the same rows.
    streamed = torch.cat([x for _, x in iter_features(tmp_path / "store", chunk_rows=2)])
    torch.testing.assert_close(streamed, X)
    # A rerun with the same settings skips; other settings are refused.
    assert compute_features(_cfg(model_dir, data, tmp_path / "store")).skipped
    with pytest.raises(Exception, match="other settings"):
        compute_features(_cfg(model_dir, data, tmp_path / "store", proj_dim=4))
    # Batch size does not change the features; float16 halves the bytes.
    compute_features(_cfg(model_dir, data, tmp_path / "b1", batch_size=1, store_dtype="float16"))
    ids1, X1 = load_features(tmp_path / "b1")
    assert ids1 == ids and read_manifest(tmp_path / "b1")["bytes_per_example"] == 2 * s.dim
    torch.testing.assert_close(X1, X, rtol=2e-3, atol=1e-3 * X.abs().max().item())


def test_killed_run_resumes_to_identical_store(setup_store, tmp_path, monkeypatch):
    import iprox.features as F

    model_dir, data = setup_store
    compute_features(_cfg(model_dir, data, tmp_path / "full"))
    real_write, written = F._write_shard, []

    def dying_write(path, feats, ids):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        written.append(path.name)
        real_write(path, feats, ids)

    monkeypatch.setattr(F, "_write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        compute_features(_cfg(model_dir, data, tmp_path / "cut"))
    assert not (tmp_path / "cut" / "COMPLETE").exists()
    assert sorted(p.name for p in (tmp_path / "cut").glob("shard-*")) == written
    monkeypatch.setattr(F, "_write_shard", lambda p, f, i: (written.append(p.name), real_write(p, f, i)))
    calls = []
    real_engine = F.KroneckerEngine.__call__
    monkeypatch.setattr(F.KroneckerEngine, "__call__", lambda self, enc: (calls.append(1), real_engine(self, enc))[1])
    compute_features(_cfg(model_dir, data, tmp_path / "cut"))
    assert written[2:] == ["shard-00002.safetensors", "shard-00003.safetensors"]  # only the missing shards
    assert len(calls) == 2  # one batch per missing shard (3 + 2 examples, batch size 3)
    a, b = load_features(tmp_path / "full"), load_features(tmp_path / "cut")
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    # A shard written by another store format (another projection scheme) is recomputed, not reused.
    from safetensors import safe_open
    from safetensors.torch import save_file

    shard = tmp_path / "cut" / "shard-00000.safetensors"
    with safe_open(str(shard), framework="pt") as f:
        meta, X = f.metadata(), f.get_tensor("features")
    save_file({"features": X}, str(shard), metadata={**meta, "format_version": "1"})
    (tmp_path / "cut" / "COMPLETE").unlink()
    written.clear()
    compute_features(_cfg(model_dir, data, tmp_path / "cut"))
    assert written == ["shard-00000.safetensors"]
    # A complete store of an older format is made again, not refused.
    man_path = tmp_path / "cut" / "manifest.json"
    man = json.loads(man_path.read_text())
    man_path.write_text(json.dumps({**man, "format_version": 1}))
    written.clear()
    compute_features(_cfg(model_dir, data, tmp_path / "cut"))
    assert len(written) == 4 and read_manifest(tmp_path / "cut")["format_version"] == STORE_FORMAT_VERSION


def test_torchrun_two_processes_equal_one(setup_store, tmp_path):
    model_dir, data = setup_store
    compute_features(_cfg(model_dir, data, tmp_path / "one"))
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "iprox.cli", "features",
           "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "two"), "--proj-dim", "16",
           "--batch-size", "3", "--shard-size", "3", "--store-dtype", "float32", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_features(tmp_path / "one"), load_features(tmp_path / "two")
    assert a[0] == b[0]
    torch.testing.assert_close(b[1], a[1], rtol=1e-5, atol=1e-6 * a[1].abs().max().item())
    man = read_manifest(tmp_path / "two")
    assert len(man["shards"]) == 4
    # Under torchrun too, a rerun with other settings is refused: the command fails and says why.
    changed = [c if c != "16" else "8" for c in cmd]
    r = subprocess.run(changed, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "other settings" in r.stderr, r.stderr[-3000:]


def test_total_dim_bounds_the_store_whatever_the_depth(tmp_path):
    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    data = write_jsonl(tmp_path / "d.jsonl", chat_records(6))
    for total in (64, 500):
        out = tmp_path / f"t{total}"
        compute_features(FeatureConfig(model=str(model_dir), data=[str(data)], out=str(out), total_dim=total,
                                       max_length=64, progress=False))
        man = read_manifest(out)
        n_layers = len(man["layout"])  # 14 projections in the tiny 2-block Llama
        assert man["dim"] <= total and man["dim"] >= total // 2 and man["proj_dim"] == total // n_layers
        assert load_features(out)[1].shape == (6, man["dim"])
