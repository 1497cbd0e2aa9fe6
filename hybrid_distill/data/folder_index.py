"""The file list of an image folder: built once in parallel, cached on disk, memory-mapped by every reader.

Layout ``root/CLASS/.../file.jpg`` (labels = sorted class-directory order) or flat ``root/file.jpg``
(labels -1). The index is three arrays, never a Python object per file:

- ``names``: every path relative to its class directory, UTF-8, concatenated (uint8),
- ``offsets``: start of each name in ``names`` (uint32 while names < 4 GiB, else int64), plus the end,
- ``labels``: class index per file (int32).

For ImageNet-21K (``n01440764/n01440764_10026.JPEG``) that is ~20 B of name + 4 B offset + 4 B label,
about 28 bytes per sample (~400 MB for 14M files), mapped read-only and shared through the page cache by
every rank and worker on a node. The cache directory is keyed by the absolute root path and the
modification times of the root and of every class directory, and is written atomically (temp dir + rename)
under a file lock, so concurrent ranks scan the tree once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from hybrid_distill.errors import DataError

logger = logging.getLogger("hybrid_distill.data")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"})
_FORMAT_VERSION = 1


class FolderIndex:
    """A memory-mapped file list of an image folder (see the module docstring for the layout)."""

    def __init__(self, root: Path, index_dir: Path) -> None:
        self.root = root
        self.index_dir = index_dir
        self._open()

    def _open(self) -> None:
        self.names = np.load(self.index_dir / "names.npy", mmap_mode="r")
        self.offsets = np.load(self.index_dir / "offsets.npy", mmap_mode="r")
        self.labels = np.load(self.index_dir / "labels.npy", mmap_mode="r")
        self.classes: list[str] = json.loads((self.index_dir / "classes.json").read_text())

    def __getstate__(self) -> dict:
        return {"root": self.root, "index_dir": self.index_dir}  # workers re-map the files, never copy them

    def __setstate__(self, state: dict) -> None:
        self.root, self.index_dir = state["root"], state["index_dir"]
        self._open()

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        """Absolute path of file ``i``."""
        name = bytes(self.names[int(self.offsets[i]):int(self.offsets[i + 1])]).decode("utf-8", "surrogateescape")
        label = int(self.labels[i])
        return os.path.join(self.root, self.classes[label], name) if label >= 0 else os.path.join(self.root, name)

    def label(self, i: int) -> int:
        """Class index of file ``i`` (-1 for a flat folder)."""
        return int(self.labels[i])

    @property
    def bytes_per_sample(self) -> float:
        """Index size divided by the number of files."""
        total = self.names.nbytes + self.offsets.nbytes + self.labels.nbytes
        return total / max(1, len(self))


def load_folder_index(root: str | Path, cache_dir: str | Path, threads: int = 32) -> FolderIndex:
    """Open the cached index of ``root``, building it (once, under a lock) when missing or stale.

    Args:
        root: image folder (class subdirectories or flat).
        cache_dir: where index directories live.
        threads: scanning threads (directory listing is I/O-bound).
    """
    root = Path(root).resolve()
    class_dirs = _class_dirs(root)
    if class_dirs:
        _warn_loose_images(root, class_dirs)
    index_dir = Path(cache_dir) / f"folder_index-{_fingerprint(root, class_dirs)}"
    if not (index_dir / "done").exists():
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        with _file_lock(Path(cache_dir) / f"{index_dir.name}.lock"):
            if not (index_dir / "done").exists():
                _build(root, class_dirs, index_dir, threads)
    index = FolderIndex(root, index_dir)
    if len(index) == 0:
        raise DataError(f"data.source folder {str(root)!r} holds no image files "
                                f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return index


def _warn_loose_images(root: Path, class_dirs: list[str]) -> None:
    """Class layout: images directly in ``root`` are not part of any class and are not read; say so."""
    with os.scandir(root) as entries:
        loose = sum(1 for e in entries if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
    if loose:
        logger.warning("data.source folder %s has class subdirectories (%s), so its %d image files at the top level "
                       "are ignored; put every image in a class directory, or use a folder without subdirectories",
                       root, ", ".join(class_dirs[:3]) + (", ..." if len(class_dirs) > 3 else ""), loose)


def _class_dirs(root: Path) -> list[str]:
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries if e.is_dir(follow_symlinks=True) and not e.name.startswith("."))


def _fingerprint(root: Path, class_dirs: list[str]) -> str:
    digest = hashlib.sha1(f"v{_FORMAT_VERSION}|{root}|{root.stat().st_mtime_ns}".encode())
    for name in class_dirs:
        digest.update(f"|{name}:{(root / name).stat().st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _build(root: Path, class_dirs: list[str], index_dir: Path, threads: int) -> None:
    start = time.perf_counter()
    if class_dirs:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            parts = list(pool.map(lambda name: _scan_dir(root / name), class_dirs))
    else:
        parts = [_scan_dir(root, recursive=False)]
    names = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.uint8)
    lengths = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    offsets = np.zeros(len(lengths) + 1, np.uint32 if names.size < 2**32 else np.int64)
    np.cumsum(lengths, out=offsets[1:])
    labels = np.concatenate([np.full(len(p[1]), i if class_dirs else -1, np.int32) for i, p in enumerate(parts)]
                            ) if parts else np.zeros(0, np.int32)
    tmp = Path(tempfile.mkdtemp(prefix=f".{index_dir.name}-", dir=index_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; other users of a shared run dir may read it
    np.save(tmp / "names.npy", names)
    np.save(tmp / "offsets.npy", offsets)
    np.save(tmp / "labels.npy", labels)
    (tmp / "classes.json").write_text(json.dumps(class_dirs))
    (tmp / "root.txt").write_text(str(root))
    (tmp / "done").write_text("")
    os.replace(tmp, index_dir)
    logger.info("indexed %d files in %d classes under %s in %.1fs (%.1f bytes/sample) -> %s", len(labels),
                len(class_dirs), root, time.perf_counter() - start,
                (names.nbytes + offsets.nbytes + labels.nbytes) / max(1, len(labels)), index_dir)


def _scan_dir(directory: Path, recursive: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Image files under ``directory`` (sorted relative paths) as (concatenated UTF-8 bytes, lengths)."""
    found: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(directory / rel if rel else directory) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=True):
                    if recursive:
                        stack.append(f"{rel}{entry.name}/")
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    found.append(rel + entry.name)
    found.sort()
    encoded = [name.encode("utf-8", "surrogateescape") for name in found]
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    return np.frombuffer(b"".join(encoded), np.uint8), lengths


class _file_lock:  # noqa: N801 - used like a function
    """Exclusive advisory lock on ``path`` (a no-op where the filesystem refuses locks)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError:
            logger.warning("cannot lock %s; each process may scan the folder itself", self.path)

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
