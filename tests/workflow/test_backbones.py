"""keras_spft.backbones: keras.applications by name, alpha, weights, head."""

import os

import keras
import numpy as np
import pytest

import keras_spft
from keras_spft.backbones import available_backbones, build_model, get_backbone
from tests.workflow.conftest import SHARED

WEIGHTS = os.path.join(SHARED, "assets", "mobilenet_2_5_224_tf_no_top.h5")


def test_names_map_to_constructor_and_its_preprocessing():
    names = available_backbones()
    for n in ("resnet101", "efficientnetb0", "mobilenet", "mobilenetv2", "vgg16", "convnexttiny"):
        assert n in names
    bb = get_backbone("ResNet101")
    assert bb.constructor is keras.applications.ResNet101
    assert bb.preprocess_input is keras.applications.resnet.preprocess_input and not bb.has_alpha
    assert get_backbone("efficientnet_b0").preprocess_input is keras.applications.efficientnet.preprocess_input
    mob = get_backbone("mobilenet")
    assert mob.constructor is keras.applications.MobileNet and mob.has_alpha
    assert get_backbone("mobilenet_v2").constructor is keras.applications.MobileNetV2
    # exported only at the top level of keras.applications, not by their module
    v3 = get_backbone("MobileNetV3Small")
    assert v3.constructor is keras.applications.MobileNetV3Small and v3.has_alpha
    assert v3.preprocess_input is keras.applications.mobilenet_v3.preprocess_input
    assert "mobilenetv3large" in names


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown model 'resnet9'.*resnet101"):
        get_backbone("resnet9")


def test_alpha_only_where_the_constructor_has_it():
    with pytest.raises(ValueError, match="ResNet50 has no width multiplier"):
        build_model("resnet50", 3, weights=None, image_size=32, alpha=0.5)


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "nope.h5"
    with pytest.raises(ValueError, match=r"weights file '.*nope.h5' does not exist"):
        build_model("mobilenet", 3, weights=str(missing), image_size=32, alpha=0.25)
    # a folder is one (it was said not to exist)
    with pytest.raises(ValueError, match=r"weights '.*' is a folder, not a weights file"):
        build_model("mobilenet", 3, weights=str(tmp_path), image_size=32, alpha=0.25)


def test_offline_imagenet_download_is_one_clear_error(monkeypatch):
    """Offline, keras.utils.get_file raises a bare Exception; the user gets a
    ValueError naming the option and the way out. (The download itself is
    not faked: get_file fails here as it does without a network.)"""
    from keras.src.utils import file_utils

    def offline(fname, origin=None, **kwargs):
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(ValueError, match=r"weights='imagenet': downloading the ImageNet weights of MobileNet "
                                         r"failed \(URL fetch failure.*pass a local weights file"):
        build_model("mobilenet", 3, weights="imagenet", image_size=128, alpha=0.25)


def test_build_model_heads_and_default_wrap_head():
    model = build_model("mobilenet", 5, weights=None, image_size=32, alpha=0.25)
    assert model.output_shape == (None, 5)
    assert model.layers[-1].name == "head"
    report = keras_spft.wrap_pretrained(model, radius=3.0, head_radius=4.0)
    heads = [w for w in report.wrapped if w.role == "head"]
    assert [w.path for w in heads] == ["head"] and heads[0].rows == 5
    flat = build_model("mobilenet", 5, weights=None, image_size=32, alpha=0.25, head="flatten")
    # Flatten of the 1x1x256 map of a 32x32 input (alpha 0.25: 256 channels).
    assert flat.get_layer("head").kernel.shape == (256, 5)
    with pytest.raises(ValueError, match="unknown head"):
        build_model("mobilenet", 5, weights=None, image_size=32, head="gap")


@pytest.mark.parametrize("name", ["junk.h5", "junk.weights.h5", "junk.png"])
def test_a_file_that_is_not_keras_weights_is_named(tmp_path, name):
    path = tmp_path / name
    path.write_text("hi")
    with pytest.raises(ValueError, match=r"weights file '\S+junk\S*' cannot be read as Keras weights"):
        build_model("mobilenet", 3, weights=str(path), image_size=32, alpha=0.25)


def test_an_image_size_the_architecture_refuses_names_the_option():
    with pytest.raises(ValueError, match=r"image size 8x8 does not fit MobileNet \(Input size must be at least "
                                         r"32x32.*check --image-size/image_size="):
        build_model("mobilenet", 3, weights=None, image_size=8, alpha=0.25)


@pytest.mark.skipif(not os.path.isfile(WEIGHTS), reason=f"shared weights {WEIGHTS} absent (../shared)")
def test_local_weights_file_is_loaded():
    a = build_model("mobilenet", 17, weights=WEIGHTS, image_size=96, alpha=0.25)
    b = build_model("mobilenet", 17, weights=None, image_size=96, alpha=0.25)
    ka = a.layers[1].get_layer("conv1").kernel.numpy()
    assert not np.allclose(ka, b.layers[1].get_layer("conv1").kernel.numpy())
    ref = keras.applications.MobileNet(alpha=0.25, include_top=False, weights=WEIGHTS, input_shape=(96, 96, 3))
    np.testing.assert_array_equal(ka, ref.get_layer("conv1").kernel.numpy())
    # The file of alpha=0.25 with alpha left at 1.0: the error names both.
    with pytest.raises(ValueError, match=r"weights file '.*' does not fit MobileNet with alpha unset \(1.0\).*--alpha"):
        build_model("mobilenet", 17, weights=WEIGHTS, image_size=96)


def test_a_keras_3_weights_file_of_another_width_is_named(tmp_path):
    # Keras 3's loader says "could not be loaded" where h5 files said "mismatch":
    # the hint about alpha was lost.
    path = str(tmp_path / "m.weights.h5")
    keras.applications.MobileNet(alpha=0.25, weights=None, include_top=False, input_shape=(32, 32, 3)).save_weights(path)
    with pytest.raises(ValueError, match=r"weights file '.*m.weights.h5' does not fit MobileNet with alpha=0.5.*--alpha"):
        build_model("mobilenet", 3, weights=path, image_size=32, alpha=0.5)


def test_core_backbones_and_recipe_import_without_tensorflow():
    """`import keras_spft` (and the TF-free workflow modules) never pulls in TensorFlow."""
    import subprocess
    import sys

    from tests.workflow.conftest import REPO

    code = ("import sys, keras_spft, keras_spft.backbones, keras_spft.recipe; "
            "print(sorted(m for m in ('tensorflow', 'keras_tuner', 'tensorflow_datasets') if m in sys.modules))")
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
