"""spin_jax.interrupt: SIGTERM / SIGINT stop between units of work; launch/sample.py resumes."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from spin_jax import interrupt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOOP = textwrap.dedent(
    """
    import os, sys, time
    from spin_jax import interrupt
    out, total, unit_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    done = len(os.listdir(out))
    with interrupt.Guard() as guard:
        for i in range(done, total):
            if guard.requested:
                break
            time.sleep(unit_s)
            with open(os.path.join(out, f"{i:04d}.tmp"), "w") as f:
                f.write(str(i * i))
            os.replace(os.path.join(out, f"{i:04d}.tmp"), os.path.join(out, f"{i:04d}.txt"))
            done += 1
            print("unit", i, flush=True)
    if guard.requested:
        interrupt.exit_interrupted(
            f"interrupted; {done} of {total} units done; rerun the same command to resume")
    print("complete", flush=True)
    """
)


def _start_loop(out, total, unit_s):
    return subprocess.Popen(
        [sys.executable, "-c", LOOP, str(out), str(total), str(unit_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )


def _wait_for(predicate, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.01)
    raise TimeoutError


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_between_units_and_rerun_completes(tmp_path, sig):
    out = tmp_path / "out"
    out.mkdir()
    proc = _start_loop(out, 200, 0.05)
    assert proc.stdout.readline().startswith("unit 0")
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == interrupt.EXIT_INTERRUPTED == 75
    assert f"received {signal.Signals(sig).name}" in stderr and "Traceback" not in stderr
    done = len(os.listdir(out))
    assert 0 < done < 200
    assert f"interrupted; {done} of 200 units done; rerun the same command to resume" in stderr
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # nothing half written
    # The rerun completes, with the same files as one uninterrupted run.
    rerun = _start_loop(out, 200, 0.0)
    stdout, _ = rerun.communicate(timeout=60)
    assert rerun.returncode == 0 and "complete" in stdout
    assert [(out / f"{i:04d}.txt").read_text() for i in range(200)] == [
        str(i * i) for i in range(200)
    ]


def test_second_sigint_exits_at_once(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = _start_loop(out, 3, 30.0)  # units far longer than the test
    time.sleep(0.5)  # the guard is up once python started; give it a moment
    _wait_for(lambda: proc.poll() is None)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=20)
    assert time.time() - t0 < 10
    assert proc.returncode == interrupt.EXIT_INTERRUPTED
    assert "again: stopping now" in stderr and "Traceback" not in stderr


GRACE = textwrap.dedent(
    """
    import hashlib, sys, time
    from spin_jax import interrupt, runlock
    lock = runlock.acquire(sys.argv[2])
    t0 = time.time()
    hashlib.pbkdf2_hmac("sha256", b"x", b"salt", 20000)
    n = int(20000 * 6.0 / max(time.time() - t0, 1e-6))  # one native call of about 6 s
    with interrupt.Guard(grace_seconds=float(sys.argv[1])) as guard:
        print("ready", flush=True)
        # The unit in flight: C code holding no Python frame, so Python's handler waits for it.
        hashlib.pbkdf2_hmac("sha256", b"x", b"salt", n)
    print("unit finished", flush=True)
    """
)


def _start_grace_child(grace, tmp_path):
    """The GRACE script in a child, returned once its unit of work is in flight."""
    proc = subprocess.Popen(
        [sys.executable, "-c", GRACE, str(grace), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_grace_period_ends_a_unit_that_overruns_it(tmp_path):
    proc = _start_grace_child(0.5, tmp_path)
    time.sleep(0.2)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    # The clock starts when the signal arrives, not when the native call returns (about 6 s).
    assert time.time() - t0 < 3.0, stderr
    assert proc.returncode == interrupt.EXIT_INTERRUPTED
    assert "unit finished" not in stdout and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "grace period of 0.5 s ran out before the work in progress finished; what was "
        "finished is kept; rerun the same command to resume"
    )
    assert not (tmp_path / ".lock").exists()  # released, although atexit did not run


def test_second_sigint_during_a_native_call_exits_at_once(tmp_path):
    proc = _start_grace_child(0, tmp_path)  # no grace limit
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert time.time() - t0 < 3.0, stderr
    assert proc.returncode == interrupt.EXIT_INTERRUPTED and "unit finished" not in stdout
    assert "received SIGINT again: stopping now" in stderr and "Traceback" not in stderr
    assert not (tmp_path / ".lock").exists()


def test_guard_restores_handlers_and_main_thread_only():
    before = signal.getsignal(signal.SIGTERM)
    with interrupt.Guard(announce=False) as guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for(lambda: guard.requested, timeout=5)
        assert guard.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before

    seen = {}

    def in_thread():
        with interrupt.Guard() as g:
            seen["active"] = g.active

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert seen == {"active": False}


# launch/sample.py ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    pytest.importorskip("diffusers")
    from tiny_sd import make_tiny_sd

    return make_tiny_sd(str(tmp_path_factory.mktemp("sd1")), "sd1")


def _sample_cmd(model_path, prompts, out):
    return [
        sys.executable,
        os.path.join(ROOT, "launch", "sample.py"),
        f"--config={os.path.join(ROOT, 'configs', 'sample.py')}",
        f"--config.model.path={model_path}",
        f"--config.prompts={prompts}",
        f"--config.out_dir={out}",
        "--config.sample.num_steps=3",
        "--config.sample.batch_size=1",
        "--config.sample.height=16",
        "--config.sample.width=16",
        "--config.output.grid_size=0",
    ]


def test_sample_sigterm_keeps_finished_images_and_resumes(model_path, tmp_path):
    from PIL import Image

    n = 12
    words = ["a cat", "a blue dog", "the red square", "photo", "a circle on the left"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(words[i % len(words)] + f" {i % 7}" for i in range(n)) + "\n")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _sample_cmd(model_path, prompts, out),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(lambda: (out / "000001.png").exists() or proc.poll() is not None, timeout=300)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == interrupt.EXIT_INTERRUPTED, stderr[-2000:]
    assert "Traceback" not in stderr
    done = len([f for f in os.listdir(out) if f.endswith(".png")])
    assert 2 <= done < n
    assert f"interrupted; {done} of {n} images done; rerun the same command to resume" in stderr
    assert not (out / ".lock").exists()
    assert not (out / "metadata.jsonl").exists()  # written once every image is there

    rerun = subprocess.run(
        _sample_cmd(model_path, prompts, out), capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f'"generated": {n - done}' in rerun.stdout
    lone = tmp_path / "lone"
    alone = subprocess.run(
        _sample_cmd(model_path, prompts, lone), capture_output=True, text=True, timeout=300
    )
    assert alone.returncode == 0, alone.stderr[-2000:]
    for i in range(n):
        a = np.asarray(Image.open(out / f"{i:06d}.png"))
        b = np.asarray(Image.open(lone / f"{i:06d}.png"))
        np.testing.assert_array_equal(a, b)
    assert (out / "metadata.jsonl").read_text() == (lone / "metadata.jsonl").read_text()
