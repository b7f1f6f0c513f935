r"""Text-to-image sampling: a prompts file -> one PNG per prompt, a grid, optional latents.

  python launch/sample.py --config=configs/sample.py \
      --config.model.path=/models/stable-diffusion-v1-5 \
      --config.prompts=prompts.txt --config.out_dir=samples/sd15

Prompts: a text file with one prompt per line (blank lines skipped), or JSON lines with a
"text", "prompt" or "caption" field. Image i (0-based, blank lines not counted) is
<out_dir>/<i:06d>.png, drawn from noise fold_in(key(seed), i): the same seed gives the same image
for the same prompt index whatever the batch size or device count. <out_dir>/metadata.jsonl
lists the images with their prompts (an imagefolder dataset). Rerunning the command continues a
partially written folder; <out_dir>/settings.json records the prompts (a hash), seed, sampler,
steps, guidance, negative prompt, size, dtype and the model folder's fingerprint, and a rerun
with other values is refused (another out_dir, or `--overwrite` to delete the old outputs).
SIGTERM / Ctrl-C: the batch in flight is finished, then exit status 75; rerun to resume.

Presets: `configs/sample.py:gpu` uses bfloat16 compute and weights (attention stays `auto`:
cuDNN where it can run); `sdxl` (SDXL base: its Euler scheduler, 30 steps, CFG 5, 1024 px),
`turbo` (SDXL-Turbo: Euler ancestral, 4 steps, no guidance, 512 px), `dmd2` (SDXL-DMD2: LCM
sampler at timesteps 999, 749, 499, 249, no guidance, 1024 px), `lcm` (LCM-SDXL: 4 steps,
guidance embedded, 1024 px).
"""

import ml_collections


def get_config(arg: str | None = None):
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # diffusers-format Stable Diffusion directory, or a single-file checkpoint
    c.model.components = ""  # single file: a diffusers folder for its tokenizer(s) and configs
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
    # The weights' dtype: float32, or bfloat16 / float16 (half the memory; a 16-bit file loads
    # without widening; each layer casts them to the compute dtype, as bfloat16 compute would).
    c.model.param_dtype = "float32"
    # "auto": cuDNN flash attention where the GPU, dtype and head dim allow, XLA elsewhere.
    c.model.attention_impl = "auto"
    c.model.allow_pickle = False

    c.prompts = ""  # prompts file (.txt one per line, or .jsonl)
    c.out_dir = ""
    c.seed = 0

    c.sample = ml_collections.ConfigDict()
    # auto (the folder's scheduler decides, as diffusers) | dpm_solver_pp | ddim | euler |
    # euler_ancestral | lcm
    c.sample.sampler = "dpm_solver_pp"
    c.sample.num_steps = 20
    c.sample.timesteps = ()  # custom descending timesteps (DMD2: 999, 749, 499, 249)
    c.sample.guidance_scale = 7.5
    c.sample.negative_prompt = ""  # used for classifier-free guidance ("" = unconditional)
    c.sample.batch_size = 8  # prompts per generate call (padded to the device count)
    c.sample.height = 512
    c.sample.width = 512

    c.output = ml_collections.ConfigDict()
    c.output.images = True  # one PNG per prompt
    c.output.latents = False  # final scaled latents as <out_dir>/latents/<start:06d>.npy shards
    c.output.grid_size = 16  # images in <out_dir>/grid.png (0: no grid)

    if arg == "gpu":
        c.model.dtype = c.model.param_dtype = "bfloat16"
        c.model.attention_impl = "auto"  # cuDNN where it can run; the preset also works on CPU/TPU
        c.sample.batch_size = 64
    elif arg == "sdxl":
        c.sample.sampler, c.sample.num_steps, c.sample.guidance_scale = "auto", 30, 5.0
        c.sample.height = c.sample.width = 1024
    elif arg == "turbo":
        c.sample.sampler, c.sample.num_steps, c.sample.guidance_scale = "euler_ancestral", 4, 0.0
    elif arg == "dmd2":
        c.sample.sampler, c.sample.num_steps, c.sample.guidance_scale = "lcm", 4, 0.0
        c.sample.timesteps = (999, 749, 499, 249)
        c.sample.height = c.sample.width = 1024
    elif arg == "lcm":
        c.sample.sampler, c.sample.num_steps, c.sample.guidance_scale = "lcm", 4, 8.0
        c.sample.height = c.sample.width = 1024
    elif arg:
        raise ValueError(
            f"configs/sample.py: unknown preset {arg!r} (known: gpu, sdxl, turbo, dmd2, lcm)"
        )
    return c
