"""The training data loader: sharded by rank and worker, resumable, robust to bad images.

``build_loader`` is the one entry point the trainer uses::

    loader = build_loader(cfg.data, img_size=224, rank=r, world_size=w, seed=cfg.run.seed, cache_dir=run_dir)
    loader.set_epoch(epoch)
    for batch in loader:     # {"images": uint8 [B, 3, S, S], "labels": int64 [B], "ids": int64 [B]}
        ...
    state = loader.state_dict()   # read position of this rank; loader.load_state_dict(state) resumes

Two loaders share one contract (``ImageLoader``):

- ``MapLoader`` (synthetic, folder, hf/wds with streaming off): a permutation of all N samples per epoch,
  seeded by (seed, epoch). Global batch g is ``perm[g*W*B:(g+1)*W*B]``; rank r takes the r-th slice of B; the
  DataLoader hands whole batches round-robin to its workers. The read position is the number of samples of
  ``perm`` consumed, so resume is exact, also onto a different world size.
- ``StreamLoader`` (hf/wds with ``data.streaming``): ``datasets.IterableDataset`` shuffled with a buffer,
  split with ``split_dataset_by_node`` and by DataLoader worker; each batch carries its worker's
  ``IterableDataset.state_dict()``, recorded when the batch is handed to the consumer.

Every rank yields exactly ``len(loader)`` batches per epoch (drop_last), so ranks never wait on each other.
See docs/data.md for what is exact, what is approximate and by how much.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hybrid_distill.config import DataConfig
from hybrid_distill.config.schema import parse_source
from hybrid_distill.data.decode import JpegDecoder, Payload, crop_params, decode_crop, probe_jpeg, sample_rng
from hybrid_distill.data.sources import (
    HFMapSource,
    ImageColumns,
    SyntheticSource,
    open_folder,
    open_hf,
    open_wds,
)
from hybrid_distill.errors import ConfigError, DataError
from hybrid_distill.runtime.cluster import worker_signal_guard

logger = logging.getLogger("hybrid_distill.data")

MIN_SAMPLES_BEFORE_ABORT = 1000  # bad-fraction check starts after min(this, samples per epoch), all ranks together
MAX_CONSECUTIVE_BAD = 100  # a worker gives up (RuntimeError) after this many undecodable samples in a row


def build_loader(cfg: DataConfig, img_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 cache_dir: str | Path | None = None) -> ImageLoader:
    """Build the loader of this rank for ``cfg.source``.

    Args:
        cfg: the ``data`` section of the config.
        img_size: crop side length (the student's input size).
        rank: this process's rank.
        world_size: number of data-parallel ranks.
        seed: run seed (permutations, shuffles and augmentation derive from it and the epoch).
        cache_dir: where the folder file-list cache goes (usually ``<run dir>/cache``);
            ``cfg.cache_dir`` overrides it.

    Raises:
        ValueError: a malformed ``data.source`` or impossible sizes (the message names the key).
        FileNotFoundError: a missing folder / file / shard (the message names ``data.source``).
        RuntimeError: ``data.gpu_decode`` without CUDA.
    """
    kind, target = parse_source(cfg.source)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if cfg.gpu_decode and not torch.cuda.is_available():
        raise ConfigError("data.gpu_decode=true needs a CUDA device (torchvision.io.decode_jpeg on GPU); "
                           "none is available: set data.gpu_decode=false")
    aug = Augment(img_size, tuple(cfg.crop_scale), cfg.hflip, seed, cfg.gpu_decode)
    if kind == "synthetic":
        return MapLoader(SyntheticSource(cfg.synthetic_size, img_size), aug, cfg, rank, world_size)
    if kind == "folder":
        where = cfg.cache_dir or cache_dir
        if where is None:
            raise ValueError("a folder source needs a cache directory: pass cache_dir or set data.cache_dir")
        return MapLoader(open_folder(target, where), aug, cfg, rank, world_size)
    readers = world_size * max(1, cfg.num_workers)
    dataset = open_hf(target, cfg.split, cfg.streaming, readers) if kind == "hf" else open_wds(
        target, cfg.split, cfg.streaming)
    if cfg.streaming:
        return StreamLoader(dataset, cfg.source, aug, cfg, rank, world_size)
    return MapLoader(HFMapSource(dataset, cfg.source, cfg.image_key), aug, cfg, rank, world_size)


# ----------------------------------------------------------------------------------------------------------------
# Per-sample work (runs in DataLoader workers)


@dataclass(frozen=True)
class Augment:
    """Crop size and augmentation settings; ``gpu`` defers JPEG decoding to the consumer's device."""

    size: int
    scale: tuple[float, float]
    hflip: bool
    seed: int
    gpu: bool = False

    def process(self, payload: Payload, rng: np.random.Generator) -> np.ndarray | dict:
        """HWC uint8 crop, or (``gpu``) a JPEG job ``{"data", "box", "flip"}`` for ``JpegDecoder``."""
        if self.gpu and not isinstance(payload, np.ndarray):
            data = payload if isinstance(payload, bytes) else Path(payload).read_bytes()
            size = probe_jpeg(data)
            if size is not None:
                box = crop_params(rng, *size, self.scale)
                flip = self.hflip and rng.random() < 0.5
                return {"data": torch.frombuffer(bytearray(data), dtype=torch.uint8), "box": box, "flip": flip}
            payload = data
        return decode_crop(payload, self.size, rng, self.scale, self.hflip)


class _BatchBuilder:
    """Fills one batch sample by sample; bad samples are noted (key and error), not stored.

    ``attempts`` counts the samples of the epoch the batch consumed: one per slot for map-style batches
    (a bad sample's slot is refilled by a replacement), one per example read for streams.
    """

    def __init__(self, batch_size: int, size: int) -> None:
        self.images = np.zeros((batch_size, size, size, 3), np.uint8)
        self.labels = np.full(batch_size, -1, np.int64)
        self.ids = np.full(batch_size, -1, np.int64)
        self.jobs: list[dict] = []
        self.bad: list[str] = []
        self.bad_ids: list[str] = []  # what identifies each bad sample (streams: shard + key), to count it once
        self.count = 0
        self.attempts = 0

    @property
    def full(self) -> bool:
        return self.count == len(self.labels)

    def add(self, result: np.ndarray | dict, label: int, sample_id: int, key: str) -> None:
        if isinstance(result, dict):
            self.jobs.append({**result, "slot": self.count, "key": key})
        else:
            self.images[self.count] = result
        self.labels[self.count] = label
        self.ids[self.count] = sample_id
        self.count += 1

    def add_bad(self, key: str, error: BaseException, ident: str | None = None) -> None:
        self.bad.append(f"{key}: {type(error).__name__}: {error}")
        self.bad_ids.append(ident or key)

    def finish(self) -> dict:
        return {"images": _nchw(self.images),
                "labels": torch.from_numpy(self.labels), "ids": torch.from_numpy(self.ids),
                "jobs": self.jobs, "bad": self.bad, "bad_ids": self.bad_ids, "attempts": self.attempts}


def _nchw(images: np.ndarray) -> torch.Tensor:
    """[B, H, W, 3] -> contiguous [B, 3, H, W]; in a worker, written straight into shared memory (one copy)."""
    shape = (images.shape[0], images.shape[3], images.shape[1], images.shape[2])
    if get_worker_info() is None:
        out = torch.empty(shape, dtype=torch.uint8)
    else:  # what default_collate does: the tensor then crosses to the main process without another copy
        out = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(images.size)).view(shape)
    return out.copy_(torch.from_numpy(images).permute(0, 3, 1, 2))


def _identity(x: Any) -> Any:
    return x


# ----------------------------------------------------------------------------------------------------------------
# The shared loader contract


class ImageLoader:
    """What the trainer sees: iteration, ``len``, epochs, resume state and the bad-sample count."""

    def __init__(self, cfg: DataConfig, aug: Augment, rank: int, world_size: int) -> None:
        self.cfg, self.aug, self.rank, self.world_size = cfg, aug, rank, world_size
        self.batch_size = cfg.batch_size
        self.epoch = 0
        self._batches = 0  # batches of the current epoch handed to the consumer on this rank
        self._bad = 0
        self._attempts = 0
        self._decoder = JpegDecoder(None, aug.size) if aug.gpu else None  # device: current CUDA device at first use
        self._pin = torch.cuda.is_available()

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank (every rank yields the same number)."""
        return self.num_samples // (self.world_size * self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples delivered per epoch over all ranks (``len(self) * batch_size * world_size``)."""
        n = self.dataset_size // (self.world_size * self.batch_size)
        if n < 1:
            raise DataError(f"data.batch_size={self.batch_size} x world_size={self.world_size} exceeds the "
                             f"{self.dataset_size} samples of data.source={self.cfg.source!r}")
        return n * self.world_size * self.batch_size

    @property
    def dataset_size(self) -> int:
        raise NotImplementedError

    @property
    def bad_samples(self) -> int:
        """Undecodable samples skipped on this rank so far (cumulative, survives resume)."""
        return self._bad

    @property
    def samples_read(self) -> int:
        """Samples this rank tried to decode so far, good and bad (cumulative, survives resume)."""
        return self._attempts

    def bad_fraction_problem(self, bad: int, read: int) -> str | None:
        """The one-line reason to stop when ``bad`` of ``read`` samples were undecodable (the trainer passes the
        counts summed over all ranks, so every rank decides alike), or None while within ``data.max_bad_fraction``.

        Checked only after ``min(MIN_SAMPLES_BEFORE_ABORT, samples per epoch)`` reads, so one bad file among the
        first few does not end a run.
        """
        if read < min(MIN_SAMPLES_BEFORE_ABORT, max(1, self.num_samples)) or bad <= self.cfg.max_bad_fraction * read:
            return None
        return (f"{bad} of {read} samples read from data.source={self.cfg.source!r} could not be decoded "
                f"({bad / read:.2%} > data.max_bad_fraction={self.cfg.max_bad_fraction}); the 'skipped undecodable "
                "sample' warnings in the rank logs name the files: fix the data or raise data.max_bad_fraction, then "
                "resume with --resume auto")

    def set_epoch(self, epoch: int) -> None:
        """Enter ``epoch`` (the trainer owns the counter; reshuffles); a no-op when the loader is already in it.

        Iterating yields the batches of the current epoch not yet handed out: all of them after ``set_epoch``,
        the rest after ``load_state_dict``, none once the epoch is finished.
        """
        if epoch != self.epoch:
            self.epoch, self._batches = epoch, 0
            self._reset_position()

    def _reset_position(self) -> None:
        pass

    def _epoch_done(self) -> bool:
        raise NotImplementedError

    def _finish(self, batch: dict) -> dict:
        """Count bad samples (``bad_fraction_problem`` judges them), decode deferred JPEGs, return the batch."""
        bad, ids = list(batch["bad"]), list(batch["bad_ids"])
        images = batch["images"]
        if self._decoder is not None:
            images, gpu_bad = self._decoder.finish(images, batch["jobs"])
            bad += gpu_bad
            ids += [entry.split(": ", 1)[0] for entry in gpu_bad]
        for entry in bad:
            logger.warning("rank %d: skipped undecodable sample %s", self.rank, entry)
        self._bad += self._count_bad(ids)
        self._attempts += batch["attempts"]
        return {"images": images, "labels": batch["labels"], "ids": batch["ids"]}

    def _count_bad(self, ids: list[str]) -> int:
        """How many of these bad samples to count (map-style: all; each is read once per epoch)."""
        return len(ids)

    def _dataloader_kwargs(self) -> dict:
        workers = self.cfg.num_workers
        return {"num_workers": workers, "collate_fn": _identity, "pin_memory": self._pin,
                "prefetch_factor": 2 if workers else None,
                "worker_init_fn": worker_signal_guard if workers else None}  # preemption SIGTERM reaches the rank

    def _common_state(self) -> dict:
        return {"epoch": self.epoch, "batches": self._batches, "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "bad_samples": self._bad, "attempted": self._attempts,
                "source": self.cfg.source}

    def _load_common(self, state: dict) -> None:
        if int(state["epoch"]) != self.epoch:
            raise ValueError(f"the data state is for epoch {state['epoch']} but the loader is in epoch {self.epoch}: "
                             "call set_epoch with the checkpoint's epoch before load_state_dict")
        self._batches = int(state["batches"])
        self._bad = int(state.get("bad_samples", 0))
        self._attempts = int(state.get("attempted", 0))
        if state.get("source", self.cfg.source) != self.cfg.source:
            logger.warning("resuming data position saved for data.source=%r with data.source=%r",
                           state.get("source"), self.cfg.source)


# ----------------------------------------------------------------------------------------------------------------
# Map-style


class _MapDataset(torch.utils.data.Dataset):
    """Turns ``(epoch, index)`` lists into finished batches; a bad sample is replaced by a seeded random index."""

    def __init__(self, source: Any, aug: Augment, batch_size: int) -> None:
        self.source, self.aug, self.batch_size = source, aug, batch_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        return self.__getitems__([item])

    def __getitems__(self, items: list[tuple[int, int]]) -> dict:
        batch = _BatchBuilder(len(items), self.aug.size)
        epoch = items[0][0]
        for (_, index), sample in zip(items, self.source.get_many([i for _, i in items]), strict=True):
            self._add(batch, epoch, index, sample)
        return batch.finish()

    def _add(self, batch: _BatchBuilder, epoch: int, index: int, sample: tuple) -> None:
        """Decode ``index`` into the next slot; if it is bad, count it once and fill the slot with seeded
        replacement candidates (a failing candidate is not counted: it is counted at its own epoch position)."""
        batch.attempts += 1
        last_error = ""
        for attempt in range(MAX_CONSECUTIVE_BAD):
            payload, label, key = sample
            try:
                result = self.aug.process(payload, sample_rng(self.aug.seed, epoch, index, attempt))
            except Exception as error:  # noqa: BLE001 - any decoder failure makes the sample bad
                if attempt == 0:
                    batch.add_bad(key, error)
                else:
                    logger.debug("replacement candidate %s is undecodable too: %s", key, error)
                last_error = f"{key}: {type(error).__name__}: {error}"
                index = int(sample_rng(self.aug.seed, epoch, index, 1_000_000 + attempt).integers(len(self.source)))
                sample = self.source.get_many([index])[0]
                continue
            batch.add(result, label, index, key)
            return
        raise RuntimeError(f"{MAX_CONSECUTIVE_BAD} undecodable samples in a row (last: {last_error}); "
                           "is data.source pointing at images?")


class _EpochPlan:
    """The batch sampler (main process): this rank's batches of one epoch from a global start position.

    Batches are cut from the permutation array lazily, one at a time, so no Python object per sample exists.
    """

    def __init__(self) -> None:
        self.perm = np.zeros(0, np.int64)
        self.epoch = self.start = self.rank = self.count = 0
        self.world = self.batch = 1

    def set(self, perm: np.ndarray, epoch: int, start: int, rank: int, world: int, batch: int, count: int) -> None:
        self.perm, self.epoch, self.start, self.rank = perm, epoch, start, rank
        self.world, self.batch, self.count = world, batch, count

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for k in range(self.count):
            first = self.start + (k * self.world + self.rank) * self.batch
            yield [(self.epoch, int(i)) for i in self.perm[first:first + self.batch]]

    def __len__(self) -> int:
        return self.count


class MapLoader(ImageLoader):
    """Loader over a source with a length (synthetic, folder, hf/wds without streaming)."""

    def __init__(self, source: Any, aug: Augment, cfg: DataConfig, rank: int, world_size: int) -> None:
        super().__init__(cfg, aug, rank, world_size)
        self.source = source
        self._dataset = _MapDataset(source, aug, cfg.batch_size)
        self._position = 0  # samples of this epoch's global permutation consumed (all ranks)
        self._plan = _EpochPlan()
        self._loader: DataLoader | None = None
        self._perm: tuple[int, np.ndarray] | None = None
        _ = self.num_samples  # fail early when the source is smaller than one global batch

    @property
    def dataset_size(self) -> int:
        return len(self.source)

    def _reset_position(self) -> None:
        self._position = 0

    def permutation(self, epoch: int) -> np.ndarray:
        """The global sample order of ``epoch`` (same on every rank)."""
        if self._perm is None or self._perm[0] != epoch:
            n = self.dataset_size
            perm = np.random.default_rng([self.aug.seed & 0xFFFFFFFF, epoch, 0x5A3D]).permutation(n)
            self._perm = (epoch, perm.astype(np.int32 if n < 2**31 else np.int64))
        return self._perm[1]

    def _epoch_done(self) -> bool:
        return self.dataset_size - self._position < self.world_size * self.batch_size

    def __iter__(self) -> Iterator[dict]:
        if self._epoch_done():
            return
        global_batch = self.world_size * self.batch_size
        epoch, start = self.epoch, self._position
        count = (self.dataset_size - start) // global_batch
        self._plan.set(self.permutation(epoch), epoch, start, self.rank, self.world_size, self.batch_size, count)
        if self._loader is None:
            self._loader = DataLoader(self._dataset, batch_sampler=self._plan,
                                      persistent_workers=self.cfg.num_workers > 0, **self._dataloader_kwargs())
        for batch in self._loader:
            self._batches += 1
            self._position += global_batch
            yield self._finish(batch)

    def state_dict(self) -> dict:
        """Read position of this rank: epoch, batches consumed, global samples consumed, bad-sample counters."""
        return {"kind": "map", "position": self._position, "dataset_size": self.dataset_size, "seed": self.aug.seed,
                **self._common_state()}

    def load_state_dict(self, state: dict) -> None:
        """Continue with the next unseen samples (exact, also onto a different world size or batch size)."""
        if state.get("kind") != "map":
            raise ValueError(f"cannot resume a map-style loader from a {state.get('kind')!r} data state")
        self._load_common(state)
        self._position = int(state["position"])
        if int(state["dataset_size"]) != self.dataset_size:
            logger.warning("dataset size changed from %s to %d since the checkpoint; the epoch order differs",
                           state["dataset_size"], self.dataset_size)
            self._position = min(self._position, self.dataset_size)
        if (state["world_size"], state["batch_size"]) != (self.world_size, self.batch_size):
            self._batches = self._position // (self.world_size * self.batch_size)
            logger.info("resuming data position %d of epoch %d on %d ranks x batch %d (saved with %s x %s)",
                        self._position, self.epoch, self.world_size, self.batch_size, state["world_size"],
                        state["batch_size"])


# ----------------------------------------------------------------------------------------------------------------
# Streaming


class _StreamDataset(IterableDataset):
    """Reads a ``datasets.IterableDataset`` in a worker and yields finished batches with the worker's state."""

    def __init__(self, hf: Any, columns: ImageColumns, name: str, aug: Augment, batch_size: int, rank: int) -> None:
        self.hf, self.columns, self.name, self.aug = hf, columns, name, aug
        self.batch_size, self.rank = batch_size, rank
        self.epoch = 0
        self.resume: dict[str, dict] = {}
        self.quotas: list[int] = [0]  # batches per worker this epoch (see worker_quotas)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid = info.id if info is not None else 0
        state = self.resume.get(str(wid), {})
        left = self.quotas[wid] - int(state.get("delivered", 0))
        if left <= 0:
            return
        yield from self._batches(wid, state, left)

    def _examples(self, wid: int, n: int) -> Iterator[dict]:
        """The ``datasets`` iterator, its own failures (not the image's: those are skipped) named for the user."""
        iterator = iter(self.hf)
        while True:
            try:
                example = next(iterator)
            except StopIteration:
                return
            except Exception as error:  # noqa: BLE001 - re-raised with the source and position
                _reraise_reader_error(self.name, wid, self.rank, n, error)
            n += 1
            yield example

    def _batches(self, wid: int, state: dict, left: int) -> Iterator[dict]:
        """This worker's next ``left`` batches; it starts another pass over its shards when they run out."""
        passes, n, delivered = int(state.get("pass", 0)), int(state.get("n", 0)), int(state.get("delivered", 0))
        self.hf.load_state_dict(state["hf"] if "hf" in state else None)
        resumed, bad_run = "hf" in state, 0
        batch = _BatchBuilder(self.batch_size, self.aug.size)
        while True:
            empty = True
            for example in self._examples(wid, n):
                empty = False
                payload, label, key = self.columns.extract(example, f"{self.name}#r{self.rank}w{wid}:{n}")
                rng = sample_rng(self.aug.seed, self.epoch, n, salt=1 + self.rank * 4096 + wid)
                n += 1
                batch.attempts += 1
                try:
                    batch.add(self.aug.process(payload, rng), label, -1, key)
                    bad_run = 0
                except Exception as error:  # noqa: BLE001 - skipped, counted, and the next example fills in
                    batch.add_bad(key, error, ident=f"{example.get('__url__', '')}#{key}")
                    bad_run += 1
                    if bad_run >= MAX_CONSECUTIVE_BAD:
                        raise RuntimeError(f"{bad_run} undecodable samples in a row in {self.name} (last: "
                                           f"{batch.bad[-1]}); is data.source pointing at images?") from error
                if batch.full:
                    out, delivered = batch.finish(), delivered + 1
                    out["state"] = {"wid": wid, "hf": self.hf.state_dict(), "pass": passes, "n": n,
                                    "delivered": delivered}
                    yield out
                    if delivered >= self.quotas[wid]:
                        return
                    batch = _BatchBuilder(self.batch_size, self.aug.size)
            if empty and not resumed:
                return  # this worker has no shards (more workers than shards)
            passes, resumed = passes + 1, False
            self.hf.load_state_dict(None)  # wrap around: another pass over this worker's shards


def _reraise_reader_error(name: str, wid: int, rank: int, n: int, error: Exception) -> None:
    raise RuntimeError(f"{name}: the datasets reader failed after example {n} of rank {rank} worker {wid} "
                       f"({type(error).__name__}: {error}). This is outside the image decoding (e.g. a damaged .cls or "
                       ".json member in a tar shard), which datasets converts while iterating; repair or drop that "
                       "shard, then resume") from error


def worker_quotas(count: int, shards: int, workers: int) -> list[int]:
    """Batches each DataLoader worker delivers in an epoch of ``count`` batches: in proportion to its shards.

    ``datasets`` deals a rank's ``shards`` to its ``workers`` round-robin, and the DataLoader takes batches from
    the workers in turn until each one stops. Were every worker to deliver ``count / workers`` batches, one with
    fewer shards would wrap around and re-read samples while the last samples of the others were never reached.
    With quotas proportional to the shards each worker reads (equal-sized shards assumed), one epoch reads every
    sample once; and since each worker counts its own batches, resuming does not depend on the turn order.
    """
    workers = max(1, workers)
    owned = [len(range(w, shards, workers)) for w in range(workers)]
    total = sum(owned)
    if total == 0:
        return [count] + [0] * (workers - 1)
    quotas = [count * o // total for o in owned]
    for w in sorted(range(workers), key=lambda w: -(count * owned[w] % total))[: count - sum(quotas)]:
        quotas[w] += 1  # the remainder to the largest fractional shares
    return quotas


def _reshard_if_useful(hf: Any, readers: int) -> Any:
    """Split parquet files by row group (``IterableDataset.reshard``) when there are fewer shards than readers."""
    if hf.num_shards >= readers or not hasattr(hf, "reshard"):
        return hf
    resharded = hf.reshard()
    return resharded if resharded.num_shards > hf.num_shards else hf


class StreamLoader(ImageLoader):
    """Loader over a streaming ``datasets.IterableDataset`` (hf/wds with ``data.streaming=true``)."""

    def __init__(self, hf: Any, name: str, aug: Augment, cfg: DataConfig, rank: int, world_size: int) -> None:
        import datasets.distributed

        super().__init__(cfg, aug, rank, world_size)
        self._size = self._known_size(hf, cfg)
        columns = ImageColumns.detect(hf.features, cfg.image_key, name)
        hf = _reshard_if_useful(hf, world_size * max(1, cfg.num_workers))
        self.num_shards = hf.num_shards
        hf = columns.prepare(hf).shuffle(seed=aug.seed, buffer_size=cfg.shuffle_buffer, max_buffer_input_shards=1)
        hf = datasets.distributed.split_dataset_by_node(hf, rank=rank, world_size=world_size)
        self.split_by = "shards" if self.num_shards % world_size == 0 else "examples"
        self._dataset = _StreamDataset(hf, columns, name, aug, cfg.batch_size, rank)
        self._worker_states: dict[str, dict] = {}
        self._bad_seen: set[str] = set()  # bad samples counted in this epoch (a resume re-reads the shuffle buffer)
        _ = self.num_samples
        logger.info("%s: %d shards over %d ranks x %d workers; ranks split by %s", name, self.num_shards,
                    world_size, max(1, cfg.num_workers), self.split_by)

    @staticmethod
    def _known_size(hf: Any, cfg: DataConfig) -> int:
        if cfg.num_samples is not None:
            return int(cfg.num_samples)
        splits = getattr(hf.info, "splits", None) or {}
        split = splits.get(cfg.split) if hasattr(splits, "get") else None
        if split is not None and getattr(split, "num_examples", 0):
            return int(split.num_examples)
        raise DataError(f"data.source={cfg.source!r} is streamed and does not state its length: set "
                         "data.num_samples to the number of samples per epoch")

    @property
    def dataset_size(self) -> int:
        return self._size

    def _reset_position(self) -> None:
        self._worker_states = {}
        self._bad_seen = set()

    def _epoch_done(self) -> bool:
        return self._batches >= len(self)

    def _count_bad(self, ids: list[str]) -> int:
        """Bad samples not yet counted in this epoch: after a resume the stream re-reads what was in the shuffle
        buffer, and a bad file among it must not count twice."""
        new = [i for i in dict.fromkeys(ids) if i not in self._bad_seen]
        self._bad_seen.update(new)
        return len(new)

    def __iter__(self) -> Iterator[dict]:
        if self._epoch_done():
            return
        epoch, count = self.epoch, len(self)
        self._dataset.epoch = epoch
        self._dataset.hf.set_epoch(epoch)
        self._dataset.resume = dict(self._worker_states)
        rank_shards = self.num_shards // self.world_size if self.split_by == "shards" else self.num_shards
        self._dataset.quotas = worker_quotas(count, rank_shards, self.cfg.num_workers)
        loader = DataLoader(self._dataset, batch_size=None, **self._dataloader_kwargs())
        iterator = iter(loader)
        try:
            for _ in range(self._batches, count):
                batch = next(iterator, None)
                if batch is None:
                    raise RuntimeError(f"data.source={self.cfg.source!r} yielded no samples on rank {self.rank}")
                self._batches += 1
                self._worker_states[str(batch["state"]["wid"])] = batch["state"]
                yield self._finish(batch)
        finally:
            del iterator  # shuts the workers down when the consumer stops early

    def state_dict(self) -> dict:
        """Read position of this rank: epoch, batches consumed and each worker's ``IterableDataset`` state."""
        return {"kind": "stream", "workers": dict(self._worker_states), "num_workers": self.cfg.num_workers,
                "bad_seen": sorted(self._bad_seen), **self._common_state()}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the last consumed batch of each worker (the shuffle buffer is not restored)."""
        if state.get("kind") != "stream":
            raise ValueError(f"cannot resume a streaming loader from a {state.get('kind')!r} data state")
        self._load_common(state)
        self._worker_states = {str(k): v for k, v in state["workers"].items()}
        self._bad_seen = set(state.get("bad_seen", ()))
        same = (state["world_size"], state["num_workers"], state["batch_size"]) == (
            self.world_size, self.cfg.num_workers, self.batch_size)
        if not same:
            logger.warning("streaming data state was saved with world_size=%s num_workers=%s batch_size=%s; the "
                           "stream restarts this epoch's pass (samples may repeat) and the epoch keeps its length",
                           state["world_size"], state["num_workers"], state["batch_size"])
            self._worker_states = {}
            saved_global = int(state["batches"]) * int(state["world_size"]) * int(state["batch_size"])
            self._batches = min(len(self), saved_global // (self.world_size * self.batch_size))
