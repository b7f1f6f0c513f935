"""A folder of images with `metadata.jsonl` (the Hugging Face imagefolder convention).

Each non-blank line of `metadata.jsonl` is `{"file_name": "0001.png", "text": "a caption"}`
(`file_name` relative to the folder; other keys are ignored). The order of the lines is the
record order. The metadata is checked when the source is opened (a bad line, a byte that is not
UTF-8 included, is an error naming the file, line and field); a missing or unreadable image file
is found when it is read and the record is skipped and counted by the latent cache. An empty or
null caption is kept as "" here; the latent cache skips and counts it, or keeps it as an
unconditional example (its ``empty_caption`` argument).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from spin_jax.cli import decode_lines
from spin_jax.data.sources import Source, hash_json

METADATA_FILE = "metadata.jsonl"


class ImageFolderSource(Source):
    """Records {"index", "text", "image"} from a folder with metadata.jsonl."""

    image_fields = ("image",)
    view = "winners"

    def __init__(self, path: str, *, caption_field: str = "text"):
        self.path = os.path.abspath(path)
        self.caption_field = caption_field
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"imagefolder: folder {self.path} does not exist")
        self.metadata_path = os.path.join(self.path, METADATA_FILE)
        if not os.path.isfile(self.metadata_path):
            raise FileNotFoundError(
                f"imagefolder: {self.metadata_path} not found; the folder needs a {METADATA_FILE} "
                'with lines {"file_name": ..., "' + caption_field + '": ...}'
            )
        with open(self.metadata_path, "rb") as f:
            raw = f.read()
        self._metadata_sha = hashlib.sha256(raw).hexdigest()
        self._files: list[str] = []
        self._texts: list[str] = []
        if raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte order mark (the hash above covers the file as it is)
        for lineno, line in enumerate(decode_lines(raw, self.metadata_path), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.metadata_path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{self.metadata_path}:{lineno}: expected a JSON object")
            name = row.get("file_name")
            if not isinstance(name, str) or not name:
                raise ValueError(
                    f"{self.metadata_path}:{lineno}: field 'file_name' missing or not a string"
                )
            if caption_field not in row:
                raise ValueError(f"{self.metadata_path}:{lineno}: field {caption_field!r} missing")
            text = row[caption_field]
            if text is None:
                text = ""  # an empty caption: see the module doc
            if not isinstance(text, str):
                raise ValueError(
                    f"{self.metadata_path}:{lineno}: field {caption_field!r} is "
                    f"{type(text).__name__}, expected a string"
                )
            self._files.append(name)
            self._texts.append(text)
        if not self._files:
            raise ValueError(f"imagefolder: {self.metadata_path} has no records")

    def __len__(self) -> int:
        return len(self._files)

    def __repr__(self) -> str:
        return f"ImageFolderSource({self.path!r}, n={len(self)})"

    def file_path(self, index: int) -> str:
        return os.path.join(self.path, self._files[self._check_index(index)])

    def meta(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        return {"index": index, "text": self._texts[index]}

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.meta(index)
        path = self.file_path(index)
        try:
            with open(path, "rb") as f:
                record["image"] = f.read()
        except OSError as e:
            record["image"] = None
            record["error"] = "missing_file"
            record["detail"] = f"{path}: {e.strerror or e}"
        return record

    def fingerprint(self) -> str:
        # The metadata's content and every image file's size; reading all image bytes would
        # cost as much as a pass over the data.
        sizes = []
        for name in self._files:
            try:
                sizes.append(os.path.getsize(os.path.join(self.path, name)))
            except OSError:
                sizes.append(-1)
        return hash_json(
            {
                "kind": "imagefolder",
                "metadata": self._metadata_sha,
                "sizes": sizes,
                "caption": self.caption_field,
            }
        )
