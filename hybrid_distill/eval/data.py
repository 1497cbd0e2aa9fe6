"""Fixed, labelled evaluation sets: any source the trainer reads, centre-cropped, split over ranks.

An ``EvalSet`` is an ordered list of samples (its *positions* ``0 .. len - 1``) chosen once from a source:

* ``folder:ROOT`` (labels = sorted class-folder order), ``hf:NAME_OR_PATH`` (an integer or ``ClassLabel`` column
  named ``label``/``cls``/``labels``/``target``/``class``), ``wds:PATTERN`` (the ``.cls`` member) and
  ``synthetic`` (label ``i % 10``): the data sources' own readers (``hybrid_distill.data.sources``);
* the whole source, or ``num_samples`` of it chosen by a seeded permutation and kept in source order; streamed
  sources (``streaming=True``) take their first ``num_samples`` examples instead;
* every image resized (bicubic) so its shorter side is ``floor(img_size / crop_pct)``, then centre-cropped to
  ``img_size`` (torchvision's ``Resize`` + ``CenterCrop``, as DINO's and timm's evaluation transforms);
* rank ``r`` of ``w`` reads positions ``r, r + w, r + 2w, ...``; the features are put back in position order after
  the gather, so results do not depend on the number of ranks.

An undecodable image is skipped with a warning naming it (the set is then one sample shorter on every world size).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

from hybrid_distill.config.schema import parse_source
from hybrid_distill.data.decode import Payload, open_image, to_rgb
from hybrid_distill.data.sources import (
    HFMapSource,
    ImageColumns,
    SyntheticSource,
    open_folder,
    open_hf,
    open_wds,
)
from hybrid_distill.errors import DataError
from hybrid_distill.runtime.cluster import worker_signal_guard

log = logging.getLogger("hybrid_distill.eval")

SUBSET_SALT = 0xE7A1  # seeds the choice of a subset apart from every other use of the run seed


def centre_crop(payload: Payload, size: int, crop_pct: float) -> np.ndarray:
    """``(size, size, 3)`` uint8 RGB: shorter side resized to ``floor(size / crop_pct)`` (bicubic), centre crop.

    The same arithmetic as torchvision's ``Resize(int)`` + ``CenterCrop`` on a PIL image.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EXIF / palette-transparency warnings from PIL
        img = Image.fromarray(payload) if isinstance(payload, np.ndarray) else open_image(payload)
        img = to_rgb(img)
        short = math.floor(size / crop_pct)
        w, h = img.size
        new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        if new != (w, h):
            img = img.resize(new, Image.Resampling.BICUBIC)
        left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
        return np.asarray(img.crop((left, top, left + size, top + size)))


def _subset(n_all: int, num_samples: int | None, seed: int) -> np.ndarray:
    """Indices of the evaluation subset, in source order: all, or ``num_samples`` chosen by ``seed``."""
    if num_samples is None or num_samples >= n_all:
        return np.arange(n_all)
    return np.sort(np.random.default_rng([seed & 0xFFFFFFFF, SUBSET_SALT]).permutation(n_all)[:num_samples])


class EvalSet:
    """A fixed labelled image set, read as centre crops; this rank's share via ``loader``.

    Args:
        source: ``folder:ROOT``, ``hf:NAME_OR_PATH``, ``wds:PATTERN`` or ``synthetic``.
        key: the config key or option that named it (``eval.train_source``), for messages.
        img_size: crop size (the model's input size).
        split: hf/wds split.
        num_samples: subset size (None: all; required when streaming).
        crop_pct: ``img_size`` / resized shorter side.
        seed: seeds the subset choice.
        rank, world_size: this process and the number of processes.
        cache_dir: folder-index cache (folder sources).
        image_key: hf/wds image column (None: auto).
        streaming: read the first ``num_samples`` examples of a streamed hf/wds source.
        synthetic_size: samples of the synthetic source.

    Raises:
        DataError: a missing source, a source without labels, or a streamed source without ``num_samples``.
    """

    def __init__(self, source: str, key: str, img_size: int, split: str = "train", num_samples: int | None = None,
                 crop_pct: float = 0.875, seed: int = 0, rank: int = 0, world_size: int = 1,
                 cache_dir: str | Path | None = None, image_key: str | None = None, streaming: bool = False,
                 synthetic_size: int = 256) -> None:
        self.key, self.img_size, self.crop_pct = key, img_size, crop_pct
        self.rank, self.world_size = rank, world_size
        self.classes: list[str] | None = None  # class-folder names (folder sources)
        try:
            kind, target = parse_source(source, key)
            self._stream = None
            if streaming and kind in ("hf", "wds"):
                self._open_stream(kind, target, split, num_samples, image_key)
            else:
                self._open_map(kind, target, split, num_samples, seed, cache_dir, image_key, synthetic_size)
        except DataError as e:  # the data readers name data.source: name this set's key instead
            message = str(e)
            if message.startswith("data.source") and ": " in message:
                message = message.split(": ", 1)[1]
            raise DataError(f"{key}={source}: {message}") from e

    def _open_map(self, kind: str, target: str, split: str, num_samples: int | None, seed: int,
                  cache_dir: str | Path | None, image_key: str | None, synthetic_size: int) -> None:
        if kind == "synthetic":
            self.source: Any = SyntheticSource(synthetic_size, self.img_size)
        elif kind == "folder":
            if cache_dir is None:
                raise DataError("a folder source needs a cache directory for its file list")
            self.source = open_folder(target, cache_dir)
            self.classes = list(self.source.index.classes)
        else:
            dataset = open_hf(target, split, False) if kind == "hf" else open_wds(target, split, False)
            self.source = HFMapSource(dataset, f"{kind}:{target}", image_key)
        self.indices = _subset(len(self.source), num_samples, seed)
        self._check_labels()

    def _check_labels(self) -> None:
        if isinstance(self.source, HFMapSource) and self.source.columns.label_key is None:
            raise DataError("no integer label column (label, cls, labels, target, class): evaluation needs labels")
        labels = getattr(getattr(self.source, "index", None), "labels", None)
        if labels is not None and (np.asarray(labels)[self.indices] < 0).any():
            raise DataError("images outside class folders have no label: evaluation needs ROOT/CLASS/image files")

    def _open_stream(self, kind: str, target: str, split: str, num_samples: int | None, image_key: str | None) -> None:
        if num_samples is None:
            raise DataError("a streamed source needs a subset size (eval.*_samples / --*-samples)")
        dataset = open_hf(target, split, True) if kind == "hf" else open_wds(target, split, True)
        columns = ImageColumns.detect(dataset.features, image_key, f"{kind}:{target}")
        if columns.label_key is None:
            raise DataError("no integer label column (label, cls, labels, target, class): evaluation needs labels")
        self._stream = (columns.prepare(dataset), columns, f"{kind}:{target}")
        self.indices = np.arange(num_samples)

    def __len__(self) -> int:
        """Samples in the set (all ranks together), before any undecodable one is skipped."""
        return len(self.indices)

    def positions(self, rank: int | None = None) -> list[int]:
        """The positions rank ``rank`` (default: this one) reads: ``rank, rank + world_size, ...``."""
        return list(range(self.rank if rank is None else rank, len(self), self.world_size))

    def loader(self, batch_size: int, num_workers: int = 0) -> DataLoader:
        """This rank's batches ``{"images": uint8 (b, 3, S, S), "labels": (b,), "positions": (b,), "bad": [...]}``.

        The loader draws nothing from the global RNGs (own generator), so iterating it never moves the training
        run's random state.
        """
        if self._stream is not None:
            dataset: Any = _StreamShare(self, batch_size)
            batches, workers = None, 0  # one ordered reader per rank
        else:
            dataset = _MapShare(self)
            mine = self.positions()
            batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
            workers = num_workers
        return DataLoader(dataset, batch_sampler=batches, batch_size=None if batches is None else 1,
                          collate_fn=_identity, num_workers=workers, generator=torch.Generator(),
                          worker_init_fn=worker_signal_guard if workers else None)

    def take(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``count`` decodable samples of the set, read in this process (the same on every rank)."""
        if self._stream is not None:
            samples = [ex for _, ex in zip(range(min(count, len(self))), self._stream_examples(), strict=False)]
        else:
            samples = self.read(list(range(min(count, len(self)))))
        batch = _build(self, list(range(len(samples))), samples)
        return batch["images"], batch["labels"]

    def read(self, positions: list[int]) -> list[tuple[Payload, int, str]]:
        """``(payload, label, key)`` of map-style positions."""
        return self.source.get_many([int(self.indices[p]) for p in positions])

    def _stream_examples(self) -> Iterator[tuple[Payload, int, str]]:
        dataset, columns, name = self._stream
        for n, example in enumerate(dataset):
            yield columns.extract(example, f"{name}#{n}")


def _identity(x: Any) -> Any:
    return x


def _build(eval_set: EvalSet, positions_in: list[int], samples: list[tuple[Payload, int, str]]) -> dict:
    """Decode the samples at ``positions_in`` into a batch; undecodable ones are left out and named in ``bad``."""
    images, labels, positions, bad = [], [], [], []
    for position, (payload, label, key) in zip(positions_in, samples, strict=True):
        try:
            images.append(centre_crop(payload, eval_set.img_size, eval_set.crop_pct))
        except Exception as error:  # noqa: BLE001 - any decoder failure: the sample is skipped, and named
            bad.append(f"{key}: {type(error).__name__}: {error}")
            continue
        labels.append(label)
        positions.append(position)
    for entry in bad:
        log.warning("%s: skipped undecodable evaluation image %s", eval_set.key, entry)
    size = eval_set.img_size
    array = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return {"images": torch.from_numpy(array).permute(0, 3, 1, 2).contiguous(),
            "labels": torch.tensor(labels, dtype=torch.int64), "positions": torch.tensor(positions, dtype=torch.int64),
            "bad": bad}


class _MapShare(Dataset):
    """Batches of map-style positions (a list of positions per ``__getitems__`` call)."""

    def __init__(self, eval_set: EvalSet) -> None:
        self.eval_set = eval_set

    def __len__(self) -> int:
        return len(self.eval_set)

    def __getitem__(self, position: int) -> dict:
        return self.__getitems__([position])

    def __getitems__(self, positions: list[int]) -> dict:
        return _build(self.eval_set, positions, self.eval_set.read(positions))


class _StreamShare(IterableDataset):
    """This rank's examples of the first ``len(eval_set)`` of a stream, in batches."""

    def __init__(self, eval_set: EvalSet, batch_size: int) -> None:
        self.eval_set, self.batch_size = eval_set, batch_size

    def __iter__(self) -> Iterator[dict]:
        s = self.eval_set
        mine = ((p, ex) for p, ex in zip(range(len(s)), s._stream_examples(), strict=False)
                if p % s.world_size == s.rank)
        while chunk := [item for _, item in zip(range(self.batch_size), mine, strict=False)]:
            yield _build(s, [p for p, _ in chunk], [ex for _, ex in chunk])
