r"""SPIN-Diffusion on SDXL base: the paper's self-play schedule on the 2.6 B-parameter SDXL UNet.

  python launch/train.py --config=configs/spin_sdxl.py --workdir=runs/spin_sdxl \
      --config.model.path=/data/stable-diffusion-xl-base-1.0 --config.data.path=/data/pickapic_v2

The paper trains SD 1.5 only; what is the paper's here: 3 self-play iterations of 500 steps,
beta 2000 then 5000, AdamW lr 2e-5 with 200 warmup steps, global batch 2048 pairs.
Our choices for SDXL (config fields): 1024 px (SDXL's native size); the opponent samples with
SDXL's own sampler (Euler, 30 steps, CFG 5.0, as diffusers' SDXL pipeline defaults suggest for
quality) instead of DPM-Solver++ 20 at CFG 7.5; micro-conditioning fixed at
(1024, 1024, 0, 0, 1024, 1024) (`data.sdxl_time_ids`, as Diffusion-DPO's SDXL script); remat
and fsdp over all devices (`mesh.fsdp = -1`): full fine-tuning with AdamW holds float32 weights, gradients and two
moments (about 42 GB for 2.6 B parameters), which does not fit one 80 GB GPU with activations;
sharded over 8 GPUs it is about 5 GB per device plus activations (bench/RESULTS.md).
1 pair per device per micro-batch (activations of 1024 px SDXL with remat).
"""

from spin_jax.toy.demo import with_preset
from spin_jax.train.config import base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.objective = "spin"
    c.iterations = 3
    c.data.source = "pickapic"
    c.data.split = "train"
    c.data.resolution = 1024
    c.data.sdxl_time_ids = "fixed"
    c.train.steps = 500
    c.train.batch_size = 2048
    c.train.per_device_batch_size = 1
    c.train.learning_rate = 2e-5
    c.train.lr_schedule = "linear"
    c.train.warmup_steps = 200
    c.train.beta = 2000.0
    c.train.betas = (2000.0, 5000.0, 5000.0)
    c.model.remat = True
    c.mesh.fsdp = -1  # all devices: 8 GPUs -> about 5 GB of weights + optimizer per device
    c.sample.sampler = "euler"
    c.sample.num_steps = 30
    c.sample.guidance_scale = 5.0
    c.sample.batch_size = 64
    return with_preset(c, arg, __file__)
