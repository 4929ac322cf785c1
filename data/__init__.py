"""Datasets as in-memory uint8 tensors, and batched augmentation on tensors.

Every dataset is loaded once into ``(N, C, H, W)`` uint8 tensors with int64 labels (airbench
style): the training loop indexes and augments whole batches on the device, with no per-sample
Python in the hot loop. Images stay in [0, 255]; the loop divides by 255 and the network
subtracts the channel mean, so Lipschitz bounds are in [0, 1]-pixel units.

Sources (see :data:`DATASETS`):

- ``fashion-mnist``: IDX gz files, from ``--data-dir`` (either torchvision's
  ``FashionMNIST/raw/`` layout or a folder holding the four ``*.gz`` files), else Debian's
  ``dataset-fashion-mnist`` at :data:`DEBIAN_FASHION_MNIST`, else a torchvision download. The gz
  files are decompressed into a temporary root's ``FashionMNIST/raw/`` and read by torchvision.
- ``digits``: scikit-learn's bundled ``load_digits`` (8×8, values 0–16, scaled to 0–255), with a
  fixed stratified 80/20 split (``random_state=0``).
- ``cifar10`` / ``cifar100``: torchvision's python pickles (``cifar-10-batches-py`` /
  ``cifar-100-python``) under ``--data-dir``, downloaded there when missing and online. The
  files are read by torchvision's classes; only the md5 check is relaxed to a presence check (the
  checksums fit the official archive only, and a download still verifies the archive).
- ``tinyimagenet``: the standard ``tiny-imagenet-200`` layout under ``--data-dir`` (the folder
  itself or its parent): ``wnids.txt``, ``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG``
  with ``val/val_annotations.txt``; optional ``words.txt`` for class names. Decoding 110k JPEGs
  takes a while, so the tensors are cached once next to the data (``lipcert-uint8.pt``).
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: Where Debian's ``dataset-fashion-mnist`` package puts the IDX gz files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
#: Default download/cache folder when no ``data_dir`` is given.
DEFAULT_DATA_DIR = Path(os.path.expanduser("~")) / ".cache" / "lipcert" / "data"

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass(frozen=True)
class AugmentSpec:
    """Batched training augmentation: random crop after zero padding, optional horizontal flip.

    Attributes:
        pad: pixels of zero padding on each side before the random crop (0 = no crop).
        flip: flip each image horizontally with probability 1/2.
    """

    pad: int = 0
    flip: bool = False


#: Dataset name → augmentation. Digits are 8×8 (a one-pixel shift is 12 % of the image): none.
#: Fashion-MNIST: small shifts, no flip (every shoe points the same way in train and test).
#: CIFAR / TinyImageNet: the comparison paper's crop with padding 4 (8 at 64 px) and flip.
AUGMENTATIONS: dict[str, AugmentSpec] = {
    "digits": AugmentSpec(pad=0, flip=False),
    "fashion-mnist": AugmentSpec(pad=2, flip=False),
    "cifar10": AugmentSpec(pad=4, flip=True),
    "cifar100": AugmentSpec(pad=4, flip=True),
    "tinyimagenet": AugmentSpec(pad=8, flip=True),
}
DATASETS: tuple[str, ...] = tuple(AUGMENTATIONS)


class DatasetUnavailableError(FileNotFoundError):
    """The dataset is missing and cannot be downloaded; the message says how to get it."""


@dataclass(frozen=True)
class Dataset:
    """A dataset held in memory.

    Attributes:
        name: dataset name (one of :data:`DATASETS`).
        train_images, test_images: ``(N, C, H, W)`` uint8.
        train_labels, test_labels: ``(N,)`` int64.
        classes: class names, index = label.
        mean: per-channel mean of the training images in [0, 1].
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]

    @property
    def in_channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.train_images.shape[1:])  # type: ignore[return-value]


def _channel_mean(images: torch.Tensor) -> tuple[float, ...]:
    return tuple(float(v) for v in images.double().mean(dim=(0, 2, 3)) / 255.0)


def _make(name: str, train: tuple, test: tuple, classes: Sequence[str]) -> Dataset:
    tr_x, tr_y = (torch.as_tensor(np.ascontiguousarray(a)) for a in train)
    te_x, te_y = (torch.as_tensor(np.ascontiguousarray(a)) for a in test)
    for x in (tr_x, te_x):
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(
                f"{name}: expected (N, C, H, W) uint8 images, got {x.dtype} {tuple(x.shape)}"
            )
    return Dataset(
        name=name,
        train_images=tr_x,
        train_labels=tr_y.long(),
        test_images=te_x,
        test_labels=te_y.long(),
        classes=tuple(str(c) for c in classes),
        mean=_channel_mean(tr_x),
    )


# -- digits ------------------------------------------------------------------------------------
#: The digits split is fixed (not the run's seed): every run and report tests on the same images.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # 0..16 → 0..255, rounded: the same grey levels as an 8-bit image of the digit.
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=DIGITS_TEST_FRACTION, stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    return _make("digits", (x_tr, y_tr), (x_te, y_te), [str(i) for i in range(10)])


# -- Fashion-MNIST -----------------------------------------------------------------------------
def _fashion_mnist_gz_dir(data_dir: Path | None) -> Path | None:
    """A folder with the four IDX ``.gz`` (or already decompressed) files, if one is known."""
    candidates = []
    if data_dir is not None:
        candidates += [data_dir, data_dir / "fashion-mnist", data_dir / "FashionMNIST" / "raw"]
    candidates.append(DEBIAN_FASHION_MNIST)
    for folder in candidates:
        if all(
            (folder / f).is_file() or (folder / f"{f}.gz").is_file() for f in FASHION_MNIST_FILES
        ):
            return folder
    return None


def _read_fashion_mnist(root: Path) -> tuple[tuple, tuple]:
    from torchvision.datasets import FashionMNIST

    splits = []
    for train in (True, False):
        ds = FashionMNIST(str(root), train=train, download=False)
        splits.append((ds.data[:, None].contiguous(), ds.targets))  # (N, 1, 28, 28) uint8
    return splits[0], splits[1]


def _load_fashion_mnist(data_dir: Path | None, download: bool) -> Dataset:
    source = _fashion_mnist_gz_dir(data_dir)
    if source is not None:
        # torchvision reads the decompressed IDX files from <root>/FashionMNIST/raw/.
        with tempfile.TemporaryDirectory(prefix="lipcert-fmnist-") as tmp:
            raw = Path(tmp) / "FashionMNIST" / "raw"
            raw.mkdir(parents=True)
            for f in FASHION_MNIST_FILES:
                if (source / f).is_file():
                    os.symlink((source / f).resolve(), raw / f)
                else:
                    with gzip.open(source / f"{f}.gz", "rb") as src, open(raw / f, "wb") as dst:
                        shutil.copyfileobj(src, dst)
            train, test = _read_fashion_mnist(Path(tmp))
        logger.info("fashion-mnist from %s", source)
    else:
        root = data_dir or DEFAULT_DATA_DIR
        from torchvision.datasets import FashionMNIST

        try:
            if not download:
                raise FileNotFoundError("downloads are off")
            for train_split in (True, False):
                FashionMNIST(str(root), train=train_split, download=True)
        except Exception as exc:  # URLError, RuntimeError, OSError: all mean "not available"
            raise DatasetUnavailableError(
                "fashion-mnist not found and could not be downloaded "
                f"({type(exc).__name__}: {exc}); install Debian's package "
                "(apt-get install dataset-fashion-mnist, files in "
                f"{DEBIAN_FASHION_MNIST}) or pass --data-dir with the four IDX .gz files"
            ) from exc
        train, test = _read_fashion_mnist(Path(root))
    return _make("fashion-mnist", train, test, FASHION_MNIST_CLASSES)


# -- CIFAR -------------------------------------------------------------------------------------
def _cifar_class(name: str) -> type:
    from torchvision.datasets import CIFAR10, CIFAR100

    base = CIFAR10 if name == "cifar10" else CIFAR100

    class _PresenceChecked(base):  # type: ignore[misc, valid-type]
        """torchvision's reader with the md5 checks of the extracted files relaxed to presence."""

        def _check_integrity(self) -> bool:
            folder = Path(self.root) / self.base_folder
            return all((folder / f).is_file() for f, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
                data = pickle.load(f, encoding="latin1")
            self.classes = data[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    _PresenceChecked.__name__ = base.__name__
    return _PresenceChecked


def _load_cifar(name: str, data_dir: Path | None, download: bool) -> Dataset:
    from torchvision.datasets import CIFAR10, CIFAR100

    root = data_dir or DEFAULT_DATA_DIR
    reader = _cifar_class(name)
    if not (root / reader.base_folder).is_dir():
        official = CIFAR10 if name == "cifar10" else CIFAR100
        try:
            if not download:
                raise FileNotFoundError("downloads are off")
            official(str(root), train=True, download=True)
        except Exception as exc:  # URLError, RuntimeError, OSError
            raise DatasetUnavailableError(
                f"{name} not found in {root / reader.base_folder} and could not be downloaded "
                f"({type(exc).__name__}: {exc}); download {official.url}, extract it into a "
                "folder and pass that folder as --data-dir"
            ) from exc
    splits = []
    for train in (True, False):
        try:
            ds = reader(str(root), train=train, download=False)
        except (RuntimeError, OSError, KeyError, pickle.UnpicklingError) as exc:
            raise DatasetUnavailableError(
                f"{name}: cannot read {root / reader.base_folder} ({exc}); re-extract "
                f"{reader.url} there"
            ) from exc
        images = torch.as_tensor(ds.data).permute(0, 3, 1, 2).contiguous()  # HWC → CHW
        splits.append((images, torch.as_tensor(ds.targets, dtype=torch.int64)))
        classes = ds.classes
    return _make(name, splits[0], splits[1], classes)


# -- TinyImageNet ------------------------------------------------------------------------------
TINYIMAGENET_CACHE = "lipcert-uint8.pt"


def _tinyimagenet_root(data_dir: Path | None) -> Path:
    for folder in [data_dir, data_dir / "tiny-imagenet-200"] if data_dir else []:
        if (folder / "wnids.txt").is_file() and (folder / "train").is_dir():
            return folder
    raise DatasetUnavailableError(
        f"tinyimagenet not found under --data-dir {data_dir}; download "
        "http://cs231n.stanford.edu/tiny-imagenet-200.zip, unzip it and pass the folder holding "
        "tiny-imagenet-200/ (or that folder itself) as --data-dir"
    )


def _decode_rgb(paths: Sequence[Path], size: int) -> torch.Tensor:
    from torchvision.datasets.folder import default_loader  # PIL, converted to RGB

    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    for i, p in enumerate(paths):  # one-off decoding at load time, cached afterwards
        img = np.array(default_loader(str(p)))  # (H, W, 3), writable
        if img.shape[:2] != (size, size):
            raise ValueError(f"{p}: expected {size}x{size}, got {img.shape[:2]}")
        out[i] = torch.from_numpy(img).permute(2, 0, 1)
    return out


def _load_tinyimagenet(data_dir: Path | None) -> Dataset:
    root = _tinyimagenet_root(data_dir)
    cache = root / TINYIMAGENET_CACHE
    wnids = [w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()]
    if cache.is_file():
        blob = torch.load(cache, weights_only=True)
        if blob.get("wnids") == wnids:
            logger.info("tinyimagenet from cache %s", cache)
            return _make(
                "tinyimagenet",
                (blob["train_x"], blob["train_y"]),
                (blob["test_x"], blob["test_y"]),
                blob["classes"],
            )
    from torchvision.datasets import ImageFolder

    index = {w: i for i, w in enumerate(wnids)}
    folder = ImageFolder(str(root / "train"))  # class folders are the wnids, sorted
    missing = sorted(set(folder.classes) ^ set(wnids))
    if missing:
        raise DatasetUnavailableError(
            f"tinyimagenet: train/ and wnids.txt disagree on {missing[:5]}"
        )
    train_paths = [Path(p) for p, _ in folder.samples]
    train_y = torch.tensor([index[folder.classes[c]] for _, c in folder.samples], dtype=torch.int64)
    annotations = (root / "val" / "val_annotations.txt").read_text().splitlines()
    val = [line.split("\t")[:2] for line in annotations if line.strip()]
    val_paths = [root / "val" / "images" / f for f, _ in val]
    val_y = torch.tensor([index[w] for _, w in val], dtype=torch.int64)
    size = 64
    train_x, test_x = _decode_rgb(train_paths, size), _decode_rgb(val_paths, size)
    words = {}
    if (root / "words.txt").is_file():
        for line in (root / "words.txt").read_text().splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid] = text.split(",")[0].strip() or wnid
    classes = [words.get(w, w) for w in wnids]
    try:
        torch.save(
            dict(
                wnids=wnids,
                train_x=train_x,
                train_y=train_y,
                test_x=test_x,
                test_y=val_y,
                classes=classes,
            ),
            cache,
        )
    except OSError:  # read-only data folder: decode again next time
        logger.warning("could not write the tinyimagenet cache %s", cache)
    return _make("tinyimagenet", (train_x, train_y), (test_x, val_y), classes)


# -- public ------------------------------------------------------------------------------------
def load_dataset(
    name: str, data_dir: str | Path | None = None, *, download: bool = True
) -> Dataset:
    """Load a dataset into memory as uint8 tensors.

    Args:
        name: one of :data:`DATASETS`.
        data_dir: where the files are (or go, for downloads); see the module docstring.
        download: try torchvision's download when the files are missing (Fashion-MNIST, CIFAR).

    Returns:
        The :class:`Dataset`.

    Raises:
        ValueError: unknown dataset name.
        DatasetUnavailableError: files missing and no download possible (says how to get them).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    folder = Path(data_dir).expanduser() if data_dir is not None else None
    if name == "digits":
        return _load_digits()
    if name == "fashion-mnist":
        return _load_fashion_mnist(folder, download)
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, folder, download)
    return _load_tinyimagenet(folder)


def augment(images: torch.Tensor, spec: AugmentSpec, generator: torch.Generator) -> torch.Tensor:
    """Randomly crop (after zero padding) and flip a batch, all images at once.

    Args:
        images: ``(B, C, H, W)`` batch (any dtype, any device).
        spec: the augmentation.
        generator: random generator on ``images.device``.

    Returns:
        The augmented batch, same shape and dtype.
    """
    b, c, h, w = images.shape
    dev = images.device
    if spec.pad > 0:
        p = spec.pad
        padded = torch.nn.functional.pad(images, (p, p, p, p))  # (B, C, H+2p, W+2p)
        dy = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=dev)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=dev)
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # (B, 1, H, 1)
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # (B, 1, 1, W)
        batch = torch.arange(b, device=dev)[:, None, None, None]
        chan = torch.arange(c, device=dev)[None, :, None, None]
        images = padded[batch, chan, rows, cols]
    if spec.flip:
        flip = torch.rand((b,), generator=generator, device=dev) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return images
