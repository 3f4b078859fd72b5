"""Putting files on disk so that no reader ever sees half of one, one job per output folder, and
reading torch files safely.

* `atomic_write(path, write_fn)` is the one way this package writes a file that must never be seen
  half-written (weights, training states, shards, settings, PNGs, reports);
  `remove_partial_writes(folder)` deletes what a process killed inside it left behind. A write the
  storage refuses (disk full, quota, read-only, permission) is a `WriteError` naming the file, the
  bytes it needs and the bytes free; `check_free_space` refuses a long job up front the same way.
* `FolderLock(folder, job)` claims an output folder (training, FID sampling, code extraction) for
  one process: a second job on the same folder is refused with the holder's process id.
* `file_digest(path)` fingerprints a file's content (a weights file, a tokenizer).
* `read_torch_file(path)` loads a `.pt` file with `weights_only=True` and turns the many errors
  torch raises for a damaged or foreign file into one `ValueError` naming the file.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import logging
import os
import re
import socket
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from arpg.errors import STORAGE_ERRNOS, SettingError, WriteError

log = logging.getLogger(__name__)

LOCK_NAME = ".arpg.lock"


def atomic_write(path: str | Path, write_fn: Callable[[Path], Any], what: str = "",
                 size: Optional[int] = None) -> Path:
    """Call `write_fn(tmp_path)`, fsync the result and rename it to `path`.

    A reader therefore sees either the previous complete file or the new complete one, never a
    partial write, even if the process dies midway (the temporary file is removed on error).
    The file gets the permissions a plain `open()` would give it (0666 & ~umask).

    When the storage refuses the write (`arpg.errors.STORAGE_ERRNOS`: full, quota, read-only,
    permission), raises `WriteError` naming `what` (e.g. "the training checkpoint"; default: from
    the suffix), `path`, the bytes needed (`size` when the caller knows it, else at least what was
    written) and the bytes free there.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        write_fn(tmp)
        # Set the mode after writing: some writers (safetensors) replace the file with their own 0600 one.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except Exception as err:
        written = _size(tmp)
        code = _storage_errno(err, tmp)
        if code is None:
            raise
        # The writer may still hold the partial file open (its frames live in the traceback), so its
        # space comes back only later: count it as free.
        free = _free_space(path.parent, plus=_size(tmp))
        raise WriteError(code, f"could not write {what or _KINDS.get(path.suffix, 'the file')} {path}: "
                               f"{STORAGE_ERRNOS[code]} ({errno.errorcode[code]}); it needs {_needed(size, written)}, "
                               f"{free}; nothing was replaced and the partial file is removed") from err
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return path


# What a file is, by suffix, for the messages of failed writes.
_KINDS = {".pt": "the PyTorch file", ".safetensors": "the weights file", ".png": "the PNG image",
          ".json": "the JSON file", ".npz": "the NumPy archive", ".npy": "the NumPy array"}
# Bytes appended to a failed write's partial file to learn whether the storage is what failed.
_PROBE_BYTES = 1 << 20


def _storage_errno(err: BaseException, tmp: Optional[Path]) -> Optional[int]:
    """The `STORAGE_ERRNOS` number that explains a failed write, or None when storage is not the cause.

    Writers in C++ or Rust (torch.save, safetensors) lose the OSError on the way ("unexpected pos",
    "iostream error"), numpy reports a short write without one; for them a probe write of 1 MiB
    more into the partial file asks the storage.
    """
    seen: Optional[BaseException] = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in STORAGE_ERRNOS:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    rust_io = re.search(r"\(os error (\d+)\)", str(err))  # how Rust (safetensors) reports an OSError
    if rust_io and int(rust_io.group(1)) in STORAGE_ERRNOS:
        return int(rust_io.group(1))
    if (isinstance(err, OSError) and err.errno is not None) or isinstance(err, ValueError):
        return None  # an OSError of another kind, or a writer's own check
    if tmp is None or not tmp.exists():
        return None
    try:
        with open(tmp, "ab") as f:
            f.write(bytes(_PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as probe:
        return probe.errno if probe.errno in STORAGE_ERRNOS else None
    return None


def _bytes(count: int) -> str:
    """A byte count for people: "1.8 MB (1,816,875 bytes)"."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit} ({count:,} bytes)"
    return f"{count:,} bytes"


def _needed(size: Optional[int], written: int) -> str:
    if size:
        return f"about {_bytes(size)}"
    return f"more than the {_bytes(written)} written" if written else "an unknown number of bytes"


def _size(path: Optional[Path]) -> int:
    return path.stat().st_size if path is not None and path.exists() else 0


def _free_space(folder: Path, plus: int = 0) -> str:
    """"1.2 MB (...) free on /mnt/disk": what this user may still write where `folder` is (or
    would be: its nearest existing parent), and `plus` bytes about to be freed."""
    folder = _existing(folder)
    stats = os.statvfs(folder)
    mount = folder
    while not os.path.ismount(mount):
        mount = mount.parent
    return f"{_bytes(stats.f_bavail * stats.f_frsize + plus)} free on {mount}"


def _existing(folder: str | Path) -> Path:
    """`folder` (absolute) or, when it does not exist yet, its nearest existing parent."""
    folder = Path(os.path.abspath(folder))
    while not folder.exists():
        folder = folder.parent
    return folder


def check_free_space(needs: dict[str | Path, int], what: str) -> None:
    """Refuse a long job before it starts when its outputs cannot fit: `needs` maps each output
    folder to the bytes the job will write there (folders on one file system are added up).
    Raises `WriteError` (ENOSPC) naming `what`, the bytes needed and free."""
    per_device: dict[int, tuple[Path, int]] = {}
    for folder, count in needs.items():
        device = os.stat(_existing(folder)).st_dev
        first, total = per_device.get(device, (Path(folder), 0))
        per_device[device] = (first, total + count)
    for folder, total in per_device.values():
        stats = os.statvfs(_existing(folder))
        if stats.f_bavail * stats.f_frsize < total:
            raise WriteError(errno.ENOSPC, f"not enough space for {what} in {folder}: it needs about {_bytes(total)}, "
                                           f"{_free_space(folder)}; free some space there or choose another folder")


def remove_partial_writes(folder: str | Path, names: str = "*") -> list[Path]:
    """Delete the temporary files that a process killed inside `atomic_write` left in `folder`
    (hidden `.<name>.<random>.tmp`) for targets matching the glob `names`; returns them.

    Call it only while holding the folder's `FolderLock`: another live writer's temporary file
    looks the same.
    """
    folder = Path(folder)
    stale = sorted(folder.glob(f".{names}.*.tmp")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d partial write(s) of a killed run from %s", len(stale), folder)
    return stale


def file_digest(path: str | Path) -> str:
    """The SHA-256 of a file's content (hex): what a file is, wherever it lives."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FolderLock:
    """An exclusive claim of one process on an output folder, for one job at a time.

    `with FolderLock(out_dir, "training"):` creates the folder and holds an advisory lock
    (`flock`) on `<folder>/.arpg.lock`, which records the holder's process id, host and job. A
    second claim, from any process, raises `SettingError` naming the holder. The kernel drops
    the lock when its process dies, however it dies; a lock file left by a dead holder is taken
    over with a warning naming it. Only the process that writes the folder's bookkeeping (rank 0
    of a multi-process job) takes the lock. A folder the lock created and nothing filled is
    removed again on release: a job that fails at its start leaves nothing behind.
    """

    def __init__(self, folder: str | Path, job: str):
        self.folder, self.job = Path(folder), job
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> FolderLock:
        """Claim the folder; a storage that refuses the folder or the lock file is a `WriteError`."""
        try:
            return self._claim()
        except OSError as err:
            if err.errno not in STORAGE_ERRNOS or isinstance(err, WriteError):
                raise
            self.release()
            raise WriteError(err.errno, f"could not write the lock file {self.path} (one {self.job} job per folder): "
                                        f"{STORAGE_ERRNOS[err.errno]} ({errno.errorcode[err.errno]}); "
                                        f"{_free_space(self.folder)}") from err

    def _claim(self) -> FolderLock:
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_lock(fd)
                os.close(fd)
                raise SettingError(f"{self.folder} is in use by {holder or 'another process'}: one job per "
                                   f"folder; wait for it to end (or stop it), or choose another folder") from None
            try:  # a releasing holder unlinks the file: if ours was unlinked meanwhile, lock the new one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_lock(fd)
        if previous:
            log.warning("%s: taking over the lock of %s, which is no longer running (killed?)", self.folder, previous)
        self._fd = fd
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} ({self.job}, since {started})\n".encode(), 0)
        return self

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # before unlocking, so a waiter never locks a file about to go
            os.close(self._fd)
            self._fd = None
        if self._created and self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()  # a job that failed before writing anything leaves no folder behind
            self._created = False

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_lock(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip()


def read_torch_file(path: str | Path, mmap: bool = False) -> Any:
    """Load a `.pt` file safely (`weights_only=True`, on the CPU), with a one-line error for files
    that are missing, truncated, corrupt or not torch.save output. `mmap` maps the tensors from
    the file instead of reading them into memory, so processes loading one file share its pages
    (files in torch's zip format, which torch.save writes since 1.6; older ones are read whole)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        # Published training checkpoints pickle their argparse Namespace under "args".
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as err:  # torch raises several unrelated types for damaged files
        # torch's own message may advise weights_only=False, i.e. running the file's code: not shown.
        raise ValueError(f"{path} is not a readable PyTorch file: truncated, corrupt, not written by torch.save, "
                         f"or holding objects other than tensors and plain data ({type(err).__name__})") from None
