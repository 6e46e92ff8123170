"""iprox: influence-preserving proxies (IProX) for gradient-based data selection in LLM fine-tuning.

The public API mirrors the command line::

    import iprox
    iprox.build_proxy(iprox.ProxyConfig(data=["pool.jsonl"], out="run/proxy", sparsity=0.5))
    ckpts = iprox.run_warmup(iprox.WarmupConfig(model="run/proxy", data=["pool.jsonl"], out="run/warmup"))
    iprox.compute_features(iprox.FeatureConfig(checkpoint=str(ckpts[-1]), data=["pool.jsonl"],
                                               out="run/train", grad="factored-adam"))
    iprox.compute_features(iprox.FeatureConfig(checkpoint=str(ckpts[-1]), data=["val.jsonl"], out="run/val"))
    iprox.score(iprox.ScoreConfig(train=["run/train"], val=["run/val"], out="run/scores"))
    iprox.select(iprox.SelectConfig(scores="run/scores", data=["pool.jsonl"], out="selected.jsonl", fraction=0.05))
    # or all of it: iprox.run("config.toml")
"""

from .data import Example, load_examples, tokenize_examples
from .evaluation import EvaluateConfig, evaluate, heldout_loss
from .features import FeatureConfig, compute_features
from .fidelity import FidelityConfig, fidelity_report
from .models import load_model
from .pipeline import run
from .runconfig import RunConfig, load_config
from .loading import iter_features, load_checkpoint, load_features, load_model_or_proxy, load_proxy, read_scores
from .pool import PoolConfig, write_pool
from .proxy import ProxyConfig, build_proxy
from .scores import ScoreConfig, compute_scores, score
from .session import Session
from .selection import SelectConfig, select
from .warmup import WarmupConfig, run_warmup

__all__ = [
    "EvaluateConfig", "Example", "FeatureConfig", "FidelityConfig", "PoolConfig", "ProxyConfig", "RunConfig", "ScoreConfig", "SelectConfig", "Session", "WarmupConfig",
    "build_proxy", "compute_features", "compute_scores", "evaluate", "fidelity_report", "heldout_loss", "iter_features", "load_checkpoint",
    "load_config", "load_examples", "load_features", "load_model", "load_model_or_proxy", "load_proxy",
    "read_scores", "run", "run_warmup", "score", "select", "tokenize_examples", "write_pool",
]
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("iprox")
except PackageNotFoundError:  # run from a source tree without installing (PYTHONPATH=src)
    __version__ = "0.19.2"
