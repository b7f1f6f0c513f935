#!/usr/bin/env bash
# Every GPU figure the project reports, in one command (designed to finish in under 8 minutes on
# one H100 / H200; not yet timed on one):
#
#   bench_unet        UNet forward, bfloat16: sd15 (batch 8, 64x64 latents), sd21 (batch 8,
#                     96x96), sdxl (batch 4, 128x128); seconds, images/s, TFLOP/image -> TFLOP/s,
#                     spin_jax and diffusers (PyTorch SDPA)
#   bench_sample      sd15: DPM-Solver++ 20 steps, CFG 7.5, 512 px, batch 8; sdxl: LCM 4 steps
#                     (guidance 8, LCM-SDXL UNet) and Euler 30 steps (CFG 5), 1024 px, batch 4;
#                     text to pixels, spin_jax vs diffusers, compile time apart from steady state
#   bench_train_step  SPIN step on the SD 1.5 UNet, bfloat16, 8 pairs: pairs/s, MFU, memory
#   bench_load        load_pretrained of an SD 1.5 folder (bfloat16 files) vs reading the
#                     tensors once vs diffusers' from_pretrained
#
# Usage: bash bench/gpu_suite.sh [--tiny] [OUT]      (OUT: default bench/gpu_results.jsonl)
#
# Every JSON line of every sub-run goes to OUT with "step": <sub-run name> added, plus one
# {"suite": "step", ...} record per sub-run (exit status, seconds, timed_out); other output
# goes to OUT.log. Each sub-run runs under `timeout` (limits below; a sub-run cut short keeps
# the lines it printed). A summary table is printed at the end. Exit status 0 when every
# sub-run exited 0. --tiny: the same suite at tiny sizes on the CPU (what tests/test_bench.py
# runs; on the 2-core development VM under a load average of about 10: 580 s with a cold XLA
# cache, 234 s with the tests' cache warm); its numbers say the scripts work, nothing about speed.
#
# This script installs nothing. On the device tool's nvidia-h200 machine, jax, flax, optax,
# torch and transformers are there, diffusers and ml_collections are not: carry them as
# wheels (/work/.library/device/README.md). Once, in the checkout the device tool sends:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .whl diffusers==0.42.1 ml_collections==1.1.0
#
# then one device `run` with carry [".whl"], timeout_s 600 and the command
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
#   bash bench/gpu_suite.sh $OUT/gpu_results.jsonl
#
# and copy the returned gpu_results.jsonl (and .log) into bench/. The sub-runs' limits add up
# to 480 s, inside one run's 600 s; they are estimates (compiles of 30-60 s, SDXL folders of
# 7 GB written and read twice), not measurements: a sub-run that runs out keeps its lines and is
# marked TIMED OUT in the summary.
set -u

tiny=0
if [ "${1:-}" = "--tiny" ]; then
    tiny=1
    shift
fi
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/bench/gpu_results.jsonl}
mkdir -p "$(dirname "$out")"
out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
log=$out.log
: >"$out"
: >"$log"
cd "$root" || exit 1
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# JAX and PyTorch share the GPU in most sub-runs: JAX takes half, not its default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
failed=0

# Appends the JSON lines of stdin to $out with "step": $1; everything else goes to the log.
tag() {
    python3 -c '
import json, sys
step, out = sys.argv[1], open(sys.argv[2], "a")
for line in sys.stdin:
    try:
        rec = json.loads(line)
    except ValueError:
        rec = None
    if isinstance(rec, dict):
        out.write(json.dumps({"step": step, **rec}) + "\n")
        out.flush()
    else:
        sys.stderr.write(line)
' "$1" "$out" 2>>"$log"
}

# run NAME SECONDS CMD...: one sub-run under timeout, its lines tagged, then its step record.
run() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)" | tee -a "$log"
    local start rc
    start=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" 2>>"$log" | tag "$name"
    rc=${PIPESTATUS[0]}
    python3 -c '
import json, sys, time
name, rc, start, limit, out = sys.argv[1:6]
rc = int(rc)
rec = {"suite": "step", "step": name, "rc": rc, "seconds": round(time.time() - float(start), 1),
       "limit_s": int(limit), "timed_out": rc in (124, 137)}
open(out, "a").write(json.dumps(rec) + "\n")
' "$name" "$rc" "$start" "$limit" "$out"
    [ "$rc" -eq 0 ] || failed=1
}

# bench_unet has no sd21 size: this adds one (SD 2.1's UNet at 768 px, and a tiny one with its
# features: per-block heads, linear projections, upcast attention) to its table, then runs it.
UNET_PY='
import sys
sys.path.insert(0, "bench")
import bench_unet
from spin_jax.models import presets
bench_unet.SIZES["sd21"] = (presets.SD21_UNET, 96, 77)
bench_unet.SIZES["tiny_sd21"] = (dict(bench_unet.TINY_UNET, attention_head_dim=[2, 4, 4],
                                      use_linear_projection=True, upcast_attention=True,
                                      cross_attention_dim=64), 32, 77)
bench_unet.main(sys.argv[1:])
'

if [ "$tiny" = 1 ]; then
    U=(--dtypes float32 --modes forward --batch_sizes 1 --steps 2)
    run unet_sd15 600 python3 -c "$UNET_PY" --size tiny "${U[@]}"
    run unet_sd21 600 python3 -c "$UNET_PY" --size tiny_sd21 "${U[@]}"
    run unet_sdxl 600 python3 -c "$UNET_PY" --size tiny_sdxl "${U[@]}"
    run sample_sd15 600 python3 bench/bench_sample.py --size tiny --batch_sizes 2 --steps 4 \
        --modes pixels --reps 1
    run sample_sdxl_lcm 600 python3 bench/bench_sample.py --size sdxl_tiny --samplers lcm \
        --batch_sizes 2 --modes pixels --reps 1
    run sample_sdxl_euler 600 python3 bench/bench_sample.py --size sdxl_tiny --samplers euler \
        --batch_sizes 2 --steps 3 --modes pixels --reps 1
    run train_step 600 python3 bench/bench_train_step.py --size tiny --batch 2 --steps 2
    run load 600 python3 bench/bench_load.py --size small --file_dtypes float32 --repeats 1
else
    U=(--dtypes bfloat16 --modes forward --steps 5)
    run unet_sd15 35 python3 -c "$UNET_PY" --size sd15 "${U[@]}" --batch_sizes 8
    run unet_sd21 35 python3 -c "$UNET_PY" --size sd21 "${U[@]}" --batch_sizes 8
    run unet_sdxl 50 python3 -c "$UNET_PY" --size sdxl "${U[@]}" --batch_sizes 4
    run sample_sd15 60 python3 bench/bench_sample.py --size sd15 --batch_sizes 8 --steps 20 \
        --guidance 7.5 --modes pixels --reps 2
    run sample_sdxl_lcm 100 python3 bench/bench_sample.py --size sdxl --samplers lcm \
        --batch_sizes 4 --modes pixels --reps 2
    run sample_sdxl_euler 115 python3 bench/bench_sample.py --size sdxl --samplers euler \
        --batch_sizes 4 --modes pixels --reps 2
    run train_step 45 python3 bench/bench_train_step.py --size sd15 --batch 8 --steps 5
    run load 40 python3 bench/bench_load.py --size sd15 --file_dtypes bfloat16 --repeats 1
fi

# Summary: one row per measurement that has a speed, then the step table.
python3 - "$out" <<'EOF'
import json, sys

recs = [json.loads(line) for line in open(sys.argv[1])]
print(f"{'step':18} {'impl / what':22} {'detail':34} {'value':>14}")


def row(step, who, detail, value):
    print(f"{step:18} {who:22} {detail:34} {value:>14}")


for r in recs:
    step, who = r.get("step", ""), r.get("impl") or r.get("what") or ""
    if step.startswith("unet") and "seconds_per_iter" in r:
        tflops = (r.get("tflop_per_image") or 0) * r["images_per_s"]
        row(step, who, f"{r['dtype']} b{r['batch']} {r['mode']}",
            f"{r['seconds_per_iter'] * 1e3:.1f} ms {tflops:.3g} TF/s")
    elif step.startswith("sample") and "images_per_s" in r:
        detail = f"{r.get('sampler', 'dpm')} {r['steps']}st b{r['batch']} {r['mode']}"
        extra = f" c{r['compile_s']:.0f}s" if r.get("compile_s") is not None else ""
        row(step, who, detail, f"{r['images_per_s']:.2f} img/s{extra}")
    elif step.startswith("sample") and r.get("what") == "parity":
        row(step, "parity", f"{r['sampler']} b{r['batch']} {r['mode']}", f"{r['max_abs_diff']:.2e}")
    elif step.startswith("sample") and r.get("what") == "ratio":
        row(step, "spin_jax / diffusers", f"b{r['batch']} {r['mode']}",
            f"{r['spin_jax_over_diffusers']:.2f}x")
    elif step == "train_step" and "pairs_per_s" in r:
        row(step, who, f"{r['dtype']} {r['batch_pairs']} pairs", f"{r['pairs_per_s']:.2f} pairs/s")
    elif step == "load" and r.get("what") in ("read", "spin_jax", "diffusers") and "seconds" in r:
        row(step, r["what"], f"{r.get('file_dtype', '')} files", f"{r['seconds']:.2f} s")
print()
for r in recs:
    if r.get("suite") == "step":
        flag = " TIMED OUT" if r["timed_out"] else ("" if r["rc"] == 0 else f" FAILED rc={r['rc']}")
        print(f"{r['step']:18} {r['seconds']:7.1f} s of {r['limit_s']} s{flag}")
print(f"all records: {sys.argv[1]}")
EOF
exit "$failed"
