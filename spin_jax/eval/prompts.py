"""The papers' evaluation prompt sets, read from local files (nothing is downloaded).

- ``pickapic``: Pick-a-Pic v2 ``test_unique`` (500 prompts): a parquet file, or a folder whose
  ``test_unique-*.parquet`` shards are read in name order; column ``caption``.
- ``parti``: PartiPrompts (1,632 prompts): ``PartiPrompts.tsv``, column ``Prompt``; the
  ``Category`` column (when present) becomes the prompt's group.
- ``hpsv2``: the HPSv2 benchmark (4 styles x 800): a folder with ``anime.json``,
  ``concept-art.json``, ``paintings.json``, ``photo.json``, each a JSON list of strings; the
  style is the group. ``styles`` picks a subset.
- ``text``: a plain text file, one prompt per line (blank lines skipped).

Prompts keep file order. Empty prompt strings are errors (they would silently score the
unconditional model), as are missing files or columns and an empty set.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
from collections.abc import Sequence

SOURCES = ("pickapic", "parti", "hpsv2", "text")
HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str
    group: str = ""  # HPSv2 style, PartiPrompts category; "" when the set has none


def _checked(prompts: list[Prompt], where: str) -> list[Prompt]:
    for i, p in enumerate(prompts):
        if not isinstance(p.text, str):
            raise ValueError(f"{where}: prompt {i} is not a string: {p.text!r}")
        if not p.text.strip():
            raise ValueError(f"{where}: prompt {i} is empty")
    if not prompts:
        raise ValueError(f"{where}: the prompt set is empty")
    return prompts


def read_pickapic(path: str, split: str = "test_unique", column: str = "caption") -> list[Prompt]:
    import pyarrow.parquet as pq

    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", f"{split}-*.parquet"), recursive=True))
        if not files:
            raise FileNotFoundError(f"pickapic prompts: no {split}-*.parquet files under {path}")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"pickapic prompts: {path} not found")
    prompts = []
    for file in files:
        schema = pq.read_schema(file)
        if column not in schema.names:
            raise ValueError(f"{file}: no column {column!r} (columns: {', '.join(schema.names)})")
        values = pq.read_table(file, columns=[column]).column(column).to_pylist()
        for i, v in enumerate(values):
            if v is None:
                raise ValueError(f"{file}: row {i} has no {column}")
            prompts.append(Prompt(str(v)))
    return _checked(prompts, path)


def read_parti(path: str, column: str = "Prompt", group_column: str = "Category") -> list[Prompt]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PartiPrompts: {path} not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        fields = reader.fieldnames or []
        if column not in fields:
            raise ValueError(f"{path}: no column {column!r} (columns: {', '.join(fields)})")
        has_group = group_column in fields
        prompts = [
            Prompt(row[column] or "", (row[group_column] or "") if has_group else "")
            for row in reader
        ]
    return _checked(prompts, path)


def read_hpsv2(path: str, styles: Sequence[str] = HPSV2_STYLES) -> list[Prompt]:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"HPSv2 benchmark: folder {path} not found")
    styles = list(styles) or list(HPSV2_STYLES)
    prompts = []
    for style in styles:
        file = os.path.join(path, f"{style}.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"HPSv2 benchmark: {file} not found (styles: {', '.join(HPSV2_STYLES)})"
            )
        try:
            with open(file, encoding="utf-8") as f:
                values = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from None
        if not isinstance(values, list):
            raise ValueError(f"{file}: expected a JSON list of prompt strings")
        if not values:
            raise ValueError(f"{file}: no prompts")
        prompts.extend(Prompt(v, style) for v in values)
    return _checked(prompts, path)


def read_text(path: str) -> list[Prompt]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path} not found")
    with open(path, encoding="utf-8") as f:
        prompts = [Prompt(line.strip()) for line in f if line.strip()]
    return _checked(prompts, path)


def load_prompts(
    source: str, path: str, *, styles: Sequence[str] = (), limit: int = 0
) -> list[Prompt]:
    """Reads prompt set ``source`` (one of ``SOURCES``) from ``path``; ``limit > 0`` keeps the
    first ``limit`` prompts (quick runs)."""
    if not path:
        raise ValueError("prompts.path is not set")
    if source == "pickapic":
        prompts = read_pickapic(path)
    elif source == "parti":
        prompts = read_parti(path)
    elif source == "hpsv2":
        prompts = read_hpsv2(path, styles or HPSV2_STYLES)
    elif source == "text":
        prompts = read_text(path)
    else:
        raise ValueError(f"prompts.source {source!r} not in {SOURCES}")
    if limit < 0:
        raise ValueError(f"prompts.limit must be >= 0, got {limit}")
    return prompts[:limit] if limit else prompts
