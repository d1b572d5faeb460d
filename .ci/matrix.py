"""Print the 36 test environments of tox.ini's envlist, comma-separated: `.ci/run -e "$(python3 .ci/matrix.py)"`."""

from __future__ import annotations

import configparser
import itertools
import re
from pathlib import Path


def environments() -> list[str]:
    config = configparser.ConfigParser(interpolation=None)
    config.read(Path(__file__).resolve().parent.parent / "tox.ini")
    names: list[str] = []
    for line in config["tox"]["envlist"].split():
        parts = re.split(r"(\{[^}]*\})", line)
        choices = [part[1:-1].split(",") if part.startswith("{") else [part] for part in parts]
        names += ["".join(combo) for combo in itertools.product(*choices)]
    return [name for name in names if name.startswith("py")]


if __name__ == "__main__":
    print(",".join(environments()))
