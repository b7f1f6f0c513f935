r"""Generates one image per prompt for each model, scores them, writes the report.

  python launch/evaluate.py --config=configs/eval.py --workdir=runs/eval \
      --config.models=base=/data/sd15,spin=runs/spin@3 --config.prompts.path=/data/pickapic_v2

The first model is the base of the win rates. Restarting the same command resumes: existing
images and scores are reused. See configs/eval.py for the fields and the scorer weights.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:preset]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Evaluation folder (images, scores, report).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from spin_jax.eval import evaluate
    from spin_jax.models.convert import WeightMismatchError

    logging.getLogger("spin_jax").setLevel(logging.INFO)
    try:
        summary = evaluate.run(_CONFIG.value, _WORKDIR.value)
    except (ValueError, FileNotFoundError, WeightMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"report: {_WORKDIR.value}/report.md")
    for metric, reason in summary["skipped"].items():
        print(f"skipped {metric}: {reason}")


if __name__ == "__main__":
    app.run(main)
