r"""Writes iteration K of a training run as a diffusers-format Stable Diffusion directory.

  python launch/export.py --workdir runs/spin --iteration 3 --out exported/spin_iter3

--out must be empty (or pass --overwrite), and is never the run's base model or workdir.

The trained UNet of iteration K with the base model's VAE, text encoder, tokenizer and scheduler
(iteration 0 is the base model itself). Load the result with
diffusers.StableDiffusionPipeline.from_pretrained(out) or spin_jax.models.load_pretrained(out).

A LoRA run (model.lora.rank > 0) writes OUT/pytorch_lora_weights.safetensors instead, in the
layout diffusers' save_lora_weights writes (alpha in its metadata), so
pipe.load_lora_weights(OUT) loads it; --merge writes the whole pipeline with the adapter merged
(for a full fine-tuning run --merge changes nothing: the pipeline is what it writes anyway).

Started as several processes (JAX_PROCESS_ID / Slurm / Open MPI, as launch/train.py): process 0
writes the export alone, the others exit 0 at once and write nothing.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spin_jax import cli  # noqa: E402

cli.quiet_start()  # before jax / transformers are imported

from absl import flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder written by launch/train.py.")
_ITERATION = flags.DEFINE_integer("iteration", None, "Iteration to export (0 = base model).")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_MERGE = flags.DEFINE_bool(
    "merge", False, "LoRA run: write the full pipeline with the adapter merged (not the adapter)."
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Write into a non-empty --out (files of the export are replaced)."
)
flags.mark_flags_as_required(["workdir", "iteration", "out"])


def check_out(out: str, model_path: str, workdir: str, overwrite: bool) -> None:
    """``out`` must not be the run's base model or inside the workdir, and must be empty unless
    ``overwrite``."""
    real = os.path.realpath(out)
    for name, path in (("the run's base model", model_path), ("the run's workdir", workdir)):
        p = os.path.realpath(path)
        if real == p or (name.endswith("workdir") and real.startswith(p + os.sep)):
            raise ValueError(f"--out={out} is {name} ({path}): choose another folder")
    if os.path.isfile(out):
        raise ValueError(f"--out={out} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"--out={out} is not empty: choose an empty folder, or pass --overwrite")


def export(workdir: str, iteration: int, out: str, merge: bool = False,
           overwrite: bool = False) -> str:  # fmt: skip
    """Writes the export; returns the folder (or, for a LoRA adapter, the file) written."""
    from spin_jax.models import load_pretrained, lora, save_pretrained
    from spin_jax.train.checkpoints import (
        load_iteration_adapter,
        load_iteration_params,
        read_lora_info,
    )

    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: is {workdir} a training run folder?")
    with open(config_path) as f:
        config = json.load(f)
    rounds = int(config.get("iterations", 1))
    if not 0 <= iteration <= rounds:
        raise ValueError(f"--iteration={iteration}: {workdir} has iterations 0 (the base model) to "
                         f"{rounds}")  # fmt: skip
    summary = os.path.join(workdir, f"iteration_{iteration}", "summary.json")
    if iteration > 0 and not os.path.isfile(summary):
        raise FileNotFoundError(f"iteration {iteration} of {workdir} is not finished ({summary})")
    check_out(out, config["model"]["path"], workdir, overwrite)
    sd = load_pretrained(
        config["model"]["path"], allow_pickle=config["model"].get("allow_pickle", False)
    )
    params = dict(sd.params)
    if read_lora_info(workdir) is not None and not merge:
        if iteration == 0:
            raise ValueError("iteration 0 of a LoRA run is the base model: it has no adapter "
                             "(use --merge for the base pipeline)")  # fmt: skip
        adapter, scale = load_iteration_adapter(workdir, iteration, sd.params["unet"])
        return lora.save_diffusers(out, adapter, scale)
    if iteration > 0:
        params["unet"] = load_iteration_params(workdir, iteration, sd.params["unet"])
    return save_pretrained(sd, out, params=params)


def main(argv):
    del argv
    from spin_jax import parallel

    try:
        if not parallel.single_process("launch/export.py", "the export"):
            return  # a multi-process launch: process 0 writes the export, the others nothing
        path = export(_WORKDIR.value, _ITERATION.value, _OUT.value, merge=_MERGE.value,
                      overwrite=_OVERWRITE.value)  # fmt: skip
    except (FileNotFoundError, ValueError) as e:  # CheckpointReadError names the broken file
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {path}")


if __name__ == "__main__":
    cli.run(main)
