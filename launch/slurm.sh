#!/bin/bash
# Multi-host SPIN-Diffusion on SLURM: one process per host, each driving all of its GPUs.
# jax.distributed reads the coordinator, process count and id from SLURM's environment.
#
#   sbatch launch/slurm.sh /data/stable-diffusion-v1-5 /data/pickapic_v2 /shared/runs/spin
#
# The workdir must be on a file system every host sees (checkpoints, synthetic samples).
#SBATCH --job-name=spin_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
MODEL=${1:?model dir}
DATA=${2:?data dir}
WORKDIR=${3:?workdir}
srun python launch/train.py --config=configs/spin.py --workdir="$WORKDIR" \
  --config.model.path="$MODEL" --config.data.path="$DATA" \
  --config.data.cache_dir="$WORKDIR/latent_cache"
