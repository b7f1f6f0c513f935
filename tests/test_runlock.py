"""spin_jax.runlock: one writer per folder, stale locks, other hosts; settings of a folder."""

import json
import logging
import os
import subprocess
import sys

import pytest

from spin_jax import runlock


def test_second_holder_refused_with_holder_named(tmp_path):
    folder = str(tmp_path / "run")
    with runlock.acquire(folder, what="workdir") as lock:
        assert lock.held and os.path.isfile(os.path.join(folder, ".lock"))
        holder = json.load(open(os.path.join(folder, ".lock")))
        assert holder["pid"] == os.getpid() and holder["host"] and holder["since"] > 0
        assert "command" in holder
        # Another process on this host: refused, naming host, pid and the lock file.
        code = (
            "import sys; from spin_jax import runlock\n"
            "try:\n"
            f"    runlock.acquire({folder!r})\n"
            "except runlock.LockedError as e:\n"
            "    print(e); sys.exit(3)\n"
        )
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert res.returncode == 3, res.stderr
        assert f"pid {os.getpid()}" in res.stdout and holder["host"] in res.stdout
        assert os.path.join(folder, ".lock") in res.stdout and "since" in res.stdout
        with pytest.raises(runlock.LockedError, match="already locked by this process"):
            runlock.acquire(folder)
    assert not lock.held and not os.path.exists(os.path.join(folder, ".lock"))
    runlock.acquire(folder).release()  # free again


def test_released_on_exception(tmp_path):
    with pytest.raises(KeyError), runlock.acquire(str(tmp_path)):
        raise KeyError("boom")
    assert not os.path.exists(tmp_path / ".lock")


def test_stale_lock_of_a_dead_pid_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"host": runlock._host(), "pid": dead.pid, "since": 1.0, "command": "old run"}
    (tmp_path / ".lock").write_text(json.dumps(stale))
    with caplog.at_level(logging.WARNING, logger="spin_jax"):
        lock = runlock.acquire(str(tmp_path))
    assert lock.held
    assert any(
        "stale lock" in r.getMessage() and f"pid {dead.pid}" in r.getMessage()
        for r in caplog.records
    )
    assert json.load(open(tmp_path / ".lock"))["pid"] == os.getpid()
    lock.release()


def test_lock_of_another_host_refused(tmp_path):
    other = {"host": "node-17.cluster", "pid": 1234, "since": 1.0, "command": "train"}
    (tmp_path / ".lock").write_text(json.dumps(other))
    with pytest.raises(runlock.LockedError) as e:
        runlock.acquire(str(tmp_path))
    msg = str(e.value)
    assert "node-17.cluster" in msg and "pid 1234" in msg
    assert f"delete {tmp_path / '.lock'}" in msg
    assert json.load(open(tmp_path / ".lock")) == other  # untouched


def test_disabled_does_nothing(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"host": "x", "pid": 1}))
    with runlock.acquire(str(tmp_path), enabled=False) as lock:
        assert not lock.held


def test_check_settings(tmp_path):
    folder = str(tmp_path)
    base = {"seed": 0, "sample": {"num_steps": 3}, "models": {"a": {"path": "/a"}}}
    runlock.check_settings(folder, base, extendable=("models",))
    runlock.check_settings(folder, base, extendable=("models",))  # same: fine
    # A new model may be added; the saved file then holds both.
    more = {**base, "models": {"b": {"path": "/b"}}}
    runlock.check_settings(folder, more, extendable=("models",))
    saved = json.load(open(tmp_path / "settings.json"))
    assert set(saved["models"]) == {"a", "b"}
    with pytest.raises(runlock.SettingsMismatchError) as e:
        runlock.check_settings(
            folder, {**base, "seed": 1, "sample": {"num_steps": 5}}, extendable=("models",)
        )
    assert e.value.fields == ["sample.num_steps", "seed"]
    assert "seed: stored 0, now 1" in str(e.value) and "--overwrite" in str(e.value)
    with pytest.raises(runlock.SettingsMismatchError, match="models.a.path"):
        runlock.check_settings(folder, {**base, "models": {"a": {"path": "/z"}}})
    empty = tmp_path / "old"
    empty.mkdir()
    with pytest.raises(runlock.SettingsMismatchError, match="no settings.json"):
        runlock.check_settings(str(empty), base, has_outputs=True)


def test_folder_fingerprint(tmp_path):
    (tmp_path / "unet").mkdir()
    w = tmp_path / "unet" / "w.safetensors"
    w.write_bytes(b"1234")
    fp = runlock.folder_fingerprint(str(tmp_path))
    assert runlock.folder_fingerprint(str(tmp_path)) == fp
    (tmp_path / ".lock").write_text("{}")  # hidden files do not count
    assert runlock.folder_fingerprint(str(tmp_path)) == fp
    w.write_bytes(b"12345")
    assert runlock.folder_fingerprint(str(tmp_path)) != fp
