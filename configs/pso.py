r"""PSO, Pairwise Sample Optimization (Miao et al., ICLR 2025): preference tuning of
timestep-distilled models (SDXL-Turbo, SDXL-DMD2, SDXL-LCM; SD-Turbo, LCM-LoRA SD 1.5) with LoRA.

Offline (the default): Pick-a-Pic v2 pairs without ties, target = winner, reference = loser, both
noised with the same noise at one of the model's distilled timesteps per pair, Diffusion-DPO's
loss against the base (the adapter off); beta 50, LoRA rank 16, batch 64, lr 1e-5, 5k steps.

  python launch/train.py --config=configs/pso.py --workdir=runs/pso \
      --config.model.path=/data/sdxl-turbo --config.data.path=/data/pickapic_v2

The timesteps are those the folder's few-step sampler visits in ``pso.num_steps`` (4) steps
(``sample.sampler=auto``; SDXL-DMD2: ``--config.sample.timesteps='(999, 749, 499, 249)'``), or
``--config.pso.timesteps=...`` for a folder whose scheduler is not a few-step one.
``--config.model.lora.rank=0``: full fine-tuning.

Online (``configs/pso.py:online``): rounds of ``pso.pairs_per_round`` (128) training prompts, two
trajectories each from the current model's sampler, labelled by PickScore
(``--config.pso.scorers.pickscore.model=/weights/PickScore_v1`` and ``.tokenizer=``; any metric of
spin_jax.eval.scorers via ``pso.reward``), one epoch over the round's stochastic transitions with
``losses.pso_online`` (clip 0.1, beta 5 as the paper; the released scripts use 50), batch 32,
lr 1e-5, 20k steps in all.

Demo (``configs/pso.py:demo``): online PSO in the toy world on a CPU, on the 4-step toy model
(assets/toy_fewstep) with LoRA, the toy judge as the reward model; ends with the judge's table.
``configs/pso.py:demo_offline``: offline PSO on the toy world's judge-labelled pairs.
"""

import ml_collections

from spin_jax.toy.demo import with_preset
from spin_jax.train.config import base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.objective = "pso"
    c.iterations = 1
    c.data.source = "pickapic"
    c.data.resolution = 1024  # SDXL; 512 for SD-Turbo / LCM-LoRA SD 1.5
    c.data.caption_dropout = 0.0
    c.model.lora.rank = 16  # DMD2, Turbo; 32 for SDXL-LCM. alpha 0: alpha = rank
    c.train.steps = 5000
    c.train.batch_size = 64
    c.train.per_device_batch_size = 8  # accumulation steps follow from the devices present
    c.train.learning_rate = 1e-5
    c.train.lr_schedule = "constant"
    c.train.warmup_steps = 0
    c.train.beta = 50.0
    c.model.remat = True
    c.checkpoint.every_steps = 500
    # The few-step model's own sampler for the grids and the online pairs, without guidance.
    c.pso.num_steps = ml_collections.FieldReference(4)
    c.sample.num_steps = c.pso.get_ref("num_steps")
    c.sample.sampler = "auto"
    c.sample.guidance_scale = 0.0
    c.sample.batch_size = 64  # online: the pairs are labelled in batches of 32 prompts x 2
    if arg == "online":
        return online(c)
    if arg == "demo":  # online PSO in the toy world (spin_jax.toy.demo)
        return with_preset(online(c), arg, __file__)
    if arg == "demo_offline":  # offline PSO on the toy world's judge-labelled pairs
        return with_preset(c, "demo", __file__)
    return with_preset(c, arg, __file__)


def online(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Online PSO: 128 prompts per round, one epoch (128 x 3 transitions / 32 = 12 steps) per
    round, 20k steps in all."""
    c.objective = "pso_online"
    c.data.source = "pickapic"  # the training prompts (the paper: a 4K subset)
    c.data.max_examples = 4000
    c.pso.pairs_per_round = 128
    c.pso.clip = 0.1
    c.train.beta = 5.0
    c.train.batch_size = 32
    c.train.per_device_batch_size = 4
    c.train.learning_rate = 1e-5
    # One epoch over a round's transitions: pairs x (N - 1) stochastic steps / batch.
    c.train.steps = 12
    c.iterations = 20000 // 12  # 1666 rounds: 19,992 steps
    c.checkpoint.every_rounds = 10
    c.checkpoint.every_steps = 12
    c.log.grid_every_rounds = 100
    return c
