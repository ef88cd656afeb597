# Copyright: kubeos contributors
# Apache License 2.0 (see LICENSE)
"""Write an image stream into a slot while hashing it: raw into a block device, or through GNU tar.

The stream goes through a small pipeline of preallocated buffers: the calling thread reads
into a free buffer, a hashing thread feeds it to sha256, a writing thread hands it to the
kernel and returns the buffer to the pool.  ``os.readv``, ``hashlib`` and ``os.write`` all
release the GIL, so reading, hashing and writing overlap while memory stays at
``depth * chunk_size`` whatever the image size.  Nothing is ever buffered on disk.

Raw writes use ``O_DIRECT`` with page-aligned buffers where the target allows it (the unaligned
tail of the stream goes through the page cache), so a multi-gigabyte image neither evicts the
node's page cache nor leaves a gigabyte of dirty pages for the final fsync.
"""

from __future__ import annotations

__metaclass__ = type

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import queue
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import IO, Callable, Optional, Protocol

CHUNK_SIZE = 4 * 1024 * 1024
# O_DIRECT needs offsets and lengths in multiples of the logical block size (512 or 4096).
DIRECT_ALIGN = 4096
PIPELINE_DEPTH = 4
PROGRESS_INTERVAL = 0.5
# A single read call is capped so that cancellation is noticed while a slow network fills a chunk.
_READ_SLICE = 1024 * 1024
_POLL = 0.2

ProgressCallback = Callable[[int, Optional[int]], None]
CancelCallback = Callable[[], bool]

_TAR_ERROR_TAIL = 4000


class StreamSource(Protocol):
    """What the writers need from a source (``fetch.ImageSource`` is one)."""

    @property
    def length(self) -> Optional[int]: ...

    def read(self, n: int) -> bytes: ...


class ChecksumMismatch(Exception):
    """The sha256 of the stream is not the expected one."""

    def __init__(self, expected: str, actual: str, what: str = "image") -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"sha256 of the {what} is {actual}, expected {expected}: the image is corrupt or the checksum "
            "belongs to another image; the slot holds unverified data and must not be booted, "
            "check the image URL and checksum and write it again"
        )


class WriteError(Exception):
    """The image could not be written (I/O error, too large, tar failed, bad arguments)."""


class Cancelled(Exception):
    """``should_cancel`` asked to stop; the target holds a partial image."""


@dataclass
class WriteResult:
    bytes_written: int
    sha256: str
    seconds: float


def normalize_sha256(expected: str) -> str:
    """``'sha256:ABC…'`` → ``'abc…'``; raise WriteError unless it is 64 hex digits."""
    value = expected.strip()
    if value[:7].lower() == "sha256:":
        value = value[7:]
    value = value.lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise WriteError(
            f"expected checksum {expected!r} is not a sha256 digest: give 64 hex digits, "
            "optionally prefixed with 'sha256:'"
        )
    return value


def write_raw(
    source: StreamSource,
    target: str,
    expected_sha256: str,
    *,
    capacity: int,
    chunk_size: int = CHUNK_SIZE,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCallback | None = None,
) -> WriteResult:
    """Stream ``source`` into ``target`` (block device or existing regular file) from offset 0.

    Refuses before writing anything when the announced length exceeds ``capacity``, and aborts
    when the stream grows past it.  Block devices are opened with ``O_EXCL`` so that a mounted
    (in use) device is refused.  The data is fsynced before the digest is compared.
    """
    expected = normalize_sha256(expected_sha256)
    if chunk_size <= 0:
        raise WriteError(f"chunk_size must be positive, got {chunk_size}")
    length = source.length
    if length is not None and length > capacity:
        raise WriteError(
            f"the image is {length} bytes ({_human(length)}) but {target} holds only {capacity} bytes "
            f"({_human(capacity)}); nothing was written: use a smaller image or a larger slot"
        )
    start = time.monotonic()
    fd, direct = _open_target(target, direct=chunk_size % DIRECT_ALIGN == 0)
    try:
        hasher = hashlib.sha256()

        def write_fully(buf: memoryview) -> None:
            nonlocal direct
            while buf:
                try:
                    done = os.write(fd, buf)
                except OSError as exc:
                    if direct and exc.errno == errno.EINVAL:
                        # The device or file system refused this direct I/O: carry on buffered.
                        direct = _set_direct(fd, False)
                        continue
                    raise WriteError(
                        f"writing to {target} failed: {exc.strerror} (errno {exc.errno})"
                        + ("; the target is full" if exc.errno == errno.ENOSPC else "; check the disk")
                    ) from exc
                buf = buf[done:]

        def write_all(buf: memoryview) -> None:
            nonlocal direct
            tail = len(buf) % DIRECT_ALIGN
            if direct and tail:
                # Only the last chunk of the stream can be short: its unaligned tail goes buffered.
                write_fully(buf[: len(buf) - tail])
                direct = _set_direct(fd, False)
                buf = buf[len(buf) - tail :]
            write_fully(buf)

        pump = _Pump(
            source,
            [hasher.update, write_all],
            chunk_size=chunk_size,
            limit=capacity,
            limit_message=lambda total: (
                f"the image stream passed {total} bytes but {target} holds only {capacity} bytes "
                f"({_human(capacity)}); the slot holds a partial image: use a smaller image or a larger slot"
            ),
            progress=progress,
            should_cancel=should_cancel,
        )
        total = pump.run()
        _check_length(length, total)
        try:
            os.fsync(fd)
        except OSError as exc:
            raise WriteError(f"flushing {target} to disk failed: {exc.strerror}; check the disk") from exc
        if hasattr(os, "posix_fadvise"):
            # The slot is not read back by us; keep the node's page cache for its workloads
            # (only the buffered tail, or everything when direct I/O was refused, is cached).
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, total, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    digest = hasher.hexdigest()
    seconds = time.monotonic() - start
    if progress is not None:
        progress(total, length if length is not None else total)
    if digest != expected:
        raise ChecksumMismatch(expected, digest)
    return WriteResult(bytes_written=total, sha256=digest, seconds=seconds)


def extract_tar(
    source: StreamSource,
    dest_dir: str,
    expected_sha256: str,
    *,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCallback | None = None,
) -> WriteResult:
    """Stream a tar archive (plain, gzip, bzip2, xz or zstd) through sha256 into GNU tar.

    Ownership (numeric), modes, xattrs, ACLs, hard links, symlinks and device nodes are kept.
    GNU tar's own protection against ``..`` and absolute member names stays on.
    ``bytes_written`` is the size of the archive stream as received.
    """
    expected = normalize_sha256(expected_sha256)
    if not os.path.isdir(dest_dir):
        raise WriteError(f"extraction directory {dest_dir} does not exist; mount the slot there first")
    tar = shutil.which("tar")
    if tar is None:
        raise WriteError("GNU tar is not installed on this host; install the 'tar' package")
    start = time.monotonic()
    length = source.length
    head = _read_head(source, 6)
    compression, tool = _detect_compression(head)
    if tool is not None and shutil.which(tool) is None:
        raise WriteError(f"the image is a {tool}-compressed tar but {tool} is not installed; install {tool}")
    argv = [
        tar,
        "--extract",
        "--file=-",
        f"--directory={dest_dir}",
        "--numeric-owner",
        "--preserve-permissions",
        "--same-owner",
        "--xattrs",
        "--xattrs-include=*",
        "--acls",
    ]
    if compression:
        argv.append(compression)
    stream = _Prefixed(head, source)
    hasher = hashlib.sha256()
    with tempfile.TemporaryFile(prefix="kubeos-tar-err-") as errfile:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=errfile,
            env=dict(os.environ, LC_ALL="C"),
            close_fds=True,
            bufsize=0,
        )
        stdin = proc.stdin
        if stdin is None:  # cannot happen with stdin=PIPE; keeps the type checker honest
            _terminate(proc)
            raise WriteError("could not open a pipe into tar")

        def feed(buf: memoryview) -> None:
            fd = stdin.fileno()
            while buf:
                buf = buf[os.write(fd, buf) :]

        def stop_tar(exc: BaseException) -> None:
            if isinstance(exc, BrokenPipeError):
                # tar (or its decompressor) quit on its own: let it finish writing its error.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
            _terminate(proc)

        try:
            pump = _Pump(
                stream,
                [hasher.update, feed],
                chunk_size=CHUNK_SIZE,
                limit=None,
                limit_message=None,
                progress=progress,
                should_cancel=should_cancel,
                on_abort=stop_tar,
            )
            try:
                total = pump.run()
            except BrokenPipeError:
                proc.wait()
                raise WriteError(_tar_failure(argv, proc.returncode, errfile, dest_dir)) from None
            stdin.close()
            _wait_tar(proc, should_cancel)
        except BaseException:
            _terminate(proc)
            raise
        finally:
            if not stdin.closed:
                with contextlib.suppress(BrokenPipeError):
                    stdin.close()
        digest = hasher.hexdigest()
        if digest != expected:
            raise ChecksumMismatch(expected, digest, "tar archive")
        _check_length(length, total)
        if proc.returncode != 0:
            raise WriteError(_tar_failure(argv, proc.returncode, errfile, dest_dir))
    seconds = time.monotonic() - start
    if progress is not None:
        progress(total, length if length is not None else total)
    return WriteResult(bytes_written=total, sha256=digest, seconds=seconds)


class _Pump:
    """Read ``source`` into pooled buffers and pass each through ``stages`` (one thread each), in order.

    Every stage sees every buffer in stream order; the last stage returns the buffer to the pool,
    which bounds memory.  The first exception in any stage (or in the reading thread, including
    cancellation) stops the stream; the remaining buffers drain without work and the exception
    is raised from :meth:`run`.
    """

    def __init__(
        self,
        source: StreamSource,
        stages: list[Callable[[memoryview], object]],
        *,
        chunk_size: int,
        limit: int | None,
        limit_message: Callable[[int], str] | None,
        progress: ProgressCallback | None,
        should_cancel: CancelCallback | None,
        on_abort: Callable[[BaseException], None] | None = None,
        depth: int = PIPELINE_DEPTH,
    ) -> None:
        self._source = source
        self._stages = stages
        self._chunk = chunk_size
        self._limit = limit
        self._limit_message = limit_message
        self._progress = progress
        self._should_cancel = should_cancel
        self._on_abort = on_abort
        self._depth = max(depth, len(stages) + 1)
        self._failed = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._done = 0  # bytes through the last stage
        readinto = getattr(source, "readinto", None)
        self._readinto: Callable[[memoryview], Optional[int]] | None = readinto if callable(readinto) else None
        self._last_cancel_check = -_POLL

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = exc
        self._failed.set()

    def _stage(
        self,
        work: Callable[[memoryview], object],
        inbox: queue.Queue[Optional[tuple[memoryview, int]]],
        outbox: queue.Queue[Optional[tuple[memoryview, int]]],
        last: bool,
    ) -> None:
        while True:
            item = inbox.get()
            if item is None:
                if not last:
                    outbox.put(None)
                return
            buf, n = item
            if not self._failed.is_set():
                try:
                    work(buf[:n])
                except BaseException as exc:
                    self._fail(exc)
                else:
                    if last:
                        self._done += n
            outbox.put(item)

    def _cancel_requested(self) -> bool:
        """Ask ``should_cancel`` at most every ``_POLL`` seconds (it may be costly)."""
        if self._should_cancel is None:
            return False
        now = time.monotonic()
        if now - self._last_cancel_check < _POLL:
            return False
        self._last_cancel_check = now
        return bool(self._should_cancel())

    def _fill(self, buf: memoryview) -> int:
        """Fill ``buf`` from the source; fewer bytes only at the end of the stream."""
        got = 0
        size = len(buf)
        while got < size:
            if self._failed.is_set():
                break
            if got and self._cancel_requested():
                raise Cancelled("the image write was cancelled")
            want = min(size - got, _READ_SLICE)
            if self._readinto is not None:
                n = self._readinto(buf[got : got + want]) or 0
            else:
                data = self._source.read(want)
                n = len(data)
                buf[got : got + n] = data
            if n == 0:
                break
            got += n
        return got

    def _report(self, last_report: float) -> float:
        if self._progress is None:
            return last_report
        now = time.monotonic()
        if now - last_report >= PROGRESS_INTERVAL:
            self._progress(self._done, self._source.length)
            return now
        return last_report

    def run(self) -> int:
        pool: queue.Queue[Optional[tuple[memoryview, int]]] = queue.Queue()
        for _slot in range(self._depth):
            # Page-aligned anonymous memory: usable for O_DIRECT writes.
            pool.put((memoryview(mmap.mmap(-1, self._chunk)), 0))
        queues: list[queue.Queue[Optional[tuple[memoryview, int]]]] = [queue.Queue() for _stage in self._stages]
        threads = []
        for i, work in enumerate(self._stages):
            last = i == len(self._stages) - 1
            outbox = pool if last else queues[i + 1]
            t = threading.Thread(
                target=self._stage, args=(work, queues[i], outbox, last), name=f"kubeos-pump-{i}", daemon=True
            )
            t.start()
            threads.append(t)
        total = 0
        last_report = time.monotonic()
        try:
            while not self._failed.is_set():
                if self._cancel_requested():
                    raise Cancelled("the image write was cancelled")
                item = None
                while item is None:
                    try:
                        item = pool.get(timeout=_POLL)
                    except queue.Empty:
                        if self._failed.is_set():
                            break
                        if self._cancel_requested():
                            raise Cancelled("the image write was cancelled") from None
                        last_report = self._report(last_report)
                if item is None:
                    break
                buf = item[0]
                n = self._fill(buf)
                if n == 0:
                    pool.put(item)
                    break
                if self._limit is not None and total + n > self._limit:
                    pool.put(item)
                    if self._limit_message is not None:
                        raise WriteError(self._limit_message(total + n))
                    raise WriteError(f"the stream passed the limit of {self._limit} bytes")
                total += n
                queues[0].put((buf, n))
                last_report = self._report(last_report)
        except BaseException as exc:
            self._fail(exc)
        finally:
            if self._error is not None and self._on_abort is not None:
                # Unblock a stage stuck writing into a consumer that will never read again.
                self._on_abort(self._error)
            queues[0].put(None)
            for t in threads:
                t.join()
        if self._error is not None:
            raise self._error
        return total


class _Prefixed:
    """A source whose first bytes were already read (to sniff the format)."""

    def __init__(self, head: bytes, source: StreamSource) -> None:
        self._head = memoryview(head)
        self._source = source
        readinto = getattr(source, "readinto", None)
        self._readinto: Callable[[memoryview], Optional[int]] | None = readinto if callable(readinto) else None

    @property
    def length(self) -> Optional[int]:
        return self._source.length

    def read(self, n: int) -> bytes:
        if self._head:
            data = bytes(self._head[:n])
            self._head = self._head[len(data) :]
            return data
        return self._source.read(n)

    def readinto(self, buf: memoryview) -> int:
        if self._head:
            n = min(len(buf), len(self._head))
            buf[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        if self._readinto is not None:
            return self._readinto(buf) or 0
        data = self._source.read(len(buf))
        buf[: len(data)] = data
        return len(data)


def _read_head(source: StreamSource, want: int) -> bytes:
    head = b""
    while len(head) < want:
        data = source.read(want - len(head))
        if not data:
            break
        head += data
    return head


def _detect_compression(head: bytes) -> tuple[str | None, str | None]:
    """(tar option, decompressor program) from the magic bytes; (None, None) for a plain tar."""
    if head[:2] == b"\x1f\x8b":
        return "--gzip", "gzip"
    if head[:6] == b"\xfd7zXZ\x00":
        return "--xz", "xz"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "--zstd", "zstd"
    if head[:3] == b"BZh":
        return "--bzip2", "bzip2"
    return None, None


def _open_target(target: str, *, direct: bool) -> tuple[int, bool]:
    """Open ``target`` for writing without truncation; returns (fd, whether O_DIRECT is on).

    Direct I/O skips the page cache: no second copy of every block, no flood of dirty pages that
    fsync must push out at the end, and the node's cache stays with its workloads.
    """
    try:
        st = os.stat(target)
    except OSError as exc:
        raise WriteError(
            f"cannot use {target} as the target: {exc.strerror}; give an existing block device or file"
        ) from exc
    flags = os.O_WRONLY | os.O_CLOEXEC
    if stat.S_ISBLK(st.st_mode):
        # On Linux O_EXCL on a block device fails with EBUSY when it is mounted or claimed
        # (device-mapper, md, swap): the running root can never be overwritten.
        flags |= os.O_EXCL
    elif not stat.S_ISREG(st.st_mode):
        raise WriteError(f"{target} is neither a block device nor a regular file; give the slot's device")
    use_direct = direct and hasattr(os, "O_DIRECT")
    try:
        if use_direct:
            try:
                return os.open(target, flags | os.O_DIRECT), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        return os.open(target, flags), False
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise WriteError(
                f"{target} is in use (mounted, or held by another device); refusing to write into it: "
                "unmount it, or check that it is the inactive slot"
            ) from exc
        raise WriteError(f"cannot open {target} for writing: {exc.strerror}") from exc


def _set_direct(fd: int, on: bool) -> bool:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    flags = flags | os.O_DIRECT if on else flags & ~os.O_DIRECT
    fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    return on


def _check_length(length: int | None, total: int) -> None:
    if length is not None and total != length:
        raise WriteError(
            f"the image stream ended after {total} bytes but {length} were announced; "
            "the download was cut short, write it again"
        )


def _wait_tar(proc: subprocess.Popen[bytes], should_cancel: CancelCallback | None) -> None:
    while True:
        try:
            proc.wait(timeout=_POLL)
            return
        except subprocess.TimeoutExpired:
            if should_cancel is not None and should_cancel():
                raise Cancelled("the image extraction was cancelled") from None


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tar_failure(argv: list[str], rc: Optional[int], errfile: IO[bytes], dest_dir: str) -> str:
    errfile.seek(0, os.SEEK_END)
    size = errfile.tell()
    errfile.seek(max(0, size - _TAR_ERROR_TAIL))
    err = errfile.read().decode("utf-8", "replace").strip()
    if size > _TAR_ERROR_TAIL:
        err = "..." + err
    return (
        f"extracting the image into {dest_dir} failed: {' '.join(argv)} exited with {rc}: "
        f"{err or 'no error output'}; the image is not a valid tar archive or the slot filesystem "
        "is full or lacks features (xattrs, ACLs)"
    )


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"
