"""Helpers shared by the benchmark scripts: finding the data and updating BENCHMARKS.md."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\n"
    "Written by the scripts in `benchmarks/` (`make bench`); each script owns one section and rewrites\n"
    "only that. Timings on these shared CPU machines are noisy; compare rows of one run, not runs.\n"
)


def find_data() -> Path:
    """``$IPROX_DATA``, else ``../shared/data`` beside the repository."""
    for cand in [os.environ.get("IPROX_DATA", ""), str(ROOT.parent / "shared" / "data")]:
        if cand and (Path(cand) / "gsm8k").is_dir():
            return Path(cand)
    raise SystemExit("benchmark data not found: set IPROX_DATA to the folder holding gsm8k/ and bbh/")


def update_benchmarks_md(section: str, body: str) -> None:
    """Replaces (or appends) the section between ``<!-- section:start -->`` and ``<!-- section:end -->``."""
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else HEADER
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)
