"""kill -9 at twenty-odd points of `iprox run`, then a rerun: byte-identical outputs; and two runs on one folder.

Slow (each trial starts Python twice): ``make test-reliability``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import chat_records, write_jsonl, write_model_folder

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("selection/selected.jsonl", "selection/selected.json", "scores/scores.csv")


def _config(tmp: Path, model_dir: Path, out: Path) -> Path:
    write_jsonl(tmp / "pool.jsonl", chat_records(32, seed=1))
    write_jsonl(tmp / "val.jsonl", [dict(r, task="target") for r in chat_records(4, seed=2)])
    path = tmp / f"{out.name}.toml"
    path.write_text(f"""
[run]
out = "{out}"
model = "{model_dir}"
[data]
pool = ["pool.jsonl"]
validation = ["val.jsonl"]
max_length = 96
[proxy]
sparsity = 0.5
probe_examples = 4
align_examples = 4
align_steps = 4
checkpoint_every = 1
batch_size = 2
lr = 1e-3
[warmup]
examples = 8
epochs = 2
lr = 1e-3
[features]
proj_dim = 4
batch_size = 4
shard_size = 4
[select]
top_k = 5
""")
    return path


def _comparable_bytes(name: str, data: bytes):
    """The bytes of an output, but selected.json without its config (which names the run's own folder)."""
    if name.endswith("selected.json"):
        man = json.loads(data)
        man.pop("config")
        return man
    return data


def _comparable(path: Path):
    return _comparable_bytes(path.name, path.read_bytes())


def _start(cfg: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.Popen([sys.executable, "-m", "iprox.cli", "run", str(cfg), "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(cfg: Path) -> None:
    p = _start(cfg)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    model_dir = write_model_folder(tmp / "tiny", "llama")
    cfg = _config(tmp, model_dir, tmp / "ref")
    t0 = time.perf_counter()
    _finish(cfg)
    return tmp, model_dir, {o: (tmp / "ref" / o).read_bytes() for o in OUTPUTS}, time.perf_counter() - t0


# Stage boundaries and points inside stages, seen as files appearing in the run folder.
TRIGGERS = ["pool/stage.json", "pool/COMPLETE", "compressed/stage.json", "compressed/STAGE1_DONE",
            "compressed/COMPLETE", "proxy/stage.json", "proxy/align_checkpoint",
            "proxy/align_log.csv", "proxy/COMPLETE", "warmup/stage.json", "warmup/train_ids.json",
            "warmup/checkpoint-1", "warmup/checkpoint-2", "features/train-1/stage.json",
            "features/train-1/shard-00002.safetensors", "features/train-1/COMPLETE", "features/val-1/COMPLETE",
            "features/train-2/shard-00000.safetensors", "features/train-2/shard-00005.safetensors",
            "features/val-2/stage.json", "scores/stage.json", "scores/COMPLETE", "selection/stage.json"]
TIMED = [0.55, 0.7, 0.85]  # fractions of the reference run's wall time


@pytest.mark.parametrize("point", TRIGGERS + [f"t={f}" for f in TIMED])
def test_kill_then_rerun_gives_identical_outputs(reference, point):
    tmp, model_dir, want, seconds = reference
    out = tmp / f"run-{point.replace('/', '_').replace('=', '')}"
    cfg = _config(tmp, model_dir, out)
    p = _start(cfg)
    deadline = time.perf_counter() + (float(point[2:]) * seconds if point.startswith("t=") else 120)
    killed = False
    while p.poll() is None and time.perf_counter() < deadline:
        if not point.startswith("t=") and (out / point).exists():
            break
        time.sleep(0.002)
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
        killed = True
    p.wait()
    assert killed, f"the run finished before reaching {point}; the trial killed nothing"
    _finish(cfg)
    for o in OUTPUTS:
        assert _comparable(out / o) == _comparable_bytes(o, want[o]), f"{o} differs after a kill at {point}"
    assert not list(out.rglob("*.tmp")), "a temporary file survived the resumed run"


def test_a_second_run_on_the_same_folder_is_refused(reference):
    tmp, model_dir, want, _ = reference
    out = tmp / "concurrent"
    cfg = _config(tmp, model_dir, out)
    first = _start(cfg)
    while not (out / "pool" / "stage.json").exists() and first.poll() is None:
        time.sleep(0.005)
    second = _start(cfg)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 3 and f"PID {first.pid}" in err and "Traceback" not in err
    _, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1[-2000:]
    assert _comparable(out / OUTPUTS[0]) == _comparable_bytes(OUTPUTS[0], want[OUTPUTS[0]])
