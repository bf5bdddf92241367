"""keras_spft.data: image folders, TFDS (mock data), preprocessing, protocol splits, errors."""

import os
import shutil

import numpy as np
import pytest

from keras_spft.data import load_data, scan_image_folder
from tests.workflow.conftest import make_image_folder


def _collect(ds):
    xs, ys = [], []
    for x, y in ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def test_folder_protocol_splits_labels_and_sizes(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("b_class", "a_class", "c_class"),
                             per_split={"train": 3, "val": 2, "test": 1})
    tune = load_data(root, image_size=8, batch_size=4, stage="tune")
    assert tune.class_names == ["a_class", "b_class", "c_class"]  # sorted: Keras' label order
    assert tune.counts == {"train": 9, "val": 6, "test": 3}
    x, y = _collect(tune.train)
    assert x.shape == (9, 8, 8, 3) and x.dtype == np.float32
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    xv, yv = _collect(tune.eval)
    assert len(yv) == 6 and tune.eval_split == "val"
    # Labels match the image content: class k is bright in channel k%3
    # (make_image_folder enumerates classes in the given order b, a, c).
    channel_of = {0: 1, 1: 0, 2: 2}
    for img, label in zip(xv, yv):
        assert np.argmax(img.mean(axis=(0, 1))) == channel_of[int(label)]

    final = load_data(root, image_size=8, batch_size=4, stage="final")
    assert final.train_splits == ("train", "val") and final.eval_split == "test"
    _, yf = _collect(final.train)
    _, yt = _collect(final.eval)
    assert len(yf) == 15 and len(yt) == 3
    assert final.train_size == 15 and final.eval_size == 3


def test_preprocess_input_is_applied_and_range_right(image_folder):
    import keras

    raw = load_data(image_folder, image_size=12, batch_size=64)
    x_raw, _ = _collect(raw.eval)
    assert x_raw.min() >= 0 and x_raw.max() > 200          # 0-255 without preprocessing
    mob = load_data(image_folder, image_size=12, batch_size=64,
                    preprocess=keras.applications.mobilenet.preprocess_input)
    x, _ = _collect(mob.eval)
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() < -0.5
    np.testing.assert_allclose(x, x_raw / 127.5 - 1.0, atol=1e-5)
    # What was applied is said (0-255 pixels given to MobileNet lose accuracy silently).
    assert str(raw).endswith("preprocess: none (0-255 RGB)") and raw.preprocess == "none (0-255 RGB)"
    assert str(mob).endswith("preprocess: mobilenet.preprocess_input")
    caffe = load_data(image_folder, image_size=12, batch_size=64,
                      preprocess=keras.applications.resnet.preprocess_input)
    xc, _ = _collect(caffe.eval)
    # "caffe" mode: RGB -> BGR and ImageNet mean subtracted.
    np.testing.assert_allclose(xc[..., 0], x_raw[..., 2] - 103.939, atol=1e-3)
    # A keras.json with "channels_first": the pipeline's images stay channels
    # last, and preprocess_input is told so (it normalised rows as channels).
    keras.config.set_image_data_format("channels_first")
    try:
        first = load_data(image_folder, image_size=12, batch_size=64,
                          preprocess=keras.applications.resnet.preprocess_input)
        x_first, _ = _collect(first.eval)
    finally:
        keras.config.set_image_data_format("channels_last")
    np.testing.assert_array_equal(x_first, xc)


def test_train_pipeline_shuffles_and_eval_does_not(tmp_path):
    root = make_image_folder(tmp_path / "d", per_split={"train": 8, "val": 4, "test": 4})
    splits = load_data(root, image_size=8, batch_size=64, seed=1)
    epochs = [_collect(splits.train)[1].tolist() for _ in range(3)]
    assert len({tuple(e) for e in epochs}) > 1, "training order never changes between epochs"
    other = splits.reseeded(2)
    assert _collect(other.train)[1].tolist() != epochs[0] or _collect(other.train)[1].tolist() != epochs[1]
    again = load_data(root, image_size=8, batch_size=64, seed=1)
    assert _collect(again.train)[1].tolist() == epochs[0], "same seed, different order"
    evals = [_collect(splits.eval)[1].tolist() for _ in range(2)]
    assert evals[0] == evals[1] == sorted(evals[0])


def test_augment_changes_training_images_only(image_folder):
    plain = load_data(image_folder, image_size=16, batch_size=64, shuffle=False)
    aug = load_data(image_folder, image_size=16, batch_size=64, shuffle=False, augment=True, seed=3)
    xp, yp = _collect(plain.train)
    xa, ya = _collect(aug.train)
    assert xa.shape == xp.shape and (ya == yp).all()
    assert not np.allclose(xa, xp)
    np.testing.assert_array_equal(_collect(aug.eval)[0], _collect(plain.eval)[0])


def test_missing_split_folder_names_the_path(image_folder):
    shutil.rmtree(os.path.join(image_folder, "val"))
    with pytest.raises(ValueError, match=r"split folder '.*data/val' is missing"):
        load_data(image_folder)


def test_missing_data_folder_names_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"data folder '.*nowhere' does not exist"):
        load_data(str(tmp_path / "nowhere"))


def test_class_without_images_names_the_folder(image_folder):
    d = os.path.join(image_folder, "test", "dog")
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    open(os.path.join(d, "notes.txt"), "w").write("not an image")
    with pytest.raises(ValueError, match=r"class folder '.*test/dog' has no images"):
        load_data(image_folder)


def test_images_outside_the_class_folders_are_named(image_folder):
    """They were left out without a word."""
    cats = os.path.join(image_folder, "train", "cat")
    shutil.copy(os.path.join(cats, sorted(os.listdir(cats))[0]), os.path.join(image_folder, "train", "loose.png"))
    with pytest.warns(UserWarning, match=r"train': 1 image\(s\) outside the class folders left out \(no class\): loose\.png"):
        splits = load_data(image_folder)
    assert splits.train_size == sum(len(os.listdir(os.path.join(image_folder, "train", c))) for c in splits.class_names)


def test_hidden_entries_are_ignored_and_other_files_named(image_folder):
    for split in ("train", "val", "test"):
        os.makedirs(os.path.join(image_folder, split, ".ipynb_checkpoints"))   # not a class
        open(os.path.join(image_folder, split, "cat", ".DS_Store"), "w").write("x")
    open(os.path.join(image_folder, "train", "dog", "scan.tif"), "w").write("x")
    with pytest.warns(UserWarning, match=r"train': 1 file\(s\) left out, not .* images: dog/scan.tif"):
        classes, files = scan_image_folder(image_folder, check_images=False)
    assert classes == ["cat", "dog"]
    assert not any(".DS_Store" in f or f.endswith(".tif") for entries in files.values() for f, _ in entries)


def test_split_without_classes_names_the_folder(image_folder):
    shutil.rmtree(os.path.join(image_folder, "test"))
    os.makedirs(os.path.join(image_folder, "test"))
    with pytest.raises(ValueError, match=r"split folder '.*data/test' has no class subfolders"):
        load_data(image_folder)


def test_class_sets_that_differ_are_named(image_folder):
    os.rename(os.path.join(image_folder, "val", "dog"), os.path.join(image_folder, "val", "wolf"))
    with pytest.raises(ValueError, match=r"differ .*only in train: \['dog'\], only in val: \['wolf'\]"):
        load_data(image_folder)


def test_corrupt_image_names_the_file(image_folder):
    bad = os.path.join(image_folder, "train", "cat", "broken.jpg")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ValueError, match=r"image '.*train/cat/broken.jpg' cannot be decoded"):
        load_data(image_folder)
    # Listing without decoding still works (the check can be skipped).
    classes, files = scan_image_folder(image_folder, check_images=False)
    assert classes == ["cat", "dog"] and len(files["train"]) == 7


def test_unknown_stage():
    with pytest.raises(ValueError, match="unknown stage"):
        load_data("whatever", stage="test")


def _tfds_metadata(data_dir, name, splits):
    """Writes TFDS's own metadata files (dataset_info.json, features.json) for
    `name` with the given split sizes, as `download_and_prepare` would: with
    them, `tfds.testing.mock_data` knows the split names and sizes."""
    tfds = pytest.importorskip("tensorflow_datasets")
    builder = tfds.builder(name, data_dir=str(data_dir))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.set_splits(tfds.core.SplitDict(
        [tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0) for s, n in splits.items()]))
    builder.info.write_to_directory(builder.data_dir)
    return tfds


def test_tfds_with_validation_split_mock_data(tmp_path):
    tfds = _tfds_metadata(tmp_path, "oxford_flowers102", {"train": 5, "validation": 5, "test": 7})
    # mock_data yields num_examples images per split, whatever the metadata says.
    with tfds.testing.mock_data(num_examples=5, data_dir=str(tmp_path)):
        tune = load_data("tfds:oxford_flowers102", image_size=10, batch_size=4, stage="tune",
                         data_dir=str(tmp_path))
        assert tune.num_classes == 102 and tune.class_names[0] == "pink primrose"
        assert tune.counts == {"train": 5, "val": 5, "test": 7} and tune.eval_split == "val"
        x, y = _collect(tune.train)
        assert x.shape == (5, 10, 10, 3) and x.dtype == np.float32
        assert y.min() >= 0 and y.max() < 102
        final = load_data("tfds:oxford_flowers102", image_size=10, batch_size=4, stage="final",
                          data_dir=str(tmp_path))
        _, yf = _collect(final.train)
        assert len(yf) == 10 and final.train_splits == ("train", "val")   # train + validation
        assert final.eval_split == "test" and final.eval_size == 7


def test_tfds_without_validation_split_carves_it_from_train(tmp_path):
    import keras

    tfds = _tfds_metadata(tmp_path, "oxford_iiit_pet", {"train": 20, "test": 8})
    with tfds.testing.mock_data(num_examples=6, data_dir=str(tmp_path)):
        tune = load_data("tfds:oxford_iiit_pet", image_size=8, batch_size=8, stage="tune",
                         val_fraction=0.25, preprocess=keras.applications.mobilenet.preprocess_input,
                         data_dir=str(tmp_path))
        assert tune.num_classes == 37
        assert (tune.counts["train"], tune.counts["val"], tune.counts["test"]) == (15, 5, 8)
        x, _ = _collect(tune.train)
        assert x.min() >= -1 and x.max() <= 1 and x.shape[1:] == (8, 8, 3)
        final = load_data("tfds:oxford_iiit_pet", image_size=8, batch_size=8, stage="final",
                          data_dir=str(tmp_path))
        assert final.train_splits == ("train_full",) and final.train_size == 20
        assert len(_collect(final.train)[1]) == 6      # one split (all of train), not train + val
        assert final.eval_split == "test"


def test_tfds_val_fraction_is_split_by_examples(tmp_path):
    # TFDS slices in whole percents: 0.125 of 1000 gave 120 examples, 0.004
    # none (an empty val), 0.996 a shuffle of nothing.
    tfds = _tfds_metadata(tmp_path, "oxford_iiit_pet", {"train": 1000, "test": 8})
    with tfds.testing.mock_data(num_examples=6, data_dir=str(tmp_path)):
        tune = load_data("tfds:oxford_iiit_pet", image_size=8, batch_size=8, stage="tune",
                         val_fraction=0.125, data_dir=str(tmp_path))
        assert (tune.counts["train"], tune.counts["val"]) == (875, 125)
        for fraction, what in ((0.0004, "no validation"), (0.9996, "no training")):
            with pytest.raises(ValueError, match=rf"val_fraction={fraction} of the 1000 training examples "
                                                 rf"of 'oxford_iiit_pet' leaves {what} example"):
                load_data("tfds:oxford_iiit_pet", image_size=8, stage="tune", val_fraction=fraction,
                          data_dir=str(tmp_path))


def test_tfds_empty_name():
    with pytest.raises(ValueError, match="empty TFDS name"):
        load_data("tfds:")


def _digest(ds):
    import hashlib

    return hashlib.md5(b"".join(x.numpy().tobytes() + y.numpy().tobytes() for x, y in ds)).hexdigest()


def test_augment_is_fixed_by_the_seed(tmp_path):
    # Stateful random ops in a parallel map gave another augmentation on every
    # pass of the same seed; each image now has its own stateless seed.
    import keras

    root = make_image_folder(tmp_path / "d", per_split={"train": 8, "val": 2, "test": 2}, size=24)
    splits = load_data(root, image_size=24, batch_size=4, augment=True, seed=1)
    keras.utils.set_random_seed(1)
    first = [_digest(splits.reseeded(1).train) for _ in range(2)]
    keras.utils.set_random_seed(1)
    again = [_digest(load_data(root, image_size=24, batch_size=4, augment=True, seed=1).train) for _ in range(1)]
    assert again[0] == first[0], "the same seed gave another augmentation"
    keras.utils.set_random_seed(1)
    epochs = splits.reseeded(1).train
    assert _digest(epochs) != _digest(epochs), "every epoch was augmented alike"
    assert _digest(splits.reseeded(2).train) != first[0]


def test_augment_flips_and_crops_each_image(tmp_path):
    root = make_image_folder(tmp_path / "d", per_split={"train": 16, "val": 1, "test": 1}, size=8)
    plain = load_data(root, image_size=8, batch_size=64, shuffle=False, check_images=False)
    flipped = load_data(root, image_size=8, batch_size=64, shuffle=False, augment=True, crop_fraction=1.0,
                        seed=5, check_images=False)
    xp, _ = _collect(plain.train)
    xf, _ = _collect(flipped.train)
    same = [np.array_equal(a, b) for a, b in zip(xf, xp)]
    mirrored = [np.array_equal(a, b[:, ::-1]) for a, b in zip(xf, xp)]
    assert all(s or m for s, m in zip(same, mirrored))     # crop_fraction 1: a flip or nothing
    assert any(same) and any(mirrored)


def test_bad_crop_fraction_and_tfds_options_with_a_folder(image_folder):
    for bad in (0, -0.5, 2.0, "0.5", True):
        with pytest.raises(ValueError, match=r"crop_fraction must be a number in \(0, 1\]"):
            load_data(image_folder, crop_fraction=bad)
    with pytest.raises(ValueError, match=r"data_dir applies to TFDS sources .* is read as an image folder"):
        load_data(image_folder, data_dir="/tmp")
    with pytest.raises(ValueError, match=r"val_fraction applies to TFDS"):
        load_data(image_folder, val_fraction=0.2)



def test_bad_sizes_flags_and_preprocess_are_named(image_folder):
    """image_size="32" loaded 3x2 images (a string unpacked), augment="no"
    turned augmentation on, batch_size=0 failed inside tf.data."""
    for bad in ("32", True, 0, -4, 32.0, (32,), (32, 32, 3), (32, 0)):
        with pytest.raises(ValueError, match=r"load_data: `image_size` must be a positive int or a pair"):
            load_data(image_folder, image_size=bad)
    for bad in (0, -1, 2.5, "8"):
        with pytest.raises(ValueError, match=r"load_data: `batch_size` must be an integer of at least 1"):
            load_data(image_folder, image_size=8, batch_size=bad)
    for option in ("augment", "cache", "shuffle"):
        with pytest.raises(ValueError, match=f"load_data: `{option}` must be True or False, got 'no'"):
            load_data(image_folder, image_size=8, **{option: "no"})
    with pytest.raises(ValueError, match=r"load_data: `preprocess` must be a function .*got 'mobilenet'"):
        load_data(image_folder, image_size=8, preprocess="mobilenet")
    assert load_data(image_folder, image_size=(8, 6), batch_size=2).image_size == (8, 6)
    assert load_data(image_folder, image_size=np.array([8, 6]), batch_size=np.int64(2)).image_size == (8, 6)
    x, _ = next(iter(load_data(image_folder, image_size=8, batch_size=2.0).train))
    assert x.shape[0] == 2


def test_images_in_subfolders_of_a_class_count_as_in_keras(image_folder):
    import keras
    from PIL import Image

    deeper = os.path.join(image_folder, "train", "dog", "more", "even_more")
    os.makedirs(deeper)
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(os.path.join(deeper, f"x{i}.png"))
    os.makedirs(os.path.join(image_folder, "train", "dog", ".cache"))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(image_folder, "train", "dog", ".cache", "h.png"))
    classes, files = scan_image_folder(image_folder)
    keras_ds = keras.utils.image_dataset_from_directory(os.path.join(image_folder, "train"), batch_size=None,
                                                        image_size=(8, 8), shuffle=False)
    assert len(files["train"]) == 9 == sum(1 for _ in keras_ds) - 1   # keras also reads the hidden folder
    assert sum(label == 1 for _, label in files["train"]) == 6
    assert any(f.endswith(os.path.join("more", "even_more", "x2.png")) for f, _ in files["train"])


@pytest.mark.parametrize("kind", ["bmp palette", "bmp 1-bit", "tiff named png"])
def test_images_tensorflow_cannot_read_as_pil_does_are_named(image_folder, kind):
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (8, 10, 3), dtype=np.uint8))
    path = os.path.join(image_folder, "train", "cat", "odd." + ("png" if "tiff" in kind else "bmp"))
    if kind == "bmp palette":
        img.convert("P").save(path, "BMP")
    elif kind == "bmp 1-bit":
        img.convert("1").save(path, "BMP")
    else:
        img.save(path, "TIFF")
    expected = {"bmp palette": "reads with other colours than PIL", "bmp 1-bit": "cannot read",
                "tiff named png": "is a TIFF file, which tf.io.decode_image cannot read"}[kind]
    with pytest.raises(ValueError, match=r"image '.*train/cat/odd\.(bmp|png)' " + ("is a TIFF" if "tiff" in kind else "is a BMP")) as err:
        load_data(image_folder)
    assert expected in str(err.value)
    # What TensorFlow reads as PIL does passes: grey and 24-bit BMP, JPEG in a .png file.
    img.convert("L").save(path.replace("odd.", "grey.").replace(".png", ".bmp"), "BMP")
    img.save(path.replace("odd.", "rgb.").replace(".png", ".bmp"), "BMP")
    img.save(path.replace("odd.", "jpeg_named.").replace(".bmp", ".png"), "JPEG")
    os.remove(path)
    assert len(load_data(image_folder, image_size=8).counts) == 3


def test_tfds_reads_image_and_label_features_not_the_supervised_keys(tmp_path):
    # pet_finder's supervised keys are ('attributes', 'label'); it has `image`.
    tfds = _tfds_metadata(tmp_path, "pet_finder", {"train": 6, "test": 4})
    with tfds.testing.mock_data(num_examples=6, data_dir=str(tmp_path)):
        splits = load_data("tfds:pet_finder", image_size=8, batch_size=4, data_dir=str(tmp_path))
        x, y = _collect(splits.train)
        assert x.shape[1:] == (8, 8, 3) and y.dtype == np.int32 and splits.num_classes == 5


def test_camera_jpegs_webp_numpy_crop_fractions_and_dangling_links(image_folder):
    from PIL import Image

    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (16, 20, 3), dtype=np.uint8)) for _ in range(2)]
    frames[0].save(os.path.join(image_folder, "train", "cat", "phone.jpg"), "MPO", save_all=True,
                   append_images=frames[1:])   # a camera's multi-picture JPEG
    frames[0].save(os.path.join(image_folder, "train", "cat", "web.png"), "WEBP")
    os.symlink(os.path.join(image_folder, "nowhere.png"), os.path.join(image_folder, "train", "dog", "gone.png"))
    with Image.open(os.path.join(image_folder, "train", "cat", "phone.jpg")) as im:
        assert im.format == "MPO"
    splits = load_data(image_folder, image_size=8, crop_fraction=np.float32(0.8), augment=True)
    assert splits.counts["train"] == 8   # 6 + the two; not the dangling link
    assert len(_collect(splits.train)[1]) == 8


def test_tfds_val_fraction_unused_by_a_data_set_with_its_own_validation_split_warns(tmp_path):
    tfds = _tfds_metadata(tmp_path, "oxford_flowers102", {"train": 10, "validation": 5, "test": 7})
    with tfds.testing.mock_data(num_examples=4, data_dir=str(tmp_path)):
        with pytest.warns(UserWarning, match=r"val_fraction=0.2 is not used: TFDS data set 'oxford_flowers102' "
                                             r"has its own validation split \('validation'\)"):
            load_data("tfds:oxford_flowers102", image_size=8, stage="tune", val_fraction=0.2, data_dir=str(tmp_path))
