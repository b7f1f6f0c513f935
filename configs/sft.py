r"""SFT baseline: supervised fine-tuning of SD 1.5 on Pick-a-Pic v2 winners (seed 002's baseline).

  python launch/train.py --config=configs/sft.py --workdir=runs/sft \
      --config.model.path=/data/stable-diffusion-v1-5 --config.data.path=/data/pickapic_v2

Produces runs/sft/iteration_1/ with the fine-tuned UNet checkpoint, an image grid and metrics.
The sources do not list SFT's own hyperparameters; this config uses SPIN-Diffusion's optimizer
settings and one iteration's step budget (choice).
"""

from spin_jax.toy.demo import with_preset
from spin_jax.train.config import base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.objective = "sft"
    c.iterations = 1
    c.data.source = "pickapic"
    c.train.steps = 500
    c.train.batch_size = 2048
    c.train.per_device_batch_size = 8  # accumulation steps follow from the devices present
    c.train.learning_rate = 2e-5
    c.train.warmup_steps = 200
    c.train.lr_schedule = "linear"
    c.model.remat = True
    return with_preset(c, arg, __file__)
