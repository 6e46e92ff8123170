"""Regression tier: the demo on the embedded model selects what it selected (about 10 minutes on 2 CPUs).

Run with ``make test-regression``. The demo selected the same ten ids at 0.2 (float64 factorisation)
and 0.3 (float32 factorisation, resident models). At 0.4 the demo follows the new defaults (the
target warms up and the proxy carries its LoRA; exact Adam instead of factored Adam) and selects
eight of those ten: boolean_expressions 37 and 206 replace multistep_arithmetic_two 39 and 163.
At 0.6 (probe_balance and align_cosine = example by default) it selects the same ten. At 0.7
(val_model = "both": the target's validation gradients beside the proxy's) seven of those ten stay;
multistep_arithmetic_two 39 and 163 (selected at 0.2-0.3) come back and formal_fallacies 70 enters,
for multistep_arithmetic_two 101, 21 and 11. At 0.8 (store format 3: a LoRA matrix's rank side kept
exact in the features) eight of those stay; multistep_arithmetic_two 11 and 21 come back for
formal_fallacies 70 and multistep_arithmetic_two 163, so nine of the ten are in the ten that LESS on
the target itself selected (measured under format 2). At 0.9 (calibration on by default: the target
featurises 20 of the 200 pool examples at each checkpoint) nine stay; multistep_arithmetic_two 101
replaces 39, and nine of the ten are still in LESS-on-target's ten (all but boolean_expressions 206).
"""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA

pytestmark = pytest.mark.regression

# Since 0.12 (the rerank) the demo selects the ten that LESS on the target itself selects (README);
# the proxy's own scores had boolean_expressions:206 in for multistep_arithmetic_two:39.
DEMO_SELECTION = {
    "multistep_arithmetic_two:11", "multistep_arithmetic_two:21", "multistep_arithmetic_two:39",
    "multistep_arithmetic_two:101", "multistep_arithmetic_two:139", "boolean_expressions:37",
    "boolean_expressions:47", "boolean_expressions:104", "boolean_expressions:165", "boolean_expressions:244",
}


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k").is_dir(), reason="needs ../shared/data")
def test_demo_selects_the_same_ten_examples(tmp_path, monkeypatch):
    from iprox.cli import DEMO_CONFIG
    from iprox.pipeline import load_config, run

    monkeypatch.setenv("IPROX_DATA", str(SHARED_DATA))
    res = run(load_config(DEMO_CONFIG, {"out": str(tmp_path / "demo"), "progress": False}))
    picked = (tmp_path / "demo" / "selection" / "selected.jsonl").read_text().splitlines()
    assert {t["id"] for t in res.selection["top"]} == DEMO_SELECTION and len(picked) == 10
    # The proxy's stage-2 losses within bounds: at 0.6 (balanced probe, per-example cosine) the
    # final L_GA is 0.70 as before and the KL fell from 2.63 (0.2-0.5) to 2.19 (measured again at 0.7,
    # whose change does not reach the proxy's stages: 0.745 and 2.20).
    meta = json.loads((tmp_path / "demo" / "proxy" / "proxy.json").read_text())
    assert 0.65 < meta["stage2"]["final_grad_align"] < 0.75
    assert 2.0 < meta["stage2"]["final_kl"] < 2.4
    assert json.loads((tmp_path / "demo" / "pipeline.json").read_text())["loads"] == {"smollm2-135m-instruct": 1}
