"""Prompt sets from local files, and their errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spin_jax.eval import prompts


def test_pickapic_parquet_file_and_folder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(
        pa.table({"caption": ["b cat", "c dog"], "x": [1, 2]}),
        folder / "test_unique-00001-of-00002.parquet",
    )
    pq.write_table(pa.table({"caption": ["a fox"]}), folder / "test_unique-00000-of-00002.parquet")
    pq.write_table(pa.table({"caption": ["train"]}), folder / "train-00000-of-00001.parquet")
    got = prompts.load_prompts("pickapic", str(tmp_path))
    assert [p.text for p in got] == ["a fox", "b cat", "c dog"]
    one = prompts.load_prompts("pickapic", str(folder / "test_unique-00001-of-00002.parquet"))
    assert [p.text for p in one] == ["b cat", "c dog"]
    assert len(prompts.load_prompts("pickapic", str(tmp_path), limit=2)) == 2


def test_pickapic_errors(tmp_path):
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "test_unique-0.parquet")
    with pytest.raises(ValueError, match="no column 'caption'"):
        prompts.load_prompts("pickapic", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nothing_here not found"):
        prompts.load_prompts("pickapic", str(tmp_path / "nothing_here"))
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match="no test_unique"):
        prompts.load_prompts("pickapic", str(tmp_path / "other"))
    empty = tmp_path / "empty"
    empty.mkdir()
    pq.write_table(
        pa.table({"caption": pa.array([], pa.string())}), empty / "test_unique-0.parquet"
    )
    with pytest.raises(ValueError, match="empty"):
        prompts.load_prompts("pickapic", str(empty))


def test_parti_tsv(tmp_path):
    path = tmp_path / "PartiPrompts.tsv"
    path.write_text(
        "Prompt\tCategory\tChallenge\nbear\tAnimals\tBasic\na red car\tVehicles\tColor\n"
    )
    got = prompts.load_prompts("parti", str(path))
    assert [(p.text, p.group) for p in got] == [("bear", "Animals"), ("a red car", "Vehicles")]
    bad = tmp_path / "bad.tsv"
    bad.write_text("prompt\tCategory\nbear\tAnimals\n")
    with pytest.raises(ValueError, match="no column 'Prompt'"):
        prompts.load_prompts("parti", str(bad))
    blank = tmp_path / "blank.tsv"
    blank.write_text("Prompt\tCategory\nbear\tAnimals\n\tAnimals\n")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        prompts.load_prompts("parti", str(blank))
    header_only = tmp_path / "header.tsv"
    header_only.write_text("Prompt\tCategory\n")
    with pytest.raises(ValueError, match="empty"):
        prompts.load_prompts("parti", str(header_only))


def test_hpsv2_styles(tmp_path):
    for style in prompts.HPSV2_STYLES:
        (tmp_path / f"{style}.json").write_text(json.dumps([f"{style} 1", f"{style} 2"]))
    got = prompts.load_prompts("hpsv2", str(tmp_path))
    assert len(got) == 8 and got[0] == prompts.Prompt("anime 1", "anime")
    got = prompts.load_prompts("hpsv2", str(tmp_path), styles=["photo"])
    assert [p.group for p in got] == ["photo", "photo"]
    (tmp_path / "photo.json").unlink()
    with pytest.raises(FileNotFoundError, match="photo.json"):
        prompts.load_prompts("hpsv2", str(tmp_path))
    (tmp_path / "anime.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="JSON list"):
        prompts.load_prompts("hpsv2", str(tmp_path), styles=["anime"])


def test_text_and_bad_source(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n\n  a dog  \n")
    assert [p.text for p in prompts.load_prompts("text", str(path))] == ["a cat", "a dog"]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        prompts.load_prompts("text", str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="not in"):
        prompts.load_prompts("coco", str(path))
    with pytest.raises(ValueError, match="not set"):
        prompts.load_prompts("text", "")
