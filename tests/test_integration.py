"""The real pipeline on the embedded SmolLM2-135M-Instruct and ../shared/data (minutes; marked)."""

import json
import math

import pytest
import torch

from conftest import SHARED_DATA

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def target():
    from iprox.models import load_model

    return load_model("smollm2-135m-instruct")


def test_sparsity_half_proxy_from_a_few_dozen_examples(tmp_path, target, capsys):
    if not (SHARED_DATA / "gsm8k").is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}")
    from iprox.data import load_examples, tokenize_examples
    from iprox.evaluation import heldout_loss
    from iprox.models import count_parameters
    from iprox.proxy import ProxyConfig, build_proxy, load_proxy

    model, tok, _ = target
    pool = [str(SHARED_DATA / "gsm8k" / "train.jsonl"), str(SHARED_DATA / "bbh" / "tasks" / "snarks.json")]
    cfg = ProxyConfig(data=pool, out=str(tmp_path / "proxy"), sparsity=0.5, probe_examples=24,
                      probe_tokens=1536, max_length=256, align_epochs=0.0, progress=False)
    summary = build_proxy(cfg, model=model, tokenizer=tok)
    meta = json.loads((tmp_path / "proxy" / "proxy.json").read_text())
    proxy = load_proxy(tmp_path / "proxy")
    assert count_parameters(proxy) == meta["proxy_params"] == summary.proxy_params
    assert meta["target"]["params"] == count_parameters(model) == 134_515_008
    assert summary.layers_compressed == 210
    # Compressed layers hold at most half their parameters.
    for r in meta["layers"]:
        assert r["params_after"] <= 0.5 * r["params_before"]
    held = load_examples(str(SHARED_DATA / "gsm8k" / "test.jsonl"))[:12]
    tokd, _ = tokenize_examples(tok, held, 256)
    t_loss = heldout_loss(model, tokd, 6, tok.pad_token_id, progress=False)["token_loss"]
    p_loss = heldout_loss(proxy, tokd, 6, tok.pad_token_id, progress=False)["token_loss"]
    with capsys.disabled():
        print(f"\nheld-out GSM8K response loss: target {t_loss:.3f}, ipsvd proxy (sparsity 0.5) {p_loss:.3f}")
    # Worse than the target, better than a uniform guess over the vocabulary (ln 49152 = 10.8), which
    # plain SVD at this sparsity exceeds (BENCHMARKS.md: 20 nats).
    assert t_loss < p_loss < math.log(49152)


def test_kronecker_features_match_dense_on_the_real_model(target):
    """Real architecture (GQA, tied embeddings, SiLU MLP): both engines give the same features."""
    from iprox.data import collate, load_examples, tokenize_examples
    from iprox.projection import DenseEngine, KroneckerEngine, feature_modules, make_preconditioners, make_projections

    model, tok, _ = target
    exs = load_examples(str(SHARED_DATA / "gsm8k" / "test.jsonl"))[:3]
    tokd, _ = tokenize_examples(tok, exs, 192)
    modules = feature_modules(model)
    assert len(modules) == 210
    proj = make_projections(modules, 16, 0)
    pc = make_preconditioners("sgd", modules)
    enc = collate(tokd, tok.pad_token_id)
    kron = KroneckerEngine(model, modules, proj, pc)(enc)
    dense = DenseEngine(model, modules, proj, pc)(enc)
    cos = torch.nn.functional.cosine_similarity(kron, dense, dim=1)
    assert cos.min() > 0.9999, cos
    torch.testing.assert_close(kron, dense, rtol=1e-2, atol=1e-3 * dense.abs().max().item())


def test_the_dequantised_embedded_model_saves_as_a_plain_folder(target, tmp_path):
    """Fine-tuned and benchmark copies of the target are written with save_pretrained."""
    from iprox.models import load_model

    model, tok, _ = target
    model.save_pretrained(tmp_path / "t")
    tok.save_pretrained(tmp_path / "t")
    reloaded, _, _ = load_model(str(tmp_path / "t"))
    w = model.model.layers[3].mlp.down_proj.weight
    assert torch.equal(reloaded.model.layers[3].mlp.down_proj.weight, w)
