"""Bad and odd images: decoded to the right RGB, or skipped and counted exactly; too many abort clearly."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hybrid_distill.config import DataConfig
from hybrid_distill.data import build_loader
from hybrid_distill.data.decode import decode_crop, sample_rng, to_rgb

SIZE = 16
RED = (230, 20, 20)


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def odd_images() -> dict[str, bytes]:
    """Decodable images in unusual forms; all show (close to) RED except where named otherwise."""
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette(list(RED) + [0, 0, 0] * 255)
    transparent = Image.new("P", (20, 20), 1)
    transparent.putpalette(list(RED) + [0, 0, 0] * 255)
    transparent.info["transparency"] = 1  # palette entry 1 (black) is fully transparent -> white
    sixteen = Image.fromarray(np.full((20, 20), 50000, np.uint16))  # 16-bit gray -> 194
    dark16 = Image.fromarray(np.full((20, 20), 200, np.uint16))  # 16-bit, nearly black: 200/257 -> 1, not 200
    return {
        "rgb.jpg": jpeg_bytes(Image.new("RGB", (30, 20), RED)),
        "cmyk.jpg": jpeg_bytes(Image.new("CMYK", (30, 20), (0, 235, 235, 25))),
        "gray.jpg": jpeg_bytes(Image.new("L", (30, 20), 128)),
        "progressive.jpg": jpeg_bytes(Image.new("RGB", (40, 30), RED), progressive=True),
        "palette.png": png_bytes(palette),
        "palette_transparent.png": png_bytes(transparent),
        "rgba.png": png_bytes(Image.new("RGBA", (20, 20), (*RED, 255))),
        "rgba_clear.png": png_bytes(Image.new("RGBA", (20, 20), (0, 0, 0, 0))),
        "la.png": png_bytes(Image.new("LA", (20, 20), (0, 0))),
        "gray16.png": png_bytes(sixteen),
        "gray16_dark.png": png_bytes(dark16),
        "tiny.png": png_bytes(Image.new("RGB", (1, 1), RED)),
        "huge.jpg": jpeg_bytes(Image.new("RGB", (4000, 3000), RED), quality=50),
    }


EXPECTED_MEAN = {"gray.jpg": (128, 128, 128), "palette_transparent.png": (255, 255, 255),
                 "rgba_clear.png": (255, 255, 255), "la.png": (255, 255, 255), "gray16.png": (194, 194, 194),
                 "gray16_dark.png": (1, 1, 1)}


def broken_images() -> dict[str, bytes]:
    good = jpeg_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    return {"truncated.jpg": good[: len(good) // 2], "random.jpg": np.random.default_rng(1).bytes(3000),
            "empty.jpg": b""}


@pytest.mark.parametrize("name", sorted(odd_images()))
def test_odd_images_decode_to_the_right_rgb(name):
    out = decode_crop(odd_images()[name], SIZE, sample_rng(0, 0, 0), (0.5, 1.0), True)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    expected = np.array(EXPECTED_MEAN.get(name, RED), np.float64)
    assert np.abs(out.reshape(-1, 3).mean(0) - expected).max() < 12, out.reshape(-1, 3).mean(0)


@pytest.mark.parametrize("name", sorted(broken_images()))
def test_broken_images_raise(name):
    with pytest.raises(Exception):  # noqa: B017 - any PIL error; the loader counts it
        decode_crop(broken_images()[name], SIZE, sample_rng(0, 0, 0), (0.5, 1.0), True)


def test_huge_jpeg_is_drafted():
    img = Image.open(io.BytesIO(odd_images()["huge.jpg"]))
    from hybrid_distill.data.decode import _draft

    box = _draft(img, (0, 0, 4000, 3000), SIZE)
    assert img.size == (500, 375) and box == (0, 0, 500, 375)  # libjpeg decodes at 1/8 scale


def test_to_rgb_alpha_on_white():
    half = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    assert abs(int(np.asarray(to_rgb(half))[0, 0, 0]) - 127) <= 1


def write_salted_folder(root: Path, copies: int = 2) -> int:
    """Class ``ok`` holds good and odd images, class ``zz`` the broken ones; returns the number of broken files."""
    (root / "ok").mkdir(parents=True)
    (root / "zz").mkdir()
    for c in range(copies):
        for name, data in odd_images().items():
            (root / "ok" / f"{c}_{name}").write_bytes(data)
    for name, data in broken_images().items():
        (root / "zz" / name).write_bytes(data)
    return len(broken_images())


def test_salted_folder_trains_through_counting_exactly_the_broken(tmp_path, caplog):
    broken = write_salted_folder(tmp_path / "imgs")  # 24 odd + 3 broken = 27 files
    cfg = DataConfig(source=f"folder:{tmp_path / 'imgs'}", batch_size=3, num_workers=2, max_bad_fraction=0.2)
    loader = build_loader(cfg, img_size=SIZE, cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="hybrid_distill.data"):
        batches = list(loader)
    assert len(batches) == 9 and all(b["images"].shape == (3, 3, SIZE, SIZE) for b in batches)
    assert loader.bad_samples == broken
    logged = " ".join(r.getMessage() for r in caplog.records)
    for name in broken_images():
        assert name in logged
    assert all(int(label) == 0 for b in batches for label in b["labels"])  # bad slots were refilled from "ok"
    assert loader.state_dict()["bad_samples"] == broken


def test_too_many_bad_samples_are_judged_with_a_clear_message(tmp_path):
    """The loader counts; the trainer asks ``bad_fraction_problem`` with the counts of all ranks at each step (and
    saves, then exits 65: tests/test_faults.py)."""
    write_salted_folder(tmp_path / "imgs", copies=1)  # 3 broken of 15
    cfg = DataConfig(source=f"folder:{tmp_path / 'imgs'}", batch_size=3, num_workers=0, max_bad_fraction=0.1)
    loader = build_loader(cfg, img_size=SIZE, cache_dir=tmp_path / "cache")
    list(loader)
    assert (loader.bad_samples, loader.samples_read) == (3, 15)
    problem = loader.bad_fraction_problem(loader.bad_samples, loader.samples_read)
    assert f"3 of 15 samples read from data.source='folder:{tmp_path / 'imgs'}'" in problem
    assert "20.00% > data.max_bad_fraction=0.1" in problem and "--resume auto" in problem
    assert loader.bad_fraction_problem(1, 15) is None  # within the fraction
    assert loader.bad_fraction_problem(3, 14) is None  # fewer than min(1000, samples per epoch) read yet


def write_shard(shard: Path, members: list[tuple[str, bytes, int]]) -> None:
    """A webdataset tar: each ``(name.jpg, bytes, label)`` as ``name.jpg`` beside ``name.cls``."""
    with tarfile.open(shard, "w") as tar:
        for name, data, label in members:
            for member, payload in ((name, data), (name.replace(".jpg", ".cls"), str(label).encode())):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_streaming_shard_with_corrupt_images_keeps_streaming(tmp_path):
    shard = tmp_path / "shard-000.tar"
    members = []
    for i in range(10):
        members.append((f"{i:04d}.jpg", jpeg_bytes(Image.new("RGB", (20, 20), RED)), i))
    members[3] = ("0003.jpg", broken_images()["truncated.jpg"], 3)
    members[7] = ("0007.jpg", broken_images()["random.jpg"], 7)
    write_shard(shard, members)
    cfg = DataConfig(source=f"wds:{shard}", streaming=True, num_samples=8, batch_size=2, num_workers=0,
                     shuffle_buffer=2, max_bad_fraction=0.3)
    loader = build_loader(cfg, img_size=SIZE)
    labels = [int(v) for b in loader for v in b["labels"]]
    assert sorted(labels) == [0, 1, 2, 4, 5, 6, 8, 9]
    assert loader.bad_samples == 2


def test_decompression_bomb_is_skipped_and_counted(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL raises above 2x this: 100x100 is a "bomb"
    bomb = jpeg_bytes(Image.new("RGB", (100, 100), (20, 20, 230)))
    with pytest.raises(Image.DecompressionBombError):  # what PIL does by itself
        decode_crop(bomb, SIZE, sample_rng(0, 0, 0), (0.5, 1.0), False)
    root = tmp_path / "imgs" / "only"
    root.mkdir(parents=True)
    for i in range(3):
        (root / f"{i}.jpg").write_bytes(jpeg_bytes(Image.new("RGB", (20, 20), RED)))
    (root / "bomb.jpg").write_bytes(bomb)
    cfg = DataConfig(source=f"folder:{tmp_path / 'imgs'}", batch_size=4, num_workers=0, max_bad_fraction=0.5)
    loader = build_loader(cfg, img_size=SIZE, cache_dir=tmp_path / "cache")  # one batch: all four files
    with caplog.at_level(logging.WARNING, logger="hybrid_distill.data"):
        (batch,) = list(loader)
    assert loader.bad_samples == 1 and "bomb.jpg" in caplog.text and "DecompressionBomb" in caplog.text
    red = torch.tensor(RED, dtype=torch.float32).view(1, 3, 1, 1)
    assert (batch["images"].float() - red).abs().amax() < 10  # the bomb's slot refilled with a red image


def test_a_streamed_bad_sample_re_read_after_a_resume_counts_once(tmp_path):
    """A resume re-reads what was in the shuffle buffer; the bad files among it were counted again (10 of 8)."""
    shard = tmp_path / "shard-000.tar"
    write_shard(shard, [(f"{i:04d}.jpg", b"not an image" if i % 5 == 0 else
                         jpeg_bytes(Image.new("RGB", (20, 20), (i, 0, 0))), i) for i in range(40)])
    cfg = DataConfig(source=f"wds:{shard}", streaming=True, num_samples=32, batch_size=4, num_workers=0,
                     shuffle_buffer=4, max_bad_fraction=0.5)
    uninterrupted = build_loader(cfg, img_size=SIZE)
    list(uninterrupted)
    first = build_loader(cfg, img_size=SIZE)
    batches = iter(first)
    for _ in range(3):
        next(batches)
    state = first.state_dict()
    resumed = build_loader(cfg, img_size=SIZE)
    resumed.load_state_dict(state)
    list(resumed)
    assert uninterrupted.bad_samples == 8  # every fifth of the 40 files
    assert resumed.bad_samples == 8
