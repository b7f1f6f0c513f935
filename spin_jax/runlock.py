"""One writer per folder: a lock file taken atomically by the process that writes there.

    from spin_jax import runlock

    with runlock.acquire(workdir, what="workdir"):      # or lock = acquire(...); lock.release()
        ...                                             # the only writer of workdir

The lock is ``<folder>/.lock``, a JSON object ``{"host", "pid", "since", "command"}`` created with
``O_CREAT | O_EXCL`` (one process wins, whatever the timing, also on NFS v3+). A second process
gets :class:`LockedError` naming the holder and the file. A lock left by a process of this host
that no longer runs (killed, OOM, power loss) is taken over with a warning; a lock of another
host is never taken over automatically (its pid cannot be checked from here): the message says
which file to delete once that run is known to be gone. ``enabled=False`` (every process but 0
of a multi-host run) does nothing. The lock is released on normal exit and on exceptions (the
context manager), and at interpreter exit (``atexit``) for a lock that was never released;
``release_all()`` releases this process's locks before an exit that skips ``atexit`` (the forced
exit of ``spin_jax.interrupt`` when a grace period runs out).
"""

from __future__ import annotations

import atexit
import datetime
import errno
import json
import logging
import os
import socket
import sys
import time

LOCK_FILE = ".lock"

log = logging.getLogger("spin_jax")
_held: set[Lock] = set()  # this process's held locks (release_all)


class LockedError(RuntimeError):
    """Another process holds the folder's lock. ``holder`` is the lock file's content."""

    def __init__(self, message: str, path: str, holder: dict):
        super().__init__(message)
        self.path = path
        self.holder = holder


def _host() -> str:
    return socket.gethostname()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    # A zombie (finished, not yet reaped) does not hold anything.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _describe(holder: dict) -> str:
    since = holder.get("since")
    when = (
        datetime.datetime.fromtimestamp(since).isoformat(sep=" ", timespec="seconds")
        if isinstance(since, (int, float))
        else "an unknown time"
    )
    command = holder.get("command") or "?"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {when} ({command})"


def _read(path: str) -> dict | None:
    """The lock's content; {} if unreadable (being written, or damaged); None if gone."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


class Lock:
    """A held lock (or a disabled one). Release with ``release()`` or by leaving ``with``."""

    def __init__(self, path: str | None, what: str, holder: dict | None):
        self.path = path
        self.what = what
        self.holder = holder
        self._held = path is not None
        if self._held:
            atexit.register(self.release)
            _held.add(self)

    @property
    def held(self) -> bool:
        return self._held

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        atexit.unregister(self.release)
        _held.discard(self)
        current = _read(self.path)
        # Only remove our own lock (it may have been removed and retaken by hand).
        if (
            current is not None
            and current.get("pid") == os.getpid()
            and (current.get("host") == _host())
        ):
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Lock({self.path!r}, held={self._held})"


def release_all() -> None:
    """Releases every lock this process holds (before ``os._exit``, which skips ``atexit``)."""
    for lock in list(_held):
        lock.release()


def acquire(folder: str, *, what: str = "workdir", enabled: bool = True) -> Lock:
    """Makes this process the only writer of ``folder`` (created if missing); see the module doc.

    Raises LockedError when another live process (or another host) holds it.
    """
    if not enabled:
        return Lock(None, what, None)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(os.path.abspath(folder), LOCK_FILE)
    me = {
        "host": _host(),
        "pid": os.getpid(),
        "since": time.time(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    for _ in range(5):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise OSError(
                    e.errno, f"cannot write the lock file of {what} {folder}: {e.strerror}"
                ) from None
            raise
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.write("\n")
            return Lock(path, what, me)
        holder = _read(path)
        if holder is None:
            continue  # released meanwhile: try again
        if not holder:
            # Being written by its creator right now, or damaged: look again shortly.
            time.sleep(0.2)
            holder = _read(path)
            if holder is None:
                continue
            if not holder:
                raise LockedError(
                    f"{what} {folder} is locked by {path}, which is unreadable; if no run uses "
                    f"{folder}, delete {path}",
                    path,
                    {},
                )
        if holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
            raise LockedError(
                f"{what} {folder} is already locked by this process ({path})", path, holder
            )
        if holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid") or -1)):
            log.warning(
                "taking over the stale lock %s of %s (that process is gone)",
                path,
                _describe(holder),
            )
            _remove_if_same(path, holder)
            continue
        if holder.get("host") == me["host"]:
            raise LockedError(
                f"{what} {folder} is in use by another run: {_describe(holder)}; lock file "
                f"{path}. Wait for it to finish, stop it, or use another folder",
                path,
                holder,
            )
        raise LockedError(
            f"{what} {folder} is in use by a run on another host: {_describe(holder)}; lock "
            f"file {path}. If that run is gone, delete {path} and rerun",
            path,
            holder,
        )
    raise LockedError(f"{what} {folder}: could not take the lock {path}", path, {})


def _remove_if_same(path: str, holder: dict) -> None:
    """Removes a stale lock unless someone else replaced it in the meantime."""
    stale = f"{path}.stale.{os.getpid()}"
    try:
        os.rename(path, stale)  # atomic: of two processes taking over, one renames it
    except FileNotFoundError:
        return
    moved = _read(stale)
    if moved is not None and moved != holder:
        # Another process took over and locked between our read and the rename: put it back.
        try:
            os.link(stale, path)
        except FileExistsError:
            pass
    try:
        os.remove(stale)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------
# What a folder holds: the settings its outputs depend on.

SETTINGS_FILE = "settings.json"


class SettingsMismatchError(ValueError):
    """The folder holds outputs made with other settings. ``fields``: the differing fields."""

    def __init__(self, message: str, fields: list[str]):
        super().__init__(message)
        self.fields = fields


def folder_fingerprint(path: str) -> str:
    """A hash of the names, sizes and modification times of the files under ``path`` (hidden
    files skipped; or of the file ``path``): it changes when any weight or config file is replaced, without reading
    the weights. sha256, first 32 hex chars."""
    import hashlib

    h = hashlib.sha256()
    root = os.path.abspath(path)
    if os.path.isfile(root):  # a single-file checkpoint
        st = os.stat(root)
        h.update(f"{os.path.basename(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:32]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            rel = os.path.relpath(full, root)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def check_settings(
    folder: str,
    settings: dict,
    *,
    what: str = "output folder",
    has_outputs: bool = False,
    extendable: tuple[str, ...] = (),
    write: bool = True,
) -> dict:
    """Records ``settings`` in ``folder/settings.json``, or checks them against the recorded ones.

    A field that differs is refused with :class:`SettingsMismatchError` listing every differing
    field, stored and new value; the message says to use another folder or ``--overwrite``.
    Top-level keys named in ``extendable`` hold dicts that may gain entries (evaluation: new
    models); their existing entries must match. A folder with outputs (``has_outputs``) but no
    settings file (written by an older version) is refused too: nothing says what made them.
    Returns the settings written (the union, for ``extendable`` keys).
    """
    from spin_jax.files import write_json

    path = os.path.join(folder, SETTINGS_FILE)
    current = json.loads(json.dumps(settings, default=str))
    hint = "use another folder, or rerun with --overwrite (deletes the old outputs first)"
    if os.path.isfile(path):
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SettingsMismatchError(f"{path} is unreadable ({e}); {hint}", []) from None
        merged = dict(saved)
        for key, value in current.items():
            if key in extendable and isinstance(value, dict) and isinstance(saved.get(key), dict):
                merged[key] = {**saved[key], **value}
            else:
                merged[key] = value
        old, new = _flatten(saved), _flatten(merged)
        diff = sorted(
            k
            for k in set(old) | set(new)
            if old.get(k) != new.get(k) and not (k not in old and k.split(".")[0] in extendable)
        )
        if diff:
            shown = "; ".join(
                f"{k}: stored {old.get(k, '(none)')!r}, now {new.get(k, '(none)')!r}" for k in diff
            )
            raise SettingsMismatchError(
                f"{what} {folder} holds outputs made with other settings ({shown}); {hint}",
                diff,
            )
        current = merged
    elif has_outputs:
        raise SettingsMismatchError(
            f"{what} {folder} holds outputs but no {SETTINGS_FILE} saying how they were made "
            f"(an older version wrote them); {hint}",
            [],
        )
    if write:
        write_json(path, current, sort_keys=True)
    return current
