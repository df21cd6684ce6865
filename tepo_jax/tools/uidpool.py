"""Sandbox uids leased host-wide: a uid serves at most one run on the host at a time.

RLIMIT_NPROC counts processes per uid, so two runs sharing a uid count against each other's
process limit; a pool held by one PythonTool object let two tools on one host (a trainer and
an evaluator, two test workers) hand out the same uids (issue 14). A lease here is an
exclusive `flock` on `<lock_dir>/<uid>.lock`: it is per open file, so it excludes other
threads, other PythonTool objects and other processes alike, and the kernel drops it when
its holder dies, so a crashed trainer never strands a uid.
"""
from __future__ import annotations

import fcntl
import os
import stat
import threading
import time
from typing import Optional

_RETRY_S = 0.01  # poll interval while every uid is leased


class UidPool:
    """Leases uids `base .. base+size-1`; `acquire(deadline)` -> UidLease or None."""

    def __init__(self, base: int, size: int, lock_dir: str):
        if size < 1:
            raise ValueError(f"uid_pool must be >= 1, got {size}")
        self.base, self.size, self.lock_dir = base, size, lock_dir
        _private_dir(lock_dir)
        self._next = 0
        self._lock = threading.Lock()

    def acquire(self, deadline: float) -> Optional["UidLease"]:
        """The first free uid (trying from a rotating start, so uids are spread), or None if
        none frees up before `deadline` (time.monotonic())."""
        while True:
            with self._lock:
                start, self._next = self._next, (self._next + 1) % self.size
            for i in range(self.size):
                uid = self.base + (start + i) % self.size
                lease = _try_lock(os.path.join(self.lock_dir, f"{uid}.lock"), uid)
                if lease is not None:
                    return lease
            if time.monotonic() + _RETRY_S > deadline:
                return None
            time.sleep(_RETRY_S)


class UidLease:
    def __init__(self, uid: int, fd: int):
        self.uid, self._fd = uid, fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the only fd of the open file drops the flock
            self._fd = -1


def _try_lock(path: str, uid: int) -> Optional[UidLease]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        raise
    return UidLease(uid, fd)


def _private_dir(path: str) -> None:
    """Create the lock directory 0700; refuse one another user owns or others can write
    (anyone able to create or hold those lock files could starve or share the pool)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise PermissionError(f"uid lock directory {path!r} must be a directory owned by uid "
                              f"{os.geteuid()} and not writable by others")
