"""Stage 1 end to end on tiny Llama, GPT-2 (Conv1D) and Qwen2 (biases) models built in code."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FACTORIES, chat_records, make_tokenizer, tiny_gpt2, tiny_llama, write_jsonl
from iprox.artifacts import ConfigMismatchError
from iprox.data import collate, load_examples, tokenize_examples
from iprox.ipsvd import weighted_error
from iprox.lowrank import FactorizedLinear
from iprox.models import compressible_modules, count_parameters, projection_weight
from iprox.probe import collect_moments
from iprox.proxy import PROXY_FORMAT_VERSION, ProxyConfig, build_proxy, factorize_model, load_proxy


def _batch(tok, path, n=6):
    tokd, _ = tokenize_examples(tok, load_examples(str(path))[:n], 128)
    return collate(tokd, tok.pad_token_id)


def _logits(model, enc):
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits


def _cfg(tmp_path, data_file, **kw):
    base = dict(data=[str(data_file)], out=str(tmp_path / "proxy"), sparsity=0.5, probe_examples=8,
                probe_tokens=256, batch_size=4, align_epochs=0.0, progress=False)  # stage 1 alone
    base.update(kw)
    return ProxyConfig(**base)


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_compressible_modules_by_structure(family):
    model = FACTORIES[family]()
    mods = compressible_modules(model)
    assert len(mods) == {"llama": 14, "qwen2": 14, "gpt2": 8}[family]
    names = " ".join(mods)
    assert "lm_head" not in names and "embed" not in names and "wte" not in names
    # Weights are presented (out, in) whatever the storage: GPT-2's fused c_attn is 3*32 out, 32 in.
    if family == "gpt2":
        assert tuple(projection_weight(mods["transformer.h.0.attn.c_attn"]).shape) == (96, 32)


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_sparsity_zero_reproduces_target_logits(tmp_path, data_file, family):
    model, tok = FACTORIES[family](), make_tokenizer()
    s = build_proxy(_cfg(tmp_path, data_file, sparsity=0.0, init="svd"), model=model, tokenizer=tok)
    assert s.layers_compressed == 0 and s.proxy_params == s.target_params
    proxy = load_proxy(tmp_path / "proxy")
    target_state = model.state_dict()
    for k, v in proxy.state_dict().items():
        assert torch.equal(v, target_state[k]), k
    # Same weights; the loaded copy may pick another attention kernel, so allow float32 rounding.
    enc = _batch(tok, data_file)
    torch.testing.assert_close(_logits(proxy, enc), _logits(model, enc), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FACTORIES))
@pytest.mark.parametrize("init", ["ipsvd", "svd", "random"])
def test_build_save_load_roundtrip(tmp_path, data_file, family, init):
    model, tok = FACTORIES[family](), make_tokenizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    s = build_proxy(_cfg(tmp_path, data_file, init=init), model=model, tokenizer=tok)
    # Stage 1 reads the target's weights without copying them, and leaves them as they were.
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n], n
    meta = json.loads((tmp_path / "proxy" / "proxy.json").read_text())
    proxy = load_proxy(tmp_path / "proxy")
    assert count_parameters(proxy) == meta["proxy_params"] == s.proxy_params < s.target_params
    assert meta["method"] == init and meta["format_version"] == PROXY_FORMAT_VERSION
    assert meta["target"]["params"] == count_parameters(model)
    assert len(meta["target"]["weights_sha256"]) == 64
    assert meta["config"]["sparsity"] == 0.5
    # Factored layers carry the recorded rank and their parameter arithmetic adds up.
    fl = [m for m in proxy.modules() if isinstance(m, FactorizedLinear)]
    assert len(fl) == s.layers_compressed == sum(1 for r in meta["layers"] if r["rank"])
    assert sum(r["params_before"] - r["params_after"] for r in meta["layers"]) == s.target_params - s.proxy_params
    if init == "ipsvd":
        assert meta["probe"]["examples"] == 8 and meta["probe"]["tokens"] > 0
    # The saved folder reproduces the in-memory proxy exactly, without the target.
    mem = FACTORIES[family]()
    if init == "svd":
        factorize_model(mem, 0.5, "svd")
    enc = _batch(tok, data_file)
    out = _logits(proxy, enc)
    assert torch.isfinite(out).all()
    if init == "svd":
        torch.testing.assert_close(out, _logits(mem, enc))
    assert not torch.allclose(out, _logits(model, enc))   # compression changed the function


def test_gpt2_conv1d_factors_follow_the_transposed_weight():
    model = tiny_gpt2(dtype=torch.float64)
    W = projection_weight(compressible_modules(model)["transformer.h.0.mlp.c_fc"]).detach().clone()
    factorize_model(model, 0.5, "svd")
    f = model.get_submodule("transformer.h.0.mlp.c_fc")
    U, S, Vt = torch.linalg.svd(W)
    r = f.rank
    torch.testing.assert_close(f.dense_weight().detach(), U[:, :r] @ torch.diag(S[:r]) @ Vt[:r])


def test_ipsvd_layers_beat_svd_on_the_weighted_objective(tmp_path, data_file):
    tok = make_tokenizer()
    model = tiny_llama(dtype=torch.float64)
    tokd, _ = tokenize_examples(tok, load_examples(str(data_file)), 128)
    moments = collect_moments(model, compressible_modules(model), tokd, 2000, pad_id=tok.pad_token_id, progress=False)
    targets = {n: projection_weight(m).detach().clone() for n, m in compressible_modules(model).items()}
    ip, sv = tiny_llama(dtype=torch.float64), tiny_llama(dtype=torch.float64)
    factorize_model(ip, 0.6, "ipsvd", moments, ridge=1e-3)
    factorize_model(sv, 0.6, "svd")
    for name, W in targets.items():
        mo = moments[name]
        C_h = mo.C_h + 1e-3 * torch.trace(mo.C_h) / mo.C_h.shape[0] * torch.eye(mo.C_h.shape[0], dtype=torch.float64)
        C_d = mo.C_d + 1e-3 * torch.trace(mo.C_d) / mo.C_d.shape[0] * torch.eye(mo.C_d.shape[0], dtype=torch.float64)
        e_ip = weighted_error(W, ip.get_submodule(name).dense_weight().detach(), C_h, C_d)
        e_sv = weighted_error(W, sv.get_submodule(name).dense_weight().detach(), C_h, C_d)
        assert e_ip <= e_sv * (1 + 1e-9), name


@pytest.mark.parametrize("blocks_per_pass", [0, 1])
@pytest.mark.parametrize("init", ["ipsvd", "svd"])
def test_depth_slope_keeps_the_lower_blocks_at_the_same_budget(tmp_path, data_file, blocks_per_pass, init):
    tok = make_tokenizer()
    model = tiny_llama(dtype=torch.float64)
    common = dict(init=init, factor_dtype="float64", probe_blocks_per_pass=blocks_per_pass)
    uni = build_proxy(_cfg(tmp_path / "u", data_file, **common), model=model, tokenizer=tok)
    dep = build_proxy(_cfg(tmp_path / "d", data_file, depth_slope=0.6, **common), model=model, tokenizer=tok)
    metas = [json.loads((tmp_path / d / "proxy" / "proxy.json").read_text()) for d in ("u", "d")]
    assert metas[1]["depth_slope"] == 0.6 and metas[0]["depth_slope"] == 0.0
    # About the same parameters (floors per layer), more of them in the first block than the last.
    assert abs(dep.proxy_params - uni.proxy_params) <= 0.02 * uni.proxy_params
    per_block = [{}, {}]
    for i, m in enumerate(metas):
        for r in m["layers"]:
            b = int(r["name"].split(".")[2])
            per_block[i][b] = per_block[i].get(b, 0) + r["params_after"]
    last = max(per_block[0])
    assert per_block[0][0] == per_block[0][last]
    assert per_block[1][0] > per_block[0][0] > per_block[1][last]
    # Loaded back at the recorded ranks; under svd each layer is W's best approximation of that rank.
    proxy = load_proxy(tmp_path / "d" / "proxy").double()
    for r in metas[1]["layers"]:
        f = proxy.get_submodule(r["name"])
        assert f.rank == r["rank"]
        if init == "svd":
            W = projection_weight(model.get_submodule(r["name"])).detach()
            U, S, Vt = torch.linalg.svd(W)
            k = r["rank"]
            torch.testing.assert_close(f.dense_weight().detach(), U[:, :k] @ torch.diag(S[:k]) @ Vt[:k], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="depth_slope"):
        _cfg(tmp_path, data_file, depth_slope=1.5)
    with pytest.raises(ValueError, match="layer-drop"):
        _cfg(tmp_path, data_file, init="layer-drop", depth_slope=0.5)


def test_layer_drop_keeps_evenly_spaced_blocks(tmp_path, data_file):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=262, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model, tok = LlamaForCausalLM(cfg).eval(), make_tokenizer()
    s = build_proxy(_cfg(tmp_path, data_file, init="layer-drop", sparsity=0.5), model=model, tokenizer=tok)
    meta = json.loads((tmp_path / "proxy" / "proxy.json").read_text())
    assert meta["kept_blocks"] == [0, 2, 5]  # 3 of 6 blocks, first and last always kept
    proxy = load_proxy(tmp_path / "proxy")
    assert proxy.config.num_hidden_layers == len(meta["kept_blocks"])
    assert count_parameters(proxy) == s.proxy_params
    # The kept blocks are the target's blocks, unchanged.
    torch.testing.assert_close(proxy.model.layers[1].mlp.up_proj.weight, model.model.layers[2].mlp.up_proj.weight)


def test_load_refuses_missing_or_extra_tensors(tmp_path, data_file):
    build_proxy(_cfg(tmp_path, data_file, init="svd"), model=tiny_llama(), tokenizer=make_tokenizer())
    wfile = tmp_path / "proxy" / "model.safetensors"
    state = load_file(str(wfile))
    key = next(k for k in state if k.endswith(".A.weight"))
    save_file({k: v for k, v in state.items() if k != key}, str(wfile))
    with pytest.raises(ValueError, match="missing"):
        load_proxy(tmp_path / "proxy")
    save_file({**state, "model.extra": torch.zeros(2)}, str(wfile))
    with pytest.raises(ValueError, match="unexpected"):
        load_proxy(tmp_path / "proxy")
    save_file({**state, key: torch.zeros(3, 3)}, str(wfile))
    with pytest.raises(ValueError, match="shape"):
        load_proxy(tmp_path / "proxy")


def test_rerun_skips_changed_config_refused_overwrite_replaces(tmp_path, data_file):
    model, tok = tiny_llama(), make_tokenizer()
    first = build_proxy(_cfg(tmp_path, data_file, init="svd"), model=model, tokenizer=tok)
    assert not first.skipped
    again = build_proxy(_cfg(tmp_path, data_file, init="svd", progress=True), model=model, tokenizer=tok)
    assert again.skipped and again.proxy_params == first.proxy_params
    with pytest.raises(ConfigMismatchError, match="sparsity"):
        build_proxy(_cfg(tmp_path, data_file, init="svd", sparsity=0.7), model=model, tokenizer=tok)
    third = build_proxy(_cfg(tmp_path, data_file, init="svd", sparsity=0.7, overwrite=True), model=model, tokenizer=tok)
    assert not third.skipped and third.proxy_params < first.proxy_params


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="sparsity"):
        ProxyConfig(data=["x"], sparsity=1.2)
    with pytest.raises(ValueError, match="--data"):
        ProxyConfig(init="ipsvd", data=[])
    with pytest.raises(ValueError, match="init"):
        ProxyConfig(data=["x"], init="pca")


@pytest.mark.parametrize("balance", ["loss", "example"])
def test_probe_moments_equal_explicit_autograd(tmp_path, balance):
    """Hooks' C_h, C_δ equal second moments of inputs and output gradients taken by autograd; with
    ``balance="example"`` each example's output gradients are scaled to unit total energy first."""
    tok = make_tokenizer()
    model = tiny_llama(dtype=torch.float64)
    path = write_jsonl(tmp_path / "d.jsonl", chat_records(3, seed=4))
    tokd, _ = tokenize_examples(tok, load_examples(str(path)), 128)
    name = "model.layers.1.mlp.down_proj"
    mods = compressible_modules(model)
    got = collect_moments(model, {name: mods[name]}, tokd, probe_tokens=10_000, batch_size=2,
                          pad_id=tok.pad_token_id, progress=False, balance=balance)[name]
    # Oracle: one example at a time (no padding), every token, grads by retain_grad.
    Ch = torch.zeros(64, 64, dtype=torch.float64)
    Cd = torch.zeros(32, 32, dtype=torch.float64)
    N = 0
    for t in tokd:
        enc = collate([t], tok.pad_token_id)
        store = {}
        hk = mods[name].register_forward_hook(lambda m, i, o: store.update(h=i[0], y=o))
        logits = model(input_ids=enc["input_ids"]).logits
        hk.remove()
        store["y"].retain_grad()
        lab = enc["labels"][0, 1:]
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], lab, ignore_index=-100, reduction="sum") / (lab != -100).sum()
        loss.backward()
        h, d = store["h"][0].detach(), store["y"].grad[0]
        if balance == "example":
            d = d / d.norm()
        Ch += h.T @ h
        Cd += d.T @ d
        N += h.shape[0]
        model.zero_grad()
    assert got.n_tokens == N
    assert len({len(t.input_ids) for t in tokd}) > 1  # examples of different lengths, padded in a batch
    torch.testing.assert_close(got.C_h, Ch / N)
    torch.testing.assert_close(got.C_d, Cd / N)


def test_models_load_straight_to_their_device(tmp_path):
    from iprox.models import ModelSource, pretrained_kwargs

    folder = ModelSource("m", "folder", str(tmp_path))
    # an accelerator: weights go to it tensor by tensor (no whole-model copy in host memory)
    assert pretrained_kwargs(folder, "bfloat16", "cuda:1")["device_map"] == {"": "cuda:1"}
    assert "device_map" not in pretrained_kwargs(folder, "float32", "cpu")
    gguf = ModelSource("m.gguf", "gguf", str(tmp_path), "m.gguf")  # dequantised on the host in any case
    assert "device_map" not in pretrained_kwargs(gguf, "float32", "cuda")
