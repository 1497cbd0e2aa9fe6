"""Data pipeline: every source kind, sharding over ranks x workers, seeded order, exact/approximate resume.

Corpora are tiny solid-colour images written by the tests; sample ``i`` has colour ``PALETTE[i % 3]`` and (for
hf/wds sources) label ``i``, so both the label mapping and the pixels can be checked after the crop.
"""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hybrid_distill.config import DataConfig
from hybrid_distill.config.schema import parse_source
from hybrid_distill.data.decode import JpegDecoder, sample_rng
from hybrid_distill.data.loader import build_loader, worker_quotas
from hybrid_distill.data.sources import expand_braces
from hybrid_distill.errors import ConfigError, DataError

PALETTE = [(230, 20, 20), (20, 230, 20), (20, 20, 230)]
N = 24
SIZE = 16


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    """Keep datasets' Arrow cache in tmp."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def encode(i: int, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (30 + i % 7, 24 + i % 5), PALETTE[i % 3]).save(buf, fmt)
    return buf.getvalue()


def dominant(images: torch.Tensor) -> list[int]:
    """Index of the brightest channel of each image (the palette colour)."""
    return images.float().mean(dim=(2, 3)).argmax(dim=1).tolist()


def hf_dataset(n: int = N):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": [{"bytes": encode(i), "path": None} for i in range(n)],
                                       "label": list(range(n))}, features=features)


def write_shards(root: Path, n: int = N, shards: int = 4) -> str:
    root.mkdir(parents=True, exist_ok=True)
    per = n // shards
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:03d}.tar", "w") as tar:
            for i in range(s * per, (s + 1) * per):
                for ext, data in (("jpg", encode(i)), ("cls", str(i).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f"wds:{root}/shard-{{000..{shards - 1:03d}}}.tar"


def make_cfg(source: str, **kw) -> DataConfig:
    base = dict(source=source, batch_size=3, num_workers=0, shuffle_buffer=4, crop_scale=(0.3, 1.0))
    return DataConfig(**{**base, **kw})


def collect(cfg: DataConfig, world: int = 1, tmp: Path | None = None, seed: int = 0) -> list[dict]:
    out = []
    for rank in range(world):
        loader = build_loader(cfg, img_size=SIZE, rank=rank, world_size=world, seed=seed, cache_dir=tmp)
        for batch in loader:
            assert batch["images"].shape == (cfg.batch_size, 3, SIZE, SIZE)
            assert batch["images"].dtype == torch.uint8 and batch["labels"].dtype == torch.int64
            out.append({"rank": rank, **batch})
    return out


def labels_of(batches: list[dict]) -> list[int]:
    return [int(v) for b in batches for v in b["labels"]]


# ----------------------------------------------------------------------------------------------------------------
# Source strings


@pytest.mark.parametrize("bad", ["", "folder", "folder:", "imagenet", "s3:bucket", "hf", "wds: ", "Synthetic"])
def test_malformed_source_names_the_key(bad):
    with pytest.raises(ConfigError, match="data.source"):
        parse_source(bad)
    with pytest.raises(ConfigError, match="data.source"):
        build_loader(make_cfg(bad), img_size=SIZE)


def test_missing_paths_name_the_source(tmp_path):
    for source in (f"folder:{tmp_path}/nope", f"wds:{tmp_path}/shard-{{000..003}}.tar", f"hf:{tmp_path}/x.parquet"):
        with pytest.raises(DataError, match="data.source") as info:
            build_loader(make_cfg(source), img_size=SIZE, cache_dir=tmp_path)
        assert "nope" in str(info.value) or "shard" in str(info.value) or "x.parquet" in str(info.value)


def test_a_missing_shard_in_the_pattern_is_an_error_naming_it(tmp_path):
    source = write_shards(tmp_path / "wds", n=24, shards=4)
    (tmp_path / "wds" / "shard-002.tar").unlink()  # a half-finished copy
    with pytest.raises(DataError, match=r"data\.source.*1 of the named shards.*shard-002\.tar"):
        build_loader(make_cfg(source, streaming=True, num_samples=24), img_size=SIZE)


def test_loose_images_next_to_class_folders_are_reported(tmp_path, caplog):
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "imgs" / "cat" / f"{i}.jpg").write_bytes(encode(i))
    for i in range(2):
        (tmp_path / "imgs" / f"loose{i}.jpg").write_bytes(encode(i))
    with caplog.at_level("WARNING", logger="hybrid_distill.data"):
        loader = build_loader(make_cfg(f"folder:{tmp_path / 'imgs'}", batch_size=1), img_size=SIZE,
                              cache_dir=tmp_path / "cache")
    assert loader.dataset_size == 3
    assert "2 image files at the top level are ignored" in caplog.text


def test_brace_expansion():
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{x,y}/{1..2}") == ["x/1", "x/2", "y/1", "y/2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_gpu_decode_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ConfigError, match="data.gpu_decode"):
        build_loader(make_cfg("synthetic", gpu_decode=True), img_size=SIZE)


def test_streaming_without_length_asks_for_num_samples(tmp_path):
    with pytest.raises(DataError, match="data.num_samples"):
        build_loader(make_cfg(write_shards(tmp_path / "wds"), streaming=True), img_size=SIZE)


# ----------------------------------------------------------------------------------------------------------------
# Each source kind: shapes, labels, pixels


def test_synthetic_is_deterministic_and_structured():
    cfg = make_cfg("synthetic", synthetic_size=12, batch_size=4)
    first, second = collect(cfg), collect(cfg)
    assert len(first) == 3
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], a["ids"] % 10)
    img = first[0]["images"][0].float()
    assert img.std() > 10  # not flat
    neighbours = (img[:, 1:, :] - img[:, :-1, :]).abs().mean()
    assert neighbours < img.std()  # smooth structure, not noise


def test_folder_with_class_subdirs(tmp_path):
    root = tmp_path / "imgs"
    classes = ["cat", "dog", "emu"]  # sorted order = label
    for c, name in enumerate(classes):
        (root / name / "nested").mkdir(parents=True)
        for i in range(4):
            where = root / name / ("nested" if i == 3 else "")
            Image.new("RGB", (20 + i, 18), PALETTE[c]).save(where / f"{i}.{'png' if i % 2 else 'JPEG'}")
    (root / "cat" / "notes.txt").write_text("not an image")
    batches = collect(make_cfg(f"folder:{root}"), tmp=tmp_path / "cache")
    assert sorted(labels_of(batches)) == [0] * 4 + [1] * 4 + [2] * 4
    for b in batches:
        assert dominant(b["images"]) == b["labels"].tolist()
    assert len(list((tmp_path / "cache").glob("folder_index-*/done"))) == 1


def test_folder_flat_and_index_cache_reuse(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(6):
        Image.new("RGB", (20, 20), PALETTE[i % 3]).save(root / f"{i}.jpg")
    cfg = make_cfg(f"folder:{root}", cache_dir=str(tmp_path / "cfg_cache"))
    loader = build_loader(cfg, img_size=SIZE, cache_dir=tmp_path / "ignored")
    batches = list(loader)
    assert labels_of(batches) == [-1] * 6
    assert sorted(int(i) for b in batches for i in b["ids"]) == list(range(6))
    assert not (tmp_path / "ignored").exists()
    assert 0 < loader.source.index.bytes_per_sample < 20
    index_dirs = list((tmp_path / "cfg_cache").glob("folder_index-*/done"))
    (root / "6.jpg").write_bytes(encode(0))  # the folder changes: a new index
    build_loader(cfg, img_size=SIZE)
    assert len(list((tmp_path / "cfg_cache").glob("folder_index-*/done"))) == len(index_dirs) + 1


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("kind", ["save_to_disk", "parquet", "wds"])
def test_hf_and_wds_sources(tmp_path, kind, streaming):
    if kind == "save_to_disk":
        hf_dataset().save_to_disk(str(tmp_path / "disk"))
        source = f"hf:{tmp_path / 'disk'}"
    elif kind == "parquet":
        hf_dataset().to_parquet(str(tmp_path / "data.parquet"))
        source = f"hf:{tmp_path / 'data.parquet'}"
    else:
        source = write_shards(tmp_path / "wds")
    batches = collect(make_cfg(source, streaming=streaming, num_samples=N if streaming else None), world=2)
    assert sorted(labels_of(batches)) == list(range(N))
    for b in batches:
        assert dominant(b["images"]) == [v % 3 for v in b["labels"].tolist()]


@pytest.mark.parametrize("streaming", [False, True])
def test_image_key_picks_the_named_column(tmp_path, streaming):
    """Two image columns: auto-detection takes ``image``; ``data.image_key=photo`` reads the other one."""
    n = 6
    image = datasets.Image()
    features = datasets.Features({"image": image, "photo": image, "label": datasets.Value("int64")})
    table = {"image": [{"bytes": encode(0), "path": None}] * n,  # all red
             "photo": [{"bytes": encode(1), "path": None}] * n,  # all green
             "label": list(range(n))}
    datasets.Dataset.from_dict(table, features=features).save_to_disk(str(tmp_path / "disk"))
    common = dict(streaming=streaming, num_samples=n if streaming else None)
    auto = collect(make_cfg(f"hf:{tmp_path / 'disk'}", **common))
    named = collect(make_cfg(f"hf:{tmp_path / 'disk'}", image_key="photo", **common))
    assert {d for b in auto for d in dominant(b["images"])} == {0}
    assert {d for b in named for d in dominant(b["images"])} == {1}
    with pytest.raises(DataError, match=r"data\.image_key='nope'.*columns"):
        build_loader(make_cfg(f"hf:{tmp_path / 'disk'}", image_key="nope", **common), img_size=SIZE)


def test_split_selects_the_split_and_an_unknown_one_is_named(tmp_path):
    dd = datasets.DatasetDict({"train": hf_dataset(6), "validation": hf_dataset(9)})
    dd.save_to_disk(str(tmp_path / "dd"))
    source = f"hf:{tmp_path / 'dd'}"
    assert build_loader(make_cfg(source), img_size=SIZE).dataset_size == 6
    assert build_loader(make_cfg(source, split="validation"), img_size=SIZE).dataset_size == 9
    with pytest.raises(DataError, match=r"data\.split='test'.*train.*validation"):
        build_loader(make_cfg(source, split="test"), img_size=SIZE)


# ----------------------------------------------------------------------------------------------------------------
# Sharding and order


def test_two_ranks_two_workers_cover_the_epoch_exactly_once(tmp_path):
    cfg = make_cfg("synthetic", synthetic_size=48, batch_size=4, num_workers=2)
    batches = collect(cfg, world=2)
    ids = [int(i) for b in batches for i in b["ids"]]
    assert sorted(ids) == list(range(48))
    per_rank = Counter(b["rank"] for b in batches)
    assert per_rank[0] == per_rank[1] == 6
    other = [int(i) for b in collect(cfg, world=2, seed=1) for i in b["ids"]]
    assert sorted(other) == list(range(48)) and other != ids


def test_streaming_two_ranks_two_workers_by_shards(tmp_path):
    source = write_shards(tmp_path / "wds", n=24, shards=4)  # 4 shards = 2 ranks x 2 workers
    cfg = make_cfg(source, streaming=True, num_samples=24, batch_size=3, num_workers=2)
    loaders = [build_loader(cfg, img_size=SIZE, rank=r, world_size=2) for r in range(2)]
    assert [ld.split_by for ld in loaders] == ["shards", "shards"]
    labels = [int(v) for ld in loaders for b in ld for v in b["labels"]]
    assert sorted(labels) == list(range(24))


def test_worker_quotas_follow_the_shards_each_worker_reads():
    assert worker_quotas(15, shards=3, workers=2) == [10, 5]  # shards dealt round-robin: 2 and 1
    assert worker_quotas(30, shards=6, workers=4) == [10, 10, 5, 5]
    assert worker_quotas(8, shards=3, workers=2) == [5, 3]  # 5.33 / 2.67: the remainder to the larger fraction
    assert worker_quotas(10, shards=1, workers=3) == [10, 0, 0]  # idle workers deliver nothing
    assert worker_quotas(7, shards=5, workers=0) == [7]  # no workers: the main process reads everything
    for count in range(0, 40):
        for shards in range(1, 9):
            for workers in range(1, 5):
                assert sum(worker_quotas(count, shards, workers)) == count


def test_streaming_workers_with_unequal_shard_shares_read_every_sample_once(tmp_path):
    """6 shards on 4 workers (2, 2, 1, 1 shards): equal batch counts per worker would re-read some samples and
    never reach others; quotas in proportion to the shards read each sample exactly once."""
    source = write_shards(tmp_path / "wds", n=36, shards=6)
    cfg = make_cfg(source, streaming=True, num_samples=36, batch_size=3, num_workers=4, shuffle_buffer=2)
    labels = labels_of(collect(cfg))
    assert sorted(labels) == list(range(36))


def test_streaming_resume_after_an_odd_batch_count_repeats_nothing(tmp_path):
    """With 2 workers the DataLoader alternates between them; stopping after 3 batches must not shift the turn
    order of the resumed run (each worker counts its own batches). Buffer 1: nothing is lost to the buffer."""
    source = write_shards(tmp_path / "wds", n=24, shards=4)
    cfg = make_cfg(source, streaming=True, num_samples=24, batch_size=3, num_workers=2, shuffle_buffer=1)
    loader = build_loader(cfg, img_size=SIZE)
    before = []
    for k, batch in enumerate(loader):
        before += batch["labels"].tolist()
        if k == 2:
            break
    resumed = build_loader(cfg, img_size=SIZE)
    resumed.load_state_dict(loader.state_dict())
    after = labels_of(list(resumed))
    assert sorted(before + after) == list(range(24))


def test_drop_last_gives_every_rank_the_same_batch_count():
    cfg = make_cfg("synthetic", synthetic_size=29, batch_size=4)
    loaders = [build_loader(cfg, img_size=SIZE, rank=r, world_size=3) for r in range(3)]
    assert [len(ld) for ld in loaders] == [2, 2, 2] and loaders[0].num_samples == 24
    assert [len(list(ld)) for ld in loaders] == [2, 2, 2]


def test_epochs_reshuffle_and_augmentation_is_deterministic():
    cfg = make_cfg("synthetic", synthetic_size=12, batch_size=4)
    loader = build_loader(cfg, img_size=SIZE, seed=3)
    epoch0 = [b["ids"].tolist() for b in loader]
    assert loader.state_dict()["epoch"] == 0 and loader.state_dict()["batches"] == 3
    assert list(loader) == [] and loader.epoch == 0  # the trainer owns the epoch: finished until set_epoch
    loader.set_epoch(1)
    epoch1 = [b["ids"].tolist() for b in loader]
    assert epoch0 != epoch1
    again = build_loader(cfg, img_size=SIZE, seed=3)
    again.set_epoch(1)
    assert [b["ids"].tolist() for b in again] == epoch1


# ----------------------------------------------------------------------------------------------------------------
# Resume


def test_map_resume_is_exact_with_workers(tmp_path):
    cfg = make_cfg("synthetic", synthetic_size=40, batch_size=4, num_workers=2)
    full = list(build_loader(cfg, img_size=SIZE, seed=5))
    first = build_loader(cfg, img_size=SIZE, seed=5)
    seen = []
    for k, batch in enumerate(first):
        seen.append(batch)
        if k == 3:
            break
    state = first.state_dict()
    assert state["batches"] == 4 and state["epoch"] == 0
    second = build_loader(cfg, img_size=SIZE, seed=5)
    second.load_state_dict(state)
    second.set_epoch(0)  # what a resumed trainer does: same epoch, keeps the position
    seen += list(second)
    assert len(seen) == len(full) == 10
    for a, b in zip(seen, full, strict=True):
        assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["images"], b["images"])


def test_map_resume_onto_a_different_world_size():
    cfg = make_cfg("synthetic", synthetic_size=48, batch_size=4)
    two = [build_loader(cfg, img_size=SIZE, rank=r, world_size=2) for r in range(2)]
    seen = []
    for loader in two:
        for k, batch in enumerate(loader):
            seen += batch["ids"].tolist()
            if k == 1:
                break
    one = build_loader(cfg, img_size=SIZE, rank=0, world_size=1)
    one.load_state_dict(two[0].state_dict())
    seen += [i for b in one for i in b["ids"].tolist()]
    assert sorted(seen) == list(range(48))


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_resume_within_the_shuffle_buffer(tmp_path, workers):
    buffer = 4
    source = write_shards(tmp_path / "wds", n=48, shards=4)
    cfg = make_cfg(source, streaming=True, num_samples=48, batch_size=3, num_workers=workers, shuffle_buffer=buffer)
    loaders = [build_loader(cfg, img_size=SIZE, rank=r, world_size=2) for r in range(2)]
    before, states = [], []
    for loader in loaders:
        for k, batch in enumerate(loader):
            before += batch["labels"].tolist()
            if k == 3:
                break
        states.append(loader.state_dict())
    after = []
    for rank, state in enumerate(states):
        loader = build_loader(cfg, img_size=SIZE, rank=rank, world_size=2)
        loader.load_state_dict(state)
        batches = list(loader)
        assert len(batches) == len(loader) - 4
        after += [v for b in batches for v in b["labels"].tolist()]
    union = before + after
    readers = 2 * max(1, workers)
    # Nothing is read twice unless a reader wrapped around to fill the epoch; what the lost shuffle buffers
    # held (at most `buffer` samples per reader) is replaced by samples read again after a wrap.
    assert len(union) == 48
    missing = set(range(48)) - set(union)
    assert len(missing) <= readers * buffer
    assert len(union) - len(set(union)) == len(missing)


# ----------------------------------------------------------------------------------------------------------------
# Device JPEG decoding (the same code path runs on CPU with torchvision's CPU decoder)


def test_jpeg_decoder_path_on_cpu():
    decoder = JpegDecoder("cpu", SIZE)
    jobs = [{"data": torch.frombuffer(bytearray(encode(i)), dtype=torch.uint8), "box": (2, 3, 15, 20),
             "flip": bool(i % 2), "slot": i, "key": f"k{i}"} for i in range(3)]
    jobs.append({"data": torch.frombuffer(bytearray(b"not a jpeg at all"), dtype=torch.uint8), "box": (0, 0, 5, 5),
                 "flip": False, "slot": 3, "key": "broken"})
    images, bad = decoder.finish(torch.zeros(4, 3, SIZE, SIZE, dtype=torch.uint8), jobs)
    assert len(bad) == 1 and bad[0].startswith("broken")
    assert dominant(images[:3]) == [0, 1, 2]
    assert images[3].float().mean() > 0  # refilled from another image of the batch


def test_gpu_augment_defers_only_decodable_jpegs(tmp_path):
    from hybrid_distill.data.loader import Augment

    aug = Augment(SIZE, (0.5, 1.0), True, 0, gpu=True)
    job = aug.process(encode(0), sample_rng(0, 0, 0))
    assert isinstance(job, dict) and set(job) == {"data", "box", "flip"}
    png = aug.process(encode(1, "PNG"), sample_rng(0, 0, 1))
    assert isinstance(png, np.ndarray) and png.shape == (SIZE, SIZE, 3)


def test_single_parquet_file_streams_by_examples_with_idle_workers(tmp_path):
    hf_dataset().to_parquet(str(tmp_path / "one.parquet"))  # one file, one row group: 1 shard < 2 ranks
    cfg = make_cfg(f"hf:{tmp_path / 'one.parquet'}", streaming=True, num_samples=N, num_workers=2)
    loaders = [build_loader(cfg, img_size=SIZE, rank=r, world_size=2) for r in range(2)]
    assert [ld.split_by for ld in loaders] == ["examples", "examples"]
    labels = [int(v) for ld in loaders for b in ld for v in b["labels"]]
    assert sorted(labels) == list(range(N))


def test_streaming_resume_with_other_worker_count_keeps_the_epoch_length(tmp_path, caplog):
    source = write_shards(tmp_path / "wds", n=24, shards=4)
    cfg = make_cfg(source, streaming=True, num_samples=24, num_workers=0)
    first = build_loader(cfg, img_size=SIZE)
    for k, _ in enumerate(first):
        if k == 2:
            break
    resumed = build_loader(make_cfg(source, streaming=True, num_samples=24, num_workers=2), img_size=SIZE)
    resumed.load_state_dict(first.state_dict())
    assert len(list(resumed)) == len(first) - 3
    assert "restarts this epoch's pass" in caplog.text


def test_checkpoint_after_the_last_batch_resumes_like_the_trainer():
    """The trainer saves its own epoch counter with the loader state and calls set_epoch(epoch) on resume."""
    cfg = make_cfg("synthetic", synthetic_size=12, batch_size=4)
    loader = build_loader(cfg, img_size=SIZE)
    loader.set_epoch(0)
    list(loader)
    state = loader.state_dict()  # taken after epoch 0's last batch, trainer epoch still 0
    expected = build_loader(cfg, img_size=SIZE)
    expected.set_epoch(1)
    resumed = build_loader(cfg, img_size=SIZE)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)
    assert list(resumed) == []  # epoch 0 was finished: nothing more to read in it
    resumed.set_epoch(1)
    got = [b["ids"].tolist() for b in resumed]
    assert got == [b["ids"].tolist() for b in expected]


def test_gpu_decode_loader_path_with_a_cpu_device(tmp_path, monkeypatch):
    """The whole data.gpu_decode path, with torchvision's CPU decoder standing in for nvjpeg."""
    root = tmp_path / "imgs" / "only"
    root.mkdir(parents=True)
    for i in range(5):
        (root / f"{i}.jpg").write_bytes(encode(0))  # red JPEGs: deferred to the device decoder
    (root / "5.png").write_bytes(encode(0, "PNG"))  # not a JPEG: decoded in the worker
    (root / "6.jpg").write_bytes(encode(0)[:200])  # header parses, decoding fails on the "device" and in PIL
    (root / "7.jpg").write_bytes(b"garbage")  # fails in the worker already
    cfg = make_cfg(f"folder:{tmp_path / 'imgs'}", batch_size=4, gpu_decode=True, max_bad_fraction=0.5)
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        loader = build_loader(cfg, img_size=SIZE, cache_dir=tmp_path / "cache")
    loader._pin = False
    loader._decoder = JpegDecoder("cpu", SIZE)
    batches = list(loader)
    assert len(batches) == 2 and loader.bad_samples == 2
    for b in batches:
        assert b["images"].shape == (4, 3, SIZE, SIZE) and dominant(b["images"]) == [0, 0, 0, 0]
