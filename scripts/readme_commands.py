"""Print one of the README's two quick-start commands ("serve" or "test").

The README's first code block holds them, in that order. `.ci/run` and the tests use this
so the commands a user copies are the ones CI runs.
"""

from __future__ import annotations

import pathlib
import re
import sys


def readme_commands(readme: pathlib.Path) -> dict[str, str]:
    """Return {"serve": ..., "test": ...} from the first fenced block of the README."""
    text = readme.read_text(encoding="utf-8")
    match = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    if match is None:
        raise SystemExit("README has no quick-start code block")
    lines = [ln.strip() for ln in match.group(1).splitlines() if ln.strip() and not ln.startswith("#")]
    if len(lines) < 2:
        raise SystemExit("README quick-start block must hold two commands")
    return {"serve": lines[0], "test": lines[1]}


if __name__ == "__main__":
    root = pathlib.Path(__file__).resolve().parent.parent
    print(readme_commands(root / "README.md")[sys.argv[1]])
