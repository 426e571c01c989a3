"""Blocks the log tailer's thread until a watched directory changes, a timeout passes, or
:meth:`DirectoryWatch.wake` is called.

One inotify descriptor, read by the thread that waits on it: no observer, emitter or
dispatcher threads to hand each event on. Everything pending is read at once, so a burst of
writes wakes the thread once. Events are not interpreted beyond keeping the watches in place
(the next :meth:`Tailer.poll` pass finds what changed); a directory that cannot be watched
raises :class:`OSError`, and the caller polls it instead.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import select
from collections.abc import Iterable

from inotify_simple import INotify
from inotify_simple import flags as in_flags

# What a writer, a rotation or a new directory does. Not open/access/close_nowrite: our own
# reads do those, and waking on them would make every pass schedule the next one.
WAKING = (in_flags.CREATE | in_flags.MODIFY | in_flags.MOVED_FROM | in_flags.MOVED_TO
          | in_flags.DELETE | in_flags.CLOSE_WRITE)
# A root deleted or renamed no longer is what its path names: forgotten, so that the next
# watch() of the path watches whatever is there then.
GONE = in_flags.DELETE_SELF | in_flags.MOVE_SELF
NEW_DIR = in_flags.CREATE | in_flags.MOVED_TO


class DirectoryWatch:
    """Directory watches and a wake-up for one waiting thread. :meth:`watch` and :meth:`wait`
    belong to that thread; :meth:`wake` may be called from any thread."""

    def __init__(self) -> None:
        self._inotify: INotify | None = None
        self._poller = select.poll()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._poller.register(self._wake_read, select.POLLIN)
        self._dirs: dict[int, tuple[str, bool]] = {}   # watch descriptor -> (path, recursive)
        self._roots: dict[str, tuple[int, bool]] = {}  # root watched whole -> (wd, recursive)

    def watch(self, root: str, recursive: bool = False) -> None:
        """Watch directory ``root`` (when ``recursive``, with every directory below it, also
        those created later). Cheap when it is watched already. Raises :class:`OSError` when it
        cannot be (no inotify, the inotify limits reached, no permission); a later call
        tries again."""
        watched = self._roots.get(root)
        if watched is not None and (watched[1] or not recursive):
            return
        inotify = self._open()
        wd = self._add(inotify, root, recursive)
        if recursive:
            self._add_below(inotify, root)
        self._roots[root] = (wd, recursive)

    def wait(self, timeout: float) -> None:
        """Return when a watched directory changed, ``timeout`` seconds passed, or
        :meth:`wake` was called (also when called before this wait)."""
        if not self._poller.poll(math.ceil(max(0.0, timeout) * 1000)):
            return
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_read, 4096)
        if self._inotify is not None:
            self._handle(self._inotify, self._inotify.read(timeout=0))

    def wake(self) -> None:
        """End the current or the next :meth:`wait` now. Thread-safe."""
        with contextlib.suppress(BlockingIOError):  # the pipe is full: a wake is pending
            os.write(self._wake_write, b"\0")

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        if self._wake_read >= 0:
            os.close(self._wake_read)
            os.close(self._wake_write)
            self._wake_read = self._wake_write = -1
        self._dirs.clear()
        self._roots.clear()

    # --- internals --------------------------------------------------------------------------

    def _open(self) -> INotify:
        if self._inotify is None:
            try:
                # Non-blocking: a wait() woken for nothing must not then block in read().
                self._inotify = INotify(nonblocking=True)
            except AttributeError as exc:  # a libc without inotify_init1: not Linux
                raise OSError(errno.ENOSYS, "inotify is not available here") from exc
            self._poller.register(self._inotify.fileno(), select.POLLIN)
        return self._inotify

    def _add(self, inotify: INotify, path: str, recursive: bool) -> int:
        wd: int = inotify.add_watch(path, WAKING | GONE | in_flags.ONLYDIR)
        # A directory reached twice (a root below a recursive root) is one watch descriptor:
        # recursive when either asked for it.
        self._dirs[wd] = (path, recursive or self._dirs.get(wd, ("", False))[1])
        return wd

    def _add_below(self, inotify: INotify, top: str) -> None:
        """Watch every directory below ``top``. One that vanished meanwhile is skipped; any
        other failure raises (its root is then walked again by the next watch())."""
        def unlistable(exc: OSError) -> None:
            if not isinstance(exc, FileNotFoundError):
                raise exc

        for parent, subdirs, _ in os.walk(top, onerror=unlistable):
            for name in subdirs:
                with contextlib.suppress(FileNotFoundError):
                    self._add(inotify, os.path.join(parent, name), True)

    def _handle(self, inotify: INotify, events: Iterable[tuple[int, int, int, str]]) -> None:
        for wd, mask, _, name in events:
            if mask & in_flags.Q_OVERFLOW:
                # New directories may be among the lost events: walk the trees again.
                self._forget_trees()
            elif mask & in_flags.IGNORED:
                self._dirs.pop(wd, None)
                self._forget_root(wd)
            elif mask & GONE and self._forget_root(wd):
                # A root's path is what is watched, so its watch goes. (Below a root, a renamed
                # directory is watched again at its new path: NEW_DIR on its new parent.)
                with contextlib.suppress(OSError):  # already gone with the directory
                    inotify.rm_watch(wd)
            elif mask & in_flags.ISDIR and mask & NEW_DIR and self._dirs.get(wd, ("", False))[1]:
                created = os.path.join(self._dirs[wd][0], name)
                try:
                    self._add(inotify, created, True)
                    self._add_below(inotify, created)
                except FileNotFoundError:
                    pass
                except OSError:
                    # Not watchable now: the next watch() of the trees retries and says why.
                    self._forget_trees()

    def _forget_root(self, wd: int) -> bool:
        """No longer count the roots watched by ``wd`` as watched; whether there were any."""
        gone = [root for root, (root_wd, _) in self._roots.items() if root_wd == wd]
        for root in gone:
            del self._roots[root]
        return bool(gone)

    def _forget_trees(self) -> None:
        """Have the next watch() of each recursive root walk its tree again."""
        self._roots = {root: entry for root, entry in self._roots.items() if not entry[1]}
