"""Regenerate the config-key and metric tables in the README from the code.

The tables live between marker comments, e.g.
    <!-- generated: config-keys -->  ...  <!-- end generated: config-keys -->
and are rendered from fastrelay.config.iter_options() and fastrelay.metrics.METRICS,
so the documentation cannot drift from what the program accepts and exports.
tests/test_config.py fails when a table is stale.

    python docs/gen_config_table.py [FILE ...]   (default: README.md)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fastrelay.config import iter_options  # noqa: E402
from fastrelay.metrics import METRICS  # noqa: E402

START = "<!-- generated: config-keys -->"


def _yaml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(value) + "]"
    if value == "":
        return '""'  # an empty code span would show as two backticks
    return str(value)


def render_config_keys() -> str:
    rows = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for option in iter_options():
        allowed = option.meta.allowed() or "any"
        default = _yaml_value(option.default)
        rows.append(
            f"| `{option.key}` | {option.kind} | `{default}` | {allowed} | {option.meta.help} |"
        )
    return "\n".join(rows)


def render_metrics() -> str:
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for m in METRICS:
        rows.append(f"| `{m.name}` | {m.type} | {f'`{m.label}`' if m.label else ''} | {m.help} |")
    return "\n".join(rows)


BLOCKS = {"config-keys": render_config_keys, "metrics": render_metrics}


def update(text: str) -> str:
    """`text` with every generated block replaced by its current rendering."""
    for name, render in BLOCKS.items():
        pattern = re.compile(
            rf"(<!-- generated: {name} -->\n).*?(<!-- end generated: {name} -->)",
            re.DOTALL,
        )
        text = pattern.sub(lambda m, r=render: m.group(1) + r() + "\n" + m.group(2), text)
    return text


def main(paths: list[str]) -> int:
    targets = [Path(p) for p in paths] or [p for p in (ROOT / "README.md",) if p.exists()]
    for path in targets:
        old = path.read_text()
        new = update(old)
        if new != old:
            path.write_text(new)
            print(f"updated {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
