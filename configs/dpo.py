r"""Diffusion-DPO baseline (Wallace et al. 2024) on Pick-a-Pic v2 (winner, loser) pairs.

  python launch/train.py --config=configs/dpo.py --workdir=runs/dpo \
      --config.model.path=/data/stable-diffusion-v1-5 --config.data.path=/data/pickapic_v2

Produces runs/dpo/iteration_1/ with the trained UNet, a grid and metrics. Reference = the frozen
base model for the whole run; ties dropped; beta 5000, lr 2.048e-5 (1e-8 x 2048), constant
schedule with 500 warmup steps, 2000 steps, batch 2048, caption dropout 0.2.
"""

from spin_jax.toy.demo import with_preset
from spin_jax.train.config import base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.objective = "dpo"
    c.iterations = 1
    c.data.source = "pickapic"
    c.data.caption_dropout = 0.2
    c.train.steps = 2000
    c.train.batch_size = 2048
    c.train.per_device_batch_size = 8  # accumulation steps follow from the devices present
    c.train.learning_rate = 2.048e-5
    c.train.lr_schedule = "constant"
    c.train.warmup_steps = 500
    c.train.beta = 5000.0
    c.model.remat = True
    return with_preset(c, arg, __file__)
