"""Does the cheap fidelity check predict score agreement better in the space the features are read in?

``iprox fidelity --proxy`` compares the proxy's factor gradients with the target's gradient projected
on the factors. In the target-first order the features are gradients of the target's carried LoRA
adapters, other subspaces; ``iprox fidelity --checkpoint`` takes the cosine there instead. For every
target-first proxy run of the fidelity study (``benchmarks/bench_fidelity.py``: its work folder and
``benchmarks/results/fidelity.json``), this computes the LoRA-space check on the same 12 held-out
examples against the run's own last warm-up checkpoint, and reports the rank correlation of each
check with the run's agreement with the target (mean over the three tasks of whole-pool and head
Spearman), over the same runs.

    python benchmarks/diag_feature_space_check.py     # writes the "feature-space check" section
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fidelity import SETTINGS  # noqa: E402
from common import IPROX, sh, slug, update_benchmarks_md  # noqa: E402

from iprox.agreement import spearman  # noqa: E402
from iprox.loading import checkpoint_dirs, read_checkpoint_info  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/iprox-bench-fidelity")
    ap.add_argument("--max-length", type=int, default=320)
    args = ap.parse_args()
    work = Path(args.work)
    study = json.loads((RESULTS / "fidelity.json").read_text())
    tasks = study["tasks"]
    out_path = RESULTS / "feature_space_check.json"
    done = json.loads(out_path.read_text()) if out_path.exists() else {}
    points = []
    for key, rec in sorted(study["runs"].items()):
        if "grad_cosine" not in rec or "target" not in rec.get("vs", {}):
            continue
        name, seed = rec["setting"], rec["seed"]
        source = SETTINGS.get(name, {}).get("rescore", {}).get("from", name)
        built = work / "runs" / f"{slug(source)}-s{seed}"
        cks = checkpoint_dirs(built / "warmup")
        if not cks or not read_checkpoint_info(cks[-1])["lora"] or not (built / "proxy").is_dir():
            continue  # a proxy warmed up itself: no target adapters to compare in
        proxy_key = f"{slug(source)}-s{seed}"
        if proxy_key not in done:
            rep = work / "gradcos-lora" / f"{proxy_key}.json"
            rep.parent.mkdir(exist_ok=True)
            if not rep.exists():
                sh(IPROX + ["fidelity", "--proxy", str(built / "proxy"), "--target", str(work / "target"),
                            "--checkpoint", str(cks[-1]), "--data", str(work / "heldout.jsonl"), "--limit", "0",
                            "--max-length", str(args.max_length), "--out", str(rep), "--no-progress"],
                   work / "log.txt")
            g = json.loads(rep.read_text())
            done[proxy_key] = {"grad_cosine_lora": g["grad_cosine_global"], "kl_lora": g["kl"],
                               "checkpoint": cks[-1].name}
            out_path.write_text(json.dumps(done, indent=1))
        vs = rec["vs"]["target"]
        points.append({"run": key, "proxy": proxy_key, "factors": rec["grad_cosine"],
                       "lora": done[proxy_key]["grad_cosine_lora"],
                       "whole": sum(vs[t]["spearman"] for t in tasks) / len(tasks),
                       "head": sum(vs[t]["head_spearman"] for t in tasks) / len(tasks)})
    if len(points) < 3:
        raise SystemExit(f"only {len(points)} target-first proxy runs found under {work}")
    col = {k: [p[k] for p in points] for k in ("factors", "lora", "whole", "head")}
    rho = {(c, a): spearman(col[c], col[a]) for c in ("factors", "lora") for a in ("whole", "head")}
    n_proxies = len({p["proxy"] for p in points})
    lines = [
        "`benchmarks/diag_feature_space_check.py`: the held-out gradient check (12 test examples, 4 per task) of every "
        f"target-first proxy run of the fidelity study ({len(points)} runs, {n_proxies} distinct proxies), in the "
        "proxy's factor space (`iprox fidelity --proxy`) and in the space of the run's last target LoRA checkpoint "
        "(`--checkpoint`, where the features are read), against the run's agreement with the target (mean over the "
        "three tasks).",
        "",
        "| check | rank correlation with whole-pool Spearman | with head Spearman | range of the cosine |",
        "|---|---|---|---|",
    ]
    for c, label in (("factors", "factor space"), ("lora", "LoRA space")):
        lines.append(f"| {label} | {rho[(c, 'whole')]:.2f} | {rho[(c, 'head')]:.2f} | "
                     f"{min(col[c]):.3f} – {max(col[c]):.3f} |")
    lines += ["", "Per run: setting | seed: factor-space cosine, LoRA-space cosine, whole-pool / head Spearman.", ""]
    lines += [f"- {p['run']}: {p['factors']:.3f}, {p['lora']:.3f}, {p['whole']:.2f} / {p['head']:.2f}" for p in points]
    (RESULTS / "feature_space_check_points.json").write_text(json.dumps(points, indent=1))
    update_benchmarks_md("feature-space-check", "## The cheap check in the features' space (issue 12)\n\n" +
                         "\n".join(lines))
    print("\n".join(lines[:8]))


if __name__ == "__main__":
    main()
