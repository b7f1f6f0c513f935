"""Online PSO end to end on tiny SDXL pipelines (8 simulated CPU devices): rounds of pairs
sampled by the policy and labelled by a tiny random PickScore-architecture scorer; the stored
transitions' log-densities as the step recomputes them."""

import os

import jax
import numpy as np
import pytest
from test_pso_train import _train_rows, pso_config, reward, turbo  # noqa: F401  (fixtures)
from test_trainer import parquet  # noqa: F401  (fixture)
from tiny_sd import make_tiny_sdxl

from spin_jax.train import loop

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    return make_tiny_sdxl(str(tmp_path_factory.mktemp("lcm")), "lcm")


def online_config(model, data):
    c = pso_config("pso_online", model, data)
    c.iterations = 2
    c.pso.pairs_per_round = 8
    c.sample.batch_size = 8  # 4 pairs per shard: 2 shards per round
    c.train.batch_size = 8
    c.train.steps = 3  # one epoch: 8 pairs x 3 stochastic transitions / 8
    c.train.beta = 5.0
    c.checkpoint.every_steps = 100
    c.log.grid_prompts = ()
    return c


def test_online_pso_end_to_end(turbo, parquet, reward, tmp_path):  # noqa: F811
    from spin_jax.data.synthetic_store import SyntheticStore

    workdir = str(tmp_path / "run")
    c = online_config(turbo, parquet)
    c.model.lora.rank = 2
    summaries = loop.run(c, workdir, reward_fn=reward[0])
    assert [s["iteration"] for s in summaries] == [1, 2]
    train, rows = _train_rows(workdir)
    assert len(train) == 6 and all(np.isfinite(r["train/loss"]) for r in train)
    assert abs(train[0]["train/loss"] - np.log(2)) < 1e-6  # theta = the reference
    assert {"train/clip_frac_w", "train/log_ratio_l", "train/transitions_per_s"} <= set(train[0])
    assert train[-1]["train/log_ratio_w"] != 0.0  # the policy moved off the reference
    pairs = [r for r in rows if "rollout/pairs_kept" in r]
    assert len(pairs) == 2 and all(r["rollout/score_target"] >= r["rollout/score_reference"]
                                   for r in pairs)  # fmt: skip
    for k in (1, 2):
        folder = os.path.join(workdir, f"iteration_{k}", "pairs")
        scores = SyntheticStore.open(os.path.join(folder, "scores")).read(range(8))
        assert np.all(scores[:, 0] >= scores[:, 1])  # target first
        # Trajectories are dropped once the round is done (pso.keep_trajectories = False).
        assert not any(
            n.startswith("shard_") for n in os.listdir(os.path.join(folder, "trajectories"))
        )
    # A finished run restarted does nothing more.
    assert loop.run(c, workdir, reward_fn=reward[0]) == summaries


def test_online_pairs_are_the_policys_trajectories(turbo, parquet, reward, tmp_path):  # noqa: F811
    # The stored trajectories: two per prompt, target first by score, and each stochastic
    # transition has the sampler's own step noise (its log-density under the base policy is a
    # standard normal's up to -log std, so it is finite and the same for policy and reference).
    from spin_jax.models import load_pretrained
    from spin_jax.train import objectives, pso

    c = online_config(turbo, parquet)
    sd = load_pretrained(turbo)
    data = pso.open_prompts(c, objectives.get("pso_online"))
    ro = pso.roll_out_pairs(config=c, sd=sd, policy=lambda: sd.params["unet"], round_=1,
                            round_dir=str(tmp_path), data=data, reward_fn=reward[0],
                            barrier=lambda name: None)  # fmt: skip
    traj = ro.trajectories.read(range(8))
    assert traj.shape == (8, 2, 5, 8, 8, 4) and ro.num_stochastic == 3
    assert not np.allclose(traj[:, 0], traj[:, 1])  # independent trajectories
    np.testing.assert_array_equal(ro.prompts, pso.round_prompts(c.seed, 1, data.pool, 8))
    # Resumable: a second call finds every shard done and samples nothing.
    again = pso.roll_out_pairs(config=c, sd=sd, policy=None, round_=1, round_dir=str(tmp_path),
                               data=data, reward_fn=None, barrier=lambda name: None)  # fmt: skip
    assert again.images == 0
    np.testing.assert_array_equal(again.trajectories.read(range(8)), traj)


def test_online_step_log_probs_are_the_samplers_noise(lcm, parquet, reward, tmp_path):  # noqa: F811
    # LCM with its guidance embedding: at theta = the sampling model, the step's log-density of
    # each stored transition is the standard normal density of the very noise the sampler drew
    # (generate's per-example stream), minus log std: the step sees exactly what sampling saw.
    import optax

    from spin_jax import parallel
    from spin_jax.diffusion import samplers
    from spin_jax.models import load_pretrained
    from spin_jax.train import batches, objectives, pso
    from spin_jax.train.state import TrainState

    c = online_config(lcm, parquet)
    c.sample.guidance_scale = 1.5  # embedded (w - 1), no CFG batch
    sd = load_pretrained(lcm)
    data = pso.open_prompts(c, objectives.get("pso_online"))
    ro = pso.roll_out_pairs(config=c, sd=sd, policy=lambda: sd.params["unet"], round_=1,
                            round_dir=str(tmp_path), data=data, reward_fn=reward[0],
                            barrier=lambda name: None)  # fmt: skip
    mesh = parallel.make_mesh(-1, 1)
    local = ro.read_batch(c, 1, 0, mesh, sd.tokenize, data.captions, time_ids=True)
    batch = parallel.global_batch_from_local(local, mesh)
    step = jax.jit(pso.make_online_step(c, sd, mesh=mesh))
    unet = parallel.replicate(sd.params["unet"], mesh)
    state = TrainState.create(sd.params["unet"], optax.sgd(0.0), mesh=mesh)
    text = parallel.replicate(sd.text_params(sd.params), mesh)
    _, m = step(state, unet, text, batch, jax.random.key(0), np.float32(5.0))
    np.testing.assert_allclose(m["loss"], np.log(2), rtol=1e-6)
    assert float(m["clip_frac_w"]) == 0.0 and abs(float(m["log_ratio_w"])) < 1e-6

    ids = batches.batch_rows(c.seed, 5001, 0, 8, np.arange(ro.num_transitions))
    pairs, steps = ro.kept[ids // ro.num_stochastic], ids % ro.num_stochastic
    std = samplers.lcm_tables(sd.schedule, 4)["std"]
    key = jax.random.fold_in(jax.random.key(c.seed), 2001)
    want = []
    for p, n in zip(pairs, steps, strict=True):
        total = 0.0
        for ex in (2 * p, 2 * p + 1):  # both trajectories of the pair: order-free sum
            k = jax.random.fold_in(jax.random.fold_in(key, int(ex)), 1)
            z = np.asarray(jax.random.normal(k, (4, 8, 8, 4)), np.float64)[n]
            total += np.mean(-0.5 * z**2) - np.log(std[n]) - 0.5 * np.log(2 * np.pi)
        want.append(total)
    np.testing.assert_allclose(float(m["logp_w"]) + float(m["logp_l"]), np.mean(want), rtol=1e-4)
