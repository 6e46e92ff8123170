"""Per-example gradient cosines from one pass: against autograd on each example alone."""

import copy

import pytest
import torch
from test_alignment import _enc, _full_rank_proxy, _lora_state

from conftest import FACTORIES, tiny_llama
from iprox import align_objective, alignment
from iprox.align_objective import alignment_loss, carrying, layer_pairs
from iprox.alignment import AlignSettings, _micro_batches
from iprox.data import collate
from iprox.example_cosines import example_cosines, token_grads
from iprox.lowrank import FactorizedLinear


@pytest.mark.parametrize("form", ["gram", "dense", "auto"])
def test_example_cosines_equal_the_formed_gradients(form):
    """Oracle: each example's gradients formed token by token (a loop), their cosine; zero rows
    (padding) change nothing, and the result is differentiable in every input."""
    g = torch.Generator().manual_seed(0)
    b, T, m, n = 3, 7, 5, 4
    Da, Xa, Db, Xb = (torch.randn(b, T, d, generator=g, dtype=torch.float64, requires_grad=True)
                      for d in (m, n, m, n))
    pad = torch.ones(b, T, 1, dtype=torch.float64)
    pad[1, 5:] = 0   # example 1 is two tokens shorter
    got = example_cosines((Da * pad, Xa), (Db * pad, Xb), form)
    for i in range(b):
        ga = sum(torch.outer(Da[i, t] * pad[i, t], Xa[i, t]) for t in range(T))
        gb = sum(torch.outer(Db[i, t] * pad[i, t], Xb[i, t]) for t in range(T))
        want = (ga * gb).sum() / (ga.norm() * gb.norm())
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-12)
    got.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (Da, Xa, Db, Xb))
    with pytest.raises(ValueError, match="form must be"):
        example_cosines((Da, Xa), (Db, Xb), "loop")


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_token_grads_give_each_examples_own_weight_gradient(tmp_path, family):
    """Σ_t D_t X_tᵀ over an example's row of the batch is the gradient of that example's loss alone."""
    from iprox.evaluation import per_example_loss
    from iprox.models import compressible_modules

    model = FACTORIES[family](dtype=torch.float64)
    enc, tokd, tok = _enc(tmp_path)
    mods = list(compressible_modules(model).values())[:3]
    for p in model.parameters():
        p.requires_grad_(False)
    for mod in mods:
        mod.weight.requires_grad_(True)
    grads, _ = token_grads(model, mods, enc, create_graph=False)
    for i in range(len(tokd)):
        one = collate(tokd[i : i + 1], tok.pad_token_id)
        logits = model(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits
        want = torch.autograd.grad(per_example_loss(logits, one["labels"]).sum(), [m.weight for m in mods])
        for mod, (D, X), w in zip(mods, grads, want):
            g = torch.einsum("tm,tn->mn", D[i], X[i])
            torch.testing.assert_close(g if isinstance(mod, torch.nn.Linear) else g.T, w, rtol=1e-8, atol=1e-12)


def test_token_grads_refuse_a_module_run_twice(tmp_path):
    """A module called twice in one forward (shared weights) has no single (D, X): refused, not
    silently taken from its first call."""
    model = tiny_llama(dtype=torch.float64)
    enc, _, _ = _enc(tmp_path)
    up = model.model.layers[0].mlp.up_proj
    model.model.layers[1].mlp.up_proj = up          # the same module in two blocks
    with pytest.raises(RuntimeError, match="more than once"):
        token_grads(model, [up], enc, create_graph=False)


def _compressed_pair(dtype=torch.float64):
    """A tiny target and a proxy of it with every factor pair cut to rank 3 (L_GA > 0)."""
    target = tiny_llama(dtype=dtype)
    proxy = _full_rank_proxy(target)
    proxy.set_attn_implementation("eager")
    with torch.no_grad():
        for mod in proxy.modules():
            if isinstance(mod, FactorizedLinear):
                mod.A.weight[:, 3:] = 0
    return target, proxy


def _close_grads(got, want):
    """Within 1e-5 of the oracle's norm, factor by factor: the models are float64, but the eager
    attention takes its softmax in float32, and a padded batch rounds it otherwise than a batch of one."""
    for g, w in zip(got, want):
        assert float(w.norm()) > 0 and float((g - w).norm()) <= 1e-5 * float(w.norm())


def _one_by_one(proxy, target, pairs, tokd, pad_id, space, factors):
    """The oracle: each example alone through the batch form, the mean of their losses and gradients."""
    losses, grads = [], []
    for i in range(len(tokd)):
        one = collate(tokd[i : i + 1], pad_id)
        loss, ga, kl = alignment_loss(proxy, target, pairs, one, 0.5, 2.0, lora=space)
        losses.append(torch.stack([loss.detach(), ga, kl]))
        grads.append(torch.autograd.grad(loss, factors))
    n = len(tokd)
    return sum(losses) / n, [sum(g[k] for g in grads) / n for k in range(len(factors))]


@pytest.mark.parametrize("form,recompute", [("gram", False), ("dense", False), ("auto", True)])
def test_per_example_loss_is_the_mean_over_examples_alone(tmp_path, form, recompute):
    """Oracle for the alignment's per-example objective: one pass over a padded batch of 4 gives the
    mean over the examples of a batch of one each, in value and in its gradient on the factors
    (second order), in either form and with the target's blocks recomputed."""
    target, proxy = _compressed_pair()
    enc, tokd, tok = _enc(tmp_path)
    assert len({len(t.input_ids) for t in tokd}) > 1   # the batch really is padded
    pairs = layer_pairs(proxy, target)
    align_objective.require_pair_grads(proxy, target, pairs)
    factors = [t for p in pairs for t in (p.proxy.A.weight, p.proxy.B.weight)]
    want, want_g = _one_by_one(proxy, target, pairs, tokd, tok.pad_token_id, None, factors)
    loss, ga, kl = align_objective.example_alignment_loss(proxy, target, pairs, enc, 0.5, 2.0, recompute, None, form)
    torch.testing.assert_close(torch.stack([loss.detach(), ga, kl]), want, rtol=1e-9, atol=1e-12)
    assert float(ga) > 1e-3 and float(kl) > 0
    _close_grads(torch.autograd.grad(loss, factors), want_g)
    # the target's weights got no gradient (G is never formed) and the dispatch takes this form
    assert all(p.target.weight.grad is None for p in pairs)
    via = alignment_loss(proxy, target, pairs, enc, 0.5, 2.0, recompute, per_example=True)
    torch.testing.assert_close(via[0].detach(), loss.detach(), rtol=1e-12, atol=1e-12)


def test_per_example_loss_in_the_lora_space(tmp_path):
    """The same oracle with both models carrying a target's LoRA adapters."""
    target, proxy = _compressed_pair()
    enc, tokd, tok = _enc(tmp_path)
    pairs = layer_pairs(proxy, target)
    align_objective.require_pair_grads(proxy, target, pairs, target_weights=False)
    with carrying(proxy, target, _lora_state(target), 4.0) as space:
        factors = [t for p in pairs for t in (p.proxy.A.weight, p.proxy.B.weight)]
        want, want_g = _one_by_one(proxy, target, pairs, tokd, tok.pad_token_id, space, factors)
        loss, ga, kl = align_objective.example_alignment_loss(proxy, target, pairs, enc, 0.5, 2.0, lora=space)
        torch.testing.assert_close(torch.stack([loss.detach(), ga, kl]), want, rtol=1e-9, atol=1e-12)
        assert float(ga) > 1e-3
        _close_grads(torch.autograd.grad(loss, factors), want_g)


def test_exact_proxy_has_zero_per_example_loss(tmp_path):
    target = tiny_llama(dtype=torch.float64)
    proxy = _full_rank_proxy(target)
    enc, _, _ = _enc(tmp_path)
    pairs = layer_pairs(proxy, target)
    align_objective.require_pair_grads(proxy, target, pairs)
    loss, ga, kl = align_objective.example_alignment_loss(proxy, target, pairs, enc, 1.0, 2.0)
    assert abs(float(ga)) < 1e-10 and abs(float(kl)) < 1e-10


@pytest.mark.parametrize("per_example", [True, False])
def test_ranks_share_each_step_once(per_example):
    """Under torchrun the ranks' micro-batches cover the step's examples once, and their shares of the
    step's loss sum to one; per example the examples themselves are dealt, so two ranks share a
    step of one micro-batch of 4."""
    examples = list(range(20))
    s = AlignSettings(steps=10, batch_size=4, grad_accum=1, lr=1e-3, weight_decay=0, lambda_kl=0, temperature=1,
                      checkpoint_every=10, seed=0, per_example=per_example, micro_batch=4)
    for step in range(6):
        _, alone, shares = _micro_batches(examples, step, s)
        assert len(alone) == 1 and shares == [1.0]
        split = [_micro_batches(examples, step, s, r, 2) for r in range(2)]
        got = sorted(x for _, mbs, _ in split for mb in mbs for x in mb)
        assert got == sorted(alone[0])
        assert sum(sum(sh) for _, _, sh in split) == pytest.approx(1.0)
        busy = sum(1 for _, mbs, _ in split if mbs)
        assert busy == (2 if per_example else 1)


def test_micro_batches_per_example():
    """grad_accum × batch_size examples per step, taken micro_batch at a time, each pass its share."""
    s = AlignSettings(steps=4, batch_size=3, grad_accum=2, lr=1e-3, weight_decay=0, lambda_kl=0, temperature=1,
                      checkpoint_every=10, seed=0, per_example=True, micro_batch=4)
    _, mbs, shares = _micro_batches(list(range(12)), 0, s)
    assert [len(mb) for mb in mbs] == [4, 2] and shares == [pytest.approx(4 / 6), pytest.approx(2 / 6)]
    _, mbs, shares = _micro_batches(list(range(12)), 0, s, 1, 4)   # rank 1 of 4: examples 1 and 5 of the step
    assert [len(mb) for mb in mbs] == [2] and shares == [pytest.approx(2 / 6)]
    s.micro_batch = 1   # the default: one pass per example
    _, mbs, shares = _micro_batches(list(range(12)), 0, s)
    assert [len(mb) for mb in mbs] == [1] * 6 and shares == [pytest.approx(1 / 6)] * 6


def test_micro_batch_setting_is_checked():
    from iprox.proxy import ProxyConfig

    with pytest.raises(ValueError, match="align_micro_batch must be >= 1"):
        ProxyConfig(init="svd", align_micro_batch=0)
    with pytest.raises(ValueError, match="sets the passes of align_cosine"):
        ProxyConfig(init="svd", align_micro_batch=2, align_cosine="batch")


@pytest.mark.parametrize("micro", [1, 4])
def test_alignment_runs_per_example_in_passes_of_align_micro_batch(tmp_path, monkeypatch, micro):
    """align_cosine = example: one loss call per pass of align_micro_batch examples; 4 per step either way,
    and the same factors (the objective does not depend on the pass size)."""
    from safetensors.torch import load_file

    from conftest import chat_records, make_tokenizer, write_jsonl
    from test_alignment import _align_cfg

    from iprox.proxy import build_proxy

    data = write_jsonl(tmp_path / "pool.jsonl", chat_records(16))
    calls = []
    real = alignment.alignment_loss

    def counting(*a, **k):
        calls.append((a[3]["input_ids"].shape[0], k.get("per_example", a[-1] if len(a) > 8 else None)))
        return real(*a, **k)

    monkeypatch.setattr(alignment, "alignment_loss", counting)
    for m in (micro, 5 - micro):
        calls.clear()
        build_proxy(_align_cfg(tmp_path, data, out=str(tmp_path / f"p{m}"), align_examples=8, align_steps=3,
                               probe_examples=4, batch_size=4, align_cosine="example", align_micro_batch=m),
                    model=copy.deepcopy(tiny_llama()), tokenizer=make_tokenizer())
        assert calls == [(m, True)] * (3 * 4 // m)
    a, b = (load_file(str(tmp_path / f"p{m}" / "model.safetensors")) for m in (1, 4))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
