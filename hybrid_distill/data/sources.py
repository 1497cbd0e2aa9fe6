"""Where samples come from: ``data.source`` parsing and the four source kinds.

A *map source* has a length and returns ``(payload, label, key)`` for a list of indices; a *stream source*
wraps a ``datasets.IterableDataset`` and turns each example into the same triple. ``payload`` is what
``data_decode.decode_crop`` accepts (encoded bytes, a path, or an HWC uint8 array); ``key`` names the sample
in logs (file path, ``__key__`` of a tar member, or ``source[index]``).
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_distill.config.files import folder_root
from hybrid_distill.data.decode import Payload
from hybrid_distill.data.folder_index import FolderIndex, load_folder_index
from hybrid_distill.errors import DataError

logger = logging.getLogger("hybrid_distill.data")

IMAGE_KEYS = ("image", "img", "jpg", "jpeg", "png", "webp", "image.jpg", "image.png")
LABEL_KEYS = ("label", "cls", "labels", "target", "class")
_TABLE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset"}

Sample = tuple[Payload, int, str]


# ----------------------------------------------------------------------------------------------------------------
# Map sources


class SyntheticSource:
    """Deterministic images with image structure: a colour gradient plus soft ellipses and rectangles.

    Image ``i`` depends only on ``i``; it is made at ``round(1.25 * img_size)`` so the crop is meaningful.
    Labels are ``i % 10``.
    """

    def __init__(self, size: int, img_size: int) -> None:
        if size < 1:
            raise DataError(f"data.synthetic_size must be >= 1, got {size}")
        self.size = size
        self.side = max(8, round(img_size * 1.25))

    def __len__(self) -> int:
        return self.size

    def get_many(self, indices: Sequence[int]) -> list[Sample]:
        """Generated images for ``indices``."""
        return [(synthetic_image(int(i), self.side), int(i) % 10, f"synthetic[{int(i)}]") for i in indices]


def synthetic_image(index: int, side: int) -> np.ndarray:
    """HWC uint8 image ``index``: a two-colour gradient, 3-6 soft shapes and faint texture."""
    rng = np.random.default_rng([0x5EED, index])
    axis = np.arange(side, dtype=np.float32) / side
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(np.cos(angle) * (axis[None, :] - 0.5) + np.sin(angle) * (axis[:, None] - 0.5) + 0.5, 0, 1)[..., None]
    c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    img = c0 * (1 - t) + c1 * t
    for _ in range(int(rng.integers(3, 7))):
        cx, cy = rng.uniform(0, 1, 2)
        rx, ry = rng.uniform(0.05, 0.35, 2)
        x0, x1 = np.searchsorted(axis, [cx - rx, cx + rx])  # the shape's bounding box only
        y0, y1 = np.searchsorted(axis, [cy - ry, cy + ry])
        dx, dy = np.abs(axis[None, x0:x1] - cx) / rx, np.abs(axis[y0:y1, None] - cy) / ry
        dist = np.sqrt(dx**2 + dy**2) if rng.random() < 0.6 else np.maximum(dx, dy)
        alpha = np.clip((1.0 - dist) * rng.uniform(4, 30), 0, 1)[..., None]
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - alpha) + colour * alpha
    img += rng.standard_normal((side, side, 1), dtype=np.float32) * 4
    return np.clip(img, 0, 255).astype(np.uint8)


class FolderSource:
    """Image files listed by a cached ``FolderIndex``."""

    def __init__(self, index: FolderIndex) -> None:
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def get_many(self, indices: Sequence[int]) -> list[Sample]:
        """(path, label, path) per index; the path is read by the decoder."""
        out = []
        for i in indices:
            path = self.index.path(int(i))
            out.append((path, self.index.label(int(i)), path))
        return out


def open_folder(target: str, cache_dir: str | Path) -> FolderSource:
    """The ``folder:PATH`` source, with its file list built or read from ``cache_dir``.

    Raises:
        DataError: naming ``data.source`` when the folder does not exist.
    """
    return FolderSource(load_folder_index(folder_root(target), cache_dir))


class HFMapSource:
    """A map-style ``datasets.Dataset`` whose image column(s) are read undecoded (``Image(decode=False)``)."""

    def __init__(self, dataset: Any, name: str, image_key: str | None) -> None:
        columns = ImageColumns.detect(dataset.features, image_key, name)
        self.columns = columns
        self.name = name
        self.dataset = columns.prepare(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def get_many(self, indices: Sequence[int]) -> list[Sample]:
        """One Arrow read for the whole list of indices."""
        indices = [int(i) for i in indices]
        rows = self.dataset[indices]
        examples = ({k: rows[k][j] for k in rows} for j in range(len(indices)))
        return [self.columns.extract(ex, f"{self.name}[{i}]") for ex, i in zip(examples, indices, strict=True)]


# ----------------------------------------------------------------------------------------------------------------
# Column detection shared by map and stream sources


@dataclass
class ImageColumns:
    """Which columns hold the image (first non-empty wins, for webdataset jpg/png mixes) and the label."""

    image_keys: list[str]
    label_key: str | None

    @classmethod
    def detect(cls, features: Any, image_key: str | None, name: str) -> ImageColumns:
        """Pick columns from ``features`` (``data.image_key`` overrides the image column).

        Raises:
            ValueError: naming ``data.image_key`` when no image column can be found.
        """
        import datasets

        names = list(features or {})
        if image_key is not None:
            if image_key not in names:
                raise DataError(f"data.image_key={image_key!r} is not a column of {name}; columns: {names}")
            image_keys = [image_key]
        else:
            typed = [k for k in names if isinstance(features[k], datasets.Image)]
            image_keys = typed + [k for k in IMAGE_KEYS if k in names and k not in typed]
        if not image_keys:
            raise DataError(f"no image column found in {name} (columns: {names}); set data.image_key")
        label_key = next((k for k in LABEL_KEYS if k in names and _is_int_label(features[k])), None)
        if label_key is None:
            logger.info("%s: no integer label column among %s; labels are -1", name, names)
        return cls(image_keys, label_key)

    def prepare(self, dataset: Any) -> Any:
        """Keep only the needed columns and cast image columns to ``Image(decode=False)``."""
        import datasets

        keep = self.image_keys + ([self.label_key] if self.label_key else []) + (
            ["__key__"] if "__key__" in (dataset.features or {}) else [])
        dataset = dataset.select_columns(keep)
        for key in self.image_keys:
            if isinstance(dataset.features[key], datasets.Image):
                dataset = dataset.cast_column(key, datasets.Image(decode=False))
        return dataset

    def extract(self, example: dict, fallback_key: str) -> Sample:
        """(payload, label, key) of one example; the payload is bytes or a path (b"" when absent)."""
        key = example.get("__key__") or fallback_key
        payload: Payload = b""
        for column in self.image_keys:
            value = example.get(column)
            if isinstance(value, dict):
                value = value.get("bytes") or value.get("path")
                key = example.get("__key__") or (value if isinstance(value, str) else key)
            if value:
                payload = value
                break
        label = example.get(self.label_key) if self.label_key else None
        return payload, -1 if label is None else int(label), str(key)


def _is_int_label(feature: Any) -> bool:
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return True
    return isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))


# ----------------------------------------------------------------------------------------------------------------
# Opening hf: and wds: targets


def open_hf(target: str, split: str, streaming: bool, readers: int = 1) -> Any:
    """A ``datasets.Dataset`` (streaming off) or ``IterableDataset`` (on) for ``hf:NAME_OR_PATH``.

    Local ``save_to_disk`` folders go through ``load_from_disk`` (``to_iterable_dataset`` when streaming);
    parquet/arrow/tar files and globs through the matching packaged builder; other local folders through
    ``load_dataset(folder)``; anything else is a hub name.

    Args:
        target: hub name or local path/glob.
        split: split to read.
        streaming: return an ``IterableDataset``.
        readers: ranks x workers; a streamed ``save_to_disk`` dataset is cut into a multiple of it.

    Raises:
        FileNotFoundError: naming ``data.source`` for a local-looking path that does not exist.
    """
    import datasets

    path = Path(os.path.expanduser(target))
    if path.is_dir() and any((path / f).exists() for f in ("state.json", "dataset_dict.json", "dataset_info.json")):
        return _from_disk(path, split, streaming, target, readers)
    if path.is_file() or glob.has_magic(target):
        files = [str(path)] if path.is_file() else sorted(glob.glob(os.path.expanduser(target)))
        if not files:
            raise DataError(f"data.source=hf:{target}: no file matches {target!r}")
        return _from_files(files, split, streaming)
    if path.is_dir():
        return datasets.load_dataset(str(path), split=split, streaming=streaming)
    if target.startswith(("/", "./", "../", "~")) or path.suffix in _TABLE_BUILDERS:
        raise DataError(f"data.source=hf:{target}: {str(path)!r} does not exist")
    try:
        return datasets.load_dataset(target, split=split, streaming=streaming)
    except Exception as error:  # noqa: BLE001 - re-raised with the config key and the cause
        raise DataError(f"data.source=hf:{target}: not a local path, and datasets could not load it as a hub "
                         f"dataset ({type(error).__name__}: {error})") from error


def open_wds(pattern: str, split: str, streaming: bool) -> Any:
    """Webdataset tar shards (``wds:GLOB_OR_BRACE_PATTERN``) through ``load_dataset("webdataset")``.

    Raises:
        FileNotFoundError: naming ``data.source`` when the pattern matches no tar file.
    """
    return _from_files(expand_shards(pattern), split, streaming, builder="webdataset")


def expand_shards(pattern: str) -> list[str]:
    """Expand braces (``{000..099}``, ``{a,b}``) then globs; remote URLs are kept as they are.

    Raises:
        FileNotFoundError: naming ``data.source`` when nothing matches, or when a shard the pattern names
            explicitly (a brace-expanded name) or a glob within it matches no file: a half-copied dataset or a
            wrong range must not train silently on part of the data.
    """
    files: list[str] = []
    missing: list[str] = []
    for item in expand_braces(pattern):
        if "://" in item:
            files.append(item)
            continue
        path = os.path.expanduser(item)
        found = sorted(glob.glob(path)) if glob.has_magic(item) else [path] if Path(path).is_file() else []
        files.extend(found)
        if not found:
            missing.append(item)
    if not files:
        raise DataError(f"data.source=wds:{pattern}: no tar shard matches {pattern!r}")
    if missing:
        raise DataError(f"data.source=wds:{pattern}: {len(missing)} of the named shards do not exist, e.g. "
                                f"{', '.join(missing[:3])}; fix the range or finish copying the shards")
    return list(dict.fromkeys(files))


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: ``a-{000..002}.tar`` -> ``a-000.tar a-001.tar a-002.tar``; ``{x,y}`` lists."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if numeric:
        lo, hi = numeric.group(1), numeric.group(2)
        width = len(lo) if lo.startswith("0") or hi.startswith("0") else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(v).zfill(width) for v in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        options = ["{" + body + "}"]  # not a brace expression: keep literally
        head, tail = pattern[:match.end()], pattern[match.end():]
        return [head + rest for rest in expand_braces(tail)]
    head, tail = pattern[:match.start()], pattern[match.end():]
    return list(itertools.chain.from_iterable(expand_braces(head + o + tail) for o in options))


def _from_disk(path: Path, split: str, streaming: bool, target: str, readers: int) -> Any:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"data.split={split!r} is not in {target}; splits: {list(loaded)}")
        loaded = loaded[split]
    return loaded.to_iterable_dataset(num_shards=_disk_shards(len(loaded), readers)) if streaming else loaded


def _disk_shards(n: int, readers: int) -> int:
    """Contiguous shards for a streamed ``save_to_disk`` dataset: a multiple of ranks x workers (<= 1024 and n)."""
    if n <= readers:
        return max(1, n)
    return readers * max(1, min(n, 1024) // readers)


def _from_files(files: list[str], split: str, streaming: bool, builder: str | None = None) -> Any:
    import datasets

    if builder is None:
        suffixes = {Path(f).suffix.lower() for f in files}
        builders = {_TABLE_BUILDERS.get(s) for s in suffixes}
        if len(builders) != 1 or None in builders:
            raise DataError(f"data.source: cannot tell the format of {files[:3]}...; "
                             f"use files ending in {', '.join(_TABLE_BUILDERS)}")
        builder = builders.pop()
    return datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=streaming)
