"""Stage 2 on tiny models: factor-space identities, the loss falls, resume equals uninterrupted."""

import csv
import json

import pytest
import torch

from conftest import FACTORIES, chat_records, make_tokenizer, tiny_llama, write_jsonl
from iprox import align_objective, alignment
from iprox.align_objective import (alignment_loss, factor_space_cosines, layer_pairs, projected_target_grads,
                                   proxy_factor_grads, target_weight_grads)
from iprox.data import collate, load_examples, tokenize_examples
from iprox.fidelity import gradient_fidelity
from iprox.ipsvd import svd_factors
from iprox.lowrank import FactorizedLinear
from iprox.models import compressible_modules, get_submodule_parent, projection_weight
from iprox.proxy import ProxyConfig, build_proxy, load_proxy


def _full_rank_proxy(target):
    """A proxy whose factors multiply back exactly to the target's weights."""
    import copy

    proxy = copy.deepcopy(target)
    for name, mod in compressible_modules(proxy).items():
        W = projection_weight(mod).detach()
        m, n = W.shape
        A, B = svd_factors(W, min(m, n))
        f = FactorizedLinear(n, m, min(m, n), bias=mod.bias is not None, dtype=W.dtype)
        f.set_factors(A.to(W.dtype), B.to(W.dtype), None if mod.bias is None else mod.bias.detach())
        parent, child = get_submodule_parent(proxy, name)
        setattr(parent, child, f)
    return proxy


def _enc(tmp_path, n=4):
    tok = make_tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", chat_records(n, seed=3))
    tokd, _ = tokenize_examples(tok, load_examples(str(path)), 96)
    return collate(tokd, tok.pad_token_id), tokd, tok


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_factor_gradients_equal_projected_target_gradients(tmp_path, family):
    target = FACTORIES[family](dtype=torch.float64)
    proxy = _full_rank_proxy(target)
    enc, _, _ = _enc(tmp_path)
    pairs = layer_pairs(proxy, target)
    for p in target.parameters():
        p.requires_grad_(False)
    for pr in pairs:
        pr.target.weight.requires_grad_(True)
    G, t_logits, t_loss = target_weight_grads(target, pairs, enc)
    gAB, p_logits, p_loss = proxy_factor_grads(proxy, pairs, enc, create_graph=False)
    torch.testing.assert_close(p_logits, t_logits, rtol=1e-9, atol=1e-9)
    for pr, g, (gA, gB) in zip(pairs, G, gAB):
        A, B = pr.proxy.A.weight, pr.proxy.B.weight
        torch.testing.assert_close(gA, g @ B.T, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(gB, A.T @ g, rtol=1e-8, atol=1e-12)
    ca, cb = factor_space_cosines(gAB, projected_target_grads(pairs, G))
    assert torch.allclose(ca, torch.ones_like(ca)) and torch.allclose(cb, torch.ones_like(cb))


def test_alignment_loss_is_zero_for_an_exact_proxy_and_positive_after_compression(tmp_path):
    target = tiny_llama(dtype=torch.float64)
    enc, _, _ = _enc(tmp_path)
    exact = _full_rank_proxy(target)
    for p in target.parameters():
        p.requires_grad_(False)
    pairs = layer_pairs(exact, target)
    for pr in pairs:
        pr.target.weight.requires_grad_(True)
    loss, ga, kl = alignment_loss(exact, target, pairs, enc, lambda_kl=1.0, temperature=2.0)
    assert abs(float(ga)) < 1e-10 and abs(float(kl)) < 1e-10


def _align_cfg(tmp_path, data, **kw):
    base = dict(data=[str(data)], out=str(tmp_path / "proxy"), sparsity=0.6, init="svd", probe_examples=4,
                align_examples=8, batch_size=8, align_steps=30, lr=3e-3, checkpoint_every=5, progress=False,
                max_length=96, align_cosine="batch")  # one micro-batch per step: the tests count them
    base.update(kw)
    return ProxyConfig(**base)


@pytest.mark.parametrize("lambda_kl", [0.0, 0.5])
def test_alignment_loss_falls(tmp_path, lambda_kl):
    data = write_jsonl(tmp_path / "pool.jsonl", chat_records(16))
    target, tok = tiny_llama(), make_tokenizer()
    build_proxy(_align_cfg(tmp_path, data, lambda_kl=lambda_kl), model=target, tokenizer=tok)
    rows = list(csv.DictReader(open(tmp_path / "proxy" / "align_log.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    ga = [float(r["grad_align"]) for r in rows]
    kl = [float(r["kl"]) for r in rows]
    assert sum(ga[-3:]) / 3 < 0.8 * sum(ga[:3]) / 3, ga
    assert all(k >= 0 for k in kl) and kl[0] > 0      # KL is reported even when it does not train
    meta = json.loads((tmp_path / "proxy" / "proxy.json").read_text())
    assert meta["stage2"]["steps"] == 30 and meta["stage2"]["lambda_kl"] == lambda_kl
    assert len(meta["stage2"]["ids"]) == 8 and len(meta["probe"]["ids"]) == 0       # svd init: no probe
    assert not set(meta["stage2"]["ids"]) & set(meta["probe"]["ids"])
    assert meta["stage2"]["final_grad_align"] == pytest.approx(ga[-1])
    # Only the factors trained: embeddings and norms are the target's.
    proxy = load_proxy(tmp_path / "proxy")
    torch.testing.assert_close(proxy.model.embed_tokens.weight, target.model.embed_tokens.weight)
    torch.testing.assert_close(proxy.model.layers[0].input_layernorm.weight, target.model.layers[0].input_layernorm.weight)
    # The caller's target comes back as it was (weights and requires_grad flags).
    assert all(p.requires_grad for p in target.parameters())
    torch.testing.assert_close(target.model.layers[0].mlp.up_proj.weight, tiny_llama().model.layers[0].mlp.up_proj.weight)


def test_interrupted_alignment_resumes_to_the_same_factors(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "pool.jsonl", chat_records(24))
    tok = make_tokenizer()
    kw = dict(batch_size=4, align_examples=12, align_steps=9, checkpoint_every=3, lambda_kl=0.2)
    build_proxy(_align_cfg(tmp_path / "a", data, **kw), model=tiny_llama(), tokenizer=tok)

    real = alignment.alignment_loss
    calls = {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 8:       # dies during step 8; last checkpoint is at step 6
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(alignment, "alignment_loss", failing)
    with pytest.raises(KeyboardInterrupt):
        build_proxy(_align_cfg(tmp_path / "b", data, **kw), model=tiny_llama(), tokenizer=tok)
    assert not (tmp_path / "b" / "proxy" / "COMPLETE").exists()
    assert json.loads((tmp_path / "b" / "proxy" / "align_checkpoint" / "state.json").read_text())["step"] == 6
    resumed = {"n": 0}

    def counting(*a, **k):
        resumed["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(alignment, "alignment_loss", counting)
    import iprox.proxy as proxy_mod

    def no_rebuild(*a, **k):
        raise AssertionError("stage 1 was rebuilt instead of loaded from the folder")

    monkeypatch.setattr(proxy_mod, "_stage1", no_rebuild)
    # A kill between dropping the old checkpoint and renaming the new one leaves only the new one
    # under its temporary name; the resume must still find it.
    ck = tmp_path / "b" / "proxy" / "align_checkpoint"
    ck.rename(ck.with_name("align_checkpoint.tmp"))
    # How often to checkpoint does not change the result, so it may differ on resume.
    build_proxy(_align_cfg(tmp_path / "b", data, **{**kw, "checkpoint_every": 4}), model=tiny_llama(), tokenizer=tok)
    assert resumed["n"] == 3          # steps 7-9 only: it resumed, it did not start over
    a, b = load_proxy(tmp_path / "a" / "proxy"), load_proxy(tmp_path / "b" / "proxy")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    log_a = (tmp_path / "a" / "proxy" / "align_log.csv").read_text().splitlines()
    log_b = (tmp_path / "b" / "proxy" / "align_log.csv").read_text().splitlines()
    assert [l.split(",")[:5] for l in log_a] == [l.split(",")[:5] for l in log_b]   # same losses, step by step


def test_fidelity_is_perfect_for_exact_proxy_and_improves_with_alignment(tmp_path):
    target = tiny_llama(dtype=torch.float64)
    _, tokd, tok = _enc(tmp_path, n=3)
    rep = gradient_fidelity(_full_rank_proxy(target), target, tokd, tok.pad_token_id, progress=False)
    assert rep["grad_cosine"] == pytest.approx(1.0, abs=1e-9) and rep["kl"] == pytest.approx(0.0, abs=1e-9)
    assert rep["grad_cosine_global"] == pytest.approx(1.0, abs=1e-9) and len(rep["layers"]) == 14
    data = write_jsonl(tmp_path / "pool.jsonl", chat_records(16))
    t32 = tiny_llama()
    build_proxy(_align_cfg(tmp_path, data, align_steps=0, align_epochs=0), model=t32, tokenizer=tok)
    before = gradient_fidelity(load_proxy(tmp_path / "proxy"), t32, tokd, tok.pad_token_id, progress=False)
    build_proxy(_align_cfg(tmp_path, data, overwrite=True), model=t32, tokenizer=tok)
    after = gradient_fidelity(load_proxy(tmp_path / "proxy"), t32, tokd, tok.pad_token_id, progress=False)
    assert -1 <= before["grad_cosine"] < after["grad_cosine"] <= 1


def test_probe_and_alignment_sets_are_disjoint_slices(tmp_path):
    data = write_jsonl(tmp_path / "pool.jsonl", chat_records(40))
    cfg = _align_cfg(tmp_path, data, init="ipsvd", probe_examples=0, align_examples=0, align_steps=1,
                     probe_tokens=64)
    assert cfg.split_sizes(123400) == (123, 1234)       # paper defaults: 1% of the pool, a tenth of it
    assert cfg.split_sizes(12234) == (16, 122)          # floors of 16 for smaller pools
    assert cfg.split_sizes(40) == (16, 16)
    build_proxy(cfg, model=tiny_llama(), tokenizer=make_tokenizer())
    meta = json.loads((tmp_path / "proxy" / "proxy.json").read_text())
    probe, align = meta["probe"]["ids"], meta["stage2"]["ids"]
    assert len(probe) == 16 and len(align) == 16 and not set(probe) & set(align)


def test_stage2_settings_are_checked():
    # alignment is on by default (5 epochs); steps, when given, replace the epochs
    assert ProxyConfig(data=["x"]).aligns and ProxyConfig(data=["x"]).align_epochs == 5.0
    assert not ProxyConfig(data=["x"], align_epochs=0).aligns
    # asked-for steps on a proxy without factors are refused; the default epochs do not apply to it
    with pytest.raises(ValueError, match="layer-drop"):
        ProxyConfig(data=["x"], init="layer-drop", align_steps=3)
    assert not ProxyConfig(data=["x"], init="layer-drop").aligns
    assert not ProxyConfig(data=["x"], sparsity=0.0).aligns


def test_epochs_count_to_at_least_align_min_steps():
    cfg = ProxyConfig(data=["x"])  # 5 epochs, a floor of 40 steps
    assert cfg.alignment_steps(4) == 40          # a 16-example set at batch 4: 20 steps raised to 40
    assert cfg.alignment_steps(10) == 50         # a larger set: the floor changes nothing
    assert ProxyConfig(data=["x"], align_min_steps=0).alignment_steps(4) == 20
    assert ProxyConfig(data=["x"], align_steps=7).alignment_steps(4) == 7     # given steps are not floored
    assert ProxyConfig(data=["x"], align_epochs=0).alignment_steps(4) == 0    # no alignment asked for
    with pytest.raises(ValueError, match="align_min_steps"):
        ProxyConfig(data=["x"], align_min_steps=-1)


def test_stage2_runs_the_floored_steps(tmp_path):
    # one pass over 8 examples at batch 8 is one step; the floor makes it 3, and the proxy records 3
    data = write_jsonl(tmp_path / "pool.jsonl", chat_records(16))
    target, tok = tiny_llama(), make_tokenizer()
    build_proxy(_align_cfg(tmp_path, data, align_steps=0, align_epochs=1.0, align_min_steps=3), model=target, tokenizer=tok)
    rows = list(csv.DictReader(open(tmp_path / "proxy" / "align_log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    meta = json.loads((tmp_path / "proxy" / "proxy.json").read_text())
    assert meta["stage2"]["steps"] == 3 and meta["stage2"]["steps_per_epoch"] == 1


def test_a_proxy_aligned_before_the_floor_still_matches_where_the_floor_changes_nothing(tmp_path):
    # a proxy aligned with no floor (as before 0.11) is skipped by the default's rerun when the floor
    # leaves its steps as they were, and refused (it would align longer now) when it raises them
    from conftest import write_model_folder
    from iprox.alignment import align_proxy
    from iprox.artifacts import ConfigMismatchError

    data = write_jsonl(tmp_path / "pool.jsonl", chat_records(16))
    model_dir = str(write_model_folder(tmp_path / "tiny", "llama"))
    build_proxy(_align_cfg(tmp_path, data, model=model_dir, out=str(tmp_path / "c"), align_steps=0, align_epochs=0.0))
    # stage 1 alone, with or without a floor, is the same proxy (a run's compressed/ made before 0.11 is kept)
    stage = json.loads((tmp_path / "c" / "stage.json").read_text())["config"]
    assert "align_min_steps" not in stage
    assert build_proxy(_align_cfg(tmp_path, data, model=model_dir, out=str(tmp_path / "c"), align_steps=0,
                                  align_epochs=0.0, align_min_steps=0)).skipped
    # 3 passes over 8 examples at batch 8: 3 steps
    cfg = lambda **kw: _align_cfg(tmp_path, data, model=model_dir, align_steps=0, align_epochs=3.0, **kw)  # noqa: E731
    assert not cfg(align_min_steps=3).floor_binds(16) and cfg(align_min_steps=4).floor_binds(16)
    first = align_proxy(cfg(align_min_steps=0), tmp_path / "c")
    assert first.stage2["steps"] == 3 and not first.skipped
    again = align_proxy(cfg(align_min_steps=3), tmp_path / "c")
    assert again.skipped
    with pytest.raises(ConfigMismatchError, match="align_min_steps"):
        align_proxy(cfg(align_min_steps=4), tmp_path / "c")


def test_gradient_report_refuses_a_proxy_without_factors(tmp_path):
    # a layer-drop or sparsity-0 proxy has no factor space to compare in: a clear refusal that points
    # at the score comparison, not the alignment's "nothing to align"
    target = tiny_llama()
    _, tokd, tok = _enc(tmp_path, n=1)
    with pytest.raises(ValueError, match="no factored layers.*--target-scores"):
        gradient_fidelity(tiny_llama(), target, tokd, tok.pad_token_id, progress=False)


def test_fidelity_warning_fires_on_random_factors_not_on_an_exact_proxy(tmp_path):
    from iprox.fidelity import fidelity_warning

    target = tiny_llama(dtype=torch.float64)
    _, tokd, tok = _enc(tmp_path, n=3)
    exact = gradient_fidelity(_full_rank_proxy(target), target, tokd, tok.pad_token_id, progress=False)
    assert fidelity_warning(exact) is None
    data = write_jsonl(tmp_path / "pool.jsonl", chat_records(16))
    t32 = tiny_llama()
    build_proxy(_align_cfg(tmp_path, data, align_steps=0, align_epochs=0, init="random"), model=t32, tokenizer=tok)
    rand = gradient_fidelity(load_proxy(tmp_path / "proxy"), t32, tokd, tok.pad_token_id, progress=False)
    msg = fidelity_warning(rand)
    assert msg is not None and "unlikely to be the target's" in msg, rand["grad_cosine_global"]
    # per source: the exact proxy's report splits its examples by source, every one faithful
    assert set(exact["by_source"]) == {t.source for t in tokd}
    assert sum(v["n_examples"] for v in exact["by_source"].values()) == len(tokd)
    assert all(v["grad_cosine_global"] > 0.999 for v in exact["by_source"].values())


def test_fidelity_warning_names_a_source_the_proxy_fails_on():
    from iprox.fidelity import fidelity_warning

    good = {"grad_cosine_global": 0.9, "kl": 0.1, "n_examples": 6}
    rep = {"grad_cosine_global": 0.45, "n_examples": 12,
           "by_source": {"bbh": good, "gsm8k": {"grad_cosine_global": 0.16, "kl": 1.7, "n_examples": 6}}}
    msg = fidelity_warning(rep)
    assert msg is not None and "gsm8k 0.160 (6 examples)" in msg and "bbh" not in msg
    rep["by_source"]["gsm8k"]["grad_cosine_global"] = 0.5
    assert fidelity_warning(rep) is None
    # one source is the overall figure: nothing more to say
    assert fidelity_warning({"grad_cosine_global": 0.45, "n_examples": 6, "by_source": {"x": good}}) is None


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_recomputed_blocks_give_the_same_gradients_and_second_derivatives(tmp_path, family):
    """Activation checkpointing (eval mode, non-reentrant) against the plain graph, in float64:
    the target's weight gradients and a double backward through the proxy's factor gradients."""
    from iprox.models import decoder_layers, recomputed_blocks

    target = FACTORIES[family](dtype=torch.float64).eval()
    enc, _, _ = _enc(tmp_path)
    results = []
    for recompute in (False, True):
        proxy = _full_rank_proxy(target)
        with torch.no_grad():   # factors off the exact product, so the cosines are not all 1
            for mod in proxy.modules():
                if isinstance(mod, FactorizedLinear):
                    mod.A.weight.mul_(1.1)
        pairs = layer_pairs(proxy, target)
        align_objective.require_pair_grads(proxy, target, pairs)
        with recomputed_blocks(target, recompute), recomputed_blocks(proxy, recompute):
            G, t_logits, _ = target_weight_grads(target, pairs, enc)
            loss, _, _ = alignment_loss(proxy, target, pairs, enc, lambda_kl=0.5, temperature=2.0)
            factors = [t for p in pairs for t in (p.proxy.A.weight, p.proxy.B.weight)]
            second = torch.autograd.grad(loss, factors)
        results.append((G, t_logits, second))
        _, blocks = decoder_layers(target)
        assert all("forward" not in b.__dict__ for b in blocks)       # left as it was
    (G0, l0, s0), (G1, l1, s1) = results
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-12)
    for a, b in zip(G0 + list(s0), G1 + list(s1)):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    assert max(float(s.abs().max()) for s in s0) > 1e-6            # the double backward reached the factors


def test_recomputed_blocks_keep_no_block_internals_for_the_backward():
    """The tensors autograd saves for the target's backward: with recomputation the blocks' internals
    are not among them (the checkpoint holds only each block's inputs, outside these hooks)."""
    from iprox.models import recomputed_blocks

    target = tiny_llama(dtype=torch.float32).eval()
    ids = torch.randint(0, 100, (2, 64))

    def saved_bytes(recompute: bool) -> int:
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with recomputed_blocks(target, recompute), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            target(input_ids=ids, use_cache=False).logits.sum()
        return sum(seen.values())
    assert saved_bytes(True) < 0.2 * saved_bytes(False)


def test_alignment_with_recomputation_and_offloaded_optimizer_trains_the_same_factors(tmp_path, monkeypatch):
    from iprox import training

    data = write_jsonl(tmp_path / "pool.jsonl", chat_records(16))
    tok = make_tokenizer()
    kw = dict(align_steps=4, lambda_kl=0.3)
    build_proxy(_align_cfg(tmp_path / "a", data, **kw), model=tiny_llama(), tokenizer=tok)
    used = {"recompute": 0, "offload": 0}
    real_blocks, real_init = align_objective.recomputed_blocks, training.MasterAdamW.__init__

    def blocks(model, enabled=True):
        used["recompute"] += bool(enabled)
        return real_blocks(model, enabled)

    def init(self, *a, offload=False, **k):
        used["offload"] += offload
        real_init(self, *a, offload=offload, **k)
    monkeypatch.setattr(align_objective, "recomputed_blocks", blocks)
    monkeypatch.setattr(training.MasterAdamW, "__init__", init)
    build_proxy(_align_cfg(tmp_path / "b", data, **kw, gradient_checkpointing=True, offload_optimizer=True),
                model=tiny_llama(), tokenizer=tok)
    assert used == {"recompute": 4, "offload": 1}   # one micro-batch per step
    a, b = load_proxy(tmp_path / "a" / "proxy"), load_proxy(tmp_path / "b" / "proxy")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(vb, va, rtol=1e-5, atol=1e-6)
    # settings that change only how it runs do not make the folder another proxy
    assert build_proxy(_align_cfg(tmp_path / "a", data, **kw, gradient_checkpointing=True),
                       model=tiny_llama(), tokenizer=tok).skipped


def test_offloaded_master_adamw_steps_like_the_resident_one():
    from iprox.training import MasterAdamW

    torch.manual_seed(0)
    ps = {dt: {"w": torch.nn.Parameter(torch.randn(8, 4).to(dt))} for dt in (torch.bfloat16, torch.float32)}
    for dt, params in ps.items():
        twin = {"w": torch.nn.Parameter(params["w"].detach().clone())}
        a, b = MasterAdamW(params, lr=1e-2), MasterAdamW(twin, lr=1e-2, offload=True)
        assert b.master["w"] is not twin["w"] and b.master["w"].device.type == "cpu"
        assert b.master["w"].dtype == torch.float32
        for step in range(3):
            g = torch.randn(8, 4).to(dt)
            params["w"].grad, twin["w"].grad = g.clone(), g.clone()
            a.step(), b.step()
        assert torch.equal(params["w"], twin["w"]), dt
        assert not torch.equal(params["w"].float(), torch.zeros(8, 4))


def test_recomputed_blocks_restore_a_forward_set_on_the_instance():
    """Hooks (accelerate's, for one) set ``forward`` on the module itself; it must survive the block."""
    from iprox.models import decoder_layers, recomputed_blocks

    model = tiny_llama(dtype=torch.float32).eval()
    _, blocks = decoder_layers(model)
    hooked = blocks[0].forward
    blocks[0].forward = hooked     # now an instance attribute, as a hook would leave it
    with recomputed_blocks(model):
        assert blocks[0].forward is not hooked and "forward" in blocks[1].__dict__
    assert blocks[0].__dict__["forward"] is hooked and "forward" not in blocks[1].__dict__


def test_per_example_cosine_is_micro_batches_of_one(tmp_path):
    """align_cosine = example trains on the same examples per step as the batch form, one example per
    micro-batch: the same factors as batch_size 1 with the step's examples accumulated, and other
    factors than the cosine over a micro-batch of 4 (the objective differs)."""
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "pool.jsonl", chat_records(16))
    tok = make_tokenizer()
    common = dict(align_examples=8, align_steps=3, probe_examples=4)
    runs = {"example": dict(batch_size=4, align_cosine="example"), "accumulated": dict(batch_size=1, grad_accum=4),
            "batch": dict(batch_size=4)}
    factors = {}
    for name, kw in runs.items():
        build_proxy(_align_cfg(tmp_path, data, out=str(tmp_path / name), **common, **kw), model=tiny_llama(),
                    tokenizer=tok)
        factors[name] = load_file(str(tmp_path / name / "model.safetensors"))
    gap = lambda a, b: max(float((factors[a][k] - factors[b][k]).abs().max()) for k in factors[a])  # noqa: E731
    assert gap("example", "accumulated") < 1e-5
    assert gap("example", "batch") > 1e-3


# ---------------------------------------------------------------------------------------------
# The LoRA space: align the gradients of a target's carried LoRA adapters
# ---------------------------------------------------------------------------------------------


def _lora_state(model, rank=2, seed=5, dtype=torch.float64):
    """Random adapters (both factors non-zero, as after a warm-up) on every compressible projection."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, mod in compressible_modules(model).items():
        m, n = projection_weight(mod).shape
        state[f"{name}.lora_A.default.weight"] = 0.3 * torch.randn(rank, n, generator=g, dtype=dtype)
        state[f"{name}.lora_B.default.weight"] = 0.3 * torch.randn(m, rank, generator=g, dtype=dtype)
    return state


def test_lora_space_gradients_are_the_merged_layers_gradient_projected(tmp_path):
    """Oracle: with W' = W + s·L_B L_A merged into a dense copy and G' = ∇_{W'} loss there, the carried
    adapters' gradients are s·L_Bᵀ G' and s·G' L_Aᵀ. An exact proxy carrying them has the target's
    (L_GA = KL = 0), and both models get their own layers back afterwards."""
    import copy

    from iprox.align_objective import LoraSpace, adapter_grads, carrying
    from iprox.lowrank import AdaptedLinear

    target = tiny_llama(dtype=torch.float64)
    proxy = _full_rank_proxy(target)
    enc, _, _ = _enc(tmp_path)
    alpha, state = 4.0, _lora_state(target)
    s = alpha / 2
    merged = copy.deepcopy(target)
    names = list(compressible_modules(merged))
    with torch.no_grad():
        for name in names:
            merged.get_submodule(name).weight += s * state[f"{name}.lora_B.default.weight"] @ state[f"{name}.lora_A.default.weight"]
    for p in merged.parameters():
        p.requires_grad_(False)
    weights = [merged.get_submodule(n).weight.requires_grad_(True) for n in names]
    logits = merged(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    from iprox.evaluation import per_example_loss

    Gs = torch.autograd.grad(per_example_loss(logits, enc["labels"]).mean(), weights)
    before = target(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.detach()
    pairs = layer_pairs(proxy, target)
    for p in list(target.parameters()) + list(proxy.parameters()):
        p.requires_grad_(False)
    with carrying(proxy, target, state, alpha) as space:
        assert isinstance(space, LoraSpace) and len(space.target) == len(names) == len(space.proxy)
        tAB, t_logits, _ = adapter_grads(target, space.target, enc, create_graph=False)
        torch.testing.assert_close(t_logits, logits.detach(), rtol=1e-9, atol=1e-9)
        for name, G, (gA, gB) in zip(sorted(names), [dict(zip(names, Gs))[n] for n in sorted(names)], tAB):
            A, B = state[f"{name}.lora_A.default.weight"], state[f"{name}.lora_B.default.weight"]
            torch.testing.assert_close(gA, s * B.T @ G, rtol=1e-8, atol=1e-12)
            torch.testing.assert_close(gB, s * G @ A.T, rtol=1e-8, atol=1e-12)
        loss, ga, kl = alignment_loss(proxy, target, pairs, enc, 1.0, 2.0, lora=space)
        assert abs(float(ga)) < 1e-10 and abs(float(kl)) < 1e-10
    assert not any(isinstance(m, AdaptedLinear) for mdl in (proxy, target) for m in mdl.modules())
    # a state naming a layer the models lack: refused, and neither model is left half-wrapped
    bad = {**state, "model.layers.9.mlp.up_proj.lora_A.default.weight": state[f"{names[0]}.lora_A.default.weight"],
           "model.layers.9.mlp.up_proj.lora_B.default.weight": state[f"{names[0]}.lora_B.default.weight"]}
    with pytest.raises(ValueError, match="no layer model.layers.9.mlp.up_proj"):
        with carrying(proxy, target, bad, alpha):
            pass
    assert not any(isinstance(m, AdaptedLinear) for mdl in (proxy, target) for m in mdl.modules())
    after = target(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_lora_space_loss_gradient_matches_finite_differences(tmp_path):
    """The second-order backward through the adapters' gradients: ⟨∇_A L, D⟩ against the central
    difference of L along a random direction D of one factor, in float64 (but for the eager
    attention's float32 softmax, which sets the step: at 3e-4 the difference agrees to ~2e-4)."""
    from iprox.align_objective import carrying

    target = tiny_llama(dtype=torch.float64)
    proxy = _full_rank_proxy(target)
    proxy.set_attn_implementation("eager")  # as run_alignment runs it: a double backward
    with torch.no_grad():  # a compressed proxy: every factor pair cut to rank 3
        for mod in proxy.modules():
            if isinstance(mod, FactorizedLinear):
                mod.A.weight[:, 3:] = 0
    enc, _, _ = _enc(tmp_path)
    pairs = layer_pairs(proxy, target)
    align_objective.require_pair_grads(proxy, target, pairs, target_weights=False)
    A = pairs[1].proxy.A.weight
    D = torch.randn(A.shape, generator=torch.Generator().manual_seed(0), dtype=A.dtype)
    with carrying(proxy, target, _lora_state(target), 4.0) as space:
        loss, ga, _ = alignment_loss(proxy, target, pairs, enc, 0.5, 2.0, lora=space)
        assert float(ga) > 1e-3
        (grad,) = torch.autograd.grad(loss, [A])
        eps = 3e-4
        vals = []
        for sign in (1, -1):
            with torch.no_grad():
                A += sign * eps * D
            vals.append(float(alignment_loss(proxy, target, pairs, enc, 0.5, 2.0, lora=space)[0].detach()))
            with torch.no_grad():
                A -= sign * eps * D
    fd = (vals[0] - vals[1]) / (2 * eps)
    assert abs(float((grad * D).sum())) > 1e-4
    assert float((grad * D).sum()) == pytest.approx(fd, rel=1e-3)


def _target_warmup(tmp_path, data, model_dir, seed=0):
    from iprox.warmup import WarmupConfig, run_warmup

    cks = run_warmup(WarmupConfig(model=str(model_dir), data=[str(data)], out=str(tmp_path / f"warmup-{seed}"),
                                  examples=8, epochs=1, lr=1e-3, lora_rank=2, max_length=96, seed=seed,
                                  progress=False))
    return cks[-1]


def test_alignment_in_the_lora_space_of_a_target_warmup(tmp_path):
    """build-proxy with align_space = lora on a real warm-up checkpoint: the LoRA-space loss falls, the
    proxy is saved without adapters and records the checkpoint, and the factors differ from the
    factor-space alignment's."""
    from safetensors.torch import load_file

    from conftest import write_model_folder

    data = write_jsonl(tmp_path / "pool.jsonl", chat_records(16))
    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    ck = _target_warmup(tmp_path, data, model_dir)
    kw = dict(model=str(model_dir), align_steps=12, lr=3e-3, lambda_kl=0.1)
    build_proxy(_align_cfg(tmp_path, data, out=str(tmp_path / "lora"), align_space="lora",
                           align_checkpoint=str(ck), **kw))
    rows = list(csv.DictReader(open(tmp_path / "lora" / "align_log.csv")))
    ga = [float(r["grad_align"]) for r in rows]
    assert len(ga) == 12 and sum(ga[-3:]) / 3 < 0.8 * sum(ga[:3]) / 3, ga
    meta = json.loads((tmp_path / "lora" / "proxy.json").read_text())
    info = json.loads((ck / "checkpoint.json").read_text())
    assert meta["stage2"]["space"] == "lora" and meta["stage2"]["checkpoint"] == str(ck.resolve())
    assert meta["stage2"]["checkpoint_uid"] == info["uid"]
    lora = load_file(str(tmp_path / "lora" / "model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in lora)
    build_proxy(_align_cfg(tmp_path, data, out=str(tmp_path / "factors"), **kw))
    factors = load_file(str(tmp_path / "factors" / "model.safetensors"))
    assert set(lora) == set(factors)
    assert max(float((lora[k] - factors[k]).abs().max()) for k in lora) > 1e-3
    assert json.loads((tmp_path / "factors" / "proxy.json").read_text())["stage2"]["space"] == "factors"
    # the same settings again: skipped; another warm-up in the same folder is another space
    again = _align_cfg(tmp_path, data, out=str(tmp_path / "lora"), align_space="lora", align_checkpoint=str(ck), **kw)
    assert build_proxy(again).skipped
    from iprox.artifacts import ConfigMismatchError
    from iprox.warmup import WarmupConfig, run_warmup

    run_warmup(WarmupConfig(model=str(model_dir), data=[str(data)], out=str(ck.parent), examples=8, epochs=1, lr=1e-3,
                            lora_rank=2, max_length=96, seed=1, progress=False, overwrite=True))
    assert json.loads((ck / "checkpoint.json").read_text())["uid"] != info["uid"]
    with pytest.raises(ConfigMismatchError):
        build_proxy(again)


def test_lora_space_settings_are_checked(tmp_path):
    from conftest import write_model_folder

    data = write_jsonl(tmp_path / "pool.jsonl", chat_records(16))
    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    with pytest.raises(ValueError, match='align_checkpoint is the LoRA checkpoint of align_space = "lora"'):
        ProxyConfig(data=[str(data)], align_checkpoint=str(tmp_path))
    with pytest.raises(ValueError, match='align_space = "lora" needs align_checkpoint'):
        build_proxy(_align_cfg(tmp_path, data, model=str(model_dir), align_space="lora"))
    with pytest.raises(FileNotFoundError, match="not a warm-up checkpoint"):
        build_proxy(_align_cfg(tmp_path, data, model=str(model_dir), align_space="lora", align_checkpoint=str(tmp_path)))
    other = write_model_folder(tmp_path / "other", "llama", seed=9)
    ck = _target_warmup(tmp_path, data, other)
    with pytest.raises(ValueError, match="is a warm-up of .*, not of the target"):
        build_proxy(_align_cfg(tmp_path, data, model=str(model_dir), align_space="lora", align_checkpoint=str(ck)))
    assert not (tmp_path / "proxy").exists()  # refused before the folder was touched


def test_fidelity_report_in_the_lora_space(tmp_path):
    """iprox fidelity --checkpoint: the cosines between the carried adapters' gradients. An exact proxy
    (and a sparsity-0 one, which has no factor space) measures 1 and KL 0; a compressed proxy less; both
    models come back without adapters; a warm-up of another model is refused."""
    from conftest import write_model_folder
    from iprox.fidelity import FidelityConfig, fidelity_report, format_report
    from iprox.lowrank import AdaptedLinear

    target = tiny_llama(dtype=torch.float64)
    _, tokd, tok = _enc(tmp_path, n=3)
    lora = (_lora_state(target), 4.0)
    exact = gradient_fidelity(_full_rank_proxy(target), target, tokd, tok.pad_token_id, progress=False, lora=lora)
    assert exact["space"] == "lora" and len(exact["layers"]) == 14
    assert exact["grad_cosine_global"] == pytest.approx(1.0, abs=1e-9) and exact["kl"] == pytest.approx(0.0, abs=1e-9)
    dense = gradient_fidelity(tiny_llama(dtype=torch.float64), target, tokd, tok.pad_token_id, progress=False, lora=lora)
    assert dense["grad_cosine_global"] == pytest.approx(1.0, abs=1e-9)
    assert not any(isinstance(m, AdaptedLinear) for m in target.modules())

    data = write_jsonl(tmp_path / "pool.jsonl", chat_records(16))
    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    ck = _target_warmup(tmp_path, data, model_dir)
    build_proxy(_align_cfg(tmp_path, data, model=str(model_dir), align_steps=0, align_epochs=0))
    common = dict(proxy=str(tmp_path / "proxy"), target=str(model_dir), data=[str(data)], limit=4, max_length=96,
                  progress=False)
    rep = fidelity_report(FidelityConfig(**common, checkpoint=str(ck), out=str(tmp_path / "lora.json")))
    fac = fidelity_report(FidelityConfig(**common, out=str(tmp_path / "factors.json")))
    assert rep["space"] == "lora" and fac["space"] == "factors" and rep["checkpoint"] == str(ck)
    assert 0 < rep["grad_cosine_global"] < 0.999 and rep["kl"] > 0  # (the KL of the two adapted models)
    assert set(rep["layers"]) == set(fac["layers"])  # every factored layer carries an adapter here
    assert "carried LoRA adapters" in format_report(rep) and "cos lora_A" in format_report(rep)
    other = write_model_folder(tmp_path / "other", "llama", seed=9)
    with pytest.raises(ValueError, match="not of the target"):
        fidelity_report(FidelityConfig(**{**common, "target": str(other)}, checkpoint=str(ck),
                                       out=str(tmp_path / "x.json")))
    with pytest.raises(ValueError, match="--checkpoint sets the space"):
        FidelityConfig(checkpoint=str(ck), out=str(tmp_path / "y.json"), target_scores="a", proxy_scores="b")
