"""Tiny models and a byte-level tokenizer built in code (no download), and small data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_tokenizer(chat_template: str | None = CHATML):
    """Byte-level tokenizer: 256 byte tokens + 4 specials; any text tokenises."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = chat_template
    return fast


VOCAB = 262


def tiny_llama(seed: int = 0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=None, eos_token_id=None,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(seed: int = 0, dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     attn_implementation="eager")
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def tiny_qwen2(seed: int = 0, dtype=torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, attn_implementation="eager", bos_token_id=None,
                      eos_token_id=None, pad_token_id=0)
    return Qwen2ForCausalLM(cfg).to(dtype).eval()


FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "qwen2": tiny_qwen2}


def write_model_folder(path: Path, family: str = "llama", seed: int = 0) -> Path:
    model = FACTORIES[family](seed)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def chat_records(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    out = []
    for i in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        a = " ".join(rng.choice(words) for _ in range(rng.randint(2, 9)))
        out.append({"question": f"{i}: {q}?", "answer": a})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def data_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pool.jsonl", chat_records(24))
