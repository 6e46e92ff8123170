"""The real pipeline on the embedded SmolLM2-135M-Instruct and ../shared/data (minutes; marked)."""

import json

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
                      probe_tokens=1536, max_length=256, progress=False)
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
    assert torch.isfinite(torch.tensor(p_loss)) and p_loss > t_loss
