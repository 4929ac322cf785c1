"""data: every loader reads small files written in the dataset's real on-disk format."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from data import (
    AUGMENTATIONS,
    AugmentSpec,
    DatasetUnavailableError,
    augment,
    load_dataset,
)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX format (big-endian): magic 0x0000 08 <ndim>, the dims as uint32, then uint8 data."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_gz_files(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (7, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (7,)),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (3,)),
    }
    for name, array in arrays.items():
        _write_idx(tmp_path / f"{name}.gz", array)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert ds.train_images.shape == (7, 1, 28, 28) and ds.test_images.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(ds.train_images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert ds.classes[0] == "T-shirt/top" and ds.num_classes == 10
    assert ds.mean[0] == pytest.approx(arrays["train-images-idx3-ubyte"].mean() / 255)


def test_digits_scaled_and_stratified():
    ds = load_dataset("digits")
    assert ds.train_images.shape == (1437, 1, 8, 8) and ds.test_images.shape == (360, 1, 8, 8)
    assert ds.train_images.dtype == torch.uint8 and int(ds.train_images.max()) == 255
    # Stratified: every class has 20 % (±1) of its samples in the test split.
    total = torch.bincount(torch.cat([ds.train_labels, ds.test_labels]), minlength=10)
    test = torch.bincount(ds.test_labels, minlength=10)
    assert ((test - 0.2 * total).abs() <= 1).all()
    again = load_dataset("digits")
    assert torch.equal(again.test_images, ds.test_images)  # the split is fixed


def _write_cifar(
    root: Path,
    folder: str,
    files: dict[str, int],
    label_key: str,
    meta_name: str,
    meta_key: str,
    classes: list[str],
) -> dict[str, tuple]:
    rng = np.random.default_rng(1)
    (root / folder).mkdir(parents=True)
    written = {}
    for name, n in files.items():
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)  # rows: R plane, G plane, B plane
        labels = rng.integers(0, len(classes), n).tolist()
        with open(root / folder / name, "wb") as f:
            pickle.dump({"data": data, label_key: labels, "batch_label": name}, f)
        written[name] = (data, labels)
    with open(root / folder / meta_name, "wb") as f:
        pickle.dump({meta_key: classes}, f)
    return written


def test_cifar10_reads_python_pickles(tmp_path):
    classes = [f"c{i}" for i in range(10)]
    files = {f"data_batch_{i}": 2 for i in range(1, 6)} | {"test_batch": 3}
    written = _write_cifar(
        tmp_path, "cifar-10-batches-py", files, "labels", "batches.meta", "label_names", classes
    )
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.train_images.shape == (10, 3, 32, 32) and ds.test_images.shape == (3, 3, 32, 32)
    first = written["data_batch_1"][0][0].reshape(3, 32, 32)
    np.testing.assert_array_equal(ds.train_images[0].numpy(), first)
    assert ds.test_labels.tolist() == written["test_batch"][1]
    assert ds.classes == tuple(classes)


def test_cifar100_reads_python_pickles(tmp_path):
    classes = [f"fine{i}" for i in range(100)]
    written = _write_cifar(
        tmp_path,
        "cifar-100-python",
        {"train": 4, "test": 2},
        "fine_labels",
        "meta",
        "fine_label_names",
        classes,
    )
    ds = load_dataset("cifar100", data_dir=tmp_path)
    assert ds.num_classes == 100 and ds.train_images.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(
        ds.test_images[1].numpy(), written["test"][0][1].reshape(3, 32, 32)
    )
    assert ds.train_labels.tolist() == written["train"][1]


def test_tinyimagenet_reads_folders_of_jpegs(tmp_path):
    from PIL import Image

    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819"]
    colours = {wnids[0]: (200, 30, 30), wnids[1]: (20, 40, 220)}
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text(f"{wnids[0]}\tgoldfish, Carassius auratus\n{wnids[1]}\teft\n")
    for w in wnids:
        (root / "train" / w / "images").mkdir(parents=True)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        for i in range(2):
            Image.new("RGB", (64, 64), colours[w]).save(
                root / "train" / w / "images" / f"{w}_{i}.JPEG"
            )
    lines = []
    for i, w in enumerate([wnids[1], wnids[0], wnids[1]]):
        Image.new("RGB", (64, 64), colours[w]).save(root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")

    ds = load_dataset("tinyimagenet", data_dir=tmp_path)
    assert ds.train_images.shape == (4, 3, 64, 64) and ds.test_images.shape == (3, 3, 64, 64)
    assert ds.test_labels.tolist() == [1, 0, 1]
    assert ds.classes == ("goldfish", "eft")
    for x, y in zip(ds.train_images, ds.train_labels, strict=True):
        expected = torch.tensor(colours[wnids[int(y)]], dtype=torch.int16)[:, None, None]
        assert (x.to(torch.int16) - expected).abs().max() <= 3  # JPEG rounding of a flat colour
    assert (root / "lipcert-uint8.pt").is_file()
    cached = load_dataset("tinyimagenet", data_dir=root)
    assert torch.equal(cached.train_images, ds.train_images) and cached.classes == ds.classes


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="tiny-imagenet-200.zip"):
        load_dataset("tinyimagenet", data_dir=tmp_path)
    with pytest.raises(DatasetUnavailableError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    with pytest.raises(
        ValueError, match="unknown dataset 'mnist'; choose from digits, fashion-mnist"
    ):
        load_dataset("mnist")


def test_augment_crops_are_shifted_windows_and_flips_mirror():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(4 * 2 * 6 * 6, dtype=torch.int64).view(4, 2, 6, 6).to(torch.uint8)
    spec = AugmentSpec(pad=2, flip=False)
    out = augment(x, spec, gen)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(4):
        windows = [padded[i, :, dy : dy + 6, dx : dx + 6] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    flipped = augment(x, AugmentSpec(pad=0, flip=True), torch.Generator().manual_seed(1))
    for i in range(4):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    assert not torch.equal(flipped, x) and not torch.equal(flipped, x.flip(-1))  # mixed per image
    assert torch.equal(augment(x, AugmentSpec(), gen), x)
    assert AUGMENTATIONS["cifar10"] == AugmentSpec(pad=4, flip=True)
