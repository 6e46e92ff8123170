"""The README's option tables, generated from the settings dataclasses: ``python -m iprox.docs README.md``
(``make docs``) rewrites them; ``tests/test_cli.py`` fails when they drift from the code."""

from __future__ import annotations

import sys
from pathlib import Path


def option_tables() -> dict[str, str]:
    from .features import FeatureConfig
    from .proxy import ProxyConfig
    from .runtime import options_table
    from .scores import ScoreConfig
    from .selection import SelectConfig
    from .warmup import WarmupConfig

    return {"proxy": options_table(ProxyConfig), "warmup": options_table(WarmupConfig),
            "features": options_table(FeatureConfig), "score": options_table(ScoreConfig),
            "select": options_table(SelectConfig)}


def main(argv: list[str]) -> int:
    from .runtime import readme_options

    path = Path(argv[0] if argv else "README.md")
    path.write_text(readme_options(path.read_text(encoding="utf-8"), option_tables()), encoding="utf-8")
    print(f"option tables rewritten in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
