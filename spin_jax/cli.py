"""What every launcher shares: a quiet start, one-line flag errors, text files read line by line.

    from spin_jax import cli
    cli.quiet_start()            # first, before jax / transformers are imported
    ...
    if __name__ == "__main__":
        cli.run(main)            # absl.app.run with flag errors as one line and exit status 2

``quiet_start`` drops the start-up noise of every command: transformers' advisory "PyTorch was
not found..." and JAX's platform probes ("Unable to initialize backend 'tpu': ...", logged at
INFO while JAX looks for accelerators, and "A Google TPU may be present..."). It installs
logging filters on those two loggers only; it does not set JAX_PLATFORMS (GPUs are still found)
and hides no warning or error of another kind.

``run`` parses the flags itself: a mistyped ml_collections override such as
``--config.trian.steps=3`` becomes ``error: --config.trian.steps: no field 'trian' in config;
did you mean 'train'?`` instead of chained absl/ml_collections tracebacks; other flag errors
(unknown flag, bad value, missing required flag) are one line too. All exit with status 2, the
usual status of a command-line usage error.
"""

from __future__ import annotations

import difflib
import logging
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

EXIT_USAGE = 2

# logger name -> prefixes of its messages that are dropped (below ERROR)
_NOISE = {
    "transformers": ("PyTorch was not found",),
    "jax._src.xla_bridge": (
        "Unable to initialize backend",
        "A Google TPU may be present on this machine",
    ),
}


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: Sequence[str]):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to judge
            return True
        return not message.startswith(self.prefixes)


def quiet_start() -> None:
    """Filters the start-up noise of transformers and JAX (module doc). Idempotent."""
    for name, prefixes in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
            logger.addFilter(_DropPrefixes(prefixes))


# ---------------------------------------------------------------------------------------------
# Flags.


def _config_flags(flag_values) -> list:
    try:
        from ml_collections.config_flags import config_flags
    except ImportError:
        return []
    seen, out = set(), []
    for flag in flag_values._flags().values():
        if isinstance(flag, config_flags._ConfigFlag) and flag.name not in seen:
            seen.add(flag.name)
            out.append(flag)
    return out


def _flag_argument(argv: Sequence[str], name: str) -> str | None:
    """The value given to --name (``--name=V`` or ``--name V``), the last one wins."""
    value = None
    for i, arg in enumerate(argv):
        m = re.match(rf"^--?{re.escape(name)}(=(.*))?$", arg)
        if m:
            if m.group(1) is not None:
                value = m.group(2)
            elif i + 1 < len(argv):
                value = argv[i + 1]
    return value


def check_overrides(config: Any, name: str, argv: Sequence[str]) -> str | None:
    """The first override ``--name.a.b[=v]`` in ``argv`` whose path is not a field of
    ``config``, described in one line (with the closest field name); None if all exist."""
    for arg in argv:
        m = re.match(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
        if not m:
            continue
        path = m.group(1)
        node, where = config, name
        for part in path.split("."):
            keys = _keys(node)
            if keys is None:
                return (
                    f"--{name}.{path}: {where} is a value ({type(node).__name__}), "
                    "not a group of fields"
                )
            if part not in keys:
                close = difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
                hint = (
                    f"; did you mean {close[0]!r}?"
                    if close
                    else f" (its fields: {', '.join(sorted(keys))})"
                )
                return f"--{name}.{path}: no field {part!r} in {where}{hint}"
            node = node[part]
            where = f"{where}.{part}"
    return None


def _keys(node: Any) -> list[str] | None:
    if hasattr(node, "keys") and hasattr(node, "__getitem__"):
        return [str(k) for k in node.keys()]
    return None


def _one_line(text: str, limit: int = 400) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    # ml_collections prefixes config-file errors with a traceback: its last line is the error.
    if lines and lines[0].startswith("Error whilst parsing config file"):
        lines = lines[-1:]
    line = " ".join(lines).replace("\\n", " ")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe_flag_error(error: BaseException, argv: Sequence[str], flag_values=None) -> str:
    """One line for an exception raised while parsing ``argv`` (see ``run``)."""
    from absl import flags

    flag_values = flag_values if flag_values is not None else flags.FLAGS
    for flag in _config_flags(flag_values):
        path = _flag_argument(argv, flag.name)
        if path is None:
            continue
        try:
            config = flag.parser.parse(path)
            config.keys()  # an unloadable file gives an object that raises on access
        except Exception as e:  # noqa: BLE001 - turned into the message
            return f"--{flag.name}={path}: {_one_line(e)}"
        problem = check_overrides(config, flag.name, argv)
        if problem:
            return problem
    if isinstance(error, KeyError) and error.args:
        return _one_line(error.args[0])
    return _one_line(error) or type(error).__name__


def parse_flags(argv: Sequence[str], flag_values=None) -> list[str]:
    """``flag_values(argv)``; a parse error is printed as one line and exits with status 2."""
    from absl import flags

    flag_values = flag_values if flag_values is not None else flags.FLAGS
    try:
        return flag_values(list(argv))
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - every parse error becomes one line
        try:
            message = describe_flag_error(e, argv, flag_values)
        except Exception:  # noqa: BLE001
            message = _one_line(e)
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)


def run(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
    """``absl.app.run(main)`` with ``parse_flags`` (one-line flag errors, exit status 2)."""
    from absl import app

    app.run(main, argv=list(argv) if argv is not None else None, flags_parser=parse_flags)


# ---------------------------------------------------------------------------------------------
# Text files.


def decode_lines(raw: bytes, path: str) -> list[str]:
    """``raw`` decoded as UTF-8 and split into lines; a byte that is not UTF-8 is an error
    naming the file, the line (1-based) and the column: ``ValueError("meta.jsonl:3: ...")``."""
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        bad = f"0x{raw[e.start]:02x}"
        raise ValueError(
            f"{path}:{line}: not valid UTF-8 (byte {bad} at column {column}; "
            "save the file as UTF-8, e.g. iconv -f latin1 -t utf-8)"
        ) from None


def read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file (``decode_lines`` for its errors)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte order mark
    return decode_lines(raw, path)
