"""The README's local links and the files it names exist; its two commands are the ones CI runs; its
quickstart is the files CI runs in a new project (docs/quickstart); it stays a front page."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    text = (ROOT / "README.md").read_text()
    problems = []
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if "://" in target or target.startswith(".ci/venv"):
            continue  # no network here: only local links are checked
        if not (ROOT / target).exists():
            problems.append(f"link to a missing file: {target}")
    for path in set(re.findall(r"`((?:tests|bench|docs|example_project|celery_scheduller|\.ci)/[\w./-]+)`", text)):
        clean = path.split("::")[0]
        if clean.startswith(".ci/venv"):
            continue  # made by .ci/run
        if not (ROOT / clean).exists():
            problems.append(f"names a missing file: {clean}")
    blocks = re.findall(r"```\n(.*?)```", text, flags=re.S)
    if ".ci/run\n" not in blocks:
        problems.append("the test command block `.ci/run` is missing")
    if not any("example_project/manage.py demo" in block for block in blocks):
        problems.append("the demo command block is missing")
    for path in sorted((ROOT / "docs" / "quickstart").rglob("*.py")):
        code = path.read_text().strip()
        if code and f"```python\n{code}\n```" not in text:
            problems.append(f"the quickstart's {path.relative_to(ROOT)} is not in the README as it is")
    lines = text.count("\n")
    if lines > 300:
        problems.append(f"{lines} lines: a front page has at most 300")
    for pattern, what in (
        (r"`[0-9a-f]{7,40}`", "a commit hash"),
        (r"\bissue \d+|#\d{2,}\b", "an issue number"),
        (r"shared/CONTRACT|planning folder", "a file outside the repository"),
    ):
        if re.search(pattern, text):
            problems.append(f"names {what}")
    for problem in problems:
        print(problem)
    print(f"README checked: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
