"""Image-classification data as `tf.data` pipelines, split as in the paper.

Two sources: an image folder with `train/`, `val/`, `test/` subfolders of
one folder per class, or a TensorFlow Datasets name (`"tfds:oxford_flowers102"`).
`load_data(...)` resizes, applies `preprocess` (usually the backbone's own
`preprocess_input`; by default none: the images stay 0-255 RGB, which
EfficientNet and ConvNeXt rescale inside the model but MobileNet and ResNet
do not), optionally augments (flip, crop), caches and prefetches. Its `stage` follows
the protocol of Gouk et al. (2021): `"tune"` trains on train and evaluates on
val; `"final"` trains on train+val and evaluates on test.

This module imports TensorFlow (tf.data); `import keras_spft` does not.
"""

import dataclasses
import functools
import inspect
import numbers
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf
import keras

from keras_spft.anchors import check_count, check_flag

__all__ = ["DataSplits", "load_data", "scan_image_folder"]

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
SPLITS = ("train", "val", "test")
STAGES = ("tune", "final")


@dataclass
class DataSplits:
    """The two pipelines of one protocol stage.

    Attributes:
        train: batched `tf.data.Dataset` of `(image, label)` to train on
            (shuffled each epoch, augmented if asked).
        eval: batched `tf.data.Dataset` to evaluate on (val when tuning, test
            in the final runs); never shuffled or augmented.
        class_names: class names; label `i` is `class_names[i]`.
        stage: `"tune"` or `"final"`.
        train_splits / eval_split: which source splits they hold, e.g.
            `("train", "val")` and `"test"`.
        counts: number of examples per source split, e.g.
            `{"train": 680, "val": 340, "test": 340}`.
        source: the folder path or `tfds:NAME`.
        image_size: `(height, width)` of the images.
        preprocess: the preprocessing applied, as a name
            (`"none (0-255 RGB)"` by default).
    """

    train: object
    eval: object
    class_names: list
    stage: str
    train_splits: tuple
    eval_split: str
    counts: dict
    source: str
    image_size: tuple = field(default=(224, 224))
    make_train: object = field(default=None, repr=False)
    preprocess: str = "none (0-255 RGB)"

    def reseeded(self, seed):
        """The same splits with the training pipeline shuffled (and augmented)
        with another seed; the cached images are shared, not reloaded.

        Args:
            seed: the new seed, e.g. the run's seed (with TensorFlow's
                global seed, see `load_data`).

        Returns:
            A new `DataSplits`.
        """
        if self.make_train is None:
            return self
        return dataclasses.replace(self, train=self.make_train(seed))

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def train_size(self):
        return sum(self.counts[s] for s in self.train_splits)

    @property
    def eval_size(self):
        return self.counts[self.eval_split]

    def __str__(self):
        return (
            f"{self.source}: {self.num_classes} classes, stage {self.stage!r}: train on "
            f"{'+'.join(self.train_splits)} ({self.train_size} images), evaluate on "
            f"{self.eval_split} ({self.eval_size} images), "
            f"{self.image_size[0]}x{self.image_size[1]}, preprocess: {self.preprocess}"
        )


def _size(image_size):
    """`(height, width)` from an int or a pair of ints, each at least 1."""
    def whole(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and v >= 1

    if whole(image_size):
        return (int(image_size), int(image_size))
    if not isinstance(image_size, (str, bytes, dict)):
        try:
            pair = list(image_size)   # a tuple, list, array or TensorShape
        except TypeError:
            pair = None
        if pair is not None and len(pair) == 2 and all(whole(v) for v in pair):
            return tuple(int(v) for v in pair)
    raise ValueError(f"load_data: `image_size` must be a positive int or a pair (height, width) of them, "
                     f"got {image_size!r}.")


def _preprocess_name(preprocess):
    """How `print(splits)` names the preprocessing: e.g. `mobilenet.preprocess_input`."""
    if preprocess is None:
        return "none (0-255 RGB)"
    module = getattr(preprocess, "__module__", "") or ""
    return f"{module.split('.')[-1]}.{getattr(preprocess, '__name__', 'function')}".lstrip(".")


# ----------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------


def scan_image_folder(path, splits=SPLITS, check_images=True):
    """Lists and checks an image folder before loading it.

    Args:
        path: folder holding one subfolder per split (`train/`, `val/`,
            `test/`), each with one subfolder per class of image files
            (`.jpg`, `.jpeg`, `.png`, `.bmp`, `.gif`).
        splits: the split folder names that must exist.
        check_images: decode every image once (with PIL, at reduced
            resolution) to find corrupt files before training starts.

    Returns:
        `(class_names, files)`: the sorted class names (label ids follow
        this order, as in `keras.utils.image_dataset_from_directory`) and
        `{split: [(file path, label), ...]}`.

    Raises:
        ValueError: naming the path at fault: missing folder or split folder,
            a split without class folders or without images, a class folder
            without images, class sets that differ between splits, an image
            that cannot be decoded.

    Example:

    ```python
    classes, files = scan_image_folder("flowers17/")
    classes[:2], len(files["train"])   # (['bluebell', 'buttercup'], 680)
    ```
    """
    root = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isdir(root):
        raise ValueError(f"data folder '{root}' does not exist or is not a folder.")
    classes = {}
    files = {}
    for split in splits:
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
            raise ValueError(
                f"split folder '{split_dir}' is missing: an image folder needs "
                f"{'/, '.join(splits)}/ subfolders with one folder per class (found: {present})."
            )
        # Hidden entries (.ipynb_checkpoints, .DS_Store) are not data.
        names = sorted(d for d in os.listdir(split_dir)
                       if not d.startswith(".") and os.path.isdir(os.path.join(split_dir, d)))
        if not names:
            raise ValueError(f"split folder '{split_dir}' has no class subfolders.")
        classes[split] = names
        loose = sorted(f for f in os.listdir(split_dir) if not f.startswith(".")
                       and os.path.isfile(os.path.join(split_dir, f)) and f.lower().endswith(IMAGE_EXTENSIONS))
        if loose:   # no class to take them from: left out, as Keras' loader does, but said
            warnings.warn(
                f"'{split_dir}': {len(loose)} image(s) outside the class folders left out (no class): "
                f"{', '.join(loose[:5])}{', ...' if len(loose) > 5 else ''}; move them into their class's folder.",
                stacklevel=2)
        entries, others = [], []
        for label, name in enumerate(names):
            class_dir = os.path.join(split_dir, name)
            # Subfolders of a class folder belong to the class, as in
            # keras.utils.image_dataset_from_directory; hidden ones do not.
            found = []
            for folder, subdirs, filenames in os.walk(class_dir):
                subdirs[:] = [d for d in subdirs if not d.startswith(".")]
                rel = os.path.relpath(folder, class_dir)
                found += [os.path.normpath(os.path.join(rel, f)) for f in filenames
                          if not f.startswith(".") and os.path.isfile(os.path.join(folder, f))]   # no dangling links
            images = sorted(f for f in found if f.lower().endswith(IMAGE_EXTENSIONS))
            others += sorted(os.path.join(name, f) for f in found if not f.lower().endswith(IMAGE_EXTENSIONS))
            if not images:
                raise ValueError(
                    f"class folder '{class_dir}' has no images (expected {', '.join(IMAGE_EXTENSIONS)} files)."
                )
            entries += [(os.path.join(class_dir, f), label) for f in images]
        if others:
            warnings.warn(
                f"'{split_dir}': {len(others)} file(s) left out, not {'/'.join(IMAGE_EXTENSIONS)} images: "
                f"{', '.join(others[:5])}{', ...' if len(others) > 5 else ''}; convert them to use them.",
                stacklevel=2)
        files[split] = entries
    first = splits[0]
    for split in splits[1:]:
        if classes[split] != classes[first]:
            a, b = set(classes[first]), set(classes[split])
            raise ValueError(
                f"class folders differ between '{os.path.join(root, first)}' and "
                f"'{os.path.join(root, split)}': only in {first}: {sorted(a - b)}, "
                f"only in {split}: {sorted(b - a)}."
            )
    if check_images:
        for split in splits:
            for file, _ in files[split]:
                _check_image(file)
    return classes[first], files


#: What `tf.io.decode_image` reads (by content, whatever the file's name).
DECODABLE_FORMATS = ("BMP", "GIF", "JPEG", "MPO", "PNG", "WEBP")   # MPO: a camera's multi-picture JPEG


def _check_image(file):
    """Raises `ValueError` naming `file` unless the pipeline's decoder
    (`tf.io.decode_image`) reads it as PIL does."""
    from PIL import Image

    try:
        with Image.open(file) as im:
            fmt = im.format
            im.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, fast
            im.load()
    except Exception as e:  # PIL raises many types for bad files
        raise ValueError(f"image '{file}' cannot be decoded ({type(e).__name__}: {e}).") from None
    if fmt not in DECODABLE_FORMATS:
        raise ValueError(
            f"image '{file}' is a {fmt} file, which tf.io.decode_image cannot read (it reads "
            f"{', '.join(DECODABLE_FORMATS)} by content, whatever the name): convert it."
        )
    if fmt == "BMP":
        # TensorFlow's BMP decoder reads 8-bit grey, 24- and 32-bit files only:
        # a 1-bit file fails mid-training, a colour palette comes out as grey
        # palette indices. Compare its result with PIL's.
        with Image.open(file) as im:
            expected = np.asarray(im.convert("RGB"))
        try:
            got = tf.io.decode_image(tf.io.read_file(file), channels=3, expand_animations=False).numpy()
        except tf.errors.OpError:
            got = None
        if got is None or got.shape != expected.shape or not np.array_equal(got, expected):
            raise ValueError(
                f"image '{file}' is a BMP that tf.io.decode_image "
                f"{'cannot read' if got is None else 'reads with other colours than PIL'} "
                "(it reads 8-bit grey, 24- and 32-bit BMP files, not palettes or 1-bit ones): convert it, e.g. to PNG."
            )


def _decode(path, label, size):
    data = tf.io.read_file(path)
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape((None, None, 3))
    image = tf.image.resize(tf.cast(image, tf.float32), size)
    return image, label


def _folder_dataset(entries, size):
    paths = [p for p, _ in entries]
    labels = np.array([l for _, l in entries], dtype="int32")
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    return ds.map(lambda p, l: _decode(p, l, size), num_parallel_calls=tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------
# TFDS
# ----------------------------------------------------------------------------


def _tfds_sources(name, data_dir, val_fraction, download):
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if download:
        builder.download_and_prepare()
    info = builder.info
    available = set(info.splits.keys())
    if "label" not in info.features or not hasattr(info.features["label"], "names"):
        raise ValueError(f"TFDS data set '{name}' has no class 'label' feature.")
    if "image" not in info.features:
        raise ValueError(f"TFDS data set '{name}' has no 'image' feature (features: {sorted(info.features)}).")
    val_name = next((s for s in ("validation", "val") if s in available), None)
    if "train" not in available:
        raise ValueError(f"TFDS data set '{name}' has no 'train' split (splits: {sorted(available)}).")
    if "test" not in available and val_name is None:
        raise ValueError(f"TFDS data set '{name}' has neither a 'test' nor a 'validation' split.")
    if val_name is not None and "test" in available:
        mapping = {"train": "train", "val": val_name, "test": "test"}
    else:
        # Carve val out of train: tune on the first part, final runs use all of train.
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
        # By examples, not TFDS' whole percents (0.125 would give 12 %, 0.004 none).
        n = info.splits["train"].num_examples
        cut = int(round(n * (1 - val_fraction)))
        if not 0 < cut < n:
            raise ValueError(
                f"val_fraction={val_fraction} of the {n} training examples of '{name}' leaves "
                f"{'no validation' if cut >= n else 'no training'} example."
            )
        test = "test" if "test" in available else val_name
        mapping = {"train": f"train[:{cut}]", "val": f"train[{cut}:]", "test": test, "train_full": "train"}
    counts = {k: info.splits[v].num_examples for k, v in mapping.items()}
    return builder, info, mapping, counts


def _tfds_dataset(builder, split, size):
    # The `image` and `label` features, not the supervised keys (which are
    # other features in some data sets, e.g. pet_finder's).
    ds = builder.as_dataset(split=split, shuffle_files=False)

    def prep(example):
        image = tf.image.resize(tf.cast(example["image"], tf.float32), size)
        if image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        return image, tf.cast(example["label"], tf.int32)

    return ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------


def _preprocess_fn(preprocess):
    if preprocess is None:
        return None
    try:
        takes_format = "data_format" in inspect.signature(preprocess).parameters
    except (TypeError, ValueError):   # no signature to read (a builtin)
        takes_format = False
    if takes_format:
        # The pipeline's images are height x width x channels; keras.applications'
        # preprocess_input otherwise reads keras.config.image_data_format(), and
        # with "channels_first" there it normalised rows as channels.
        preprocess = functools.partial(preprocess, data_format="channels_last")
    if keras.backend.backend() == "tensorflow":
        return preprocess

    # Other backends: keras.applications' preprocess_input computes with the
    # active backend's ops, which tf.data cannot trace; run it on NumPy.
    def apply(image):
        def np_fn(x):
            return np.asarray(preprocess(np.array(x)), dtype="float32")

        out = tf.numpy_function(np_fn, [image], tf.float32)
        out.set_shape(image.shape)
        return out

    return apply


def _augment(image, size, crop_fraction, seed):
    """One image: random horizontal flip, then a random crop resized back.

    `seed` is the image's own stateless seed (shape `[2]`): the same seed gives
    the same image, whatever the order in which parallel calls run."""
    flip_seed, crop_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    if crop_fraction < 1.0:
        h, w = size
        ch, cw = max(1, int(round(h * crop_fraction))), max(1, int(round(w * crop_fraction)))
        image = tf.image.stateless_random_crop(image, (ch, cw, 3), crop_seed)
        image = tf.image.resize(image, size)
    return image


def load_data(
    source,
    *,
    image_size=224,
    batch_size=32,
    preprocess=None,
    stage="tune",
    augment=False,
    crop_fraction=0.875,
    cache=True,
    shuffle=True,
    seed=0,
    data_dir=None,
    val_fraction=None,
    download=True,
    check_images=True,
):
    """Loads an image folder or a TFDS data set as `tf.data` pipelines.

    Images are resized to `image_size` (bilinear, as float 0-255 RGB), passed
    through `preprocess` (if given: the backbone's `preprocess_input`), cached, then the
    training pipeline is shuffled, augmented, batched and prefetched.

    Split protocol (Gouk et al., 2021): `stage="tune"` trains on `train` and
    evaluates on `val` (for searching hyper-parameters); `stage="final"`
    trains on `train` + `val` and evaluates on `test`. A TFDS data set without
    a validation split (e.g. `oxford_iiit_pet`, `caltech_birds2011`) uses the
    last `val_fraction` of its train split as val when tuning, and all of
    train in the final runs.

    Args:
        source: an image folder path (with `train/`, `val/`, `test/`
            subfolders of one folder per class) or `"tfds:NAME"` (any TFDS
            image-classification data set with `image` and `label`, e.g.
            `tfds:oxford_flowers102`, `tfds:oxford_iiit_pet`, `tfds:dtd`,
            `tfds:caltech_birds2011`).
        image_size: output height and width (int or `(h, w)`).
        batch_size: batch size of both pipelines.
        preprocess: a function of a float32 batch of 0-255 RGB images, usually
            `keras_spft.backbones.get_backbone(name).preprocess_input`;
            `None` keeps 0-255.
        stage: `"tune"` or `"final"` (see above).
        augment: random horizontal flip and random crop (of `crop_fraction`
            of each side, resized back) on the training pipeline only.
        crop_fraction: the crop size for `augment`, in (0, 1]; 1.0 disables
            cropping.
        cache: cache decoded, resized, preprocessed images in memory.
        shuffle: shuffle the training pipeline every epoch (seeded).
        seed: seed of shuffling and augmentation; `splits.reseeded(seed)`
            gives the pipeline of another seed over the same cached images.
            `tf.data` combines it with TensorFlow's global seed when the
            pipeline is made (`keras.utils.set_random_seed`, which a seeded
            search sets before every trial): for the same order in every
            run, set that first, e.g. `keras.utils.set_random_seed(seed)`
            then `splits.reseeded(seed)`, as the CLI does.
        data_dir: TFDS only: its data directory (default: TFDS's).
        val_fraction: TFDS only, see above (default 0.1).
        download: TFDS only: download and prepare the data set if needed.
        check_images: image folders only: decode every file once up front
            so that a corrupt image is reported by path.

    Returns:
        A `DataSplits` with `.train`, `.eval`, `.class_names`, `.counts`.

    Raises:
        ValueError: a bad folder (see `scan_image_folder`), an unknown stage,
            a `crop_fraction` outside (0, 1], a TFDS option given with an
            image folder, or a TFDS data set without the needed splits.

    Example:

    ```python
    import keras
    from keras_spft.data import load_data
    splits = load_data("flowers17/", image_size=160, batch_size=32,
                       preprocess=keras.applications.mobilenet.preprocess_input)
    print(splits)       # 17 classes, train on train (680), evaluate on val (340)
    ```
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}.")
    if isinstance(crop_fraction, (bool, np.bool_)) or not isinstance(crop_fraction, numbers.Real) \
            or not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be a number in (0, 1], got {crop_fraction!r}.")
    size = _size(image_size)
    batch_size = check_count(batch_size, "batch_size", "load_data")
    augment, cache, shuffle = (check_flag(v, what, "load_data") for what, v in
                               (("augment", augment), ("cache", cache), ("shuffle", shuffle)))
    if preprocess is not None and not callable(preprocess):
        raise ValueError(f"load_data: `preprocess` must be a function (the backbone's preprocess_input, e.g. "
                         f"keras_spft.backbones.get_backbone('mobilenet').preprocess_input), got {preprocess!r}.")
    source = str(source)
    if source.startswith("tfds:"):
        name = source[len("tfds:"):]
        if not name:
            raise ValueError("empty TFDS name: use e.g. 'tfds:oxford_flowers102'.")
        builder, info, mapping, counts = _tfds_sources(
            name, data_dir, 0.1 if val_fraction is None else val_fraction, download)
        if val_fraction is not None and "train_full" not in mapping:
            warnings.warn(f"val_fraction={val_fraction} is not used: TFDS data set '{name}' has its own "
                          f"validation split ('{mapping['val']}').", UserWarning, stacklevel=2)
        class_names = list(info.features["label"].names)
        if stage == "tune":
            train_parts, eval_split = ("train",), "val"
        else:
            train_parts = ("train_full",) if "train_full" in mapping else ("train", "val")
            eval_split = "test"
        make = lambda split: _tfds_dataset(builder, mapping[split], size)  # noqa: E731
        counts = {k: counts[k] for k in ("train", "val", "test")} | (
            {"train_full": counts["train_full"]} if "train_full" in counts else {}
        )
    else:
        tfds_only = [n for n, v in (("data_dir", data_dir), ("val_fraction", val_fraction)) if v is not None]
        if tfds_only:
            raise ValueError(
                f"{' and '.join(tfds_only)} {'applies' if len(tfds_only) == 1 else 'apply'} to TFDS sources "
                f"('tfds:NAME') only; "
                f"'{source}' is read as an image folder."
            )
        class_names, files = scan_image_folder(source, check_images=check_images)
        counts = {k: len(v) for k, v in files.items()}
        source = os.path.abspath(os.path.expanduser(source))
        if stage == "tune":
            train_parts, eval_split = ("train",), "val"
        else:
            train_parts, eval_split = ("train", "val"), "test"
        make = lambda split: _folder_dataset(files[split], size)  # noqa: E731

    prep = _preprocess_fn(preprocess)

    def base(ds):
        if prep is not None:
            ds = ds.map(lambda x, y: (prep(x), y), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.cache() if cache else ds

    train = make(train_parts[0])
    for part in train_parts[1:]:
        train = train.concatenate(make(part))
    train_base = base(train)
    n_train = sum(counts[s] for s in train_parts)

    def make_train(seed):
        ds = train_base
        if shuffle:
            ds = ds.shuffle(n_train, seed=seed, reshuffle_each_iteration=True)
        if augment:
            # One stateless seed per image, from a seeded stream that moves on
            # every epoch: a run's seed fixes its augmentation exactly
            # (stateful random ops in a parallel map would not).
            seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
            ds = tf.data.Dataset.zip((ds, seeds)).map(
                lambda xy, s: (_augment(xy[0], size, crop_fraction, s), xy[1]),
                num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    return DataSplits(
        train=make_train(seed),
        eval=base(make(eval_split)).batch(batch_size).prefetch(tf.data.AUTOTUNE),
        make_train=make_train,
        class_names=class_names,
        stage=stage,
        train_splits=train_parts,
        eval_split=eval_split,
        counts=counts,
        source=source,
        image_size=size,
        preprocess=_preprocess_name(preprocess),
    )
