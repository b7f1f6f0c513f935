"""The trainer's config fields, their defaults and their validation.

Every ``configs/*.py`` file starts from ``base_config()`` and changes what its method needs, so
a field means the same thing in every config and ``--config.x.y=value`` works everywhere.
"""

from __future__ import annotations

import math

import ml_collections

from spin_jax.train import objectives

SOURCES = ("imagefolder", "pickapic", "tfds")
DTYPES = ("auto", "float32", "bfloat16")
# Reward models of online PSO besides spin_jax.eval's scorers (built by launch/train.py).
EXTRA_REWARDS = ("toy_judge",)
SDXL_TIME_IDS = ("fixed", "true")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.objective = "spin"  # a row of spin_jax.train.objectives.OBJECTIVES
    c.iterations = 1  # rounds (self-play iterations; 1 for the fixed-reference baselines)
    c.overwrite = False  # allow a workdir holding a run with another config to be replaced

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # diffusers-format directory, or a single-file checkpoint (.safetensors)
    c.model.components = ""  # single file: a diffusers folder for its tokenizer(s) and configs
    # Compute dtype ("auto": bfloat16 on GPUs and TPUs, float32 on CPUs); parameters stay float32.
    c.model.dtype = "auto"
    # "auto": cuDNN flash attention per layer where the GPU, dtype and head dim allow, XLA
    # elsewhere; "xla" or "cudnn" to force one (spin_jax.platform).
    c.model.attention_impl = "auto"
    c.model.remat = False
    c.model.allow_pickle = False
    # LoRA adapters on the UNet (spin_jax.models.lora): rank 0 = full fine-tuning. alpha 0 means
    # alpha = rank (scale 1). targets: layer names (peft's rule: a dotted suffix of the module
    # name) or the shorthands attn / ff / conv / proj. init_from: a LoRA file (diffusers, peft
    # or kohya format) to start from; its layers and ranks replace rank / targets.
    c.model.lora = ml_collections.ConfigDict()
    c.model.lora.rank = 0
    c.model.lora.alpha = 0.0
    c.model.lora.targets = ("to_q", "to_k", "to_v", "to_out.0")
    c.model.lora.dropout = 0.0  # only 0: a weight merge cannot express dropout
    c.model.lora.init_from = ""

    c.data = ml_collections.ConfigDict()
    c.data.source = "imagefolder"
    c.data.path = ""
    c.data.split = "train"  # pickapic / tfds split
    c.data.resolution = 512  # images are resized and center-cropped (cached latents)
    c.data.resize_filter = "bicubic"
    c.data.random_flip = True
    c.data.caption_dropout = 0.0  # Diffusion-DPO uses 0.2; SPIN-Diffusion is silent (choice)
    # A record with an empty caption: "skip" (counted) or "unconditional" (trained with "").
    c.data.empty_caption = "skip"
    c.data.max_examples = 0  # 0: all
    c.data.kto_desirable_ratio = 0.0  # KTO: fraction of desirable images per batch (0: as data)
    c.data.cache_dir = ""  # latent cache; "" -> <workdir>/latent_cache
    c.data.encode_batch_size = 32
    # SDXL micro-conditioning in training: "fixed" = (res, res, 0, 0, res, res) for every image,
    # as Diffusion-DPO's SDXL script (choice); "true": each image's original size and crop, as
    # diffusers' SDXL examples (pairs: the winner's).
    c.data.sdxl_time_ids = "fixed"

    c.train = ml_collections.ConfigDict()
    c.train.steps = 500  # optimizer steps per round
    c.train.batch_size = 2048  # global, in pairs (SPIN/DPO) or images (SFT/KTO)
    # Examples per device per micro-batch; the number of micro-batches (accumulation steps)
    # follows from the devices present: batch_size / (per_device_batch_size x devices), the
    # per-device size lowered until it divides. 0: use train.accum_steps as given.
    c.train.per_device_batch_size = 0
    c.train.accum_steps = 1  # micro-batches per optimizer step (per_device_batch_size = 0)
    c.train.optimizer = "adamw"
    c.train.learning_rate = 2e-5
    c.train.lr_schedule = "linear"  # constant | linear | cosine, after warmup
    c.train.warmup_steps = 200
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.eps = 1e-8
    c.train.weight_decay = 1e-2
    c.train.grad_clip_norm = 1.0
    c.train.beta = 2000.0
    # Per-iteration beta for self-play (iteration k uses betas[min(k, len - 1)]); empty: beta.
    c.train.betas = ()

    c.loss = ml_collections.ConfigDict()
    c.loss.share_noise = True  # SPIN: same eps for the real and the synthetic latent (choice)
    c.loss.kto_lambda_d = 1.0
    c.loss.kto_lambda_u = 1.0
    # Pairwise objectives: + sft_weight * the policy's error on the preferred images (0: off).
    c.loss.sft_weight = 0.0

    c.seppo = ml_collections.ConfigDict()
    # The reference of each round: uniform over {base, every saved earlier round end} (SePPO),
    # base, or latest (the paper's ablation).
    c.seppo.reference = "uniform"

    c.pso = pso_config()

    c.sample = ml_collections.ConfigDict()
    # A name of spin_jax.diffusion.samplers.SAMPLERS, or "auto": the sampler diffusers' pipeline
    # uses with the model folder's scheduler (few-step models: euler_ancestral, lcm).
    c.sample.sampler = "dpm_solver_pp"
    c.sample.timesteps = ()  # custom descending sampler timesteps (SDXL-DMD2: 999, 749, 499, 249)
    c.sample.num_steps = 20
    c.sample.guidance_scale = 7.5
    c.sample.batch_size = 64  # global
    # True: decode the opponent's samples to pixels and re-encode them, as the papers' pipeline.
    c.sample.pixel_roundtrip = False

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 100
    c.checkpoint.max_to_keep = 2  # step checkpoints per round; a saved round end is always kept
    c.checkpoint.every_rounds = 1  # save the end of every n-th round (and of the last)
    # After SIGTERM / Ctrl-C, the run ends on its own this many seconds later even if the
    # checkpoint of the step in flight is not written by then (the newest intact one is kept),
    # ahead of the scheduler's SIGKILL (SLURM KillWait, Kubernetes terminationGracePeriodSeconds:
    # 30 s by default). 0: no limit.
    c.checkpoint.grace_seconds = 25.0

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 10
    c.log.grid_prompts = (
        "a photo of an astronaut riding a horse",
        "a red apple on a wooden table",
        "a watercolor painting of a lighthouse at dawn",
        "a corgi wearing sunglasses",
    )
    c.log.grid_seed = 1234
    c.log.grid_every_rounds = 1

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by fsdp
    c.mesh.fsdp = 1  # -1: all devices (parameters and optimizer state split over every one)
    return c


def pso_config() -> ml_collections.ConfigDict:
    """The ``pso`` section (PSO, ALGORITHMS.md; read only by the pso objectives)."""
    p = ml_collections.ConfigDict()
    p.num_steps = 4  # N, the distilled model's sampling steps
    # Training timesteps of offline PSO; empty: from pso.timestep_source.
    p.timesteps = ()
    # "sampler": the timesteps the model's few-step sampler visits in pso.num_steps steps
    # (sample.sampler, "auto" = the folder's scheduler; sample.timesteps if set): LCM's
    # lcm_timesteps, Euler (ancestral)'s spaced ones. "grid": arange(N, 0, -1) * (T // N) - 1,
    # the paper's formula (choice: "sampler", which is the grid for trailing Euler ancestral
    # and DMD2's custom timesteps, and what an LCM scheduler really visits otherwise).
    p.timestep_source = "sampler"
    p.reference_weight = 1.0  # weight of the reference image's term (released script: 0.1)
    p.prior_weight = 0.0  # + this x the policy's error on the reference images (script: 0.5)
    p.clip = 0.1  # online: ratios clipped to [1 - clip, 1 + clip]
    p.pairs_per_round = 128  # online: prompts per round, two trajectories each
    # Online: the reward model labelling the pairs (a metric of spin_jax.eval.scorers), with
    # its files as configs/eval.py's scorers.<name> section names them.
    p.reward = "pickscore"
    p.reward_batch_size = 64
    # Online: keep each finished round's trajectories (iteration_k/pairs/trajectories; SDXL:
    # about 330 MB per 128 pairs) or delete them once the round is done (scores are kept; a
    # redone round samples them again, the same way).
    p.keep_trajectories = False
    p.scorers = ml_collections.ConfigDict()
    p.scorers.pickscore = ml_collections.ConfigDict({"model": "", "tokenizer": ""})
    p.scorers.hpsv2 = ml_collections.ConfigDict({"weights": "", "tokenizer": "",
                                                 "model_config": ""})  # fmt: skip
    p.scorers.imagereward = ml_collections.ConfigDict({"weights": "", "med_config": "",
                                                       "tokenizer": "", "vision_num_heads": 0,
                                                       "max_length": 35})  # fmt: skip
    p.scorers.aesthetic = ml_collections.ConfigDict({"clip": "", "head": ""})
    return p


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field for values the trainer cannot run with."""

    def fail(field: str, msg: str) -> None:
        raise ValueError(f"config.{field} = {_get(c, field)!r}: {msg}")

    if c.objective not in objectives.OBJECTIVES:
        fail("objective", f"must be one of {sorted(objectives.OBJECTIVES)}")
    row = objectives.OBJECTIVES[c.objective]
    if c.data.empty_caption not in ("skip", "unconditional"):
        fail("data.empty_caption", "must be 'skip' or 'unconditional'")
    if c.data.sdxl_time_ids not in SDXL_TIME_IDS:
        fail("data.sdxl_time_ids", f"must be one of {SDXL_TIME_IDS}")
    if c.data.source not in SOURCES:
        fail("data.source", f"must be one of {SOURCES}")
    if c.model.dtype not in DTYPES:
        fail("model.dtype", f"must be one of {DTYPES}")
    if c.model.attention_impl not in (None, "", "auto", "xla", "cudnn"):
        fail("model.attention_impl", "must be 'auto', 'xla' (or empty) or 'cudnn'")
    if not c.model.path:
        fail("model.path", "set it to a diffusers-format Stable Diffusion directory")
    if not c.data.path:
        fail("data.path", "set it to the dataset folder")
    for field in (
        "iterations",
        "train.steps",
        "train.batch_size",
        "train.accum_steps",
        "sample.num_steps",
        "sample.batch_size",
        "data.resolution",
        "checkpoint.every_rounds",
        "checkpoint.every_steps",
        "log.every_steps",
        "log.grid_every_rounds",
    ):
        if int(_get(c, field)) < 1:
            fail(field, "must be >= 1")
    if int(c.train.per_device_batch_size) < 0:
        fail("train.per_device_batch_size", "must be >= 0 (0: use train.accum_steps)")
    if not c.train.per_device_batch_size and c.train.batch_size % c.train.accum_steps:
        fail("train.batch_size", f"must be divisible by train.accum_steps={c.train.accum_steps}")
    if c.data.resolution % 8:
        fail("data.resolution", "must be a multiple of 8 (the VAE downsamples by 8)")
    for i, beta in enumerate([c.train.beta, *c.train.betas]):
        if float(beta) <= 0:
            fail("train.beta" if i == 0 else "train.betas", "beta must be > 0")
    if not 0.0 <= c.data.caption_dropout < 1.0:
        fail("data.caption_dropout", "must be in [0, 1)")
    if not row.continuous and row.rollout == "none" and c.iterations != 1:
        fail("iterations", f"the {c.objective} baseline trains against a fixed reference: use 1")
    if row.reference == "previous" and c.checkpoint.every_rounds != 1:
        fail("checkpoint.every_rounds", f"{c.objective}'s reference is the previous round's end, "
             "which must be saved: use 1")  # fmt: skip
    if c.seppo.reference not in objectives.REFERENCE_CHOICES:
        fail("seppo.reference", f"must be one of {objectives.REFERENCE_CHOICES}")
    grace = c.checkpoint.get("grace_seconds", 0.0)
    if isinstance(grace, bool) or not isinstance(grace, int | float) or not 0 <= grace < math.inf:
        fail("checkpoint.grace_seconds", "must be a number of seconds >= 0 (0: no limit)")
    if float(c.loss.sft_weight) < 0:
        fail("loss.sft_weight", "must be >= 0")
    if c.objective.startswith("pso"):
        _validate_pso(c, fail)
    validate_lora(c)


def _validate_pso(c: ml_collections.ConfigDict, fail) -> None:
    p = c.pso
    if int(p.num_steps) < 1:
        fail("pso.num_steps", "must be >= 1")
    if p.timestep_source not in ("sampler", "grid"):
        fail("pso.timestep_source", "must be 'sampler' or 'grid'")
    if not 0.0 < float(p.clip) < 1.0:
        fail("pso.clip", "must be in (0, 1)")
    if float(p.reference_weight) < 0 or float(p.prior_weight) < 0:
        fail("pso.reference_weight" if float(p.reference_weight) < 0 else "pso.prior_weight",
             "must be >= 0")  # fmt: skip
    if objectives.OBJECTIVES[c.objective].rollout == "online_pairs":
        if int(p.pairs_per_round) < 1:
            fail("pso.pairs_per_round", "must be >= 1")
        if p.reward not in p.scorers and p.reward not in EXTRA_REWARDS:
            fail("pso.reward", f"must be one of {sorted(p.scorers) + list(EXTRA_REWARDS)}")


def validate_lora(c: ml_collections.ConfigDict) -> None:
    """The ``model.lora`` fields (configs without them train the full UNet)."""
    cfg = c.model.get("lora")
    if cfg is None:
        return

    def fail(field: str, msg: str) -> None:
        raise ValueError(f"config.model.lora.{field} = {cfg.get(field)!r}: {msg}")

    if not isinstance(cfg.rank, int) or cfg.rank < 0:
        fail("rank", "must be an int >= 0 (0: full fine-tuning)")
    if float(cfg.alpha) < 0:
        fail("alpha", "must be >= 0 (0: alpha = rank)")
    if float(cfg.get("dropout", 0.0)) != 0.0:
        fail("dropout", "LoRA dropout is not supported: adapters are applied as a weight merge, "
             "which cannot drop the adapter's inputs; use 0")  # fmt: skip
    if cfg.rank == 0 and cfg.get("init_from"):
        fail("init_from", "needs model.lora.rank > 0 (LoRA training)")
    if cfg.rank > 0 and not cfg.targets:
        fail("targets", "name at least one layer (e.g. to_q)")


def accumulation(c: ml_collections.ConfigDict, data_parallel: int) -> tuple[int, str]:
    """(micro-batches per optimizer step, why) for ``data_parallel`` devices."""
    b = int(c.train.batch_size)
    want = int(c.train.per_device_batch_size)
    if not want:
        return int(c.train.accum_steps), "train.accum_steps as set"
    if b % data_parallel:
        raise ValueError(
            f"config.train.batch_size = {b}: must be divisible by the {data_parallel} "
            "data-parallel devices"
        )
    per_device = min(want, b // data_parallel)
    while (b // data_parallel) % per_device:
        per_device -= 1
    accum = b // (per_device * data_parallel)
    why = f"{b} = {accum} x {per_device} per device x {data_parallel} devices"
    if per_device != want:
        why += f" (train.per_device_batch_size {want} lowered to divide the batch)"
    return accum, why


def beta_for_iteration(c: ml_collections.ConfigDict, iteration: int) -> float:
    betas = list(c.train.betas)
    return float(betas[min(iteration, len(betas) - 1)]) if betas else float(c.train.beta)


def _get(c: ml_collections.ConfigDict, dotted: str):
    for part in dotted.split("."):
        c = c[part]
    return c
