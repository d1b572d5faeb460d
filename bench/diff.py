"""Two runs of ``bench/compare.py --json`` side by side: celery_scheduller's rows, before and after a change.

    python bench/diff.py before.json after.json

Prints a Markdown table of the figures a change to the engine could move (lateness, beat's CPU per alarm,
the worker's CPU per task, the time to publish everything, ``dispatch`` and ``dispatch_many``) with
after ÷ before for each. Run the two back to back on the same machine: figures of different runs on a
shared 2-core machine differ more than most changes do.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OURS = "celery_scheduller"
#: column → (label, lower is better)
FIGURES = {
    "p50_s": ("p50 s", True),
    "p90_s": ("p90 s", True),
    "p99_s": ("p99 s", True),
    "max_s": ("max s", True),
    "beat_cpu_ms_per_alarm": ("beat CPU ms/alarm", True),
    "worker_cpu_ms_per_task": ("worker CPU ms/task", True),
    "machine_cpu_ms_per_alarm": ("machine CPU ms/alarm", True),
    "not_run": ("not run", True),
    "duplicates": ("dup", True),
}


def _rows(path: str) -> dict[tuple[str, str], dict[str, object]]:
    data = json.loads(Path(path).read_text())
    return {(row["workload"], row["system"]): row for row in data["rows"] if row["system"].startswith(OURS)}


def main(before_path: str, after_path: str) -> None:
    before, after = _rows(before_path), _rows(after_path)
    print("| workload | figure | before | after | after ÷ before |")
    print("|---|---|---|---|---|")
    for key in before:
        if key not in after:
            continue
        workload, system = key
        label = workload + (", no in-flight cap" if "no in-flight cap" in system else "")
        for column, (name, _lower) in FIGURES.items():
            old, new = before[key].get(column), after[key].get(column)
            ratio = (
                f"{new / old:.2f}" if isinstance(old, (int, float)) and isinstance(new, (int, float)) and old else "–"
            )
            print(f"| {label} | {name} | {old} | {new} | {ratio} |")
    api_before = json.loads(Path(before_path).read_text())["api"]
    api_after = json.loads(Path(after_path).read_text())["api"]
    for column, name in (("dispatch_ms", "`dispatch` ms"), ("dispatch_many_per_s", "`dispatch_many` alarms/s")):
        old, new = api_before[column], api_after[column]
        print(f"| API | {name} | {old} | {new} | {new / old:.2f} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
