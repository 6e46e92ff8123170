"""The CLI as a user runs it, on a tiny model folder."""

import json

from conftest import write_model_folder
from iprox.cli import main


def test_build_proxy_then_evaluate(tmp_path, data_file, capsys):
    model_dir = write_model_folder(tmp_path / "tiny", "gpt2")
    out = tmp_path / "proxy"
    rc = main(["build-proxy", "--model", str(model_dir), "--data", str(data_file), "--out", str(out),
               "--sparsity", "0.5", "--probe-examples", "8", "--probe-tokens", "200", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "layers compressed: 8 of 8" in printed and "parameters:" in printed
    meta = json.loads((out / "proxy.json").read_text())
    assert meta["target"]["model"] == str(model_dir) and meta["probe"]["examples"] == 8
    rc = main(["evaluate", "--model", str(out), "--data", str(data_file), "--out", str(tmp_path / "ev.json")])
    assert rc == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["n_examples"] == 24 and ev["token_loss"] > 0
    # Same command again: skipped, not rebuilt.
    main(["build-proxy", "--model", str(model_dir), "--data", str(data_file), "--out", str(out),
          "--sparsity", "0.5", "--probe-examples", "8", "--probe-tokens", "200", "--no-progress"])
    assert "already complete; skipped" in capsys.readouterr().out


def test_errors_are_one_line_with_exit_code_2(tmp_path, data_file, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"oops": 1}\n')
    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    rc = main(["build-proxy", "--model", str(model_dir), "--data", str(bad), "--out", str(tmp_path / "p"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad}:2" in err and "unknown record format" in err
    assert not (tmp_path / "p").exists()      # bad input fails before the output folder is made
    rc = main(["build-proxy", "--model", str(tmp_path / "missing"), "--data", str(data_file), "--out", str(tmp_path / "p")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_build_proxy_with_alignment_then_fidelity(tmp_path, data_file, capsys):
    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    out = tmp_path / "aligned"
    rc = main(["build-proxy", "--model", str(model_dir), "--data", str(data_file), "--out", str(out),
               "--probe-examples", "4", "--probe-tokens", "100", "--align-steps", "3", "--align-examples", "6",
               "--batch-size", "3", "--checkpoint-every", "2", "--no-progress"])
    assert rc == 0
    assert "stage 2: 3 steps on 6 examples" in capsys.readouterr().out
    assert not (out / "align_checkpoint").exists()          # resume point dropped once complete
    assert len((out / "align_log.csv").read_text().splitlines()) == 4
    rc = main(["fidelity", "--target", str(model_dir), "--proxy", str(out), "--data", str(data_file),
               "--limit", "3", "--out", str(tmp_path / "fid.json"), "--no-progress"])
    assert rc == 0
    rep = json.loads((tmp_path / "fid.json").read_text())
    assert rep["n_examples"] == 3 and rep["kl"] > 0  # a compressed proxy differs from its target
    per_layer = [(v["cos_A"] + v["cos_B"]) / 2 for v in rep["layers"].values()]
    assert abs(rep["grad_cosine"] - sum(per_layer) / len(per_layer)) < 1e-9  # the headline is the layers' mean
    assert len(rep["layers"]) == 14
    assert "gradient cosine (mean over layers)" in capsys.readouterr().out


def test_every_command_has_help_with_defaults(capsys):
    import pytest

    for cmd in ("build-proxy", "align", "plan", "warmup", "features", "finetune", "score", "select", "evaluate", "fidelity", "run", "demo"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0, cmd
    out = capsys.readouterr().out
    assert "--sparsity SPARSITY" in out and "(default: 0.5)" in out and "--no-progress" in out
    assert "{ipsvd,svd,random,layer-drop}" in out  # choices from the settings' Literal type


def test_readme_option_tables_are_the_generated_ones():
    """The README's settings tables are generated from the dataclasses (make docs); this fails when a
    setting, its default or its help changes without them."""
    from pathlib import Path

    from iprox.docs import option_tables
    from iprox.runtime import readme_options

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert readme_options(readme, option_tables()) == readme, "run `make docs`"


def test_align_a_compressed_proxy_equals_build_proxy_with_alignment(tmp_path, data_file, capsys):
    """``iprox align`` (stage 2 alone) on a stage-1 proxy gives the proxy build-proxy makes in one go,
    taking the target, data, seed and probe split from the compressed proxy."""
    from safetensors.torch import load_file

    model_dir = write_model_folder(tmp_path / "tiny", "llama")
    common = ["--model", str(model_dir), "--data", str(data_file), "--probe-examples", "4", "--probe-tokens", "100",
              "--batch-size", "3", "--seed", "1", "--no-progress"]
    assert main(["build-proxy", *common, "--out", str(tmp_path / "compressed"), "--align-epochs", "0"]) == 0
    assert main(["build-proxy", *common, "--out", str(tmp_path / "once"), "--align-steps", "3", "--align-examples", "6"]) == 0
    capsys.readouterr()
    assert main(["align", "--proxy", str(tmp_path / "compressed"), "--out", str(tmp_path / "aligned"),
                 "--align-steps", "3", "--align-examples", "6", "--no-progress"]) == 0
    assert "aligned 3 steps on 6 examples" in capsys.readouterr().out
    once, aligned = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("once", "aligned"))
    assert once.keys() == aligned.keys()
    assert max(float((once[k] - aligned[k]).abs().max()) for k in once) < 1e-6
    before = load_file(str(tmp_path / "compressed" / "model.safetensors"))
    assert max(float((before[k] - aligned[k]).abs().max()) for k in once) > 1e-4   # it did train
    meta = json.loads((tmp_path / "aligned" / "proxy.json").read_text())
    assert meta["stage2"]["steps"] == 3 and meta["config"]["seed"] == 1
    assert main(["align", "--proxy", str(data_file.parent / "nothing"), "--out", str(tmp_path / "x")]) == 2
