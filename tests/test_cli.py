"""spin_jax.cli: quiet start, one-line override errors, text files named by file and line."""

import logging
import os
import subprocess
import sys

import ml_collections
import pytest

from spin_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

APP = """
import sys
sys.path.insert(0, {root!r})
if {quiet}:
    from spin_jax import cli
    cli.quiet_start()
from absl import app
def main(argv):
    import logging, jax
    print(jax.devices())
    logging.getLogger("jax._src.xla_bridge").warning("a real warning stays")
app.run(main)
"""


@pytest.mark.parametrize("quiet", [False, True])
def test_quiet_start_drops_platform_probes_only(quiet):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["XLA_FLAGS"] = ""
    code = APP.format(root=ROOT, quiet=quiet)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "a real warning stays" in res.stderr
    probes = "Unable to initialize backend" in res.stderr
    assert probes != quiet  # today's start prints the TPU probe; quiet_start drops it
    assert "JAX_PLATFORMS" not in env  # nothing forced: accelerators are still found


def test_filters_keep_errors():
    cli.quiet_start()
    cli.quiet_start()  # idempotent
    logger = logging.getLogger("jax._src.xla_bridge")
    assert sum(isinstance(f, cli._DropPrefixes) for f in logger.filters) == 1
    (f,) = [f for f in logger.filters if isinstance(f, cli._DropPrefixes)]

    def rec(level, msg):
        return logging.LogRecord("jax._src.xla_bridge", level, __file__, 1, msg, (), None)

    assert not f.filter(rec(logging.INFO, "Unable to initialize backend 'tpu': no libtpu"))
    assert f.filter(rec(logging.ERROR, "Unable to initialize backend 'cuda': broken"))
    assert f.filter(rec(logging.WARNING, "An NVIDIA GPU may be present on this machine"))


def test_check_overrides():
    c = ml_collections.ConfigDict({"train": {"steps": 1, "beta": 0.1}, "seed": 0})
    assert cli.check_overrides(c, "config", ["--config.train.steps=3", "--other=1"]) is None
    assert cli.check_overrides(c, "config", ["--config.trian.steps=3"]) == (
        "--config.trian.steps: no field 'trian' in config; did you mean 'train'?"
    )
    assert cli.check_overrides(c, "config", ["--config.train.stpes", "5"]) == (
        "--config.train.stpes: no field 'stpes' in config.train; did you mean 'steps'?"
    )
    assert "its fields: seed, train" in cli.check_overrides(c, "config", ["--config.xyzzy=1"])
    assert "not a group of fields" in cli.check_overrides(c, "config", ["--config.seed.a=1"])
    assert cli.check_overrides(c, "config", ["--noconfig.train.steps"]) is None


def test_launchers_report_flag_errors_in_one_line(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cases = [
        (
            ["launch/evaluate.py", "--config=configs/eval.py", f"--workdir={tmp_path}",
             "--config.scorers.metrix=pickscore"],
            "error: --config.scorers.metrix: no field 'metrix' in config.scorers; "
            "did you mean 'metrics'?",
        ),
        (["launch/prepare_data.py", "--path=x", "--resolutoin=3"],
         "error: Unknown command line flag 'resolutoin'. Did you mean: resolution ?"),
        (["launch/export.py", "--workdir=w", "--out=o", "--iteration=last"],
         "error: flag --iteration=last: invalid literal for int() with base 10: 'last'"),
    ]  # fmt: skip
    for args, expected in cases:
        res = subprocess.run(
            [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env
        )
        assert res.returncode == 2, (args, res.stderr)
        assert res.stderr.strip() == expected


def test_decode_lines_names_file_line_and_column(tmp_path):
    raw = b'{"a": 1}\n{"text": "caf' + b"\xe9" + b'"}\n'
    with pytest.raises(ValueError) as e:
        cli.decode_lines(raw, "/data/metadata.jsonl")
    msg = str(e.value)
    assert msg.startswith("/data/metadata.jsonl:2: not valid UTF-8 (byte 0xe9 at column 14")
    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbfone\ntwo\n")
    assert cli.read_lines(str(path)) == ["one", "two"]
