"""After ``sphinx-build``: the API page as built names no private object (``_Ok``, ``_DISPATCH_BATCH``…: a
type hint or a docstring autodoc expanded) and shows the defaults a subclass inherits.

    python docs/check_built.py docs/_build/html
"""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path


def text_of(path: Path) -> str:
    page = path.read_text()
    page = re.sub(r"<(script|style)\b.*?</\1>", " ", page, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


def main(built: Path) -> list[str]:
    problems = []
    api = text_of(built / "reference" / "api.html")
    body = api.split("Python API", 1)[-1]
    private = sorted(set(re.findall(r"(?<![\w.])_[A-Za-z][A-Za-z0-9_]*", body)))
    if private:
        problems.append(f"reference/api.html shows private names: {', '.join(private)}")
    for needed in ("60,000", "DISPATCH_TIMEOUT", "now=", "use_state", "Fail", "pending"):
        if needed not in body:
            problems.append(f"reference/api.html does not show {needed!r}")
    settings = text_of(built / "reference" / "settings.html")
    from celery_scheduller.conf import PREFIX, SPECS

    for spec in SPECS:
        if f"{PREFIX}{spec.name}" not in settings:
            problems.append(f"reference/settings.html lacks {spec.name}")
    return problems


if __name__ == "__main__":
    import os

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    os.environ.setdefault("CSCHED_DB", "sqlite")
    import django

    django.setup()
    found = main(Path(sys.argv[1]))
    for problem in found:
        print(problem)
    sys.exit(1 if found else 0)
