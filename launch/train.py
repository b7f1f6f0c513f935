r"""Trains with any objective of spin_jax.train.objectives: SPIN-Diffusion self-play, SePPO, or a
baseline (SFT, Diffusion-DPO, Diffusion-KTO), or PSO (offline, or online with a reward model).

  python launch/train.py --config=configs/spin.py --workdir=runs/spin \
      --config.model.path=/data/sd15 --config.data.path=/data/pickapic_v2

Restarting the same command resumes the run. SIGTERM (a preemption) or Ctrl-C: the step in
flight finishes, a checkpoint of it is written, and the run exits with status 75
(spin_jax.interrupt.EXIT_INTERRUPTED), at the latest ``checkpoint.grace_seconds`` after the
signal (then without that checkpoint; one line names the newest intact one); a second Ctrl-C
stops at once. One run per workdir: a second one is refused while the first holds
``<workdir>/.lock``. On several hosts, start one process per host (jax.distributed is
initialised from SLURM / Open MPI or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID); see launch/slurm.sh. A config with ``toy_eval.enabled`` (the demo presets)
ends with the toy world's judge table.
"""

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from spin_jax import cli

cli.quiet_start()  # before jax / transformers are imported

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:preset]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (checkpoints, samples, metrics).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from spin_jax import parallel

    parallel.init_distributed()  # before any other JAX call
    import jax

    from spin_jax import interrupt, runlock
    from spin_jax.train import checkpoints, loop

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it touches at INFO
    config = _CONFIG.value
    try:
        reward_fn = _reward_fn(config)  # before any sampling: missing weights fail here
        with interrupt.Guard() as guard:
            loop.run(config, _WORKDIR.value, guard, reward_fn=reward_fn)
    except loop.Interrupted as e:
        interrupt.exit_interrupted(f"interrupted {e}; rerun the same command to resume")
    except (ValueError, FileNotFoundError, runlock.LockedError, loop.NonFiniteLossError,
            checkpoints.CheckpointWriteError) as e:  # fmt: skip
        parallel.exit_on_error(e)  # one line; on several processes the others stop too
    if config.get("toy_eval") and config.toy_eval.get("enabled") and jax.process_index() == 0:
        from spin_jax.toy.demo import demo_report

        demo_report(_WORKDIR.value, config)


def _reward_fn(config):
    """Online PSO's reward model (``pso.reward`` from ``pso.scorers``), None for the others."""
    from spin_jax.train import objectives

    if objectives.get(config.objective).rollout != "online_pairs":  # only online PSO labels
        return None
    from spin_jax.eval import scorers
    from spin_jax.train import pso

    if config.pso.reward == "toy_judge":  # the demo's reward: the toy world's analytic judge
        from spin_jax.toy.judge import reward_fn

        return reward_fn
    name, cfg = config.pso.reward, pso.scorer_config(config)
    reason = scorers.check_scorer(name, cfg)
    if reason:
        raise FileNotFoundError(
            f"online PSO labels its pairs with {name}, whose weights are missing: "
            f"config.pso.{reason} (set --config.pso.scorers.{name}.<field>=PATH)"
        )
    scorer = scorers.load_scorer(name, cfg, batch_size=int(config.pso.reward_batch_size))
    return pso.reward_from_scorer(scorer)


if __name__ == "__main__":
    cli.run(main)
