"""Test setup: 8 simulated CPU devices so sharded code paths run on any machine.

Compilation dominates the suite's time on a CPU, so XLA's backend optimisations are turned down
(the tiny models run for milliseconds) and compiled programs are cached on disk, which the
trainer tests' subprocesses share.
"""

import os
import tempfile

import pytest

os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "spin_jax_test_xla_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# Parameter templates (spin_jax.models.templates) go to a scratch folder, not the user's home.
os.environ.setdefault(
    "SPIN_JAX_CACHE_DIR", os.path.join(tempfile.gettempdir(), "spin_jax_test_cache")
)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


# Trainer fixtures: a tiny SD 1.x pipeline and a folder of shapes (test_trainer, test_train_preempt)


@pytest.fixture(scope="module")
def sd1_model_dir(tmp_path_factory):
    pytest.importorskip("diffusers")
    from tiny_sd import make_tiny_sd

    return make_tiny_sd(str(tmp_path_factory.mktemp("model")), "sd1")


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    """16 clean 16-px shape images with captions (an imagefolder)."""
    from spin_jax.toy.shapes import write_imagefolder

    path = str(tmp_path_factory.mktemp("shapes"))
    write_imagefolder(path, "clean", 16, seed=0, size=16)
    return path


# Fixtures of the toy demo and the toy benchmark ---------------------------------------------


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A random (untrained) toy pipeline of the demo's layout, small enough for tests."""
    from spin_jax.models import save_pretrained
    from spin_jax.toy import pretrain

    path = str(tmp_path_factory.mktemp("toy") / "toy_base")
    sd = pretrain.init_pipeline(
        0, unet_channels=(16, 32), unet_layers_per_block=1, vae_channels=(8, 16),
        text_hidden_size=16, text_layers=1,
    )  # fmt: skip
    save_pretrained(sd, path)
    return path


@pytest.fixture
def demo_env(tmp_path, monkeypatch, tiny_base):
    """The demo's cache in ``tmp_path`` and ``tiny_base`` in place of the shipped base."""
    from spin_jax.toy import demo

    monkeypatch.setenv(demo.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "shipped_base_path", lambda: tiny_base)
    return tmp_path
