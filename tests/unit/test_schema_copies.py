"""The app keeps its own copy of the sidecar's schema helper (neither package imports the
other): the shared part must stay the same text, so a fix to one is a fix to both."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def shared_part(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    return text[text.index("\ndef validate("):]


def test_the_apps_schema_helper_is_the_sidecars_word_for_word() -> None:
    assert shared_part(REPO / "tts_app" / "schema.py") == \
        shared_part(REPO / "exporter" / "schema.py")
