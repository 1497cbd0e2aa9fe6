"""The docs say what is true: every config key is in the README's table."""

import dataclasses
import re
from pathlib import Path

import pytest

from hybrid_distill.config import Config

REPO = Path(__file__).resolve().parents[1]


def _table_rows() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Configuration"):text.index("## Resuming")]
    return [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]


@pytest.mark.parametrize("section", [f.name for f in dataclasses.fields(Config)])
def test_every_config_key_is_in_the_readme_table(section):
    names = [f.name for f in dataclasses.fields(getattr(Config(), section))]
    prefixes = {section, "*_teacher"} if section.endswith("_teacher") else {section}
    rows = [r for r in _table_rows() if any(f"`{p}." in r for p in prefixes)]
    listed = {name for r in rows for name in re.findall(r"`(?:[a-z_*]+\.)?([a-z_]+)`", r)}
    assert set(names) <= listed, f"README table lacks {section}.{sorted(set(names) - listed)}"
