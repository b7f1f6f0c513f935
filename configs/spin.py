r"""SPIN-Diffusion: self-play fine-tuning of Stable Diffusion 1.5 on Pick-a-Pic v2 winners.

  python launch/train.py --config=configs/spin.py --workdir=runs/spin \
      --config.model.path=/data/stable-diffusion-v1-5 --config.data.path=/data/pickapic_v2

Produces, per self-play iteration k (1..3), runs/spin/iteration_k/ with the opponent's
synthetic latents, the trained UNet checkpoint, an image grid and metrics; export an iteration
with launch/export.py. The paper's setup (ALGORITHMS.md): beta 2000 then 5000, AdamW lr 2e-5,
200 warmup steps, 500 steps per iteration, global batch 2048 pairs, DPM-Solver++ 20 steps, CFG 7.5.

Presets: `configs/spin.py:demo` runs the whole loop on the built-in toy world on a CPU.
"""

from spin_jax.toy.demo import with_preset
from spin_jax.train.config import base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.objective = "spin"
    c.iterations = 3
    c.data.source = "pickapic"
    c.data.split = "train"
    c.data.resolution = 512
    c.train.steps = 500
    c.train.batch_size = 2048
    # 8 per device: 8 GPUs x 8 pairs x 32 micro-batches, as the paper; the count follows the devices.
    c.train.per_device_batch_size = 8
    c.train.learning_rate = 2e-5
    c.train.lr_schedule = "linear"
    c.train.warmup_steps = 200
    c.train.beta = 2000.0
    c.train.betas = (2000.0, 5000.0, 5000.0)
    c.model.remat = True
    c.sample.num_steps = 20
    c.sample.guidance_scale = 7.5
    c.sample.batch_size = 64
    return with_preset(c, arg, __file__)
