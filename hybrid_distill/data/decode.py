"""Robust image decoding and the one RandomResizedCrop + horizontal flip per sample, on uint8.

Everything here works on one sample and raises on an undecodable image; the caller (``data.py``) counts
and replaces such samples. The crop follows torchvision's ``RandomResizedCrop.get_params`` but draws from a
``numpy`` generator seeded by (seed, epoch, sample), so a sample's crop is the same after a resume.

Decoding rules (documented in docs/data.md):

- JPEG: ``draft()`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the crop still keeps at least
  ``size`` pixels each way, so a 4000x3000 photo costs about as much as a 500x375 one.
- Grayscale, CMYK, palette and 16-bit images are converted to RGB; images with alpha (RGBA, LA, PA,
  palette with transparency) are composited on white.
- Images above PIL's decompression-bomb limit (about 179 MP) raise and are skipped as bad.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image

#: What a source hands over for one sample: encoded bytes, a file path, or a decoded HWC uint8 array.
Payload = bytes | str | np.ndarray

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_RESIZE_FIRST_MODES = ("RGB", "L", "CMYK")  # crop+resize in this mode, then convert the small result
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


def sample_rng(seed: int, epoch: int, index: int, salt: int = 0) -> np.random.Generator:
    """The augmentation generator of one sample.

    Args:
        seed: run seed.
        epoch: epoch number.
        index: sample index (map-style) or a per-worker position (streaming).
        salt: extra stream id (rank/worker for streaming, retry attempt for replacements).
    """
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, index, salt])


def crop_params(rng: np.random.Generator, width: int, height: int,
                scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (top, left, height, width), torchvision's algorithm with ratio (3/4, 4/3).

    Args:
        rng: the sample's generator.
        width: image width in pixels.
        height: image height in pixels.
        scale: range of the crop area as a fraction of the image area.
    """
    area = width * height
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*_LOG_RATIO))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    ratio = width / height  # fallback: central crop at the nearest allowed aspect ratio
    if ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif ratio > 4 / 3:
        h, w = height, int(round(height * (4 / 3)))
    else:
        w, h = width, height
    h, w = min(h, height), min(w, width)
    return (height - h) // 2, (width - w) // 2, h, w


def open_image(payload: bytes | str) -> Image.Image:
    """Open (lazily: header only) an encoded image from bytes or a path."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(payload))
    return Image.open(payload)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; alpha is composited on white, 16/32-bit gray is scaled to 8 bits."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:  # 16-bit by mode, even when dark
            arr = arr / 257.0
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return img.convert("RGB")


def decode_crop(payload: Payload, size: int, rng: np.random.Generator, scale: tuple[float, float],
                hflip: bool) -> np.ndarray:
    """Decode one image and return its random-resized crop as HWC uint8 RGB of shape (size, size, 3) (maybe a view).

    Args:
        payload: encoded bytes, a file path, or an HWC uint8 array (synthetic data).
        size: output side length.
        rng: the sample's generator (crop box, then flip).
        scale: RandomResizedCrop area range.
        hflip: flip horizontally with probability 0.5.

    Raises:
        Exception: whatever PIL raises for an undecodable image (the caller counts it as bad).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EXIF / palette-transparency / bomb-size warnings from PIL
        img = Image.fromarray(payload) if isinstance(payload, np.ndarray) else open_image(payload)
        box = crop_params(rng, *img.size, scale)
        return _crop_resize(img, box, hflip and rng.random() < 0.5, size)


def decode_box(payload: Payload, box: tuple[int, int, int, int], flip: bool, size: int) -> np.ndarray:
    """Like ``decode_crop`` with a given crop box (top, left, height, width) and flip."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = Image.fromarray(payload) if isinstance(payload, np.ndarray) else open_image(payload)
        return _crop_resize(img, box, flip, size)


def _crop_resize(img: Image.Image, box: tuple[int, int, int, int], flip: bool, size: int) -> np.ndarray:
    top, left, h, w = box
    pil_box: tuple[float, ...] = (left, top, left + w, top + h)
    if img.format == "JPEG":
        pil_box = _draft(img, pil_box, size)
    if img.mode not in _RESIZE_FIRST_MODES:
        img = to_rgb(img)
    out = img.resize((size, size), Image.BILINEAR, box=pil_box, reducing_gap=3.0)
    arr = np.asarray(to_rgb(out))
    return arr[:, ::-1] if flip else arr  # a view: the caller copies it into the batch anyway


def _draft(img: Image.Image, box: tuple[float, float, float, float], size: int) -> tuple[float, ...]:
    """Let libjpeg decode at a reduced scale that still leaves >= ``size`` pixels in the crop; rescale the box."""
    width, height = img.size
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    request = (max(1, math.ceil(width * size / crop_w)), max(1, math.ceil(height * size / crop_h)))
    img.draft(None, request)
    sx, sy = img.size[0] / width, img.size[1] / height
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def probe_jpeg(payload: bytes) -> tuple[int, int] | None:
    """(width, height) when ``payload`` is a baseline/progressive RGB or gray JPEG nvjpeg can decode, else None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = open_image(payload)
            if img.format == "JPEG" and img.mode in ("RGB", "L"):
                return img.size
    except Exception:  # noqa: BLE001 - an unreadable header is handled by the CPU path
        return None
    return None


class JpegDecoder:
    """Decodes the JPEGs a batch deferred (``data.gpu_decode``) with ``torchvision.io.decode_jpeg`` on a device.

    Workers only read the bytes, parse the header and draw the crop box; here the batch is decoded in one
    call, each crop resized with antialiased bilinear interpolation and flipped. A JPEG the device decoder
    rejects is decoded by PIL; one PIL rejects too is bad: it is counted and its slot gets a copy of
    another image of the batch (so the batch stays full).
    """

    def __init__(self, device: torch.device | str | None, size: int) -> None:
        self._device = torch.device(device) if device is not None else None
        self.size = size

    @property
    def device(self) -> torch.device:
        """The decode device; ``None`` at construction means the current CUDA device at first use."""
        if self._device is None:
            self._device = torch.device("cuda", torch.cuda.current_device())
        return self._device

    def finish(self, images: torch.Tensor, jobs: list[dict]) -> tuple[torch.Tensor, list[str]]:
        """Fill the deferred slots of ``images`` (uint8 [B, 3, S, S]); return it on the device and bad entries."""
        images = images.to(self.device, non_blocking=True)
        if not jobs:
            return images, []
        decoded = self._decode([job["data"] for job in jobs])
        bad_slots, bad = [], []
        for job, img in zip(jobs, decoded, strict=True):
            try:
                images[job["slot"]] = self._crop(img, job) if img is not None else self._pil(job)
            except Exception as error:  # noqa: BLE001 - counted as bad, slot refilled below
                bad_slots.append(job["slot"])
                bad.append(f"{job['key']}: {type(error).__name__}: {error}")
        good = [i for i in range(len(images)) if i not in set(bad_slots)]
        for slot in bad_slots:
            if not good:
                raise RuntimeError(f"no image of the batch could be decoded ({bad[-1]})")
            images[slot] = images[good[slot % len(good)]]
        return images, bad

    def _decode(self, datas: list[torch.Tensor]) -> list[torch.Tensor | None]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
            from torchvision.io import ImageReadMode, decode_jpeg

            return self._decode_with(decode_jpeg, ImageReadMode.RGB, datas)

    def _decode_with(self, decode_jpeg: Any, mode: Any, datas: list[torch.Tensor]) -> list[torch.Tensor | None]:
        try:
            return list(decode_jpeg(datas, mode=mode, device=self.device))
        except Exception:  # noqa: BLE001 - find the culprit(s) one by one
            out: list[torch.Tensor | None] = []
            for data in datas:
                try:
                    out.append(decode_jpeg(data, mode=mode, device=self.device))
                except Exception:  # noqa: BLE001
                    out.append(None)
            return out

    def _crop(self, img: torch.Tensor, job: dict) -> torch.Tensor:
        top, left, h, w = job["box"]
        crop = img[None, :, top:top + h, left:left + w].float()
        out = torch.nn.functional.interpolate(crop, size=(self.size, self.size), mode="bilinear",
                                              antialias=True, align_corners=False)[0]
        out = out.round_().clamp_(0, 255).to(torch.uint8)
        return out.flip(-1) if job["flip"] else out

    def _pil(self, job: dict) -> torch.Tensor:
        arr = decode_box(job["data"].numpy().tobytes(), job["box"], job["flip"], self.size)
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).to(self.device)
