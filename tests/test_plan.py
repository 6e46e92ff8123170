"""iprox plan: estimates from the config alone, checked against peaks measured on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from iprox.cli import main
from iprox.plan import PlanConfig, plan

HERE = Path(__file__).parent
LENGTH, BATCH = 256, 4

# A child process (so its peak is its own): load the model, then build the stage-1 proxy; the
# measured peak is the weights plus the highest RSS above the RSS after loading (what a device
# would hold: the load's host-side copy is not the stage's).
CHILD = f"""
import json, resource, sys
import psutil
import iprox.plan, iprox.proxy
from iprox.models import load_model
from iprox.proxy import ProxyConfig, build_proxy
folder = sys.argv[1]
m, tok, _ = load_model(folder)
W = sum(p.numel() * p.element_size() for p in m.parameters())
base = psutil.Process().memory_info().rss
build_proxy(ProxyConfig(model=folder, data=[folder + "/data.jsonl"], out=folder + "/proxy", probe_examples=8,
                        probe_tokens=512, max_length={LENGTH}, batch_size={BATCH}, probe_statistics=sys.argv[2],
                        align_epochs=0.0, progress=False), model=m, tokenizer=tok)
print(json.dumps({{"measured_gib": (W + resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**30}}))
"""


def _small_model(folder: Path, family: str) -> None:
    """Small enough to build in seconds, large enough that its memory stands out of the RSS noise."""
    from conftest import make_tokenizer, write_jsonl
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    kw = dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, tie_word_embeddings=False)
    cfg = {"llama": lambda: LlamaConfig(**kw, pad_token_id=0), "qwen2": lambda: Qwen2Config(**kw),
           "gpt2": lambda: GPT2Config(vocab_size=32000, n_embd=256, n_layer=4, n_head=8, n_positions=512)}[family]()
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    words = " ".join("alpha beta gamma delta epsilon zeta eta theta".split() * 8)
    write_jsonl(folder / "data.jsonl", [{"messages": [{"role": "user", "content": words},
                                                      {"role": "assistant", "content": words}]}] * 8)


@pytest.mark.parametrize("family,statistics", [("llama", "moments"), ("gpt2", "moments"), ("qwen2", "moments"),
                                               ("llama", "samples")])
def test_stage1_estimate_within_25_percent_of_the_measured_peak(tmp_path, family, statistics):
    _small_model(tmp_path, family)
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), statistics], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    measured = json.loads(r.stdout.strip().splitlines()[-1])["measured_gib"]
    planned = plan(PlanConfig(model=str(tmp_path), dtype="float32", max_length=LENGTH,
                              proxy=dict(batch_size=BATCH, probe_examples=8, probe_tokens=512,
                                         probe_statistics=statistics)))["stages"]["probe+factorise"]["peak_gib"]
    assert measured > 0.5  # the stage's memory dominates the measurement, not the process's noise
    assert abs(planned / measured - 1) <= 0.25, (family, planned, measured)


# The alignment's peak, measured the same way. glibc's malloc would keep freed memory of the target
# phase in the process and add it to the proxy phase's (a device's caching allocator reuses it):
# a fixed mmap threshold returns freed blocks, so the RSS follows the live tensors.
ALIGN_CHILD = f"""
import json, resource, sys
import psutil
from iprox.models import load_model
from iprox.proxy import ProxyConfig, build_proxy
folder = sys.argv[1]
m, tok, _ = load_model(folder)
W = sum(p.numel() * p.element_size() for p in m.parameters())
base = psutil.Process().memory_info().rss
build_proxy(ProxyConfig(model=folder, data=[folder + "/data.jsonl"], out=folder + "/proxy", init="svd", probe_examples=4,
                        max_length={LENGTH}, batch_size={BATCH}, align_examples={BATCH}, align_steps=1,
                        gradient_checkpointing=sys.argv[2] == "1", align_cosine=sys.argv[3],
                        align_micro_batch={BATCH} if sys.argv[3] == "example" else 1, progress=False),
            model=m, tokenizer=tok)
print(json.dumps({{"measured_gib": (W + resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**30}}))
"""


@pytest.mark.parametrize("family,recompute,cosine", [("llama", False, "batch"), ("gpt2", False, "batch"),
                                                    ("qwen2", True, "batch"), ("llama", False, "example"),
                                                    ("qwen2", True, "example")])
def test_alignment_estimate_within_25_percent_of_the_measured_peak(tmp_path, family, recompute, cosine):
    import os

    _small_model(tmp_path, family)
    r = subprocess.run([sys.executable, "-c", ALIGN_CHILD, str(tmp_path), str(int(recompute)), cosine],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert r.returncode == 0, r.stderr[-3000:]
    measured = json.loads(r.stdout.strip().splitlines()[-1])["measured_gib"]
    planned = plan(PlanConfig(model=str(tmp_path), dtype="float32", max_length=LENGTH,
                              proxy=dict(batch_size=BATCH, gradient_checkpointing=recompute, align_cosine=cosine,
                                         align_micro_batch=BATCH if cosine == "example" else 1)))["stages"]["align"]["peak_gib"]
    assert measured > 1.0
    assert abs(planned / measured - 1) <= 0.25, (family, planned, measured)


def test_llama_8b_alignment_fits_80_gb_with_recomputation_offload_and_micro_batches():
    cfg = str(HERE / "data" / "llama-3.1-8b-config.json")
    peak = lambda **kw: plan(PlanConfig(model=cfg, dtype="bf16",  # noqa: E731  (micro-batches of 4 unless told)
                                        proxy={"align_cosine": "batch", **kw}))["stages"]["align"]["peak_gib"]
    default = peak()
    assert default > 100                                            # batch 4, Adam state on the device
    assert peak(offload_optimizer=True) < default - 45              # 16 bytes × ~3.5B factor parameters
    assert peak(gradient_checkpointing=True) <= default             # the target phase is not the peak here
    assert peak(gradient_checkpointing=True, offload_optimizer=True, batch_size=1) <= 80
    # the per-example cosine runs passes of align_micro_batch (1 unless told) whatever batch_size, and
    # never forms the target's weight gradients: below the summed cosine's micro-batch of one
    one = peak(offload_optimizer=True, align_cosine="example")
    assert one == pytest.approx(peak(offload_optimizer=True, align_cosine="example", batch_size=1, grad_accum=4))
    assert one < peak(offload_optimizer=True, batch_size=1) - 5        # G: 2 bytes × ~7B weights
    assert peak(offload_optimizer=True, align_cosine="example", align_micro_batch=4) > one + 40


def test_llama_8b_config_plans_stage1_within_60_gb_in_bf16():
    cfg = str(HERE / "data" / "llama-3.1-8b-config.json")
    p = plan(PlanConfig(model=cfg, dtype="bf16", budget_gib=60))
    assert 8.0e9 < p["params"] < 8.1e9 and p["weights_gib"] == pytest.approx(8.03e9 * 2 / 2**30, rel=0.01)
    assert p["probe_fits_budget"] and p["stages"]["probe+factorise"]["peak_gib"] <= 60
    # ... by probing a few blocks per pass: all 32 in one pass hold ~185 GB of float64 moments
    assert 1 <= p["probe_blocks_per_pass"] < 32
    everything = plan(PlanConfig(model=cfg, dtype="bf16", proxy=dict(probe_blocks_per_pass=32), budget_gib=1000))
    assert everything["stages"]["probe+factorise"]["peak_gib"] > 150
    # the bounded-memory probe keeps 4,096 sampled rows instead: all 32 blocks in one pass in ~64 GB
    samples = plan(PlanConfig(model=cfg, dtype="bf16", budget_gib=1000,
                              proxy=dict(probe_blocks_per_pass=32, probe_statistics="samples")))
    assert samples["stages"]["probe+factorise"]["peak_gib"] < 70


def test_cli_plan_prints_every_stage(capsys):
    assert main(["plan", "--model", "tiny", "--pool", "1000", "--budget-gib", "8"]) == 0
    out = capsys.readouterr().out
    for stage in ("probe+factorise", "align", "warmup (target)", "features (proxy)", "features (target)",
                  "features (target, val + calibration)"):
        assert stage in out
    assert "fits in 8 GiB" in out
    assert main(["plan", "--model", "tiny", "--pool", "1000", "--warmup-on", "proxy"]) == 0
    out = capsys.readouterr().out
    assert "warmup (proxy)" in out and "val + calibration" not in out
    # the loss's logits alone (4 × 512 × 49,152 in float32, five of them) exceed 1 GiB
    assert main(["plan", "--model", "tiny", "--budget-gib", "1"]) == 0
    assert "does NOT fit in 1 GiB" in capsys.readouterr().out
    assert main(["plan", "--model", "/no/such/folder"]) == 2


def test_plan_takes_a_run_configs_settings_and_stage_defaults(tmp_path, capsys):
    from conftest import chat_records, write_jsonl

    pool = write_jsonl(tmp_path / "pool.jsonl", chat_records(30))
    val = write_jsonl(tmp_path / "val.jsonl", chat_records(3, seed=1))
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[run]\nout = "{tmp_path}/run"\nmodel = "tiny"\n[data]\npool = ["{pool}"]\n'
                   f'validation = ["{val}"]\nmax_length = 64\n[proxy]\nsparsity = 0.3\n[warmup]\nepochs = 2\n'
                   f'[features]\ntrain_grad = "adam"\nval_model = "both"\n')  # the pipeline's own keys
    assert main(["plan", "--config", str(cfg), "--out", str(tmp_path / "p.json")]) == 0
    from_run = json.loads((tmp_path / "p.json").read_text())
    # the same settings given as --set on the command line plan the same run
    assert main(["plan", "--model", "tiny", "--pool", "30", "--validation", "3", "--max-length", "64",
                 "--set", "proxy.sparsity=0.3", "--set", "warmup.epochs=2", "--out", str(tmp_path / "q.json")]) == 0
    assert json.loads((tmp_path / "q.json").read_text()) == from_run
    # the run's settings were planned, not the defaults: sparsity 0.3 keeps more of the target than
    # 0.5, and 2 warm-up epochs featurise the pool twice where 4 do it four times
    default = plan(PlanConfig(model="tiny", pool=30, validation=3, max_length=64))
    assert from_run["proxy_params"] > default["proxy_params"]
    assert from_run["stages"]["features (target)"]["flops"] == pytest.approx(default["stages"]["features (target)"]["flops"] / 2)
    # the stage's own defaults: 5 alignment epochs over max(16, 1%) examples at batch 4 = 20 steps,
    # raised to align_min_steps (40); a larger pool's set is past the floor
    assert PlanConfig(model="tiny", pool=30).align_steps() == 40
    assert PlanConfig(model="tiny", pool=30, proxy={"align_min_steps": 0}).align_steps() == 20
    assert PlanConfig(model="tiny", pool=10000, proxy={"batch_size": 1, "grad_accum": 4}).align_steps() == 125
    with pytest.raises(ValueError, match=r"\[proxy\] has unknown settings \['sparsty'\]"):
        PlanConfig(proxy={"sparsty": 0.3})
    with pytest.raises(ValueError, match=r"\[warmup\]"):
        PlanConfig(warmup={"epochs": 0})
    assert main(["plan", "--set", "sparsity=0.3"]) == 2


def test_plan_counts_the_target_first_orders_own_passes():
    """Target-first (the default), the IProX run warms the target up and has the target featurise
    the validation examples and the calibration subset; each pipeline's FLOPs are its stages' sum."""
    base = dict(model="tiny", pool=1000, validation=12, max_length=64, warmup={"epochs": 2})
    p = plan(PlanConfig(**base))
    st = p["stages"]
    assert p["pipelines"]["iprox"] == ["probe+factorise", "align", "warmup (target)",
                                       "features (target, val + calibration)", "features (proxy)",
                                       "features (target, rerank)"]
    assert p["proxy_flops"] == sum(st[k]["flops"] for k in p["pipelines"]["iprox"])
    assert p["target_flops"] == st["warmup (target)"]["flops"] + st["features (target)"]["flops"]
    extra = st["features (target, val + calibration)"]
    # the default: validation "both" (12 examples) and min(128, 1000 // 10) = 100 calibration examples
    assert extra["examples"] == {"validation": 12, "calibration": 100}
    per_example = st["features (target)"]["flops"] / (1000 + 12)  # the same passes, per example
    assert extra["flops"] == pytest.approx(per_example * (12 + 100))
    # the proxy carries the target's LoRA: its store has the target's dimensions, and it featurises
    # the pool and (val_model "both") the validation examples
    assert st["features (proxy)"]["dim"] == st["features (target)"]["dim"]
    assert st["features (proxy)"]["store_gib"] == pytest.approx(st["features (target)"]["store_gib"])
    # no calibration and the proxy's validation alone: the target's extra passes are gone
    none = plan(PlanConfig(**base, calibrate=0, val_model="proxy"))["stages"]["features (target, val + calibration)"]
    assert none["flops"] == 0 and none["examples"] == {"validation": 0, "calibration": 0}
    assert plan(PlanConfig(**base, calibrate=100))["stages"]["features (target, val + calibration)"]["examples"][
        "calibration"] == 100
    # proxy-first: the proxy warms up its factors and featurises everything; the target none of it
    pf = plan(PlanConfig(**base, warmup_on="proxy"))
    assert pf["pipelines"]["iprox"] == ["probe+factorise", "align", "warmup (proxy)", "features (proxy)"]
    assert "features (target, val + calibration)" not in pf["stages"]
    # the proxy featurises the pool and the validation examples in both orders; with val_model
    # "target" the pool alone
    assert pf["stages"]["features (proxy)"]["flops"] == pytest.approx(st["features (proxy)"]["flops"])
    only_target = plan(PlanConfig(**base, val_model="target"))["stages"]["features (proxy)"]["flops"]
    assert only_target == pytest.approx(st["features (proxy)"]["flops"] * 1000 / 1012)
    with pytest.raises(ValueError, match="target-first"):
        PlanConfig(**base, warmup_on="proxy", calibrate=8)
    with pytest.raises(ValueError, match="calibrate must be"):
        PlanConfig(**base, calibrate=-2)


def test_plan_takes_the_run_configs_order_and_calibration(tmp_path):
    from conftest import chat_records, write_jsonl

    pool = write_jsonl(tmp_path / "pool.jsonl", chat_records(30, seed=0))
    val = write_jsonl(tmp_path / "val.jsonl", chat_records(3, seed=1))
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[run]\nout = "{tmp_path}/run"\nmodel = "tiny"\n[data]\npool = ["{pool}"]\n'
                   f'validation = ["{val}"]\nmax_length = 64\n[features]\ncalibrate = 5\nval_model = "target"\n')
    assert main(["plan", "--config", str(cfg), "--out", str(tmp_path / "p.json")]) == 0
    extra = json.loads((tmp_path / "p.json").read_text())["stages"]["features (target, val + calibration)"]
    assert extra["examples"] == {"validation": 3, "calibration": 5}
    # a flag given beside the config wins
    assert main(["plan", "--config", str(cfg), "--calibrate", "0", "--out", str(tmp_path / "q.json")]) == 0
    assert json.loads((tmp_path / "q.json").read_text())["stages"]["features (target, val + calibration)"][
        "examples"] == {"validation": 3, "calibration": 0}
