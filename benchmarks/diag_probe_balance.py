"""Stage 1 alone with each probe balance: the compressed proxy's gradient fidelity per pool source.

Builds a stage-1 proxy (no alignment) of the fidelity study's target on its pool, once with
``probe_balance = "loss"`` and once with ``"example"`` (sparsity 0.5, 16 probe examples, 4,096
tokens, batch 4, max length 320, seed 0), and prints the all-layer gradient cosine with the target
and the response-token KL on 6 seeded pool examples of each source. These are the stage-1 figures
quoted in BENCHMARKS.md ("Reading the fidelity study", update). Needs ``bench_fidelity.py``'s work
folder (``<work>/target`` and ``<work>/runs/target-s0/pool``).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from iprox.data import load_examples, tokenize_examples  # noqa: E402
from iprox.fidelity import gradient_fidelity  # noqa: E402
from iprox.loading import load_model_or_proxy  # noqa: E402
from iprox.proxy import ProxyConfig, build_proxy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/iprox-bench-fidelity")
    ap.add_argument("--per-source", type=int, default=6)
    args = ap.parse_args()
    work = Path(args.work)
    pool_file = work / "runs" / "target-s0" / "pool" / "pool.jsonl"
    target, tok = load_model_or_proxy(str(work / "target"))
    pool = load_examples(str(pool_file))
    for balance in ("loss", "example"):
        out = work / f"stage1-balance-{balance}"
        build_proxy(ProxyConfig(model=str(work / "target"), data=[str(pool_file)], out=str(out), sparsity=0.5,
                                probe_examples=16, probe_tokens=4096, batch_size=4, max_length=320, seed=0,
                                probe_balance=balance, align_epochs=0.0, progress=False))
        proxy, _ = load_model_or_proxy(str(out))
        for source in sorted({e.source for e in pool}):
            picked = random.Random(1).sample([e for e in pool if e.source == source], args.per_source)
            tokd, _ = tokenize_examples(tok, picked, 320)
            rep = gradient_fidelity(proxy, target, tokd, tok.pad_token_id, progress=False)
            print(f"probe_balance {balance}, {source}: gradient cosine {rep['grad_cosine_global']:.3f}, "
                  f"KL {rep['kl']:.3f}", flush=True)


if __name__ == "__main__":
    main()
