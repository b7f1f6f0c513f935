r"""Trains with any objective of spin_jax.train.objectives: SPIN-Diffusion self-play, SePPO, or a
baseline (SFT, Diffusion-DPO, Diffusion-KTO).

  python launch/train.py --config=configs/spin.py --workdir=runs/spin \
      --config.model.path=/data/sd15 --config.data.path=/data/pickapic_v2

Restarting the same command resumes the run. On several hosts, start one process per host
(jax.distributed is initialised from SLURM / Open MPI or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID); see launch/slurm.sh. A config with ``toy_eval.enabled``
(the demo presets) ends with the toy world's judge table.
"""

import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:preset]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (checkpoints, samples, metrics).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from spin_jax import parallel

    parallel.init_distributed()  # before any other JAX call
    import jax

    from spin_jax.train import checkpoints, loop

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it touches at INFO
    config = _CONFIG.value
    try:
        loop.run(config, _WORKDIR.value)
    except (ValueError, FileNotFoundError, loop.NonFiniteLossError,
            checkpoints.CheckpointWriteError) as e:  # fmt: skip
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if config.get("toy_eval") and config.toy_eval.get("enabled") and jax.process_index() == 0:
        from spin_jax.toy.demo import demo_report

        demo_report(_WORKDIR.value, config)


if __name__ == "__main__":
    app.run(main)
