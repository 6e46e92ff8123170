"""Warm-up checkpoints (LoRA on a plain model, factors on a proxy), resume, and features from them."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_model_folder
from safetensors.torch import load_file

from iprox.cli import main
from iprox.proxy import ProxyConfig, build_proxy
from iprox.loading import canonical_name, checkpoint_dirs, load_checkpoint, load_features, read_manifest
from iprox.training import lr_at
from iprox.warmup import WarmupConfig, run_warmup


def _wcfg(model, data, out, **kw):
    base = dict(model=str(model), data=[str(data)], out=str(out), examples=10, epochs=3, lr=5e-3, batch_size=4,
                lora_rank=2, lora_alpha=4, max_length=96, progress=False)
    base.update(kw)
    return WarmupConfig(**base)


def test_lr_schedule():
    lrs = [lr_at(s, 10, 1.0, 0.2) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_lora_warmup_writes_a_checkpoint_per_epoch(tmp_path, data_file):
    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    dirs = run_warmup(_wcfg(model_dir, data_file, tmp_path / "w"))
    assert [d.name for d in dirs] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    infos = [json.loads((d / "checkpoint.json").read_text()) for d in dirs]
    assert [i["epoch"] for i in infos] == [1, 2, 3] and all(i["lora"] for i in infos)
    assert infos[0]["lr"] > infos[2]["lr"] > 0  # linear decay: later epochs weigh less in TracIn
    opt = load_file(str(dirs[0] / "optimizer.safetensors"))
    trained = load_file(str(dirs[0] / "trainable.safetensors"))
    assert all(".lora_" in k for k in trained) and len(trained) == 2 * 14  # A and B on 7 projections × 2 layers
    assert set(opt) == {f"exp_avg.{k}" for k in trained} | {f"exp_avg_sq.{k}" for k in trained}
    assert all(opt[f"exp_avg_sq.{k}"].sum() > 0 for k in trained)
    # The checkpoint reloads to the same adapter, and the model has changed from the base.
    ck = load_checkpoint(dirs[-1])
    last = load_file(str(dirs[-1] / "trainable.safetensors"))
    got = dict(ck.model.named_parameters())
    assert all(torch.equal(got[k], v) for k, v in last.items())
    assert any(v.abs().max() > 0 for k, v in last.items() if "lora_B" in k)


def test_interrupted_warmup_resumes_to_the_same_checkpoints(tmp_path, data_file, monkeypatch):
    import iprox.warmup as W

    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    run_warmup(_wcfg(model_dir, data_file, tmp_path / "full"))
    real = W._save_epoch

    def die_after_first(folder, *a):
        if folder.name == "checkpoint-2":
            raise KeyboardInterrupt
        real(folder, *a)

    monkeypatch.setattr(W, "_save_epoch", die_after_first)
    with pytest.raises(KeyboardInterrupt):
        run_warmup(_wcfg(model_dir, data_file, tmp_path / "cut"))
    assert [d.name for d in checkpoint_dirs(tmp_path / "cut")] == ["checkpoint-1"]
    saved = []
    monkeypatch.setattr(W, "_save_epoch", lambda folder, *a: (saved.append(folder.name), real(folder, *a)))
    run_warmup(_wcfg(model_dir, data_file, tmp_path / "cut"))
    assert saved == ["checkpoint-2", "checkpoint-3"]  # epoch 1 was not retrained
    for name in ("checkpoint-3",):
        a = load_file(str(tmp_path / "full" / name / "trainable.safetensors"))
        b = load_file(str(tmp_path / "cut" / name / "trainable.safetensors"))
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)


def test_proxy_warmup_trains_factors_and_features_use_them(tmp_path, data_file):
    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    proxy = tmp_path / "proxy"
    build_proxy(ProxyConfig(model=str(model_dir), data=[str(data_file)], out=str(proxy), sparsity=0.5,
                            probe_examples=4, max_length=96, align_epochs=0.0, progress=False))
    dirs = run_warmup(_wcfg(proxy, data_file, tmp_path / "w", epochs=1))
    trained = load_file(str(dirs[0] / "trainable.safetensors"))
    assert trained and all(k.endswith((".A.weight", ".B.weight")) for k in trained)
    # LoRA on the proxy is the alternative.
    dirs_l = run_warmup(_wcfg(proxy, data_file, tmp_path / "wl", epochs=1, proxy_trains="lora"))
    assert all(".lora_" in k for k in load_file(str(dirs_l[0] / "trainable.safetensors")))
    # Features from the factor checkpoint: one block per factor, Adam-preconditioned (factored).
    rc = main(["features", "--checkpoint", str(dirs[0]), "--data", str(data_file), "--out", str(tmp_path / "f"),
               "--grad", "factored-adam", "--proj-dim", "4", "--max-length", "96", "--no-progress"])
    assert rc == 0
    man = read_manifest(tmp_path / "f")
    assert man["checkpoint"] == str(dirs[0].resolve()) and man["epoch"] == 1 and man["lr"] > 0
    assert all(l["name"].endswith((".A", ".B")) for l in man["layout"])
    ids, X = load_features(tmp_path / "f")
    assert X.shape == (24, man["dim"]) and torch.isfinite(X).all()


def test_cli_warmup_then_dense_adam_and_kronecker_features(tmp_path, data_file, capsys):
    model_dir = write_model_folder(tmp_path / "tiny", "gpt2")
    assert main(["warmup", "--model", str(model_dir), "--data", str(data_file), "--out", str(tmp_path / "w"),
                 "--examples", "8", "--epochs", "1", "--lr", "1e-3", "--lora-rank", "2", "--max-length", "96",
                 "--no-progress"]) == 0
    ck = str(tmp_path / "w" / "checkpoint-1")
    for engine, grad in (("dense", "adam"), ("kronecker", "adam"), ("kronecker", "factored-adam"),
                         ("dense", "factored-adam")):
        assert main(["features", "--checkpoint", ck, "--data", str(data_file), "--out", str(tmp_path / f"{engine}-{grad}"),
                     "--engine", engine, "--grad", grad, "--proj-dim", "4", "--max-length", "96",
                     "--store-dtype", "float32", "--no-progress"]) == 0
    _, kf = load_features(tmp_path / "kronecker-factored-adam")
    _, df = load_features(tmp_path / "dense-factored-adam")
    _, da = load_features(tmp_path / "dense-adam")
    torch.testing.assert_close(kf, df, rtol=1e-4, atol=1e-5 * df.abs().max().item())
    assert not torch.allclose(da, df)  # elementwise and factored Adam differ
    _, ka = load_features(tmp_path / "kronecker-adam")  # the fast engine's exact elementwise Adam
    torch.testing.assert_close(ka, da, rtol=1e-4, atol=1e-5 * da.abs().max().item())


def test_a_proxy_carries_the_targets_lora_checkpoint(tmp_path, data_file, capsys):
    """The target-first order: a proxy of the target takes the target's LoRA checkpoint (adapters and
    Adam state). Through a proxy that left every layer dense (sparsity 0) its features are the
    target's own, projection for projection; through a compressed proxy they differ."""
    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    assert main(["warmup", "--model", str(model_dir), "--data", str(data_file), "--out", str(tmp_path / "w"),
                 "--examples", "8", "--epochs", "1", "--lr", "1e-3", "--lora-rank", "2", "--max-length", "96",
                 "--no-progress"]) == 0
    ck = str(tmp_path / "w" / "checkpoint-1")
    common = ["--checkpoint", ck, "--data", str(data_file), "--grad", "adam", "--proj-dim", "4", "--max-length", "96",
              "--store-dtype", "float32", "--no-progress"]
    assert main(["features", "--out", str(tmp_path / "f-target")] + common) == 0
    stores = {}
    for sp in ("0", "0.5"):
        proxy = tmp_path / f"proxy-{sp}"
        assert main(["build-proxy", "--model", str(model_dir), "--data", str(data_file), "--out", str(proxy),
                     "--sparsity", sp, "--probe-examples", "4", "--probe-tokens", "100", "--max-length", "96",
                     "--align-epochs", "0", "--no-progress"]) == 0
        assert main(["features", "--model", str(proxy), "--out", str(tmp_path / f"f-{sp}")] + common) == 0
        stores[sp] = load_features(tmp_path / f"f-{sp}")[1]
        assert read_manifest(tmp_path / f"f-{sp}")["trains"] == "target lora, carried"
    ids, target = load_features(tmp_path / "f-target")
    assert target.abs().max() > 0
    torch.testing.assert_close(stores["0"], target, rtol=1e-4, atol=1e-6 * target.abs().max().item())
    assert (stores["0.5"] - target).abs().max() > 1e-3 * target.abs().max()
    # The compressed proxy's pool store scores against the target's store of the same checkpoint
    # (both are gradients of that one adapter, projected alike) ...
    assert main(["score", "--train", str(tmp_path / "f-0.5"), "--val", str(tmp_path / "f-target"),
                 "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    # ... but not against the target's store of another warm-up (another adapter).
    assert main(["warmup", "--model", str(model_dir), "--data", str(data_file), "--out", str(tmp_path / "w2"),
                 "--examples", "8", "--epochs", "1", "--lr", "1e-3", "--lora-rank", "2", "--max-length", "96",
                 "--seed", "3", "--no-progress"]) == 0
    assert main(["features", "--out", str(tmp_path / "f-target2"), "--checkpoint", str(tmp_path / "w2" / "checkpoint-1")]
                + common[2:]) == 0
    assert main(["score", "--train", str(tmp_path / "f-0.5"), "--val", str(tmp_path / "f-target2"),
                 "--out", str(tmp_path / "s2"), "--no-progress"]) == 2
    assert "gradients of different models or checkpoints" in capsys.readouterr().err
    # A proxy of another model cannot carry it.
    other = write_model_folder(tmp_path / "other", "llama", seed=9)
    assert main(["build-proxy", "--model", str(other), "--data", str(data_file), "--out", str(tmp_path / "p-other"),
                 "--sparsity", "0.5", "--probe-examples", "4", "--probe-tokens", "100", "--max-length", "96",
                 "--align-epochs", "0", "--no-progress"]) == 0
    assert main(["features", "--model", str(tmp_path / "p-other"), "--out", str(tmp_path / "f-x")] + common) == 2


def test_a_layer_drop_proxy_carries_the_targets_lora_checkpoint(tmp_path, data_file, monkeypatch):
    """Layer-drop in the target-first order: the proxy's kept blocks carry the target's adapters at the
    target's block indices. Oracle: the target itself, with the dropped blocks made to pass their input
    through, featurised by the dense engine (one autograd backward per example; the dropped blocks'
    adapters then have no gradient). The proxy's store must equal it, on both engines."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    from conftest import VOCAB, make_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=None, eos_token_id=None,
                      attn_implementation="eager")
    model_dir = tmp_path / "tiny4"
    LlamaForCausalLM(cfg).eval().save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    assert main(["warmup", "--model", str(model_dir), "--data", str(data_file), "--out", str(tmp_path / "w"),
                 "--examples", "8", "--epochs", "1", "--lr", "1e-3", "--lora-rank", "2", "--max-length", "96",
                 "--no-progress"]) == 0
    ck = str(tmp_path / "w" / "checkpoint-1")
    proxy = tmp_path / "drop"
    assert main(["build-proxy", "--model", str(model_dir), "--out", str(proxy), "--sparsity", "0.5",
                 "--init", "layer-drop", "--no-progress"]) == 0
    kept = json.loads((proxy / "proxy.json").read_text())["kept_blocks"]
    assert kept == [0, 3]
    common = ["--checkpoint", ck, "--data", str(data_file), "--proj-dim", "4", "--max-length", "96",
              "--store-dtype", "float32", "--no-progress"]
    for engine in ("kronecker", "dense"):
        for grad in ("adam", "sgd"):
            assert main(["features", "--model", str(proxy), "--out", str(tmp_path / f"p-{engine}-{grad}"),
                         "--engine", engine, "--grad", grad] + common) == 0
            assert read_manifest(tmp_path / f"p-{engine}-{grad}")["trains"] == "target lora, carried"
    for grad in ("adam", "sgd"):
        assert main(["features", "--out", str(tmp_path / f"t-{grad}"), "--engine", "dense", "--grad", grad] + common) == 0
    # the oracle: the target with blocks 1 and 2 passing their input through
    real = modeling_llama.LlamaDecoderLayer.forward

    def skip_dropped(self, hidden_states, *a, **k):
        return hidden_states if self.self_attn.layer_idx not in kept else real(self, hidden_states, *a, **k)

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", skip_dropped)
    for grad in ("adam", "sgd"):
        assert main(["features", "--out", str(tmp_path / f"o-{grad}"), "--engine", "dense", "--grad", grad] + common) == 0
    layout = read_manifest(tmp_path / "o-sgd")["layout"]
    for grad in ("adam", "sgd"):
        ids, oracle = load_features(tmp_path / f"o-{grad}")
        _, target = load_features(tmp_path / f"t-{grad}")
        assert (oracle - target).abs().max() > 1e-3 * target.abs().max()  # dropping blocks changes the features
        for engine in ("kronecker", "dense"):
            pids, mine = load_features(tmp_path / f"p-{engine}-{grad}")
            # the same layout (a target's layers carry peft's prefix, a proxy's carried adapters do not)
            assert pids == ids and read_manifest(tmp_path / f"p-{engine}-{grad}")["layout"] == \
                [{**part, "name": canonical_name(part["name"])} for part in layout]
            torch.testing.assert_close(mine, oracle, rtol=1e-4, atol=1e-5 * oracle.abs().max().item())
    # under sgd a dropped block's features are zero (its adapters take no part in the proxy), a kept one's not
    _, sgd = load_features(tmp_path / "p-kronecker-sgd")
    for part in layout:
        block = int(part["name"].split("layers.")[1].split(".")[0])
        cols = sgd[:, part["offset"]:part["offset"] + part["k_out"] * part["k_in"]]
        assert (cols.abs().max() == 0) == (block not in kept), part["name"]
