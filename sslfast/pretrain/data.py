"""Encoded-image datasets, GPU-side decoding and loaders for pretraining.

Samples travel through the DataLoader as encoded bytes (JPEG or PNG) and are decoded
on the training device in the main process (``decode_images``), where the GPU
augmentation takes over. Workers only read files. Two sources share this path:
a folder of images (``EncodedImages.from_folder``) and ``embedded_dataset``, a
labelled synthetic set generated in code, so that examples, tests and the kNN
evaluation run without a download.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import NamedTuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

EMBEDDED_CLASSES = (
    "disc",
    "square",
    "triangle",
    "cross",
    "star",
    "ring",
    "bar_pair",
    "x",
    "diamond",
    "half_disc",
)
EMBEDDED_SIZES = {"train": 5000, "test": 1000}
# Disjoint seeds per split; the second word just keeps them apart from user seeds.
_EMBEDDED_SEEDS = {"train": (0, 0x551F), "test": (1, 0x551F)}

PathLike = Union[str, "os.PathLike[str]"]


def _torchvision_io():
    try:
        import torchvision.io as tvio
    except ImportError as exc:  # pragma: no cover - torchvision is installed with [bench]
        raise ImportError(
            "sslfast.pretrain needs torchvision to encode and decode images "
            "(pip install torchvision)"
        ) from exc
    return tvio


class EncodedImages(Dataset):
    """Encoded images (JPEG/PNG) with integer labels.

    ``items`` are either encoded buffers (``bytes`` or uint8 tensors), kept in one
    contiguous uint8 tensor, or file paths, read lazily in ``__getitem__`` (so
    DataLoader workers do the reading). Both are stored without one Python object
    per sample, which keeps forked workers from copying the list page by page.

    ``dataset[i]`` is ``(uint8 1-D tensor of the encoded bytes, int label)``.
    """

    def __init__(
        self,
        items: Sequence[bytes | torch.Tensor | PathLike],
        labels: Sequence[int] | torch.Tensor,
        classes: Sequence[str] | None = None,
    ):
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if len(items) != labels.numel():
            raise ValueError(
                f"items and labels differ in length: {len(items)} != {labels.numel()}"
            )
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError("labels must be non-negative")
        if classes is None:
            n = int(labels.max()) + 1 if labels.numel() else 0
            classes = [str(i) for i in range(n)]
        classes = list(classes)
        if labels.numel() and int(labels.max()) >= len(classes):
            raise ValueError(
                f"labels reach {int(labels.max())} but there are {len(classes)} classes"
            )
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self._labels = labels
        self._paths: np.ndarray | None = None
        self._data: torch.Tensor | None = None
        self._offsets: torch.Tensor | None = None

        kinds = {_item_kind(x) for x in items}
        if kinds == {"path"}:
            self._paths = np.array([os.fspath(p) for p in items], dtype=np.str_)
        elif kinds <= {"buffer"}:
            chunks = [_as_uint8(x) for x in items]
            lengths = torch.tensor([0] + [c.numel() for c in chunks], dtype=torch.int64)
            self._offsets = lengths.cumsum(0)
            self._data = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
        else:
            raise TypeError(
                "items must be all encoded buffers (bytes or uint8 tensors) or all file "
                f"paths, got {sorted(kinds)}"
            )

    @classmethod
    def from_folder(cls, root: PathLike) -> EncodedImages:
        """An ImageFolder tree: ``root/<class>/**/<image>.jpg|jpeg|png``.

        Classes are the sub-folders of ``root``, sorted, indexed like torchvision's
        ``ImageFolder``; files are listed in sorted order, recursively.
        """
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root!r}")
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not classes:
            raise ValueError(f"no class folders in {root!r} (expected root/<class>/<image>)")
        paths, labels, empty = [], [], []
        for idx, name in enumerate(classes):
            found = 0
            for dirpath, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        paths.append(os.path.join(dirpath, f))
                        labels.append(idx)
                        found += 1
            if not found:
                empty.append(name)
        if not paths:
            raise ValueError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {root!r}"
            )
        if empty:
            raise ValueError(f"class folders without images in {root!r}: {empty}")
        return cls(paths, labels, classes)

    @classmethod
    def _from_packed(cls, data, offsets, labels, classes) -> EncodedImages:
        """From buffers already packed as one uint8 tensor and N + 1 offsets (shared)."""
        ds = cls([], [], classes)
        ds._data, ds._offsets, ds._labels = data, offsets, labels.clone()
        return ds

    def __len__(self) -> int:
        return self._labels.numel()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = int(self._labels[index])
        if self._paths is not None:
            with open(str(self._paths[index]), "rb") as f:
                data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        else:
            if index < 0:
                index += len(self)
            lo, hi = int(self._offsets[index]), int(self._offsets[index + 1])
            data = self._data[lo:hi].clone()  # own storage: workers send only this sample
        return data, label

    @property
    def labels(self) -> torch.Tensor:
        """All labels, int64 (a copy)."""
        return self._labels.clone()

    @property
    def targets(self) -> list[int]:
        """All labels as a list (torchvision's name)."""
        return self._labels.tolist()

    def __repr__(self) -> str:
        source = "files" if self._paths is not None else "buffers"
        return f"EncodedImages({len(self)} {source}, {len(self.classes)} classes)"


def _item_kind(x) -> str:
    if isinstance(x, (bytes, bytearray, memoryview, torch.Tensor)):
        return "buffer"
    if isinstance(x, (str, os.PathLike)):
        return "path"
    return type(x).__name__


def _as_uint8(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.uint8 or x.dim() != 1:
            raise TypeError(
                f"encoded tensors must be uint8 and 1-D, got {x.dtype} {tuple(x.shape)}"
            )
        return x.detach().cpu()
    return torch.frombuffer(bytearray(x), dtype=torch.uint8)


# --------------------------------------------------------------------------- embedded


def embedded_dataset(
    split: str = "train", size: int | None = None, image_size: int = 32
) -> EncodedImages:
    """A labelled synthetic image set generated in code (no download).

    Ten classes, one per shape (``EMBEDDED_CLASSES``), drawn at a random position,
    scale and rotation (±15°, small enough that cross/x and square/diamond stay
    apart), in a random foreground colour on a random background colour with a
    faint gradient and noise. Colour varies most between images and carries no
    label, so raw pixels and random features cluster by colour; the label is the
    shape. Images are RGB ``image_size`` × ``image_size`` JPEGs (quality 90), labels
    balanced (``size`` default 5000 train / 1000 test). Deterministic: a fixed seed
    per split, disjoint between train and test; cached per process.
    """
    if split not in EMBEDDED_SIZES:
        raise ValueError(f"split must be one of {sorted(EMBEDDED_SIZES)}, got {split!r}")
    size = EMBEDDED_SIZES[split] if size is None else int(size)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if int(image_size) < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    data, offsets, labels = _embedded_bytes(split, size, int(image_size))
    return EncodedImages._from_packed(data, offsets, labels, EMBEDDED_CLASSES)


@functools.lru_cache(maxsize=8)
def _embedded_bytes(split: str, size: int, image_size: int):
    rng = np.random.default_rng(_EMBEDDED_SEEDS[split])
    n_cls = len(EMBEDDED_CLASSES)
    labels = rng.permutation(np.arange(size) % n_cls)
    chunk = 1024  # bounds the float32 working set to a few MB per chunk
    encoded = []
    tvio = _torchvision_io()
    for lo in range(0, size, chunk):
        images = _render_shapes(labels[lo : lo + chunk], image_size, rng)
        tensors = list(torch.from_numpy(images).permute(0, 3, 1, 2))
        encoded.extend(tvio.encode_jpeg(tensors, quality=90))
    lengths = torch.tensor([0] + [e.numel() for e in encoded], dtype=torch.int64)
    return torch.cat(encoded), lengths.cumsum(0), torch.from_numpy(labels.astype(np.int64))


def _box(x, y, hx, hy):
    return np.maximum(np.abs(x) - hx, np.abs(y) - hy)


def _shape_distance(cls: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) to shape ``cls`` of radius about 1, y up.

    Polygons are intersections of half-planes: exact near the edges, which is all
    the one-pixel soft edge needs.
    """
    name = EMBEDDED_CLASSES[cls]
    r = np.hypot(x, y)
    if name == "disc":
        return r - 0.9
    if name == "square":
        return _box(x, y, 0.75, 0.75)
    if name == "triangle":  # equilateral, apex up, circumradius 1.1
        normals = ((0.0, -1.0), (np.sqrt(3) / 2, 0.5), (-np.sqrt(3) / 2, 0.5))
        return np.max([nx * x + ny * y for nx, ny in normals], axis=0) - 0.55
    if name == "cross":
        return np.minimum(_box(x, y, 0.95, 0.25), _box(x, y, 0.25, 0.95))
    if name == "star":  # five points up; radius between 0.45 and 1.05, linear in angle
        t = (np.arctan2(x, y) * (5 / (2 * np.pi))) % 1.0
        return r - (0.45 + 0.6 * np.abs(2 * t - 1) ** 1.5)
    if name == "ring":
        return np.abs(r - 0.75) - 0.2
    if name == "bar_pair":
        return np.minimum(_box(x, y - 0.5, 0.95, 0.2), _box(x, y + 0.5, 0.95, 0.2))
    if name == "x":
        u, v = (x + y) / np.sqrt(2), (x - y) / np.sqrt(2)
        return np.minimum(_box(u, v, 0.95, 0.22), _box(u, v, 0.22, 0.95))
    if name == "diamond":  # taller than wide, so not a rotated square
        return (np.abs(x) / 0.6 + np.abs(y) / 1.0 - 1.0) * 0.5
    if name == "half_disc":  # flat side down, shifted so its area is centred
        return np.maximum(np.hypot(x, y + 0.4) - 1.0, -(y + 0.4))
    raise AssertionError(name)


def _random_colours(rng, n: int, away_from: np.ndarray | None = None, tries: int = 8):
    """RGB colours in [0, 1]; at least 0.45 (euclidean) from ``away_from`` when given."""
    c = rng.random((tries, n, 3), dtype=np.float32)
    if away_from is None:
        return c[0]
    ok = np.linalg.norm(c - away_from[None], axis=-1) >= 0.45  # (tries, n)
    picked = c[ok.argmax(0), np.arange(n)]  # the first far-enough try
    far_corner = np.where(away_from > 0.5, 0.0, 1.0).astype(np.float32)
    return np.where(ok.any(0)[:, None], picked, far_corner)


def _render_shapes(labels: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """(N, s, s, 3) uint8 images of the shapes ``labels``."""
    n = len(labels)
    radius = rng.uniform(0.22, 0.36, n).astype(np.float32) * s  # pixels per shape unit
    margin = radius * 0.9
    cx = margin + rng.random(n, dtype=np.float32) * (s - 2 * margin)
    cy = margin + rng.random(n, dtype=np.float32) * (s - 2 * margin)
    angle = np.deg2rad(rng.uniform(-15.0, 15.0, n)).astype(np.float32)
    bg = _random_colours(rng, n)
    fg = _random_colours(rng, n, away_from=bg)
    grad_dir = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    grad_amp = rng.uniform(0.0, 0.12, n).astype(np.float32)

    pix = np.arange(s, dtype=np.float32) + 0.5
    py, px = np.meshgrid(pix, pix, indexing="ij")  # (s, s)
    dx = px[None] - cx[:, None, None]
    dy = cy[:, None, None] - py[None]  # y up
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    x = (cos * dx + sin * dy) / radius[:, None, None]
    y = (-sin * dx + cos * dy) / radius[:, None, None]

    dist = np.empty((n, s, s), dtype=np.float32)
    for c in np.unique(labels):
        sel = labels == c
        dist[sel] = _shape_distance(int(c), x[sel], y[sel])
    alpha = np.clip(0.5 - dist * radius[:, None, None], 0.0, 1.0)[..., None]  # 1-px edge

    ramp = (np.cos(grad_dir)[:, None, None] * (px[None] / s - 0.5)
            + np.sin(grad_dir)[:, None, None] * (py[None] / s - 0.5))
    background = bg[:, None, None, :] + (grad_amp[:, None, None] * ramp)[..., None]
    img = background * (1 - alpha) + fg[:, None, None, :] * alpha
    img += rng.normal(0.0, 0.03, img.shape).astype(np.float32)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- batches


class PackedBuffers(NamedTuple):
    """A batch's encoded images in one uint8 tensor: ``data`` holds them end to end,
    ``sizes`` (int64) their lengths. One tensor crosses from a DataLoader worker and is
    pinned, not one per image (which, 256 to a batch, also holds that many file
    descriptors in flight under torch's default sharing strategy)."""

    data: torch.Tensor
    sizes: torch.Tensor

    @classmethod
    def pack(cls, buffers: Sequence[torch.Tensor]) -> PackedBuffers:
        sizes = torch.tensor([b.numel() for b in buffers], dtype=torch.int64)
        flat = [b.reshape(-1) for b in buffers]
        data = torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8)
        return cls(data, sizes)

    def unpack(self) -> list[torch.Tensor]:
        """The images' buffers: views into ``data``."""
        return list(self.data.split(self.sizes.tolist()))


def collate_encoded(batch) -> tuple[PackedBuffers, torch.Tensor]:
    """``[(bytes, label), ...]`` → (the buffers packed, int64 labels)."""
    buffers = PackedBuffers.pack([b for b, _ in batch])
    labels = torch.tensor([int(y) for _, y in batch], dtype=torch.int64)
    return buffers, labels


def _is_jpeg(buf: torch.Tensor) -> bool:
    return buf.numel() >= 3 and buf[:3].tolist() == [0xFF, 0xD8, 0xFF]


def decode_images(encoded: Sequence[torch.Tensor] | PackedBuffers, device) -> list[torch.Tensor]:
    """Decode buffers (a sequence of uint8 1-D tensors, or ``PackedBuffers``) to RGB
    uint8 ``(3, H, W)`` tensors on ``device``.

    On CUDA, JPEGs are decoded in one batched nvJPEG call; other formats (PNG) and
    JPEGs nvJPEG refuses are decoded on the CPU and moved. Grayscale and alpha
    images become 3-channel RGB.
    """
    tvio = _torchvision_io()
    rgb = tvio.ImageReadMode.RGB
    device = torch.device(device)
    if isinstance(encoded, PackedBuffers):
        encoded = encoded.unpack()
    buffers = [b if b.device.type == "cpu" else b.cpu() for b in encoded]
    out: list[torch.Tensor | None] = [None] * len(buffers)
    if device.type == "cuda":
        jpeg_idx = [i for i, b in enumerate(buffers) if _is_jpeg(b)]
        if jpeg_idx:
            # nvJPEG may write on its own stream into blocks the caching allocator just
            # freed from work still queued on ours (pytorch/vision#9606, torchcodec#1634):
            # let that work finish first. The decode waits for its result anyway.
            torch.cuda.current_stream(device).synchronize()
            try:
                decoded = tvio.decode_jpeg([buffers[i] for i in jpeg_idx], device=device, mode=rgb)
            except RuntimeError:  # e.g. CMYK or corrupt-but-readable files: one by one on CPU
                decoded = [None] * len(jpeg_idx)
            for i, img in zip(jpeg_idx, decoded):
                out[i] = img
    for i, img in enumerate(out):
        if img is None:
            img = tvio.decode_image(buffers[i], mode=rgb)
            out[i] = img.to(device, non_blocking=True) if device.type != "cpu" else img
    return out


def stack_if_same_size(images: list[torch.Tensor]):
    """A ``(B, 3, H, W)`` tensor when all images share one size, else ``images``."""
    if images and all(img.shape == images[0].shape for img in images):
        return torch.stack(images)
    return images


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool,
    num_workers: int,
    sampler=None,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader of encoded batches (``collate_encoded``).

    With a ``sampler`` (e.g. a ``DistributedSampler``) the sampler decides the order
    and ``shuffle`` is ignored. A generator seeded with ``seed`` makes the shuffle
    order (and the workers' base seed) reproducible.
    """
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else None,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate_encoded,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        generator=generator,
    )
