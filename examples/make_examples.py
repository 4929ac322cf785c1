"""Regenerate the shipped example images (``python examples/make_examples.py``, repository root).

- Fashion-MNIST: the first *test* image of a few classes, read with torchvision's loader through
  ``data.load_dataset`` (Debian's ``dataset-fashion-mnist`` here), saved as 28×28 gray
  PNG.
- digits: two 8×8 images of scikit-learn's ``load_digits`` that lie in lipcert's digits *test*
  split (``data``) and in the last 297 images that ``tests/test_service.py`` holds out.
- a photo: scikit-learn's ``flower.jpg`` (CC BY 2.0), centre-cropped and resized to 112×112 RGB,
  so its size and colours differ from every training set (112 = 4 × 28 = 14 × 8: the service
  maps it to a model's input by channel averaging and exact area downsampling, so the radius in
  the photo's own pixels is defined).

``index.json`` lists every file with its label, its index in the data set and its provenance
(the web page reads it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
#: Fashion-MNIST classes shipped, by file name.
FASHION = {"shirt": 6, "sneaker": 7, "trouser": 1, "bag": 8, "ankle-boot": 9}
#: Digits shipped (class labels).
DIGITS = (3, 7)
PHOTO_SIZE = 112


def _fashion() -> list[dict]:
    from data import load_dataset

    data = load_dataset("fashion-mnist", download=False)
    labels = data.test_labels.numpy()
    out = []
    for name, cls in FASHION.items():
        index = int(np.flatnonzero(labels == cls)[0])
        pixels = data.test_images[index, 0].numpy()  # (28, 28) uint8
        Image.fromarray(pixels, mode="L").save(HERE / f"{name}.png", optimize=True)
        out.append({"file": f"{name}.png", "label": data.classes[cls], "dataset": "fashion-mnist",
                    "index": index, "size": "28×28 gray",
                    "source": f"Fashion-MNIST test image {index} (MIT licence, Zalando Research)"})
    return out


def _digits() -> list[dict]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # the split data.load_dataset makes, applied to the indices
    _, test_idx = train_test_split(np.arange(len(bunch.target)), test_size=0.2,
                                   stratify=bunch.target, random_state=0)
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    out = []
    for digit in DIGITS:
        index = int(min(i for i in test_idx if i >= 1500 and bunch.target[i] == digit))
        Image.fromarray(images[index], mode="L").save(HERE / f"digit-{digit}.png")
        out.append({"file": f"digit-{digit}.png", "label": str(digit), "dataset": "digits",
                    "index": index, "size": "8×8 gray",
                    "source": f"scikit-learn load_digits image {index} (UCI optical "
                              "recognition of handwritten digits, CC BY 4.0)"})
    return out


def _photo() -> list[dict]:
    from sklearn.datasets import load_sample_image

    photo = Image.fromarray(load_sample_image("flower.jpg"))  # 640×427 RGB
    side = min(photo.size)
    left, top = (photo.width - side) // 2, (photo.height - side) // 2
    crop = photo.crop((left, top, left + side, top + side))
    crop.resize((PHOTO_SIZE, PHOTO_SIZE), Image.Resampling.LANCZOS).save(
        HERE / "photo-flower.png", optimize=True)
    return [{"file": "photo-flower.png", "label": None, "dataset": "photo", "index": None,
             "size": f"{PHOTO_SIZE}×{PHOTO_SIZE} RGB",
             "source": "scikit-learn sample image flower.jpg by vultilion on Flickr "
                       "(CC BY 2.0), centre-cropped and resized"}]


def main() -> None:
    items = _fashion() + _digits() + _photo()
    (HERE / "index.json").write_text(json.dumps(items, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
