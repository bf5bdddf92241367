"""Tiny image folders and models for the workflow tests."""

import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
CLASSES = ("cat", "dog")


def make_image_folder(root, classes=CLASSES, per_split=None, size=16, fmt="png"):
    """Writes `root/{train,val,test}/<class>/img<i>.<fmt>`; class k is bright in channel k."""
    from PIL import Image

    per_split = per_split or {"train": 3, "val": 2, "test": 2}
    rng = np.random.default_rng(0)
    for split, n in per_split.items():
        for k, name in enumerate(classes):
            d = os.path.join(root, split, name)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, (size, size + 4, 3), dtype=np.uint8)
                img[..., k % 3] = 250
                Image.fromarray(img).save(os.path.join(d, f"img{i}.{fmt}"))
    return str(root)


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "data")


def tiny_model(num_classes=2, size=16):
    """A small conv 'backbone' nested in a model with a Dense head."""
    import keras

    base = keras.Sequential(
        [keras.Input((size, size, 3)), keras.layers.Conv2D(4, 3, name="c1"),
         keras.layers.GlobalAveragePooling2D()], name="base")
    inputs = keras.Input((size, size, 3))
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="head")(base(inputs)))
