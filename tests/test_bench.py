"""bench/gpu_suite.sh --tiny: every sub-run of the GPU suite, at tiny sizes on the CPU, writes the
records the suite's summary reads, with finite numbers; and bench_sample's SDXL path agrees with
diffusers on the same latents."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

pytest.importorskip("torch")
pytest.importorskip("diffusers")

# step -> [(fields a record must have, numeric fields that must be finite)]
TIMED = ("seconds_per_batch", "images_per_s", "first_call_s", "compile_s", "tflop_per_image")
EXPECTED = {
    **{
        f"unet_{size}": [
            (
                {"impl": impl, "mode": "forward"},
                ("seconds_per_iter", "images_per_s", "tflop_per_image"),
            )
            for impl in ("spin_jax", "diffusers_torch_sdpa")
        ]
        for size in ("sd15", "sd21", "sdxl")
    },
    "sample_sd15": [
        ({"impl": "spin_jax", "mode": "pixels"}, ("seconds_per_batch", "images_per_s")),
        ({"impl": "diffusers", "mode": "pixels"}, ("seconds_per_batch", "images_per_s")),
        ({"what": "ratio", "mode": "pixels"}, ("spin_jax_over_diffusers",)),
    ],
    **{
        f"sample_sdxl_{s}": [
            ({"impl": "spin_jax", "sampler": s, "mode": "pixels"}, TIMED),
            ({"impl": "diffusers", "sampler": s, "mode": "pixels"}, TIMED),
            ({"what": "parity", "sampler": s}, ("max_abs_diff",)),
            ({"what": "ratio", "sampler": s}, ("spin_jax_over_diffusers",)),
            ({"what": "build", "setting": s}, ("load_pretrained_s", "unet_tflop_per_image")),
        ]
        for s in ("lcm", "euler")
    },
    "train_step": [
        ({"impl": "spin_jax"}, ("seconds_per_step", "pairs_per_s", "tflop_per_pair", "loss")),
        ({"impl": "diffusers_torch"}, ("seconds_per_step", "pairs_per_s", "loss")),
    ],
    "load": [
        ({"what": w}, ("seconds", "process_seconds")) for w in ("read", "spin_jax", "diffusers")
    ],
}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "results.jsonl"
    env = dict(os.environ)
    # One CPU device (bench_train_step's batch of 2 pairs must divide over the devices); keep the
    # test setup's cheap XLA optimisation level and its compilation cache.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    env.pop("PYTHONPATH", None)  # the suite puts its own checkout first
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_suite.sh"), "--tiny", str(out)],
                          env=env, capture_output=True, text=True, timeout=1200)  # fmt: skip
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return proc, records, out


def test_gpu_suite_tiny_writes_every_record(suite):
    proc, records, out = suite
    log = (out.parent / (out.name + ".log")).read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + log[-3000:]
    steps = {r["step"]: r for r in records if r.get("suite") == "step"}
    assert sorted(steps) == sorted(EXPECTED)
    assert all(s["rc"] == 0 and not s["timed_out"] for s in steps.values())
    for step, wanted in EXPECTED.items():
        mine = [r for r in records if r.get("step") == step and "suite" not in r]
        for fields, numeric in wanted:
            match = [r for r in mine if all(r.get(k) == v for k, v in fields.items())]
            assert match, f"{step}: no record with {fields} in {mine}"
            for r in match:
                for k in numeric:
                    assert isinstance(r.get(k), int | float) and math.isfinite(r[k]), (step, k, r)
    # The summary names every step, and the tiny SDXL runs compute what diffusers computes.
    for step in EXPECTED:
        assert step in proc.stdout
    for r in records:
        if r.get("what") == "parity":
            assert r["max_abs_diff"] < 1e-3, r


def test_sdxl_skipped_off_gpu_without_force():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_sample.py"),
                           "--size", "sdxl"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped off a GPU" in proc.stdout
    assert not [line for line in proc.stdout.splitlines() if line.startswith("{")]
