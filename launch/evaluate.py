r"""Generates one image per prompt for each model, scores them, writes the report.

  python launch/evaluate.py --config=configs/eval.py --workdir=runs/eval \
      --config.models=base=/data/sd15,spin=runs/spin@3 --config.prompts.path=/data/pickapic_v2

The first model is the base of the win rates. A LoRA training run (model.lora.rank > 0) is
named the same way (name=runs/x@K): its adapter is merged into the base UNet on load. A LoRA
file made elsewhere: merge it first (launch/sample.py --lora for images, or evaluate the
folder that launch/export.py --merge writes). Restarting the same command resumes: existing
images and scores are reused. The workdir records what its images depend on (settings.json) and
refuses a restart with other sampling settings or other files behind a model name: use another
workdir, or --overwrite (deletes the earlier outputs first). One evaluation writes a workdir at a
time (<workdir>/.lock). SIGTERM or Ctrl-C stops after the batch in flight, keeps what is
finished and exits with status 75 (rerun to resume); a second Ctrl-C stops at once.
See configs/eval.py for the fields and the scorer weights. Started as several processes
(JAX_PROCESS_ID / Slurm / Open MPI, as launch/train.py): process 0 evaluates alone, on its own
devices, and writes the workdir; the others exit 0 at once and write nothing.
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spin_jax import cli  # noqa: E402

cli.quiet_start()  # before jax / transformers are imported

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:preset]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Evaluation folder (images, scores, report).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete the workdir's earlier outputs first.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from spin_jax import interrupt, parallel, runlock
    from spin_jax.eval import evaluate
    from spin_jax.models.convert import WeightMismatchError

    logging.getLogger("spin_jax").setLevel(logging.INFO)
    try:
        if not parallel.single_process("launch/evaluate.py", "the evaluation"):
            return  # a multi-process launch: process 0 evaluates and writes, the others nothing
        summary = evaluate.run(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)
    except (ValueError, FileNotFoundError, WeightMismatchError, runlock.LockedError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if summary.get("interrupted"):
        interrupt.exit_interrupted(
            f"interrupted; {summary['images_done']} of {summary['images_total']} images done; "
            "rerun the same command to resume"
        )
    print(f"report: {_WORKDIR.value}/report.md")
    for metric, reason in summary["skipped"].items():
        print(f"skipped {metric}: {reason}")


if __name__ == "__main__":
    cli.run(main)
