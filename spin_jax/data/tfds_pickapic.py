"""Pick-a-Pic v2 as a TFDS dataset (array_record), built from the local parquet shards.

Prepare once (no TensorFlow needed):

    python launch/prepare_data.py --source=pickapic --path=/data/pickapic_v2 \
        --tfds_dir=/data/tfds --view=winners

or from Python: `build_tfds(manual_dir, data_dir, view)`. The dataset has one builder config per
view (winners, pairs, kto), keeps the parquet source's record order (shuffling disabled, so
index i is the same record as PickapicSource index i), and stores the encoded JPEG bytes as a
string tensor: TFDS's Image feature needs TensorFlow to decode, the latent cache decodes with
PIL instead. Read it with `TfdsSource`, or directly (after importing this module, which
registers the builder) with `tfds.data_source("pickapic_v2/winners", data_dir=..., split="train")`.
"""

from __future__ import annotations

import glob
import inspect
import json
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from spin_jax.data.pickapic import PickapicSource
from spin_jax.data.sources import VIEWS, Source, hash_json

BUILDER_NAME = "pickapic_v2"
PICKAPIC_SPLITS = ("train", "validation", "test", "validation_unique", "test_unique")


class PickapicV2(tfds.core.GeneratorBasedBuilder):
    """Pick-a-Pic v2 preference pairs (winners, pairs or kto view) with encoded image bytes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Views over the published parquet shards; JPEG bytes undecoded."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(
            name="winners", description="Preferred image of each non-tie pair."
        ),
        tfds.core.BuilderConfig(
            name="pairs", description="(preferred, other) of each non-tie pair."
        ),
        tfds.core.BuilderConfig(
            name="kto", description="Both images of each non-tie pair, labelled."
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the Pick-a-Pic v2 parquet shards (e.g. data/train-00000-of-00645.parquet) in "
        "manual_dir; any of the splits train, validation, test, validation_unique, test_unique."
    )

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS finds a packaged builder's file through importlib_resources, which it does not
        # require and this environment lacks; the plain file path is its own fallback.
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        image = tfds.features.Tensor(shape=(), dtype=np.object_)
        features = {"index": np.int64, "text": tfds.features.Text(), "image": image}
        if self.builder_config.name == "pairs":
            features["image_l"] = tfds.features.Tensor(shape=(), dtype=np.object_)
        if self.builder_config.name == "kto":
            features["label"] = np.int64
        return tfds.core.DatasetInfo(
            builder=self,
            description="Pick-a-Pic v2 (Kirstain et al. 2023), ties dropped.",
            features=tfds.features.FeaturesDict(features),
            homepage="https://huggingface.co/datasets/yuvalkirstain/pickapic_v2",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        manual = os.fspath(dl_manager.manual_dir)
        splits = {}
        for split in PICKAPIC_SPLITS:
            if glob.glob(os.path.join(manual, "**", f"{split}-*.parquet"), recursive=True):
                splits[split] = self._generate_examples(manual, split)
        if not splits:
            raise FileNotFoundError(
                f"pickapic tfds: no parquet shards named <split>-*.parquet under {manual} "
                f"(splits {PICKAPIC_SPLITS})"
            )
        return splits

    def _generate_examples(self, manual_dir: str, split: str):
        source = PickapicSource(manual_dir, view=self.builder_config.name, split=split)
        for i in range(len(source)):
            record = source[i]
            example = {"index": i, "text": record["text"]}
            for field in source.image_fields:
                example[field] = record[field] or b""  # read back as missing_image
            if "label" in record:
                example["label"] = record["label"]
            yield i, example


def build_tfds(manual_dir: str, data_dir: str, view: str = "winners") -> str:
    """Builds the array_record dataset for `view`; returns its directory."""
    if view not in VIEWS:
        raise ValueError(f"pickapic view {view!r}; expected one of {VIEWS}")
    builder = PickapicV2(data_dir=data_dir, config=view, file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.path.abspath(manual_dir))
    )
    return os.fspath(builder.data_dir)


def resolve_dataset_dir(path: str, view: str) -> str:
    """A version folder (holding dataset_info.json) from itself or a TFDS data_dir."""
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
        return path
    config_dir = os.path.join(path, BUILDER_NAME, view)
    versions = sorted(
        (
            v
            for v in glob.glob(os.path.join(config_dir, "*"))
            if os.path.isfile(os.path.join(v, "dataset_info.json"))
        ),
        key=lambda v: (
            tfds.core.Version(os.path.basename(v)) if _is_version(v) else tfds.core.Version("0.0.0")
        ),
    )
    if not versions:
        raise FileNotFoundError(
            f"tfds: no prepared dataset at {path} (expected {path}/dataset_info.json or "
            f"{config_dir}/<version>/dataset_info.json; build it with launch/prepare_data.py --tfds_dir)"
        )
    return versions[-1]


def _is_version(path: str) -> bool:
    try:
        tfds.core.Version(os.path.basename(path))
    except ValueError:
        return False
    return True


class TfdsSource(Source):
    """Random access to a prepared pickapic_v2 TFDS dataset (array_record files)."""

    def __init__(self, path: str, *, view: str = "winners", split: str = "train"):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tfds: folder {path} does not exist")
        self.dir = os.path.abspath(resolve_dataset_dir(path, view))
        with open(os.path.join(self.dir, "dataset_info.json")) as f:
            self._info_json = json.load(f)
        config = self._info_json.get("configName")
        if config and config != view:
            raise ValueError(
                f"tfds: {self.dir} holds the {config!r} view, but view={view!r} was asked"
            )
        self.view = view
        self.split = split
        self.image_fields = ("image", "image_l") if view == "pairs" else ("image",)
        builder = tfds.builder_from_directory(self.dir)
        if split not in builder.info.splits:
            raise ValueError(
                f"tfds: split {split!r} not in {self.dir}; it has {list(builder.info.splits)}"
            )
        self._len = builder.info.splits[split].num_examples
        self._ds = None

    def _data(self):
        if self._ds is None:
            self._ds = tfds.builder_from_directory(self.dir).as_data_source(split=self.split)
        return self._ds

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ds"] = None  # each worker process opens its own readers
        return state

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"TfdsSource({self.dir!r}, split={self.split!r}, n={len(self)})"

    def _read(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        example = self._data()[index]
        text = example["text"]
        record = {
            "index": index,
            "text": text.decode("utf-8") if isinstance(text, bytes) else str(text),
        }
        if "label" in example:
            record["label"] = int(example["label"])
        for field in self.image_fields:
            record[field] = example[field]
        return record

    def meta(self, index: int) -> dict[str, Any]:
        record = self._read(index)
        for field in self.image_fields:
            record.pop(field)
        return record

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._read(index)
        for field in self.image_fields:
            if not record[field]:
                record[field] = None
                record["error"] = "missing_image"
                record["detail"] = f"{self.dir} {self.split}[{index}]: empty {field}"
        return record

    def fingerprint(self) -> str:
        return hash_json(
            {"kind": "tfds", "info": self._info_json, "split": self.split, "view": self.view}
        )
