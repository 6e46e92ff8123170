"""Settings that every model-running stage shares: warm-up, features and fine-tuning.

Each stage's config subclasses :class:`ModelStageConfig` and adds its own fields; the shared ones are
keyword-only, so a stage's own fields keep their order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .models import EMBEDDED_MODEL, resolve_dtype


@dataclass(kw_only=True)
class ModelStageConfig:
    """Attributes:
        data: the stage's input records (files or folders).
        out: the folder the stage writes.
        model: a proxy folder, or any model spec ``load_model`` accepts.
        max_length: tokens per example (a longer prompt is cut from the left first).
        seed: the stage's seed (data order, LoRA init, projections).
        dtype / device: how the model is loaded ("" device: CUDA when present, else CPU; dtype also
            bf16, fp16 or auto, resolved when the config is made so that stage.json records it).
        trust_remote_code: passed to transformers for hub models with custom code.
        overwrite: replace an output folder that holds a result with other settings.
        progress: show progress bars.
    """

    data: list[str] = field(default_factory=list)
    out: str = ""
    model: str = EMBEDDED_MODEL
    max_length: int = 512
    seed: int = 0
    dtype: str = "float32"
    device: str = ""
    trust_remote_code: bool = False
    overwrite: bool = False
    progress: bool = True

    def check_io(self, stage: str, data_hint: str, out_hint: str) -> None:
        """Accepts one path for ``data``; refuses a missing ``data`` or ``out`` with the stage's words."""
        self.dtype = resolve_dtype(self.dtype, self.device)
        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.data:
            raise ValueError(f"{stage} needs --data ({data_hint})")
        if not self.out:
            raise ValueError(f"{stage} needs --out ({out_hint})")
