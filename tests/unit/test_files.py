"""The atomic-write helper each package has (the sidecar's and the app's, which must not
import each other): a reader sees the old file or the new one, and a failed write leaves the
old file and no temp file behind."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from exporter.files import write_atomically as sidecar_write
from tts_app.files import write_atomically as app_write

Write = Callable[[Path, bytes], None]
WRITERS = [pytest.param(sidecar_write, id="sidecar"),
           pytest.param(lambda path, data: sidecar_write(path, data, durable=True),
                        id="sidecar-durable"),
           pytest.param(app_write, id="app")]


@pytest.mark.parametrize("write", WRITERS)
def test_write_replaces_the_file_readable_by_others_without_leftovers(
        tmp_path: Path, write: Write) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    write(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


@pytest.mark.parametrize("write", WRITERS)
def test_a_failed_write_raises_and_leaves_no_temp_file(tmp_path: Path, write: Write) -> None:
    target = tmp_path / "taken"
    target.mkdir()                      # os.replace cannot put a file over a directory
    with pytest.raises(IsADirectoryError):
        write(target, b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_a_fixed_temp_name_is_used_and_gone_afterwards(tmp_path: Path) -> None:
    target, temp = tmp_path / "offsets.json", tmp_path / "offsets.json.tmp"
    temp.write_bytes(b"left by a crash")
    sidecar_write(target, b"{}", durable=True, temp=temp)
    assert target.read_bytes() == b"{}"
    assert not temp.exists()
