"""Pretraining data path (embedded set, folders, decoding, loaders) and kNN evaluation."""

import time

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")
from torchvision.io import encode_jpeg, encode_png  # noqa: E402

from sslfast.pretrain.data import (  # noqa: E402
    EMBEDDED_CLASSES,
    EncodedImages,
    PackedBuffers,
    _embedded_bytes,
    collate_encoded,
    decode_images,
    embedded_dataset,
    make_loader,
    stack_if_same_size,
)
from sslfast.pretrain.knn import extract_features, knn_accuracy, knn_predict  # noqa: E402
from tests.utils import spawn_gloo  # noqa: E402

# torchvision 0.29 deprecates its image codecs (in favour of TorchCodec) on every call
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def _all_bytes(ds):
    return [ds[i][0] for i in range(len(ds))]


# --------------------------------------------------------------------------- embedded


def test_embedded_deterministic_and_splits_disjoint():
    a = embedded_dataset("train", size=300)
    b = embedded_dataset("train", size=300)  # cached
    fresh = _embedded_bytes.__wrapped__("train", 300, 32)  # generated again, not cached
    assert all(torch.equal(x, y) for x, y in zip(_all_bytes(a), _all_bytes(b)))
    assert torch.equal(fresh[0], a._data) and torch.equal(fresh[2], a.labels)
    test = embedded_dataset("test", size=300)
    train_set = {bytes(x.numpy()) for x in _all_bytes(a)}
    assert not train_set & {bytes(x.numpy()) for x in _all_bytes(test)}
    assert len(train_set) == 300  # no duplicate images within a split either


def test_embedded_balanced_labels_and_defaults():
    ds = embedded_dataset("test")
    assert len(ds) == 1000
    assert ds.classes == list(EMBEDDED_CLASSES) and len(ds.classes) == 10
    assert torch.bincount(ds.labels, minlength=10).tolist() == [100] * 10
    odd = embedded_dataset("train", size=25)
    counts = torch.bincount(odd.labels, minlength=10)
    assert counts.sum() == 25 and counts.max() - counts.min() <= 1
    with pytest.raises(ValueError, match="split"):
        embedded_dataset("val")
    with pytest.raises(ValueError, match="size"):
        embedded_dataset("train", size=0)


def test_embedded_generation_is_fast():
    _embedded_bytes.cache_clear()
    start = time.perf_counter()
    embedded_dataset("train")
    embedded_dataset("test")
    elapsed = time.perf_counter() - start
    print(f"\nembedded dataset: 6000 images generated and JPEG-encoded in {elapsed:.2f} s")
    assert elapsed < 10.0
    start = time.perf_counter()
    embedded_dataset("train")
    assert time.perf_counter() - start < 0.05


def test_embedded_colour_is_a_nuisance():
    """Mean colour does not tell the class: a nearest-class-mean on it is near chance."""
    ds = embedded_dataset("train", size=1000)
    x = torch.stack(decode_images(_all_bytes(ds), "cpu")).float().mean((2, 3))  # (N, 3)
    y = ds.labels
    centroids = torch.stack([x[y == c].mean(0) for c in range(10)])
    acc = (torch.cdist(x, centroids).argmin(1) == y).float().mean().item()
    assert acc < 0.3


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("image_size", [32, 48])
def test_decode_round_trip(image_size):
    ds = embedded_dataset("train", size=20, image_size=image_size)
    buf, label = ds[3]
    assert buf.dtype == torch.uint8 and buf.dim() == 1 and isinstance(label, int)
    assert buf[:3].tolist() == [0xFF, 0xD8, 0xFF]  # JPEG
    images = decode_images(_all_bytes(ds)[:8], "cpu")
    assert len(images) == 8
    for img in images:
        assert img.dtype == torch.uint8 and img.shape == (3, image_size, image_size)
    batch = stack_if_same_size(images)
    assert isinstance(batch, torch.Tensor) and batch.shape == (8, 3, image_size, image_size)
    assert ds[-1][1] == ds[len(ds) - 1][1]


def test_stack_if_same_size():
    a, b = torch.zeros(3, 4, 5, dtype=torch.uint8), torch.zeros(3, 5, 4, dtype=torch.uint8)
    assert stack_if_same_size([a, a]).shape == (2, 3, 4, 5)
    mixed = [a, b]
    assert stack_if_same_size(mixed) is mixed
    assert stack_if_same_size([]) == []


def _write_folder(root):
    """class names out of order, nested files, jpg/JPEG/png, RGB/gray/RGBA/palette, other files."""
    import io

    from PIL import Image

    gen = torch.Generator().manual_seed(0)

    def pil_png(c, h, w, mode):
        pixels = img(c, h, w).permute(1, 2, 0).numpy()
        image = Image.fromarray(pixels, "RGBA" if c == 4 else "RGB")
        if mode == "P":
            image = image.convert("P")
        out = io.BytesIO()
        image.save(out, format="PNG")
        return torch.frombuffer(bytearray(out.getvalue()), dtype=torch.uint8)

    def img(c, h, w):
        return torch.randint(0, 256, (c, h, w), dtype=torch.uint8, generator=gen)

    (root / "zebra").mkdir(parents=True)
    (root / "apple" / "nested").mkdir(parents=True)
    (root / "Mango").mkdir()
    files = {
        "zebra/a.jpg": encode_jpeg(img(3, 20, 30)),
        "zebra/b.png": encode_png(img(1, 16, 16)),  # grayscale PNG
        "apple/c.JPEG": encode_jpeg(img(1, 24, 24)),  # grayscale JPEG
        "apple/nested/d.png": pil_png(4, 12, 18, "RGBA"),
        "Mango/e.jpeg": encode_jpeg(img(3, 8, 8)),
        "Mango/f.png": pil_png(3, 10, 6, "P"),  # palette PNG
    }
    for name, data in files.items():
        (root / name).write_bytes(bytes(data.numpy()))
    (root / "apple" / "notes.txt").write_text("not an image")
    (root / "README").write_text("a file at the top is not a class")
    return files


def test_from_folder(tmp_path):
    _write_folder(tmp_path)
    ds = EncodedImages.from_folder(tmp_path)
    tv = torchvision.datasets.ImageFolder(str(tmp_path))
    assert ds.classes == tv.classes == ["Mango", "apple", "zebra"]
    assert len(ds) == 6
    assert list(ds._paths) == [p for p, _ in tv.samples]  # same files, same order
    assert ds.targets == tv.targets == [0, 0, 1, 1, 2, 2]
    buffers, labels = collate_encoded([ds[i] for i in range(len(ds))])
    assert labels.dtype == torch.int64 and labels.tolist() == ds.targets
    images = decode_images(buffers, "cpu")
    assert [tuple(i.shape) for i in images] == [
        (3, 8, 8), (3, 10, 6), (3, 24, 24), (3, 12, 18), (3, 20, 30), (3, 16, 16)
    ]
    assert all(i.dtype == torch.uint8 for i in images)
    gray = images[2]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert isinstance(stack_if_same_size(images), list)
    assert "3 classes" in repr(ds)


def test_from_folder_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        EncodedImages.from_folder(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no class folders.*empty"):
        EncodedImages.from_folder(empty)
    no_images = tmp_path / "noimg"
    (no_images / "cls").mkdir(parents=True)
    (no_images / "cls" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="no images.*noimg"):
        EncodedImages.from_folder(no_images)
    one_empty = tmp_path / "oneempty"
    (one_empty / "a").mkdir(parents=True)
    (one_empty / "b").mkdir()
    (one_empty / "a" / "x.jpg").write_bytes(bytes(encode_jpeg(torch.zeros(3, 4, 4,
                                                                         dtype=torch.uint8))))
    with pytest.raises(ValueError, match="without images.*'b'"):
        EncodedImages.from_folder(one_empty)


def test_encoded_images_constructor():
    bufs = [b"\x01\x02", torch.tensor([3, 4, 5], dtype=torch.uint8)]
    ds = EncodedImages(bufs, [0, 1])
    assert ds.classes == ["0", "1"]
    assert ds[1][0].tolist() == [3, 4, 5] and ds[0][0].tolist() == [1, 2]
    with pytest.raises(ValueError, match="length"):
        EncodedImages(bufs, [0])
    with pytest.raises(TypeError, match="all encoded buffers"):
        EncodedImages([b"\x01", "some/path.jpg"], [0, 0])
    with pytest.raises(ValueError, match="classes"):
        EncodedImages(bufs, [0, 2], classes=["a", "b"])


def test_collate_and_loader(tmp_path):
    ds = embedded_dataset("train", size=30)
    buffers, labels = collate_encoded([ds[0], ds[1]])
    assert isinstance(buffers, PackedBuffers) and buffers.data.dtype == torch.uint8
    assert buffers.sizes.tolist() == [len(ds[0][0]), len(ds[1][0])]
    assert [b.tolist() for b in buffers.unpack()] == [ds[0][0].tolist(), ds[1][0].tolist()]
    unpacked = decode_images([ds[0][0], ds[1][0]], "cpu")
    for x, y in zip(decode_images(buffers, "cpu"), unpacked, strict=True):
        assert torch.equal(x, y)
    assert labels.dtype == torch.int64 and labels.tolist() == [ds[0][1], ds[1][1]]

    def order(seed):
        loader = make_loader(ds, 8, shuffle=True, drop_last=True, num_workers=0, seed=seed)
        return torch.cat([y for _, y in loader])

    assert len(order(0)) == 24  # drop_last
    assert torch.equal(order(0), order(0)) and not torch.equal(order(0), order(1))

    sampler = torch.utils.data.SequentialSampler(ds)
    loader = make_loader(ds, 7, shuffle=True, drop_last=False, num_workers=0, sampler=sampler)
    assert torch.equal(torch.cat([y for _, y in loader]), ds.labels)

    _write_folder(tmp_path)  # files are read in a worker process
    folder = EncodedImages.from_folder(tmp_path)
    loader = make_loader(folder, 2, shuffle=False, drop_last=False, num_workers=1)
    assert loader.persistent_workers
    batches = list(loader)
    assert all(isinstance(b, PackedBuffers) for b, _ in batches)  # one tensor per batch
    assert [len(b.sizes) for b, _ in batches] == [2, 2, 2]
    assert torch.equal(batches[0][0].unpack()[0], folder[0][0])


# --------------------------------------------------------------------------- kNN


def test_knn_predict_by_hand():
    # bank: four unit vectors, labels 0, 0, 1, 2; query closest to the label-1 vector
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]).t()
    labels = torch.tensor([0, 0, 1, 2])
    q = torch.tensor([[0.0, 1.0]])
    # k=1: only the label-1 neighbour votes
    assert knn_predict(q, bank, labels, 3, knn_k=1)[0, 0] == 1
    # k=3: label 0 gets exp(0/t) + exp(0.6/t) > exp(1/t) at t=1 (1 + 1.82 > 2.72)
    assert knn_predict(q, bank, labels, 3, knn_k=3, knn_t=1.0)[0].tolist()[:2] == [0, 1]
    # ... but not at t=0.1 (1 + e^6 < e^10)
    assert knn_predict(q, bank, labels, 3, knn_k=3, knn_t=0.1)[0].tolist()[:2] == [1, 0]
    # k larger than the bank is clamped: all four vote
    pred = knn_predict(q, bank, labels, 3, knn_k=200, knn_t=1.0)
    assert pred.shape == (1, 3) and pred[0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="dim"):
        knn_predict(q, bank.t(), labels, 3)


@pytest.mark.parametrize("k,t", [(1, 0.1), (20, 0.1), (200, 0.07), (500, 0.5)])
def test_knn_predict_matches_lightly(k, t):
    lightly_knn = pytest.importorskip("lightly.utils.benchmarking").knn_predict
    n_cls, m, b, d = 7, 300, 64, 16
    bank = torch.nn.functional.normalize(torch.randn(m, d), dim=1)
    labels = torch.randint(0, n_cls, (m,))
    q = torch.nn.functional.normalize(torch.randn(b, d), dim=1)
    ours = knn_predict(q, bank.t(), labels, n_cls, knn_k=k, knn_t=t)
    theirs = lightly_knn(q, bank.t(), labels, n_cls, knn_k=min(k, m), knn_t=t)
    assert ours.shape == theirs.shape == (b, n_cls)
    assert torch.equal(ours[:, 0], theirs[:, 0])
    if k >= 200:  # every class has votes, so scores are distinct and the whole ranking agrees
        assert torch.equal(ours, theirs)


def test_knn_accuracy_on_pixels():
    train, test = embedded_dataset("train", size=500), embedded_dataset("test", size=200)
    backbone = nn.Flatten()
    backbone.train()
    acc = knn_accuracy(backbone, train, test, "cpu", 32, k=20, batch_size=64)
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0
    assert backbone.training  # mode restored
    feats, labels = extract_features(backbone, test, "cpu", 16, batch_size=64)
    assert feats.shape == (200, 3 * 16 * 16) and feats.dtype == torch.float32
    assert torch.allclose(feats.norm(dim=1), torch.ones(200), atol=1e-5)
    assert torch.equal(labels, test.labels)
    # with the test set as its own bank, each image's nearest neighbour is itself
    assert knn_accuracy(backbone, test, test, "cpu", 32, k=1) == 1.0


def _knn_accuracies(rank=0, world=1):
    """The accuracies of four (k, t), and the sizes of the datasets embedded."""
    from sslfast.pretrain import knn

    # 101 training images: shards of 51/50 or 34/34/33, so k = 60 exceeds every shard
    train, test = embedded_dataset("train", size=101), embedded_dataset("test", size=37)
    sizes, extract = [], knn.extract_features

    def recording(backbone, dataset, *args, **kw):
        sizes.append(len(dataset))
        return extract(backbone, dataset, *args, **kw)

    knn.extract_features = recording
    try:
        accs = [knn_accuracy(nn.Flatten(), train, test, "cpu", 16, k=k, t=t, batch_size=16,
                             distributed=True)
                for k, t in ((1, 0.1), (5, 0.07), (60, 0.5), (500, 0.1))]
    finally:
        knn.extract_features = extract
    return accs, sizes


@pytest.mark.parametrize("world", [2, 3])
def test_knn_accuracy_over_ranks_equals_one_process(world, tmp_path):
    # Each rank embeds a shard of the training set (and the whole test set); the
    # merged neighbours are the global ones: every rank returns the one-process accuracy.
    per_rank = spawn_gloo(_knn_accuracies, world, tmp_path)
    expected, sizes = _knn_accuracies()
    assert len(set(expected)) > 1 and sizes == [101, 37] * 4
    for r, (accs, sizes) in enumerate(per_rank):
        assert accs == expected
        assert sizes == [len(range(r, 101, world)), 37] * 4


def test_extract_features_mixed_sizes(tmp_path):
    _write_folder(tmp_path)
    ds = EncodedImages.from_folder(tmp_path)
    conv = nn.Conv2d(3, 4, 3)
    backbone = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1)).eval()
    feats, labels = extract_features(backbone, ds, "cpu", 16, batch_size=2, channels_last=True,
                                     autocast_dtype=torch.bfloat16)
    assert feats.shape == (6, 4) and feats.dtype == torch.float32
    assert labels.tolist() == ds.targets
    assert not backbone.training


def test_knn_random_resnet18_on_embedded():
    """Record (not a tight assertion) how a random-init ResNet-18 does: colour dominates
    its features, so it should sit near chance (10 %), leaving SSL something to learn."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    train, test = embedded_dataset("train", size=2000), embedded_dataset("test", size=500)
    start = time.perf_counter()
    acc = knn_accuracy(model, train, test, "cpu", 32, k=200, t=0.1)
    elapsed = time.perf_counter() - start
    print(f"\nrandom-init resnet18 kNN top-1 on embedded (2000/500, 32x32): {acc:.3f} "
          f"in {elapsed:.2f} s")
    assert 0.0 <= acc < 0.5


@pytest.mark.cuda
def test_decode_on_cuda(tmp_path):
    _write_folder(tmp_path)  # JPEG (RGB and gray) batched through nvJPEG; PNGs via the CPU
    ds = EncodedImages.from_folder(tmp_path)
    buffers = [ds[i][0] for i in range(len(ds))]
    on_gpu, on_cpu = decode_images(buffers, "cuda"), decode_images(buffers, "cpu")
    for g, c in zip(on_gpu, on_cpu):
        assert g.is_cuda and g.dtype == torch.uint8 and g.shape == c.shape
        # nvJPEG's IDCT and upsampling may differ from libjpeg's by a few levels
        assert (g.cpu().int() - c.int()).abs().float().mean() < 3
    emb = embedded_dataset("test", size=64)
    batch = stack_if_same_size(decode_images(_all_bytes(emb), torch.device("cuda")))
    assert batch.is_cuda and batch.shape == (64, 3, 32, 32)
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    acc = knn_accuracy(model.cuda(), emb, emb, "cuda", 32, k=1, channels_last=True,
                       autocast_dtype=torch.bfloat16)
    assert acc > 0.9  # its own nearest neighbour, up to bf16 ties
