r"""SePPO (Zhang et al.): self-play preference optimization on Pick-a-Pic v2 winners, as
ALGORITHMS.md reconstructs it (no training code was released; every choice is a field).

  python launch/train.py --config=configs/seppo.py --workdir=runs/seppo \
      --config.model.path=/data/stable-diffusion-v1-5 --config.data.path=/data/pickapic_v2

One continuous fine-tune cut into rounds of ``seppo.round_steps`` optimizer updates (the
reviews: 7 checkpoints, every 30 updates). Round k draws its reference uniformly from the base
and the saved ends of rounds 1..k-1 (``seppo.reference``: uniform | base | latest, the paper's
ablation); the reference samples one image per winner's prompt of the round and is the DPO
reference; the anchor sign on the winner decides whether that sample is a loser or a second
winner (``losses.seppo``). beta 2000, global batch 2048; lr, schedule and sampler are
SPIN-Diffusion's (the paper does not state them). Each round's summary.json names its reference
and the fraction of reference samples treated as losers (``reference_loser_frac``).

Presets: `configs/seppo.py:demo` runs it on the built-in toy world on a CPU.
"""

import ml_collections

from spin_jax.toy.demo import with_preset
from spin_jax.train.config import base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.objective = "seppo"
    c.iterations = 7
    c.data.source = "pickapic"
    c.data.split = "train"
    c.data.resolution = 512
    # train.steps (optimizer steps per round) follows seppo.round_steps, and the other way round.
    c.seppo.round_steps = ml_collections.FieldReference(30)
    c.train.steps = c.seppo.get_ref("round_steps")
    c.seppo.reference = "uniform"
    c.train.batch_size = 2048
    c.train.per_device_batch_size = 8  # accumulation steps follow from the devices present
    c.train.learning_rate = 2e-5
    c.train.lr_schedule = "linear"
    c.train.warmup_steps = 20
    c.train.beta = 2000.0
    c.model.remat = True
    c.sample.num_steps = 20
    c.sample.guidance_scale = 7.5
    c.sample.batch_size = 64
    c.checkpoint.every_rounds = 1  # every round end joins the pool of references
    c.checkpoint.every_steps = 30
    return with_preset(c, arg, __file__)
