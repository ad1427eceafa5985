"""The crash journal: every call is written to a local file before it is queued.

A process killed before its writer stored a call (``kill -9``, the OOM killer, a crash
in native code) loses nothing: the next Tally that opens the same store replays what it
finds. The journal is also where records wait when the store is down for longer than
the in-memory queue can hold.

A journal is a directory of segment files, ``<pid>-<n>-<random>.journal``, each written
by one process. A segment is preallocated (so a full disk fails at creation, never
mid-write) and mapped into memory: appending a record is a copy into the page cache,
which the kernel keeps when the process dies. No fsync: the journal survives the
process, not the machine losing power.

The owner holds an ``flock`` on its segments. A segment that nobody holds belongs to a
process that is gone, and whoever locks it first replays it.

A frame is ``u32 length | u32 crc32 | payload`` with the payload marshalled by the caller.
The high bit of the length marks a record that was only journaled (the queue was full).
A frame torn by a kill (in the middle of its copy) fails its CRC and reads as the end.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import mmap
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy.engine import make_url

from .._internal import logger

MAGIC = b"LLMTJRN1"
SUFFIX = ".journal"
SEGMENT_BYTES = 4 << 20  # ~20k records of ~200 bytes
_FRAME = struct.Struct("<II")
_SPILLED = 0x8000_0000
_LENGTH = 0x7FFF_FFFF
_counter = itertools.count()


def default_directory(database_url: str) -> Path | None:
    """Where the journal of a store lives unless configured; None: no journal.

    ``$LLM_TALLY_JOURNAL_DIR/<store>`` when that variable is set; else beside a SQLite
    file (``app.db`` -> ``app.db.llm-tally-journal``); else
    ``~/.local/state/llm-tally/journal/<store>`` (``$XDG_STATE_HOME`` if set), where
    ``<store>`` is a hash of the database URL without its password. An in-memory
    SQLite store has no journal (nothing could be replayed into it).
    """
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        return None
    if url.database and url.database.startswith("file:") and "mode=memory" in url.database:
        return None
    key = hashlib.sha256(url.render_as_string(hide_password=True).encode()).hexdigest()[:16]
    root = os.environ.get("LLM_TALLY_JOURNAL_DIR")
    if root:
        return Path(root) / key
    if url.get_backend_name() == "sqlite" and url.database:
        database = Path(url.database)
        return database.with_name(database.name + ".llm-tally-journal")
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(state) / "llm-tally" / "journal" / key


class Segment:
    """One journal file, mapped in memory and locked by this process."""

    __slots__ = ("end", "fd", "map", "path", "spilled", "written")

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self.fd = fd
        self.map = mmap.mmap(fd, size)
        self.end = size
        self.written = len(MAGIC)  # where the next frame goes
        self.spilled = 0  # records in this segment that never reached the queue

    @classmethod
    def create(cls, directory: Path, size: int) -> Segment:
        """A new segment, preallocated and locked before it gets its visible name."""
        name = f"{os.getpid()}-{next(_counter)}-{os.urandom(4).hex()}"
        temporary = directory / f".{name}.tmp"
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.posix_fallocate(fd, 0, size)
            os.pwrite(fd, MAGIC, 0)
            path = directory / f"{name}{SUFFIX}"
            os.rename(temporary, path)
            return cls(path, fd, size)
        except BaseException:
            os.close(fd)
            temporary.unlink(missing_ok=True)
            raise

    def append(self, payload: bytes, spilled: bool) -> bool:
        """Copy one frame in; False when it does not fit. The caller holds the journal lock.

        The space is claimed before it is written, so a call that re-enters from a garbage
        collector callback in the middle of this one writes elsewhere.
        """
        start = self.written
        stop = start + 8 + len(payload)
        if stop > self.end:
            return False
        self.written = stop
        # One copy, header first: a frame torn by a kill in the middle fails its CRC.
        self.map[start:stop] = (
            _FRAME.pack(len(payload) | (_SPILLED if spilled else 0), zlib.crc32(payload)) + payload
        )
        if spilled:
            self.spilled += 1
        return True

    def frames(self, only_spilled: bool = False) -> Iterator[bytes]:
        """The payloads in this segment, in order, up to the first empty or torn frame."""
        return read_frames(self.map, only_spilled)

    def close(self, delete: bool) -> None:
        """Unmap and unlock; ``delete`` removes the file first (everything in it is stored)."""
        if delete:
            self.path.unlink(missing_ok=True)
        self.map.close()
        os.close(self.fd)


def read_frames(data: bytes | mmap.mmap, only_spilled: bool = False) -> Iterator[bytes]:
    """Payloads of a segment's bytes (see the module docstring for the frame format)."""
    if data[: len(MAGIC)] != MAGIC:
        return
    position = len(MAGIC)
    size = len(data)
    while position + 8 <= size:
        word, crc = _FRAME.unpack_from(data, position)
        length = word & _LENGTH
        stop = position + 8 + length
        if length == 0 or stop > size:
            return
        payload = bytes(data[position + 8 : stop])
        if zlib.crc32(payload) != crc:
            return  # torn by a kill mid-write: nothing can follow it
        if not only_spilled or word & _SPILLED:
            yield payload
        position = stop


def _age_seconds(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _remove_if_unlocked(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink(missing_ok=True)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)


class Journal:
    """The segments of one process for one store, and the ones left behind by others."""

    def __init__(self, directory: Path, segment_bytes: int = SEGMENT_BYTES) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory = directory
        self.segment_bytes = segment_bytes
        # Held while a record is written and queued, so that rotating sees both or neither.
        # Re-entrant: a garbage-collection callback can finish a stream in the middle.
        self.lock = threading.RLock()
        self.current: Segment | None = Segment.create(directory, segment_bytes)
        self._spare: Segment | None = None
        #: Rotated segments this process still holds (their records may not be stored yet).
        self.retired: list[Segment] = []
        #: Segments that could not be created (a full disk), and the last reason.
        self.errors = 0
        self.last_error: str | None = None

    def prepare_spare(self) -> None:
        """Create the next segment ahead of time (writer thread), so rotating is cheap."""
        if self._spare is None and self.current is not None:
            self._spare = self._create()

    def _create(self) -> Segment | None:
        try:
            return Segment.create(self.directory, self.segment_bytes)
        except OSError as exc:
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"[:500]
            if self.errors == 1:
                logger.warning(
                    "llm-tally: the journal cannot create its next file in %s (%s); when the "
                    "current one is full, records are only queued in memory",
                    self.directory,
                    self.last_error,
                )
            return None

    def rotate(self) -> Segment:
        """Start a new segment; returns the old one. The caller holds ``lock``.

        With no space for a new segment, the journal stops (records are still queued).
        """
        old = self.current
        if old is None:
            raise RuntimeError("the journal is stopped or closed")
        spare, self._spare = self._spare, None
        self.current = spare or self._create()
        self.retired.append(old)
        return old

    def release(self, segment: Segment) -> None:
        """Every record of ``segment`` is stored: delete it."""
        if segment in self.retired:
            self.retired.remove(segment)
        segment.close(delete=True)

    def abandoned(self) -> Iterator[Segment]:
        """Segments whose process is gone, each locked by us now (skip ones in use)."""
        for path in self.directory.glob(".*.tmp"):
            # Left by a process that died while creating a segment: it holds no record. A
            # fresh one is being created right now (and locked only after it is opened).
            if _age_seconds(path) > 60:
                _remove_if_unlocked(path)
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # replayed and deleted by another process just now
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            size = os.fstat(fd).st_size
            if not path.exists() or size < len(MAGIC):
                # Deleted after we opened it (its records are stored), or never written.
                if size < len(MAGIC):
                    path.unlink(missing_ok=True)
                os.close(fd)
                continue
            yield Segment(path, fd, size)

    def reopen_in_child(self) -> Journal | None:
        """After ``fork()``: let go of the parent's files (without deleting them: they are
        the parent's) and start files of this process."""
        for segment in (*self.retired, self.current, self._spare):
            if segment is not None:
                segment.close(delete=False)
        try:
            return Journal(self.directory, self.segment_bytes)
        except OSError as exc:
            logger.warning("llm-tally: no crash journal in this worker (%s)", exc)
            return None

    def size_bytes(self) -> int:
        """Bytes used by this process's segments (the space they reserve on disk)."""
        segments = [*self.retired, self.current, self._spare]
        return sum(s.end for s in segments if s is not None)

    def close(self, delete: bool) -> None:
        """Release every segment; ``delete`` when all their records are stored."""
        with self.lock:
            segments = [*self.retired, self.current]
            self.retired, self.current = [], None
        for segment in segments:
            if segment is not None:
                segment.close(delete=delete)
        if self._spare is not None:
            self._spare.close(delete=True)
            self._spare = None
