"""iprox: influence-preserving proxies (IProX) for gradient-based data selection in LLM fine-tuning.

The public API mirrors the command line::

    from iprox import ProxyConfig, build_proxy, load_proxy
    build_proxy(ProxyConfig(data=["pool.jsonl"], out="proxy", sparsity=0.5))
    proxy = load_proxy("proxy")
"""

from .data import Example, load_examples, tokenize_examples
from .evaluation import heldout_loss
from .models import load_model
from .proxy import ProxyConfig, build_proxy, load_model_or_proxy, load_proxy

__all__ = [
    "Example",
    "ProxyConfig",
    "build_proxy",
    "heldout_loss",
    "load_examples",
    "load_model",
    "load_model_or_proxy",
    "load_proxy",
    "tokenize_examples",
]
__version__ = "0.1.0"
