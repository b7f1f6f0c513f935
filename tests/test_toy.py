"""The shapes toy world: dataset generator, caption grammar, analytic judge, distance."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from scipy import linalg, ndimage

from spin_jax.toy import distance, judge, shapes


def _degrade(images: np.ndarray, seed: int, sigma: float, noise: float) -> np.ndarray:
    """Blur and noise, like an imperfect generator; float32 NHWC in [-1, 1]."""
    x = images.astype(np.float64) / 127.5 - 1.0
    x = ndimage.gaussian_filter(x, (0, sigma, sigma, 0))
    x = x + np.random.default_rng(seed).normal(0.0, noise, x.shape)
    return x.astype(np.float32)


# ----------------------------------------------------------------------------- captions


@pytest.mark.parametrize("num_objects,count", [(1, 60), (2, 288)])
def test_caption_grammar_round_trip(num_objects, count):
    combos = shapes.all_combinations(num_objects)
    captions = shapes.all_captions(num_objects)
    assert len(combos) == count and len(set(captions)) == count
    words = set(shapes.vocabulary())
    for objs, text in zip(combos, captions, strict=True):
        assert shapes.parse_caption(text) == objs
        assert set(text.split()) <= words
    assert shapes.parse_caption("  A Red   Circle ON the left ") == [
        {"color": "red", "shape": "circle", "position": "left"}
    ]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a purple circle on the left",
        "a red circle",
        "red circle on the left",
        "a red circle on the left and",
    ],
)
def test_parse_caption_rejects(text):
    with pytest.raises(ValueError, match="not in the shapes grammar"):
        shapes.parse_caption(text)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="'purple'"):
        shapes.caption([{"color": "purple", "shape": "circle", "position": "left"}])
    with pytest.raises(ValueError, match="size"):
        shapes.render([{"color": "red", "shape": "circle", "position": "left"}], size=30)
    with pytest.raises(ValueError, match="distribution"):
        shapes.make_sample("web", 0, 0)
    with pytest.raises(ValueError, match="rng"):
        shapes.render([{"color": "red", "shape": "circle", "position": "left"}], 32, "noisy")


# ----------------------------------------------------------------------------- generator


def test_generator_is_deterministic_and_prefix_stable():
    for dist in shapes.DISTRIBUTIONS:
        a, ra = shapes.generate(dist, 12, seed=3)
        b, rb = shapes.generate(dist, 12, seed=3)
        c, _ = shapes.generate(dist, 5, seed=3)
        d, _ = shapes.generate(dist, 12, seed=4)
        assert a.dtype == np.uint8 and a.shape == (12, 32, 32, 3)
        np.testing.assert_array_equal(a, b)
        assert ra == rb
        np.testing.assert_array_equal(a[:5], c)
        assert not np.array_equal(a, d)
    big, _ = shapes.generate("clean", 2, seed=0, size=64)
    assert big.shape == (2, 64, 64, 3)


def test_clean_is_plain_and_right_noisy_has_wrong_captions():
    clean, rc = shapes.generate("clean", 50, seed=0)
    assert all(r["caption_correct"] and r["text"] == r["true_text"] for r in rc)
    assert np.all(clean[:, 0, 0] == shapes.CLEAN_BACKGROUND)
    _, rn = shapes.generate("noisy", 400, seed=0)
    wrong = [r for r in rn if not r["caption_correct"]]
    assert 0.13 < len(wrong) / len(rn) < 0.27  # NOISY_WRONG_CAPTION_FRACTION = 0.2
    for r in wrong:  # exactly one attribute of one object differs
        said = shapes.parse_caption(r["text"])
        diffs = sum(
            s[f] != o[f] for s, o in zip(said, r["objects"], strict=True) for f in judge.FIELDS
        )
        assert diffs == 1


def test_write_imagefolder_cli(tmp_path):
    out = tmp_path / "ds"
    shapes.main(["--out", str(out), "--distribution", "noisy", "--n", "6", "--seed", "2"])
    lines = [json.loads(x) for x in open(out / "metadata.jsonl")]
    images, records = shapes.generate("noisy", 6, seed=2)
    assert len(lines) == 6
    for i, line in enumerate(lines):
        assert {"file_name", "text", "objects", "color", "shape", "position"} <= set(line)
        assert line["text"] == records[i]["text"] and line["objects"] == records[i]["objects"]
        assert line["color"] == records[i]["objects"][0]["color"]
        png = np.asarray(Image.open(os.path.join(out, line["file_name"])).convert("RGB"))
        np.testing.assert_array_equal(png, images[i])


# ----------------------------------------------------------------------------- judge


@pytest.mark.parametrize("size,num_objects,n", [(32, 1, 300), (64, 1, 60), (32, 2, 100)])
def test_judge_reads_clean_images(size, num_objects, n):
    images, records = shapes.generate("clean", n, seed=7, size=size, num_objects=num_objects)
    out = judge.judge(images, [r["text"] for r in records])
    assert out["fidelity"] >= 0.99, out["accuracy"]
    assert out["correct"].shape == (n,)
    assert len(out["detections"]) == n


def test_judge_reads_noisy_images_and_spots_wrong_captions():
    images, records = shapes.generate("noisy", 300, seed=11)
    truth = judge.judge(images, [r["true_text"] for r in records])
    assert truth["fidelity"] >= 0.97, truth["accuracy"]
    said = judge.judge(images, [r["text"] for r in records])
    caption_correct = np.asarray([r["caption_correct"] for r in records])
    assert np.mean(said["correct"] == caption_correct) >= 0.97


def test_judge_tolerates_blur_and_noise():
    images, records = shapes.generate("clean", 200, seed=5)
    blurry = _degrade(images, seed=0, sigma=0.7, noise=0.05)
    out = judge.judge(blurry, [r["text"] for r in records])
    assert out["fidelity"] >= 0.97, out["accuracy"]


@pytest.mark.parametrize("field", judge.FIELDS)
@pytest.mark.parametrize("dist", shapes.DISTRIBUTIONS)
def test_judge_notices_a_changed_attribute(field, dist):
    _, records = shapes.generate(dist, 60, seed=1)
    orig, changed = [], []
    for i, r in enumerate(records):
        objs = r["objects"]
        other = [v for v in shapes.ATTRIBUTES[field] if v != objs[0][field]][i % 2]
        moved = [{**objs[0], field: other}]
        # The same rng state draws the same background, jitter and noise for both.
        orig.append(shapes.render(objs, 32, dist, np.random.default_rng(i)))
        changed.append(shapes.render(moved, 32, dist, np.random.default_rng(i)))
    prompts = [r["true_text"] for r in records]
    assert judge.judge(np.stack(orig), prompts)["fidelity"] >= 0.95
    out = judge.judge(np.stack(changed), prompts)
    assert out["fidelity"] <= 0.03
    assert out["accuracy"][field] <= 0.03
    for f in judge.FIELDS:
        if f != field:
            assert out["accuracy"][f] >= 0.95


def test_judge_inputs():
    images, records = shapes.generate("clean", 4, seed=0)
    as_float = images.astype(np.float32) / 127.5 - 1.0
    a = judge.detect(images)
    b = judge.detect(as_float)
    assert [[d["shape"] for d in x] for x in a] == [[d["shape"] for d in x] for x in b]
    single = judge.detect(images[0])  # HWC
    assert single[0][0]["color"] == records[0]["objects"][0]["color"]
    blank = np.full((2, 32, 32, 3), 200, np.uint8)
    out = judge.judge(blank, ["a red circle on the left"] * 2)
    assert out["fidelity"] == 0.0 and out["detections"] == [[], []]
    assert out["accuracy"]["count"] == 0.0
    objs = [r["objects"] for r in records]
    assert judge.judge(images, objs)["fidelity"] == 1.0  # parsed prompts work too
    with pytest.raises(ValueError, match="dtype"):
        judge.detect(images.astype(np.int32))
    with pytest.raises(ValueError, match="shape"):
        judge.detect(images[..., :2])
    with pytest.raises(ValueError, match="prompts"):
        judge.judge(images, ["a red circle on the left"])


# ----------------------------------------------------------------------------- distance


@pytest.mark.parametrize("na,nb,d", [(50, 40, 6), (8, 12, 20), (30, 9, 16)])
def test_frechet_distance_matches_scipy_reference(na, nb, d):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(na, d)) @ rng.normal(size=(d, d))
    b = rng.normal(1.0, 2.0, size=(nb, d))
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * linalg.sqrtm(s_a @ s_b).real)
    np.testing.assert_allclose(distance.frechet_distance(a, b), ref, rtol=1e-6)
    np.testing.assert_allclose(distance.frechet_distance(b, a), ref, rtol=1e-6)
    assert distance.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-7)


def test_distance_separates_distributions():
    n = 100
    sets = {
        "clean_a": shapes.generate("clean", n, seed=0)[0],
        "clean_b": shapes.generate("clean", n, seed=1)[0],
        "noisy_a": shapes.generate("noisy", n, seed=0)[0],
        "noisy_b": shapes.generate("noisy", n, seed=1)[0],
    }
    sets["blurred_b"] = _degrade(sets["clean_b"], seed=0, sigma=1.0, noise=0.0)
    f = {k: distance.features(v) for k, v in sets.items()}
    assert f["clean_a"].shape == (n, distance.FEATURE_DIM)
    np.testing.assert_array_equal(f["clean_a"], distance.features(sets["clean_a"]))
    same_clean = distance.frechet_distance(f["clean_a"], f["clean_b"])
    same_noisy = distance.frechet_distance(f["noisy_a"], f["noisy_b"])
    cross = distance.frechet_distance(f["clean_a"], f["noisy_b"])
    assert same_clean < 0.05 * cross and same_noisy < 0.05 * cross
    assert distance.frechet_distance(f["clean_a"], f["blurred_b"]) > 5 * same_clean
    assert distance.distance(sets["clean_a"][:8], sets["clean_a"][:8]) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="multiple of 8"):
        distance.features(np.zeros((2, 30, 30, 3), np.uint8))
