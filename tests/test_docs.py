"""The reference says what the code does: the configuration table lists every setting."""

from __future__ import annotations

import re
from pathlib import Path

from lmarena_gateway.config import SETTINGS

DOCS = Path(__file__).resolve().parent.parent / "docs"
ROW = re.compile(r"^   \* - (?:``--(?P<option>[a-z0-9-]+)``|\(variable only\))\n"
                 r"     - ``(?P<env>[A-Z0-9_]+)``$", re.M)


def documented_settings() -> list[tuple[str | None, str]]:
    text = (DOCS / "configuration.rst").read_text()
    return [(m.group("option"), m.group("env")) for m in ROW.finditer(text)]


def test_the_configuration_table_lists_every_setting_once_in_order():
    assert documented_settings() == [(s.option, s.env) for s in SETTINGS], (
        "docs/configuration.rst's table must list each Setting of config.SETTINGS, "
        "in the same order, as its option (or '(variable only)') and its variable")


def test_the_readme_indexes_every_reference_page():
    readme = (DOCS.parent / "README.rst").read_text()
    linked = set(re.findall(r"<docs/([a-z0-9-]+\.rst)>`_", readme))
    assert linked == {p.name for p in DOCS.glob("*.rst")}
