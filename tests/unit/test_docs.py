"""The docs say what the code does: the tables drawn from the code are up to date in the pages, every
setting shows its default, and the API page names no private object (no services)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docs"))

import generate  # noqa: E402


def test_the_tables_in_the_pages_are_the_ones_the_code_draws():
    assert generate.main(check=True) == [], "run python docs/generate.py"


def test_every_setting_shows_its_default_and_unit():
    from celery_scheduller.conf import PREFIX, SPECS

    page = (ROOT / "docs" / "reference" / "settings.md").read_text()
    for spec in SPECS:
        row = next(line for line in page.splitlines() if line.startswith(f"| `{PREFIX}{spec.name}` |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1] == f"`{spec.default!r}`", row
        assert cells[3], row


def test_every_log_action_in_the_code_is_in_the_table():
    page = (ROOT / "docs" / "reference" / "signals.md").read_text()
    for action in generate.log_actions():
        assert f"| `{action}` |" in page


def test_the_api_page_names_no_private_object_and_shows_every_member_and_default():
    page = (ROOT / "docs" / "reference" / "api.md").read_text()
    assert not re.findall(r"(?<![\w.])_[A-Za-z]\w*", page), "a private name on the API page"
    assert "The type of OK" not in page
    for path, members in generate.API:
        assert f"`{path.removeprefix('celery_scheduller.')}" in page, path
        for name in filter(None, members.split(", ")):
            assert f"**`{name}" in page, (path, name)
    for needed in ("60,000", "DISPATCH_TIMEOUT", "now=", "(class attribute)", "Fail(reason)"):
        assert needed in page, needed


def test_the_tutorial_shows_the_quickstart_files_as_they_are_and_reads_without_sphinx():
    """The tutorial's code is the files CI runs in a new project (docs/quickstart), written out in the page
    (not included by a directive, which the repository host does not render)."""
    tutorial = (ROOT / "docs" / "tutorial.md").read_text()
    assert "{literalinclude}" not in tutorial and "{include}" not in tutorial
    for path in sorted((ROOT / "docs" / "quickstart").rglob("*.py")):
        code = path.read_text().strip()
        if code:
            assert f"```python\n{code}\n```" in tutorial, path
    for page in (ROOT / "docs").rglob("*.md"):
        assert "{include}" not in page.read_text(), f"{page}: an include the repository host shows as text"


def test_no_page_uses_a_directive_the_repository_host_shows_as_text():
    """Pictures are Markdown images, tables are written into the pages: a page opened on the repository host
    reads as on the site. Only the index's table of contents is Sphinx's own."""
    for page in (ROOT / "docs").rglob("*.md"):
        if "_build" in page.parts or page.name == "index.md":
            continue
        text = page.read_text()
        assert not re.findall(r"```\{(?!toctree)", text), page


def test_every_metric_is_in_the_operations_page():
    """The metrics are listed by hand in the operations page: none may be missing there."""
    import re
    from pathlib import Path

    source = (Path(__file__).resolve().parents[2] / "celery_scheduller" / "metrics.py").read_text()
    names = set(re.findall(r'PREFIX \+ "([a-z_]+)"', source)) | set(re.findall(r'\("([a-z_]+)", "[A-Z]', source))
    page = (Path(__file__).resolve().parents[2] / "docs" / "howto" / "observe.md").read_text()
    assert len(names) >= 20
    missing = sorted(name for name in names if f"celery_scheduller_{name}" not in page)
    assert missing == []


def test_the_json_lines_formatter_keeps_the_extras():
    import json
    import logging

    from celery_scheduller.logs import JsonLinesFormatter

    record = logging.LogRecord("celery_scheduller", logging.INFO, __file__, 1, "alarm %s finished", ("a-1",), None)
    record.alarm_id, record.action, record.attempt = "a-1", "finished", 2
    line = json.loads(JsonLinesFormatter().format(record))
    assert line["message"] == "alarm a-1 finished"
    assert (line["alarm_id"], line["action"], line["attempt"], line["level"]) == ("a-1", "finished", 2, "INFO")
    assert line["time"].endswith("+00:00")
