r"""Diffusion-KTO baseline (Li et al. 2024): unpaired desirable / undesirable Pick-a-Pic images.

  python launch/train.py --config=configs/kto.py --workdir=runs/kto \
      --config.model.path=/data/stable-diffusion-v1-5 --config.data.path=/data/pickapic_v2

Produces runs/kto/iteration_1/ with the trained UNet, a grid and metrics. beta 5000, Adam lr 1e-7,
1000 warmup steps, 10,000 steps, global batch 8 (2 per GPU on 4 GPUs), lambda_D = lambda_U = 1,
desirable ratio 0.8 in each batch.
"""

from spin_jax.toy.demo import with_preset
from spin_jax.train.config import base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.objective = "kto"
    c.iterations = 1
    c.data.source = "pickapic"
    c.data.kto_desirable_ratio = 0.8
    c.train.steps = 10_000
    c.train.batch_size = 8
    c.train.optimizer = "adam"
    c.train.weight_decay = 0.0
    c.train.learning_rate = 1e-7
    c.train.lr_schedule = "constant"
    c.train.warmup_steps = 1000
    c.train.beta = 5000.0
    return with_preset(c, arg, __file__)
