"""The drop-in folder: air-gapped sites deliver model images as files.

An OCI image layout — a directory (``oci-layout`` + ``index.json`` + ``blobs/``)
or a tar of one — placed in ``<state-dir>/inbox/`` is noticed through
``watchdog``, verified against the trust policy exactly like a pull (the
signature travels inside the layout as the ``sha256-<hex>.sig`` manifest cosign
and skopeo write), imported into the store and deployed through the reconciler
as the ``local`` source. A refused entry is moved to ``inbox/refused/`` with a
``<name>.reason`` file next to it; an imported one is removed (its blobs now
live in the content-addressed store).

Writers should create the entry under a name starting with ``.`` and rename it
into place when complete; entries that are still growing are also left alone
until they have been quiet for ``inbox.settle_s`` seconds, so a slow ``cp``
works too. Entries present at start-up (dropped while the agent was down) are
processed first.

Whoever can write here is not trusted: a layout is read only through its own
regular files, with bounded reads (:mod:`agent.images.layout`), so a link to
``/dev/zero`` or to a host file, a FIFO or a sparse tar member is refused
instead of followed, read or waited on. Whatever goes wrong with one entry —
even an error nobody anticipated — refuses that entry and the watcher goes on
with the next. ``.reason`` files are written 0600 through a descriptor of
``refused/`` (a link planted there is replaced, never written through). An entry
that can be neither moved aside nor removed is logged once and left alone until it
changes, and the watcher's own reads (open/close events) never wake it, so nothing
loops; a ``refused`` that is not a directory at start-up is renamed
``refused.not-a-directory.<n>`` and replaced by a fresh directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from watchdog.events import (
    EVENT_TYPE_CLOSED_NO_WRITE,
    EVENT_TYPE_OPENED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from agent.control import Control
from agent.errors import AgentError, BadRequest
from agent.events import EventBus

if TYPE_CHECKING:
    from agent.config import Config
    from agent.images.service import ImageService

log = structlog.get_logger("edge_agent.inbox")

REFUSED_DIR = "refused"
# What held the name ``refused`` at start-up when it was no directory: kept, never imported.
NOT_A_DIRECTORY = f"{REFUSED_DIR}.not-a-directory."
# Reading an entry is no change to it: the agent's own reads must not wake the watcher again.
_READ_EVENTS = frozenset({EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE})
# A reason quotes the dropper's own text (names from index.json): keep it to a readable size.
MAX_REASON_CHARS = 4096


@dataclass(frozen=True)
class InboxSettings:
    enabled: bool = True
    # An entry is taken once nothing in it changed for this long.
    settle_s: float = 1.0
    # Safety net beside inotify (events can be lost when the queue overflows).
    rescan_s: float = 30.0

    @classmethod
    def from_config(cls, config: Config) -> InboxSettings:
        from agent.config import section_values

        return cls(**section_values("inbox", config.section("inbox"), cls))


class _Wakeup(FileSystemEventHandler):
    """watchdog calls this from its own thread; all it does is poke the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wake: asyncio.Event):
        self._loop = loop
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in _READ_EVENTS:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self._loop.call_soon_threadsafe(self._wake.set)


class InboxWatcher:
    """A Service of the agent: start() begins watching, stop() ends it."""

    def __init__(
        self,
        *,
        settings: InboxSettings,
        root: Path,
        puller: ImageService | None,
        control: Control,
        events: EventBus,
    ):
        self.settings = settings
        self.root = root  # <state-dir>/inbox
        self.puller = puller  # None when image pulls are off: every entry is refused, saying so
        self.control = control
        self.events = events
        self.refused_dir = self.root / REFUSED_DIR
        self._observer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        # Entries that could be neither moved aside nor removed, by name, as they were then:
        # left alone until they change, or the watcher would judge them again at every pass.
        self._stuck: dict[str, tuple[int, int, int, float]] = {}
        self.processed = 0
        self.refused = 0

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _ensure_refused_dir(self.refused_dir)
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._wake.set()  # entries dropped while the agent was down
        observer = Observer()
        observer.schedule(_Wakeup(loop, self._wake), str(self.root), recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer
        self._task = asyncio.ensure_future(self._run())
        log.info("watching the drop-in folder", path=str(self.root))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._observer is not None:
            observer, self._observer = self._observer, None
            observer.stop()
            await asyncio.to_thread(observer.join, 5)

    # -- the loop ------------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            # asyncio.timeout, not wait_for: on 3.11 a cancel that races wait_for's inner
            # task can be lost, and stop() would wait for this task forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.rescan_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                # Let a burst of writes settle before judging which entries are complete.
                while pending := await self.scan_once():
                    await asyncio.sleep(min(self.settings.settle_s, max(0.05, pending)))
            except Exception:
                # The folder itself misbehaved (unreadable, gone): keep watching, try again at the next wake-up.
                log.exception("drop-in folder scan failed; watching on")

    async def scan_once(self) -> float:
        """Process every settled entry; returns how long until an unsettled one may be ready (0: none)."""
        wait = 0.0
        entries = sorted(self._entries())
        names = {entry.name for entry in entries}
        for name in [n for n in self._stuck if n not in names]:
            del self._stuck[name]
        for entry in entries:
            if entry.name in self._stuck and self._stuck[entry.name] == _fingerprint(entry):
                continue
            self._stuck.pop(entry.name, None)
            quiet_for = time.time() - _last_change(entry)
            if quiet_for < self.settings.settle_s:
                wait = max(wait, self.settings.settle_s - quiet_for)
                continue
            await self.process(entry)
            if os.path.lexists(entry):
                # Neither moved aside nor removed (refused/ replaced by a link, an undeletable
                # subdirectory...): say so once, and leave it until it changes.
                self._stuck[entry.name] = _fingerprint(entry)
                log.warning(
                    "drop-in entry could be neither moved aside nor removed; left alone until it changes",
                    entry=entry.name,
                )
        return wait

    def _entries(self) -> Iterator[Path]:
        try:
            children = list(self.root.iterdir())
        except FileNotFoundError:
            return
        for child in children:
            if child.name.startswith((".", NOT_A_DIRECTORY)) or child.name == REFUSED_DIR:
                continue
            yield child

    async def process(self, entry: Path) -> None:
        name = entry.name
        try:
            _check_shape(entry)
            if self.puller is None:
                raise BadRequest("image imports are not available on this agent")
            record = await self.puller.import_layout(entry)
            result = await self.control.deploy(f"store:{record.model}:{record.version}", source="local")
        except AgentError as exc:
            self._refuse(entry, str(exc))
            return
        except OSError as exc:
            # The entry vanished or is unreadable mid-way: refuse it rather than retry forever.
            self._refuse(entry, f"cannot read {name}: {exc.strerror or exc}")
            return
        except Exception as exc:
            # A bug below, or input no layer anticipated: this entry is refused, the watcher lives on.
            log.exception("drop-in entry failed unexpectedly", entry=name)
            self._refuse(entry, f"{name}: internal error while importing ({type(exc).__name__}: {exc})")
            return
        await asyncio.to_thread(_remove, entry)
        self.processed += 1
        self.events.publish(
            "inbox.imported", entry=name, model=record.model, version=record.version, digest=record.manifest_digest
        )
        log.info("drop-in image imported and deployed", entry=name, model=record.model, version=result["version"])

    def _refuse(self, entry: Path, reason: str) -> None:
        self.refused += 1
        reason = reason.rstrip()
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[:MAX_REASON_CHARS] + " [...]"
        moved_to: str | None = None
        try:
            moved_to = _move_aside(self.refused_dir, entry, reason)
        except Exception as exc:  # noqa: BLE001 - whatever it is, the refusal is still logged and published
            log.error("cannot move a refused drop-in entry aside", entry=entry.name, error=str(exc))
        self.events.publish("inbox.refused", entry=entry.name, error=reason)
        log.error("drop-in image refused", entry=entry.name, moved_to=moved_to, error=reason)


def _ensure_refused_dir(refused_dir: Path) -> None:
    """Make ``refused/`` a real directory; whatever else holds the name (a link, a file) is moved aside."""
    try:
        st = refused_dir.lstat()
    except FileNotFoundError:
        refused_dir.mkdir(mode=0o750)
        return
    if stat.S_ISDIR(st.st_mode):
        return
    n = 1
    while os.path.lexists(aside := refused_dir.with_name(f"{NOT_A_DIRECTORY}{n}")):
        n += 1
    os.rename(refused_dir, aside)
    log.warning("the drop-in folder's refused/ was not a directory; moved it aside", moved_to=str(aside))
    refused_dir.mkdir(mode=0o750)


def _fingerprint(entry: Path) -> tuple[int, int, int, float]:
    """What tells that an entry changed: its inode, mtime and size, and its newest change within."""
    try:
        st = entry.lstat()
    except FileNotFoundError:
        return (0, 0, 0, 0.0)
    return (st.st_ino, st.st_mtime_ns, st.st_size, _last_change(entry))


def _move_aside(refused_dir: Path, entry: Path, reason: str) -> str:
    """Move ``entry`` into ``refused/`` and write its ``.reason`` (0600) beside it; returns the new path.

    Both go through a descriptor of ``refused/`` opened without following links, and the
    reason is written to a fresh file renamed into place, so a link the dropper planted as
    ``refused`` or as ``<name>.reason`` is never written through.
    """
    try:
        dir_fd = os.open(refused_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        refused_dir.mkdir(mode=0o750)
        dir_fd = os.open(refused_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        name = entry.name
        if _lexists(name, dir_fd):
            name = f"{entry.name}.{time.time_ns()}"
        os.replace(entry, name, dst_dir_fd=dir_fd)
        tmp = f".{name}.reason.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(reason + "\n")
            os.replace(tmp, f"{name}.reason", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        return str(refused_dir / name)
    finally:
        os.close(dir_fd)


def _lexists(name: str, dir_fd: int) -> bool:
    """Whether ``refused/<name>`` exists, as anything (a dangling link counts)."""
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def _check_shape(entry: Path) -> None:
    if entry.is_symlink():
        raise BadRequest(f"{entry.name}: symbolic links are not followed in the drop-in folder")
    if entry.is_dir():
        if not (entry / "oci-layout").is_file() or not (entry / "index.json").is_file():
            raise BadRequest(f"{entry.name}: not an OCI image layout (no oci-layout or index.json file)")
        return
    if entry.is_file():
        if not entry.name.endswith(".tar"):
            raise BadRequest(f"{entry.name}: drop-in files must be OCI layouts as tar archives (*.tar)")
        return
    raise BadRequest(f"{entry.name}: neither a directory nor a file")


def _last_change(entry: Path) -> float:
    """Newest mtime/ctime in the entry (a directory is walked): when it was last written."""
    try:
        st = entry.lstat()
    except FileNotFoundError:
        return time.time()
    newest = max(st.st_mtime, st.st_ctime)
    if entry.is_dir() and not entry.is_symlink():
        for dirpath, dirnames, filenames in os.walk(entry):
            for item in (*dirnames, *filenames):
                with contextlib.suppress(FileNotFoundError):
                    s = os.lstat(os.path.join(dirpath, item))
                    newest = max(newest, s.st_mtime, s.st_ctime)
    return newest


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
