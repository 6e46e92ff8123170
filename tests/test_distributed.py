"""torchrun: the whole pipeline over two gloo processes gives the one-process selection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import chat_records, write_jsonl, write_model_folder

from iprox.loading import read_scores

CONFIG = """
[run]
out = "{out}"
model = "{model}"
selector = "proxy"
[data]
pool = [{{path = "pool.jsonl", sample = 24}}]
validation = ["val.jsonl"]
max_length = 96
[proxy]
sparsity = 0.5
probe_examples = 4
batch_size = 2
align_examples = 4
align_steps = 2
grad_accum = 2
lr = 1e-3
[warmup]
examples = 6
epochs = 2
lr = 1e-3
lora_rank = 2
batch_size = 2
grad_accum = 2
[features]
proj_dim = 4
batch_size = 4
shard_size = 8
[score]
method = "{method}"
[select]
top_k = 5
"""


@pytest.mark.parametrize("method", ["tracin", "if"])  # if: the second moment is summed over the ranks' shards
def test_torchrun_pipeline_equals_one_process(tmp_path, method):
    """Probe batches, alignment micro-batches and warm-up examples are split over the ranks and summed;
    features and scores by shard; rank 0 writes. The selection must be byte for byte the one-process selection,
    and the scores equal within float tolerance (sums in another order)."""
    model = write_model_folder(tmp_path / "tiny", "llama")
    write_jsonl(tmp_path / "pool.jsonl", chat_records(30, seed=1))
    write_jsonl(tmp_path / "val.jsonl", [dict(r, task="target") for r in chat_records(4, seed=2)])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("one", "two"):
        (tmp_path / f"{name}.toml").write_text(CONFIG.format(out=tmp_path / name, model=model, method=method))
    one = subprocess.run([sys.executable, "-m", "iprox.cli", "run", str(tmp_path / "one.toml"), "--no-progress"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "iprox.cli", "run",
                          str(tmp_path / "two.toml"), "--no-progress"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("selected 5 of 24") == 1  # one report, from rank 0
    sel_one = (tmp_path / "one" / "selection" / "selected.jsonl").read_bytes()
    assert sel_one and (tmp_path / "two" / "selection" / "selected.jsonl").read_bytes() == sel_one
    a = {r["id"]: r["score"] for r in read_scores(tmp_path / "one" / "scores")}
    b = {r["id"]: r["score"] for r in read_scores(tmp_path / "two" / "scores")}
    assert a.keys() == b.keys()
    scale = max(abs(v) for v in a.values())
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-3 * scale
    if method == "tracin":  # the rerank (on by default here): the same shortlist, the target's scores of it alike
        assert (tmp_path / "one" / "rerank" / "shortlist.jsonl").read_bytes() == \
            (tmp_path / "two" / "rerank" / "shortlist.jsonl").read_bytes()
        a = {r["id"]: r["score"] for r in read_scores(tmp_path / "one" / "rerank" / "target-scores")}
        b = {r["id"]: r["score"] for r in read_scores(tmp_path / "two" / "rerank" / "target-scores")}
        assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) <= 1e-3 * max(abs(v) for v in a.values())
    # the ranks really split the work (each says so in the log)
    for r in (0, 1):
        assert f"probe: rank {r} of 2 ran 1 of 2 batches" in two.stderr
        assert f"warmup epoch 2: rank {r} of 2 trained on 3 of 6 examples" in two.stderr
    assert two.stderr.count("alignment: rank") == 2
    # 24 examples in shards of 8: rank 0 scores shards 0 and 2 of each checkpoint's pool store, rank 1
    # shard 1, once per validation store (val_model = "both": the proxy's and the target's), and once
    # more against the target's alone for each of the rerank's recalibrated scorings (one, and one more
    # per round it added: how many depends on the tiny proxy's scores near the k-th, which the two runs
    # sum in another order; tracin only: the influence-function variant has no rerank)
    passes = 4
    if method == "tracin":
        rep = json.loads((tmp_path / "two" / "rerank" / "scores" / "scores.json").read_text())["rerank"]
        passes += 2 * (1 + rep["recalibrated"]["rounds"])  # (two checkpoints)
    assert two.stderr.count("score: rank 0 of 2 scored 2 of 3 shards") == passes
    assert two.stderr.count("score: rank 1 of 2 scored 1 of 3 shards") == passes


def test_collectives_carry_host_tensors_through_the_gpu_on_nccl(monkeypatch):
    """NCCL moves CUDA tensors only: the alignment's and training's host loss sums go through the
    rank's GPU there (they would fail otherwise); gloo takes every tensor where it is."""
    import torch

    from iprox.distributed import wire_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert wire_device("nccl", torch.device("cpu")) == torch.device("cuda", 1)
    assert wire_device("nccl", torch.device("cuda", 3)) == torch.device("cuda", 3)
    assert wire_device("gloo", torch.device("cpu")) == torch.device("cpu")


def _fail_on_rank1(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from iprox.distributed import on_every_rank

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)

    def work():
        if rank == 1:
            raise ValueError("shard 3 is damaged")
        return "done"

    try:
        on_every_rank(work)
        msg = "returned"
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {e}"
    Path(out, f"rank{rank}.txt").write_text(msg)
    dist.destroy_process_group()


def test_on_every_rank_raises_everywhere_when_one_rank_fails(tmp_path):
    """A rank's failure in its share of the work must reach every rank, not leave rank 0 waiting at
    the all-reduce that follows."""
    import torch.multiprocessing as mp

    mp.spawn(_fail_on_rank1, args=(f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank1.txt").read_text() == "ValueError: shard 3 is damaged"
    assert (tmp_path / "rank0.txt").read_text() == "RuntimeError: rank 1 failed: ValueError: shard 3 is damaged"
