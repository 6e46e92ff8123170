"""The fuzz tier: over a thousand generated bad inputs, each a clean one-line failure naming its cause.

Run with ``make test-fuzz`` (part of ``make test`` too: it takes seconds). ``IPROX_FUZZ_SEED`` picks
the generator's seed; a failure prints it with the cases that failed.
"""

from __future__ import annotations

import os

import pytest
from conftest import write_model_folder
from fuzz_cases import all_cases, run_case

SEED = int(os.environ.get("IPROX_FUZZ_SEED", "20261130"))
COUNTS = {"data": 300, "config": 300, "cli": 250, "store": 160}


@pytest.mark.fuzz
def test_every_bad_input_fails_cleanly_and_names_its_cause(tmp_path):
    import logging

    logging.disable(logging.WARNING)  # the cases' own warnings would flood the output
    try:
        model_dir = write_model_folder(tmp_path / "tiny", "llama")
        cases = all_cases(tmp_path, model_dir, SEED, COUNTS)
        assert len(cases) >= 1000
        outcomes = [run_case(c) for c in cases]
    finally:
        logging.disable(logging.NOTSET)
    bad = [o for o in outcomes if not o.clean]
    report = "\n".join(
        f"- [{o.case.category}] {o.case.what}: exit {o.code}, traceback {o.traceback}, names {o.case.needle!r}: "
        f"{o.named}, left output: {bool(o.case.out and o.case.out.exists())}\n    {o.err.strip()[-300:]}"
        for o in bad[:15])
    assert not bad, f"{len(bad)} of {len(outcomes)} bad inputs did not fail cleanly (seed {SEED}):\n{report}"
    # Usage errors (the user's to fix) exit 2, damaged artifacts 3.
    codes = {o.case.category: set() for o in outcomes}
    for o in outcomes:
        codes[o.case.category].add(o.code)
    assert codes["data files"] == {2} and codes["TOML configs"] == {2}
    assert codes["corrupted stores"] <= {2, 3}
