"""DirectoryWatch on real directories with real inotify: what wakes a wait and what does not,
a burst drained at once, trees that grow, roots that are deleted and come back, limits.

Waits that must end early are bounded at 5 s (a loaded 2-core CI box), far below the 30 s
timeouts they are given; waits that must not end early are checked against 0.3 s."""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.logs import watch as watch_module
from exporter.logs.watch import DirectoryWatch

from .conftest import InotifyLimits

LONG = 30.0
PROMPT = 5.0
QUIET = 0.3


@pytest.fixture
def watch() -> Iterator[DirectoryWatch]:
    directory_watch = DirectoryWatch()
    yield directory_watch
    directory_watch.close()


def waited(watch: DirectoryWatch, timeout: float = LONG) -> float:
    started = time.monotonic()
    watch.wait(timeout)
    return time.monotonic() - started


def stays_quiet(watch: DirectoryWatch) -> bool:
    """Whether a wait of QUIET seconds lasts (about) all of it."""
    return waited(watch, QUIET) >= QUIET * 0.9


def settle(watch: DirectoryWatch) -> None:
    """Consume the events so far."""
    while not stays_quiet(watch):
        pass


def test_a_write_in_a_watched_directory_ends_the_wait(
        tmp_path: Path, watch: DirectoryWatch) -> None:
    watch.watch(str(tmp_path))
    threading.Timer(0.1, lambda: (tmp_path / "app.log").write_text("line\n")).start()
    assert waited(watch) < PROMPT


def test_nothing_happening_waits_for_the_timeout(tmp_path: Path, watch: DirectoryWatch) -> None:
    watch.watch(str(tmp_path))
    assert QUIET * 0.9 <= waited(watch, QUIET) < PROMPT


def test_reading_files_does_not_wake(tmp_path: Path, watch: DirectoryWatch) -> None:
    log = tmp_path / "app.log"
    log.write_text("line\n")
    watch.watch(str(tmp_path))
    watch.wait(0)  # the write above, if it is still queued
    log.read_bytes()
    os.stat(log)
    assert stays_quiet(watch)


def test_wake_ends_a_wait_from_another_thread_and_one_made_before_it(
        tmp_path: Path, watch: DirectoryWatch) -> None:
    watch.watch(str(tmp_path))
    threading.Timer(0.1, watch.wake).start()
    assert waited(watch) < PROMPT
    watch.wake()
    watch.wake()
    assert waited(watch) < PROMPT
    assert stays_quiet(watch)  # two wakes before a wait end one wait


def test_a_burst_of_writes_ends_one_wait_only(tmp_path: Path, watch: DirectoryWatch) -> None:
    watch.watch(str(tmp_path))
    for i in range(500):
        with (tmp_path / f"app{i % 3}.log").open("a") as out:
            out.write(f"line {i}\n")
    assert waited(watch) < PROMPT
    assert stays_quiet(watch)


def test_a_recursive_watch_follows_directories_created_later(
        tmp_path: Path, watch: DirectoryWatch) -> None:
    (tmp_path / "old" / "deep").mkdir(parents=True)
    watch.watch(str(tmp_path), recursive=True)
    (tmp_path / "old" / "deep" / "app.log").write_text("line\n")
    assert waited(watch) < PROMPT

    # The inner directory may be created before the watch on its parent is added: the walk of
    # a new directory finds it.
    (tmp_path / "new" / "pod" / "c1").mkdir(parents=True)
    settle(watch)
    (tmp_path / "new" / "pod" / "c1" / "app.log").write_text("line\n")
    assert waited(watch) < PROMPT

    moved = tmp_path.parent / (tmp_path.name + "-elsewhere")
    (moved / "sub").mkdir(parents=True)
    os.rename(moved, tmp_path / "moved-in")
    settle(watch)
    (tmp_path / "moved-in" / "sub" / "app.log").write_text("line\n")
    assert waited(watch) < PROMPT


def test_a_plain_watch_ignores_subdirectories_until_the_root_is_watched_recursively(
        tmp_path: Path, watch: DirectoryWatch) -> None:
    (tmp_path / "sub").mkdir()
    watch.watch(str(tmp_path))
    (tmp_path / "sub" / "app.log").write_text("line\n")
    assert stays_quiet(watch)
    watch.watch(str(tmp_path), recursive=True)  # as for the globs logs/*.log and logs/*/*.log
    (tmp_path / "sub" / "app.log").write_text("line\n")
    assert waited(watch) < PROMPT


@pytest.mark.parametrize("away", ["deleted", "renamed"])
def test_a_root_deleted_or_renamed_is_watched_again_at_its_path(
        tmp_path: Path, watch: DirectoryWatch, away: str) -> None:
    root = tmp_path / "logs"
    root.mkdir()
    watch.watch(str(root))
    if away == "deleted":
        shutil.rmtree(root)
    else:
        root.rename(tmp_path / "logs.old")
    assert waited(watch) < PROMPT
    settle(watch)
    root.mkdir()
    watch.watch(str(root))
    (root / "app.log").write_text("line\n")
    assert waited(watch) < PROMPT
    if away == "renamed":
        settle(watch)
        (tmp_path / "logs.old" / "app.log").write_text("not ours any more\n")
        assert stays_quiet(watch)


def test_a_watch_past_the_limits_raises_and_a_later_watch_succeeds(
        tmp_path: Path, inotify_limits: InotifyLimits) -> None:
    inotify_limits.instances = inotify_limits.watches = True
    watch = DirectoryWatch()
    try:
        with pytest.raises(OSError, match=os.strerror(errno.EMFILE)):
            watch.watch(str(tmp_path))
        inotify_limits.instances = False
        with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)):
            watch.watch(str(tmp_path))
        inotify_limits.watches = False
        watch.watch(str(tmp_path))
        (tmp_path / "app.log").write_text("line\n")
        assert waited(watch) < PROMPT
    finally:
        watch.close()


def test_without_inotify_in_libc_a_watch_raises_enosys(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def not_linux(*args: object, **kwargs: object) -> None:
        raise AttributeError("dlsym(RTLD_DEFAULT, inotify_init1): symbol not found")

    monkeypatch.setattr(watch_module, "INotify", not_linux)
    watch = DirectoryWatch()
    try:
        with pytest.raises(OSError, match="inotify is not available") as raised:
            watch.watch(str(tmp_path))
        assert raised.value.errno == errno.ENOSYS
        watch.wake()
        assert waited(watch) < PROMPT  # waits and wakes without inotify
    finally:
        watch.close()


def test_close_releases_every_descriptor(tmp_path: Path) -> None:
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        pytest.skip("needs /proc")
    before = len(list(fds.iterdir()))
    for _ in range(3):
        watch = DirectoryWatch()
        watch.watch(str(tmp_path), recursive=True)
        watch.wake()
        watch.wait(0)
        watch.close()
        watch.close()
    assert len(list(fds.iterdir())) == before
