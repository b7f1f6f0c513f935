r"""Evaluation as the papers do it: one image per prompt, four learned scorers, win rates.

  python launch/evaluate.py --config=configs/eval.py --workdir=runs/eval_pickapic \
      --config.models=sd15=/data/sd15,spin1=runs/spin@1,spin3=runs/spin@3 \
      --config.prompts.path=/data/pickapic_v2 --config.scorers.weights_dir=/data/scorers

The first model is the base the win rates are measured against. Presets pick the prompt set:
`configs/eval.py` or `:pickapic` (Pick-a-Pic v2 test_unique, 500 prompts), `:parti`
(PartiPrompts.tsv, 1,632), `:hpsv2` (the HPSv2 benchmark folder, 4 styles x 800).
Sampling as the papers: DPM-Solver++ 20 steps, CFG 7.5, 512x512, one seed per prompt shared by
all models. Scorer paths that are relative live under `scorers.weights_dir`; the default names
are those of the published files after `launch/convert_scorer.py`:

  PickScore_v1/                          config.json + model.safetensors (CLIPModel)
  CLIP-ViT-H-14-laion2B-s32B-b79K/       its tokenizer (PickScore's and HPSv2's text side)
  HPS_v2_compressed.safetensors          open_clip names
  clip-vit-large-patch14/                CLIPModel (the aesthetic predictor's image tower)
  sac+logos+ava1-l14-linearMSE.safetensors
  ImageReward/ImageReward.safetensors    + ImageReward/med_config.json
  bert-base-uncased/                     vocab.txt (ImageReward's tokenizer)

A scorer whose files are missing is skipped and the report says so; the others still run.
The workdir records the sampling settings and each model's files (settings.json): a restart with
other values is refused; `launch/evaluate.py --overwrite` deletes the earlier outputs first.
"""

import ml_collections

PRESETS = {
    "pickapic": ("pickapic", "pickapic_v2"),
    "parti": ("parti", "PartiPrompts.tsv"),
    "hpsv2": ("hpsv2", "hpsv2_benchmark"),
}


def get_config(arg: str | None = None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    # "name=diffusers_dir", "name=workdir@iteration" or "name=images:folder", comma-separated.
    c.models = ""
    c.base_model = ""  # diffusers dir for run iterations (default: the workdir's model.path)

    c.prompts = ml_collections.ConfigDict()
    c.prompts.source = "pickapic"  # pickapic | parti | hpsv2 | text
    c.prompts.path = ""
    c.prompts.styles = ""  # hpsv2: comma-separated subset of anime,concept-art,paintings,photo
    c.prompts.limit = 0  # first N prompts only (0: all)

    c.model = ml_collections.ConfigDict()
    # Compute dtype of generation: "auto" = bfloat16 on GPUs and TPUs, float32 on CPUs.
    c.model.dtype = "auto"
    # "auto": cuDNN flash attention where the GPU, dtype and head dim allow, XLA elsewhere.
    c.model.attention_impl = "auto"
    c.model.allow_pickle = False

    c.sample = ml_collections.ConfigDict()
    c.sample.sampler = "dpm_solver_pp"
    c.sample.num_steps = 20
    c.sample.guidance_scale = 7.5
    c.sample.height = 512
    c.sample.width = 512
    c.sample.batch_size = 16

    c.scorers = ml_collections.ConfigDict()
    c.scorers.metrics = "pickscore,hpsv2,imagereward,aesthetic"
    c.scorers.weights_dir = "weights"
    c.scorers.batch_size = 32
    c.scorers.dtype = "float32"
    c.scorers.attention_impl = ml_collections.config_dict.placeholder(str)
    c.scorers.pickscore = ml_collections.ConfigDict()
    c.scorers.pickscore.model = "PickScore_v1"
    c.scorers.pickscore.tokenizer = "CLIP-ViT-H-14-laion2B-s32B-b79K"
    c.scorers.hpsv2 = ml_collections.ConfigDict()
    c.scorers.hpsv2.weights = "HPS_v2_compressed.safetensors"
    c.scorers.hpsv2.tokenizer = "CLIP-ViT-H-14-laion2B-s32B-b79K"
    c.scorers.hpsv2.model_config = ""  # open_clip model config JSON; "" -> ViT-H-14
    c.scorers.imagereward = ml_collections.ConfigDict()
    c.scorers.imagereward.weights = "ImageReward/ImageReward.safetensors"
    c.scorers.imagereward.med_config = "ImageReward/med_config.json"
    c.scorers.imagereward.tokenizer = "bert-base-uncased"
    c.scorers.imagereward.vision_num_heads = 0  # 0: ViT width // 64 (BLIP base and large)
    c.scorers.imagereward.max_length = 35
    c.scorers.aesthetic = ml_collections.ConfigDict()
    c.scorers.aesthetic.clip = "clip-vit-large-patch14"
    c.scorers.aesthetic.head = "sac+logos+ava1-l14-linearMSE.safetensors"

    c.report = ml_collections.ConfigDict()
    c.report.resamples = 1000  # bootstrap resamples
    c.report.confidence = 0.95
    c.report.grid_prompts = 16  # prompts shown side by side (0: no grids)
    c.report.grid_rows = 4  # prompts per grid image
    c.report.grid_image_size = 256  # pixels per image in the grids (0: as generated)

    preset = arg or "pickapic"
    if preset not in PRESETS:
        raise ValueError(f"configs/eval.py: unknown preset {arg!r} (known: {', '.join(PRESETS)})")
    c.prompts.source, c.prompts.path = PRESETS[preset]
    return c
