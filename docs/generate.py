"""The tables the docs draw from the code, written into the pages themselves between markers, so that a page
reads the same on the docs site and opened as a file on the repository host, and cannot drift from the code.

    python docs/generate.py           # rewrite the tables in the pages
    python docs/generate.py --check   # exit 1 naming each page whose table differs from the code

Run by the docs build (``docs/conf.py``); ``tests/unit/test_docs.py`` runs the check.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "celery_scheduller"

BEGIN = "<!-- generated: {name} (python docs/generate.py); edit the code, not this table -->"
END = "<!-- end generated: {name} -->"


def settings_table() -> str:
    from celery_scheduller.conf import PREFIX, SPECS

    rows = ["| setting | default | unit | what it does |", "|---|---|---|---|"]
    for spec in SPECS:
        bounds = f" ({spec.minimum:,}–{spec.maximum:,})" if spec.maximum is not None else ""
        default = f"`{spec.default!r}`"
        rows.append(f"| `{PREFIX}{spec.name}` | {default} | {spec.unit or '–'}{bounds} | {spec.doc} |")
    return "\n".join(rows)


def transitions_table() -> str:
    from celery_scheduller.states import TRANSITIONS
    from celery_scheduller.store import transitions

    def shown(value: object) -> str:
        if isinstance(value, transitions.Given):
            return "given"
        if isinstance(value, transitions.Fixed):
            return "NULL" if value.value is None else repr(value.value)
        if isinstance(value, transitions.Now):
            return "now"
        if isinstance(value, transitions.NextAttempt):
            return "attempt + 1"
        return "max(now, dispatch_at) + timeout_ms"

    lines = ["| transition | starts from | ends in | guard besides the state | writes |", "|---|---|---|---|---|"]
    for name, starts in TRANSITIONS.items():
        t = transitions.ALL[name]
        end = f"`{t.target}`" if t.target else "removed"
        if t.removes_without_history:
            end += " (removed without history)"
        guard = ", ".join([*(f"`{column}`" for column in t.guard), *([t.takes] if t.takes else [])]) or "–"
        writes = ", ".join(f"`{column}` = {shown(value)}" for column, value in t.effect) or "–"
        if t.records_attempt:
            writes += "; the attempt's history row"
        lines.append(f"| `{name}` | {', '.join(f'`{s}`' for s in starts)} | {end} | {guard} | {writes} |")
    return "\n".join(lines)


def log_actions() -> dict[str, dict[str, set[str]]]:
    """Every ``action`` a log line of the package carries: action → {"levels", "modules", "messages"}, read
    from the source (``extra={"action": "…"}``), plus the decisions ``responses`` logs by name."""
    found: dict[str, dict[str, set[str]]] = {}

    def note(action: str, level: str, module: str, message: str) -> None:
        entry = found.setdefault(action, {"levels": set(), "modules": set(), "messages": set()})
        entry["levels"].add(level)
        entry["modules"].add(module)
        if message:
            entry["messages"].add(message)

    for path in sorted(PACKAGE.rglob("*.py")):
        if "migrations" in path.parts:
            continue
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            level = node.func.attr
            if level not in ("debug", "info", "warning", "error", "exception", "critical"):
                continue
            message = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else ""
            for keyword in node.keywords:
                if keyword.arg != "extra" or not isinstance(keyword.value, ast.Dict):
                    continue
                for key, value in zip(keyword.value.keys, keyword.value.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value == "action" and isinstance(value, ast.Constant):
                        note(str(value.value), "error" if level == "exception" else level, module, str(message))
    from celery_scheduller.responses import DECIDED_ACTIONS

    for action in DECIDED_ACTIONS:
        note(action, "info", "responses", "alarm %s <action>")
    return found


def actions_table() -> str:
    rows = ["| action | level | logged by | the line reads |", "|---|---|---|---|"]
    for action, entry in sorted(log_actions().items()):
        messages = "; ".join(f"“{m}”" for m in sorted(entry["messages"]))
        messages = messages.replace("|", "\\|")
        rows.append(
            f"| `{action}` | {', '.join(sorted(entry['levels']))} | "
            f"{', '.join(f'`{m}`' for m in sorted(entry['modules']))} | {messages} |"
        )
    return "\n".join(rows)


def _doc(obj: object) -> str:
    """A docstring as Markdown: dedented, RST literals as Markdown code."""
    import inspect

    text = inspect.getdoc(obj) or ""
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def _signature(obj: object) -> str:
    import inspect

    try:
        signature = str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "()"
    signature = re.sub(r"'([^'()]*)'", r"\1", signature)  # string annotations, unquoted
    return signature.replace("(self, ", "(").replace("(self)", "()").replace("(cls, ", "(").replace("(cls)", "()")


def _comment_doc(path: Path, line_start: str) -> str:
    """The ``#:`` comment lines just above the source line that starts with ``line_start``."""
    lines = path.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if line.strip().startswith(line_start))
    found = []
    for line in reversed(lines[:index]):
        if not line.strip().startswith("#:"):
            break
        found.insert(0, line.strip().removeprefix("#:").strip())
    return re.sub(r"``([^`]+)``", r"`\1`", " ".join(found))


#: what the API page documents, in order: (heading, object path, members)
API = (
    (
        "celery_scheduller.Scheduller",
        "name, use_state, scheduller_name, service_responded, in_memory_interval, dispatch_timeout, save_alarm, "
        "load_alarms, dispatch, dispatch_or_get, dispatch_many, pending, cancel, cancel_aggregate, reschedule, "
        "dispatch_now, restart, adispatch, adispatch_or_get, adispatch_many, apending, acancel, acancel_aggregate, "
        "areschedule",
    ),
    ("celery_scheduller.Message", "new, assign, with_response, dispatch_at, to_json, from_json, dumps, loads"),
    ("celery_scheduller.Response", "ok, to_json, from_json"),
    ("celery_scheduller.OK", ""),
    ("celery_scheduller.Retry", ""),
    ("celery_scheduller.Fail", ""),
    ("celery_scheduller.hooks.current_message", ""),
)
ERRORS = (
    "SchedullerError",
    "ConfigurationError",
    "InvalidAlarm",
    "InvalidResponse",
    "UnknownScheduller",
    "exceptions.ClaimConflict",
    "exceptions.PublishFailed",
)
BEAT = (
    ("celery_scheduller.schedulers.AlarmScheduler", "tick, tick_alarms"),
    ("celery_scheduller.schedulers.AlarmSide", ""),
    ("celery_scheduller.task_backend.AlarmTaskBackend", "enqueue, get_result, celery_priority, celery_queue"),
)


def _entries(entries: tuple[tuple[str, str], ...]) -> list[str]:
    import inspect

    from django.utils.module_loading import import_string

    out: list[str] = []
    for path, members in entries:
        obj = import_string(path)
        short = path.removeprefix("celery_scheduller.")
        if inspect.isclass(obj) or inspect.isfunction(obj):
            out += [f"### `{short}{_signature(obj) if inspect.isfunction(obj) else ''}`", "", _doc(obj), ""]
        else:  # a value (OK)
            out += [f"### `{short}`", "", _doc(type(obj)), ""]
        for name in filter(None, members.split(", ")):
            member = inspect.getattr_static(obj, name)
            if name == "name" and path.endswith("Scheduller"):
                out += [f"- **`{name}`** (class attribute): {_comment_doc(PACKAGE / 'scheduller.py', 'name:')}"]
                continue
            target = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
            if isinstance(target, property):
                out += [f"- **`{name}`** (property): {_doc(target).replace(chr(10), ' ')}"]
                continue
            doc = _doc(target).replace("\n", "\n  ")
            out += [f"- **`{name}{_signature(target)}`**: {doc}"]
        out.append("")
    return out


def api_reference() -> str:
    from celery_scheduller import exceptions, models

    lines = ["## Scheduling and answering", "", *_entries(API)]
    lines += ["## Models (read-only)", ""]
    for model in (models.Alarm, models.AlarmAttempt):
        fields = ", ".join(f"`{f.name}`" for f in model._meta.get_fields() if f.concrete)
        doc = _doc(model).replace("\n", "\n  ")
        lines += [f"- **`models.{model.__name__}`**: {doc} Fields: {fields}."]
    lines += ["", "## Errors", "", "Every error the package raises is a `SchedullerError`:", ""]
    for name in ERRORS:
        cls = getattr(exceptions, name.removeprefix("exceptions."))
        doc = _doc(cls).replace("\n", "\n  ")
        lines += [f"- **`{name}`**: {doc}"]
    lines += ["", "## Beat and the Django Tasks backend", ""]
    lines += _entries(BEAT)
    return "\n".join(lines).strip()


def signals_reference() -> str:
    import celery_scheduller.signals as signals

    return _doc(signals)


PAGES = {
    "settings": (ROOT / "docs" / "reference" / "settings.md", settings_table),
    "transitions": (ROOT / "docs" / "explanation" / "states.md", transitions_table),
    "log actions": (ROOT / "docs" / "reference" / "signals.md", actions_table),
    "signals": (ROOT / "docs" / "reference" / "signals.md", signals_reference),
    "api": (ROOT / "docs" / "reference" / "api.md", api_reference),
}


def rendered(page: str, name: str, table: str) -> str:
    begin, end = BEGIN.format(name=name), END.format(name=name)
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(page):
        raise SystemExit(f"the markers of the {name!r} table are missing")
    return pattern.sub(lambda _match: f"{begin}\n\n{table}\n\n{end}", page)


def main(check: bool) -> list[str]:
    stale = []
    for name, (path, table) in PAGES.items():
        text = path.read_text()
        new = rendered(text, name, table())
        if new != text:
            stale.append(str(path.relative_to(ROOT)))
            if not check:
                path.write_text(new)
    return stale


if __name__ == "__main__":
    import os

    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    os.environ.setdefault("CSCHED_DB", "sqlite")
    import django

    django.setup()
    check = "--check" in sys.argv
    stale = main(check)
    if check and stale:
        print("out of date (run python docs/generate.py): " + ", ".join(stale))
        sys.exit(1)
