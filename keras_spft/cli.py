"""`keras-spft`: the paper's fine-tuning experiment on your data, from the shell.

    keras-spft finetune --data DIR --model mobilenet --method mars-pgm ...
    keras-spft tune     --data DIR --model mobilenet --method mars-pgm --seeds 3 ...
    keras-spft compare  --data DIR --model mobilenet --seeds 3 ...

Every finished run is a JSON file under `--out` (`runs/<method>/seed<k>.json`,
`search/<method>/best.json`), so `tune` and `compare` started again with the
same `--out` skip what is done. See docs/workflow.md.
"""

import argparse
import contextlib
import hashlib
import inspect
import json
import math
import os
import sys
import time

from keras_spft._files import atomic_json, atomic_write, read_json

__all__ = ["run", "main"]

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_METHODS = ("none", "l2-sp", "mars-sp", "l2-pgm", "mars-pgm")
DISPLAY = {
    "none": "None", "l2-sp": "L2-SP", "mars-sp": "MARS-SP", "l2-pgm": "L2-PGM",
    "mars-pgm": "MARS-PGM", "mars-pgm-exact": "MARS-PGM (exact)", "delta": "DELTA",
    "mars-pgm-learned": "MARS-PGM (learned radii)", "l2-pgm-learned": "L2-PGM (learned radii)",
}
#: `--distribute` choices and the Keras backend each needs.
DISTRIBUTE = ("none", "mirrored", "data-parallel")
DISTRIBUTE_BACKEND = {"mirrored": "tensorflow", "data-parallel": "jax"}
#: Command-line names of hyper-parameters whose plain name is taken
#: (`--alpha` is the width multiplier): DELTA's alpha and beta.
ARG_NAMES = {"alpha": "delta_alpha", "beta": "delta_beta"}
#: The search-range options (`LOW HIGH`).
RANGE_OPTIONS = ("radius-range", "head-radius-range", "strength-range", "head-strength-range",
                 "delta-alpha-range", "delta-beta-range", "lr-range")
#: Batches of the training data used to compute DELTA's attention.
ATTENTION_BATCHES = 4
# Settings that must match for a finished run on disk to be reused.
SETTING_KEYS = ("data", "data_files", "model", "weights", "weights_file", "alpha", "image_size", "head", "epochs",
                "batch_size", "augment", "batchnorm", "radius_lr", "stage", "delta_maps")
#: DELTA's feature maps, recorded with its runs: ResNet's changed on 2026-11-28
#: (block outputs before; Li et al.'s last convolution of each stage since).
DELTA_MAPS = "li2019 (ResNet: last convolution of each stage)"
#: What a setting that older versions did not record was: runs they finished
#: are reused (batchnorm options and --radius-lr came later; the radius step
#: size has been 0.01 throughout).
UNRECORDED_SETTINGS = {"batchnorm": "none", "radius_lr": 1e-2}


def _log(msg):
    print(msg, flush=True)


class UsageError(SystemExit):
    """A bad option, or an output folder that holds other settings: one line
    on stderr (printed by `run`) and exit status 2, as argparse's errors."""

    def __init__(self, message):
        super().__init__(2)
        self.message = "keras-spft: error: " + message

    def __str__(self):
        return self.message


MAX_SEED_COUNT = 1000   # runs per method: a count of 2**32 ran out of memory making the list


def _seeds(text):
    text = str(text).strip()
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
            if not seeds or any(not 0 <= s < 2**32 for s in seeds):
                raise ValueError
            if len(set(seeds)) < len(seeds):
                raise argparse.ArgumentTypeError(
                    f"--seeds {text!r}: a seed given twice would count one run twice in the table.")
        else:
            n = int(text)
            if not 1 <= n <= MAX_SEED_COUNT:
                raise ValueError
            seeds = list(range(n))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds {text!r}: give a count from 1 to {MAX_SEED_COUNT} (3 means seeds 0,1,2) or a comma "
            "list of seeds from 0 to 2**32-1 (0,4,7)."
        ) from None
    return seeds


def _methods(text):
    from keras_spft.recipe import METHODS

    methods = [m.strip() for m in str(text).split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise argparse.ArgumentTypeError(f"--methods: unknown method {m!r}; expected from {METHODS}.")
    if not methods:
        raise argparse.ArgumentTypeError(f"--methods {text!r}: give at least one method from {METHODS}.")
    return methods


def _count(low):
    """An int option of at least `low`."""
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < low:
            raise argparse.ArgumentTypeError(f"expected an integer of at least {low}, got {text!r}.")
        return v
    return parse


def _positive(text):
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}.")
    return v


def build_parser():
    """The argument parser of `keras-spft` (subcommands finetune, tune, compare)."""
    parser = argparse.ArgumentParser(
        prog="keras-spft",
        description="Regularised fine-tuning of keras.applications models (Gouk et al., 2021 protocol).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        g = p.add_argument_group("data and model")
        g.add_argument("--data", required=True,
                       help="image folder with train/ val/ test/ class subfolders, or tfds:NAME")
        g.add_argument("--data-dir", default=None, help="TFDS data directory")
        g.add_argument("--model", default="mobilenet",
                       help="keras.applications name, e.g. resnet101, efficientnetb0, mobilenet (default)")
        g.add_argument("--weights", default="imagenet", help="imagenet (default), none, or a weights file path")
        g.add_argument("--alpha", type=_positive, default=None,
                       help="width multiplier, for models that have one (MobileNet*)")
        g.add_argument("--image-size", type=_count(1), default=224, help="input size in pixels (default 224)")
        g.add_argument("--head", choices=("avg", "flatten"), default="avg",
                       help="new head on global average pooling (default) or Flatten as in the paper's code")
        g.add_argument("--augment", action="store_true", help="random flip and crop while training")
        t = p.add_argument_group("training")
        t.add_argument("--radius", type=_positive, default=None, help="backbone radius (constraint methods)")
        t.add_argument("--head-radius", type=_positive, default=None, help="head radius (constraint methods)")
        t.add_argument("--strength", type=_positive, default=None, help="backbone strength (penalty methods)")
        t.add_argument("--head-strength", type=_positive, default=None, help="head strength (penalty methods)")
        t.add_argument("--delta-alpha", type=_positive, default=None,
                       help="DELTA's feature-map strength alpha (method delta)")
        t.add_argument("--delta-beta", type=_positive, default=None,
                       help="DELTA's head L2 strength beta (method delta)")
        t.add_argument("--radius-lr", type=_positive, default=None,
                       help="step size of the learned radii (methods *-learned; default 1e-2, FTP's)")
        t.add_argument("--batchnorm", choices=("none", "gamma", "reference"), default="none",
                       help="BatchNorm handling of wrap_pretrained (default none: gamma free)")
        t.add_argument("--epochs", type=_count(1), default=30, help="epochs per run (default 30, as the paper)")
        t.add_argument("--batch-size", type=_count(1), default=32, help="batch size (default 32)")
        t.add_argument("--lr", type=_positive, default=None,
                       help="initial learning rate (default 1e-4), halved every 2/3 of the run; "
                            "in tune/compare the 'none' baseline searches its own (see --lr-range)")
        t.add_argument("--seeds", type=_seeds, default=[0],
                       help="number of seeds (3 -> 0,1,2) or a comma list (default 1)")
        t.add_argument("--out", default="spft_runs", help="output folder (default spft_runs)")
        t.add_argument("--verbose", type=int, choices=(0, 1, 2), default=2,
                       help="Keras fit verbosity: 2 one line per epoch (default), 1 progress bar, 0 quiet")
        t.add_argument("--distribute", choices=DISTRIBUTE, default="none",
                       help="data parallelism: mirrored (TensorFlow backend, tf.distribute.MirroredStrategy), "
                            "data-parallel (JAX backend, keras.distribution.DataParallel), none (default)")

    def searching(p):
        s = p.add_argument_group("search (KerasTuner)")
        s.add_argument("--trials", type=_count(0), default=20, help="search trials per method (default 20; 0: no search)")
        s.add_argument("--tuner", choices=("bayesian", "random", "hyperband", "grid"), default=None,
                       help="KerasTuner tuner (default bayesian)")
        s.add_argument("--objective", choices=("val_accuracy", "val_loss"), default=None,
                       help="what the search maximises or minimises (default val_accuracy)")
        s.add_argument("--tune-epochs", type=_count(1), default=None, help="epochs per trial (default --epochs)")
        for name in (o[:-len("-range")] for o in RANGE_OPTIONS if o != "lr-range"):
            s.add_argument(f"--{name}-range", type=_positive, nargs=2, metavar=("LOW", "HIGH"), default=None,
                           help=f"log-uniform search range of {name.replace('-', '_')} "
                                f"(default {'e^0.5 e^3.5' if 'radius' in name else 'e^-10 e^-1'})")
        s.add_argument("--lr-range", type=_positive, nargs=2, metavar=("LOW", "HIGH"), default=None,
                       help="log-uniform search range of the 'none' baseline's learning rate (default 1e-5 1e-3)")

    p = sub.add_parser("finetune", help="one fine-tuning run per seed with given values")
    common(p)
    p.add_argument("--method", choices=_methods_list(), default="mars-pgm")
    p.add_argument("--stage", choices=("final", "tune"), default="final",
                   help="final: train on train+val, report test (default); tune: train on train, report val")

    p = sub.add_parser("tune", help="search a method's radii/strengths on train->val, then final runs per seed")
    common(p)
    searching(p)
    p.add_argument("--method", choices=_methods_list(), default="mars-pgm")

    p = sub.add_parser("compare", help="methods x seeds (each tuned), then a table of mean +- std test accuracy")
    common(p)
    searching(p)
    p.add_argument("--methods", type=_methods, default=list(DEFAULT_METHODS),
                   help="comma list (default none,l2-sp,mars-sp,l2-pgm,mars-pgm; also mars-pgm-exact, delta, "
                        "mars-pgm-learned, l2-pgm-learned)")
    p.add_argument("--name", default=None, help="column name of the data set in the table (default: its folder name)")
    return parser


def _methods_list():
    from keras_spft.recipe import METHODS

    return METHODS


# ----------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------


def _data_key(data):
    """`--data` as recorded in the settings: an image folder by its real path
    (`syn/`, `./syn`, `/abs/syn` and a link to it are one folder; the same
    relative path from another directory is another)."""
    return data if data.startswith("tfds:") else os.path.realpath(os.path.expanduser(data))


def _data_files(data, contents=True):
    """What an image folder holds, as recorded in the settings: the number of
    images the loader reads (`keras_spft.data.scan_image_folder`: hidden and
    non-image files are not among them), their bytes, and a digest of their
    paths, labels, sizes and contents (another folder at the same path, or
    images added, removed or replaced, differ; `contents=False`: without the
    contents, as older versions recorded it, so that two images swapped
    between classes went unseen); None for TFDS, whose name (and version,
    `tfds:NAME:1.2.0`) says it, and for a folder the loader refuses (its
    error comes when the data is loaded)."""
    if data.startswith("tfds:"):
        return None
    from keras_spft.data import scan_image_folder

    root = _data_key(data)
    try:
        _, files = scan_image_folder(root, check_images=False)
    except ValueError:
        return None
    digest, count, size = hashlib.sha1(), 0, 0
    for split in sorted(files):
        for path, label in sorted(files[split]):
            n = os.path.getsize(path)
            digest.update(f"{os.path.relpath(path, root)}\0{label}\0{n}\0".encode())
            if contents:
                _hash_file(digest, path)
            count, size = count + 1, size + n
    return f"{count} files, {size} bytes, {'contents ' if contents else ''}{digest.hexdigest()[:12]}"


class Session:
    """Loads data once per stage and builds models for one invocation."""

    def __init__(self, args):
        from keras_spft.backbones import check_weights, get_backbone

        self.args = args
        self.backbone = get_backbone(args.model)
        if args.alpha is not None and not self.backbone.has_alpha:
            raise UsageError(
                f"--alpha given, but {self.backbone.name} has no width multiplier "
                "(only MobileNet, MobileNetV2, MobileNetV3Small/Large)."
            )
        try:
            self.weights = check_weights(args.weights)
        except ValueError as e:
            raise UsageError(f"--weights: {e}") from None
        _check_out(args.out)
        self.weights_file = _file_digest(self.weights) if self.weights not in (None, "imagenet") else None
        self._splits = {}
        self._probes = {}
        self._attention = None
        self.strategy = None
        self.distribution = None
        self.replicas = 1
        if args.distribute == "mirrored":
            import tensorflow as tf

            self.strategy = tf.distribute.MirroredStrategy()
            self.replicas = int(self.strategy.num_replicas_in_sync)
            _log(f"[distribute] tf.distribute.MirroredStrategy over {self.replicas} replicas: "
                 f"{', '.join(self.strategy.extended.worker_devices)}")
        elif args.distribute == "data-parallel":
            import keras

            self.distribution = keras.distribution.DataParallel()
            self.replicas = int(self.distribution.device_mesh.devices.size)
            _log(f"[distribute] keras.distribution.DataParallel over {self.replicas} devices")

    def scope(self):
        """Where models are built, loaded, wrapped and compiled (the strategy's
        scope). On JAX it makes the DataParallel distribution current again:
        `keras.backend.clear_session()`, called before every run, drops it,
        and it must stay set through `fit` and `evaluate` as well."""
        self.activate()
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def activate(self):
        """Makes the JAX DataParallel distribution (if any) current."""
        if self.distribution is not None:
            import keras

            keras.distribution.set_distribution(self.distribution)

    def check_batches(self, splits):
        """DataParallel splits every batch evenly over the devices: a batch
        size, or a split's last batch, that does not divide fails inside
        `fit` or `evaluate` (after training): refused before."""
        if self.distribution is None:
            return
        batch = self.args.batch_size
        for name, n in (("train", splits.train_size), (splits.eval_split, splits.eval_size)):
            for size in sorted({min(batch, n), n % batch} - {0}):
                if size % self.replicas:
                    raise UsageError(
                        f"--distribute data-parallel splits every batch over {self.replicas} devices, but "
                        f"--batch-size {batch} gives the {n} images of split '{name}' a batch of {size}: "
                        f"choose a --batch-size whose batches all divide by {self.replicas} (or run on "
                        "fewer devices, e.g. CUDA_VISIBLE_DEVICES).")

    def probe(self, stage):
        """One fixed batch of the training data (numpy), for `GradientNormMonitor`."""
        if stage not in self._probes:
            import keras

            # tf.data's order also depends on the global seed: fix it, so the
            # probe is the same batch whichever run asks first.
            keras.utils.set_random_seed(0)
            x, y = next(iter(self.splits(stage).reseeded(0).train))
            self._probes[stage] = (x.numpy(), y.numpy())
        return self._probes[stage]

    def attention_cache(self):
        """The `.npz` file under `--out` holding DELTA's attention of this
        backbone: one an earlier version wrote, without the images' contents
        in its key, when that one is there and no newer one."""
        path = self._attention_cache(self.data_files)
        if not os.path.isfile(path) and self.data_files is not None:
            earlier = self._attention_cache(self.data_files_by_size)
            if os.path.isfile(earlier):
                # Taken under the new name, once: images changed later (same
                # sizes) then miss both names and the attention is computed again.
                os.replace(earlier, path)
                _log(f"[delta] attention cache of an earlier version (its key without the images' contents) "
                     f"adopted as {path}")
        return path

    def _attention_cache(self, data_files):
        a = self.args
        key = [_data_key(a.data), data_files, self.backbone.name, self.weights, a.alpha, a.image_size, a.head,
               ATTENTION_BATCHES, a.batch_size, a.augment]
        if self.weights_file is not None:   # (not in the key of earlier versions: their caches are found)
            key.append(self.weights_file)
        key = json.dumps(key)
        digest = hashlib.sha1(key.encode()).hexdigest()[:10]
        return os.path.join(a.out, "delta", f"attention_{self.backbone.name}_{digest}.npz")

    def attention(self):
        """DELTA's channel attention, computed once per backbone (on a few batches
        of the training split, train only, so searches never see val) and cached
        under `--out`; later runs and invocations read it back."""
        if self._attention is None:
            import keras

            from keras_spft.delta import compute_attention

            path = self.attention_cache()
            reused = os.path.isfile(path)
            splits = self.splits("tune")
            keras.backend.clear_session()
            keras.utils.set_random_seed(0)
            model = self.build_fn(splits.num_classes)()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            start = time.time()
            self._attention = compute_attention(model, splits.reseeded(0).train.take(ATTENTION_BATCHES),
                                                steps=ATTENTION_BATCHES, cache=path)
            how = ("read from" if reused else
                   f"computed in {time.time() - start:.0f} s on {ATTENTION_BATCHES} training batches ->")
            _log(f"[delta] attention of {self.backbone.name} {how} {path}")
        return self._attention

    def settings(self, stage, method, epochs=None):
        """What a run (or search) of `method` depends on, as recorded with it."""
        from keras_spft import recipe

        a = self.args
        return self.comparable({
            "data": _data_key(a.data), "data_files": self.data_files, "model": self.backbone.name, "weights": self.weights,
            "weights_file": self.weights_file, "alpha": a.alpha,
            "image_size": a.image_size, "head": a.head, "epochs": epochs or a.epochs,
            "batch_size": a.batch_size, "augment": a.augment, "batchnorm": a.batchnorm,
            "radius_lr": self.radius_lr, "stage": stage,
            **({"delta_maps": DELTA_MAPS} if method in recipe.DELTA_METHODS else {}),
        }, method)

    def comparable(self, settings, method):
        """`settings` (made now, or read from disk) with what does not change
        a run of `method` made equal: a setting older versions did not record,
        the width multiplier left at its default (`--alpha` absent), BatchNorm
        handling for methods it does not apply to, the radius step size for
        fixed radii."""
        from keras_spft import recipe

        out = dict(settings)
        for k, v in UNRECORDED_SETTINGS.items():
            if out.get(k) is None:
                out[k] = v
        if "weights_file" not in out:
            # Older versions recorded the weights file by its path only: taken
            # as the file there now.
            out["weights_file"] = self.weights_file if out.get("weights") == self.weights else None
        if out.get("weights_file") and out["weights_file"] == self.weights_file:
            # The same bytes under another name (moved, copied, or given
            # through a link): the same weights.
            out["weights"] = self.weights
        if "data_files" not in out:
            # Recorded by older versions as a path relative to where they ran
            # (taken as relative to here), without the folder's contents.
            out["data"] = _data_key(out.get("data", ""))
            out["data_files"] = self.data_files if out["data"] == _data_key(self.args.data) else None
        elif out["data_files"] and "contents" not in out["data_files"] and out["data"] == _data_key(self.args.data):
            # Recorded by older versions without the images' contents:
            # compared as they recorded it.
            if out["data_files"] == self.data_files_by_size:
                out["data_files"] = self.data_files
        if out.get("alpha") is None and out.get("model") == self.backbone.name and self.backbone.has_alpha:
            out["alpha"] = float(inspect.signature(self.backbone.constructor).parameters["alpha"].default)
        if method not in batchnorm_methods(out["batchnorm"]):
            out["batchnorm"] = "none"
        if method not in recipe.LEARNED_METHODS:
            out["radius_lr"] = recipe.DEFAULT_RADIUS_LR
        if out.get("tuner") == "hyperband":
            out.pop("trials", None)   # Hyperband sets its own budget: --trials does not apply
        if method in recipe.DELTA_METHODS and "delta_maps" not in out:
            out["delta_maps"] = _unrecorded_delta_maps(out.get("model"))
        return out

    @property
    def data_files(self):
        """`_data_files` of `--data`, worked out once."""
        if not hasattr(self, "_data_files"):
            self._data_files = _data_files(self.args.data)
        return self._data_files

    @property
    def data_files_by_size(self):
        """`_data_files` of `--data` without the contents, as versions before
        2026-11-28 recorded it (compared with their records), worked out once."""
        if not hasattr(self, "_data_files_by_size"):
            self._data_files_by_size = _data_files(self.args.data, contents=False)
        return self._data_files_by_size

    @property
    def radius_lr(self):
        """The radii's learning rate (learned-radius methods only)."""
        from keras_spft import recipe

        return self.args.radius_lr or recipe.DEFAULT_RADIUS_LR

    def splits(self, stage):
        if stage not in self._splits:
            from keras_spft.data import load_data

            a = self.args
            self._splits[stage] = load_data(
                a.data, image_size=a.image_size, batch_size=a.batch_size,
                preprocess=self.backbone.preprocess_input, stage=stage, augment=a.augment,
                data_dir=a.data_dir,
            )
            _log(f"[data] {self._splits[stage]}")
        return self._splits[stage]

    def build_fn(self, num_classes):
        from keras_spft.backbones import build_model

        a = self.args

        def build():
            return build_model(a.model, num_classes, weights=self.weights, image_size=a.image_size,
                               alpha=a.alpha, head=a.head)

        return build

    def wrap_options(self, method=None):
        from keras_spft import recipe

        if method in recipe.DELTA_METHODS:
            return {"attention": self.attention()}   # --batchnorm does not apply to DELTA
        bn = self.args.batchnorm
        return {"batchnorm": bn} if bn != "none" and method in batchnorm_methods(bn) else {}


def _hash_file(digest, path):
    """Feeds the bytes of the file at `path` to `digest`, a block at a time."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


def _file_digest(path):
    """A weights file as recorded in the settings: its size and a digest of
    its bytes (a file replaced at the same path differs)."""
    digest = hashlib.sha1()
    _hash_file(digest, path)
    return f"{os.path.getsize(path)} bytes, {digest.hexdigest()[:12]}"


def _check_out(out):
    """--out must be a folder this process can write: found before training,
    not when the first result is saved."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".keras_spft_write_test.{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"--out '{out}' is not a folder keras-spft can write to ({e.strerror or e}).") from None


def _read_json(path, what):
    """A keras-spft record under --out; a damaged one is a UsageError naming
    the file, not a bare JSON error."""
    try:
        return read_json(path, what, "remove it to redo it")
    except ValueError as e:
        raise UsageError(str(e)) from None


def batchnorm_methods(mode):
    """The methods `--batchnorm mode` applies to."""
    from keras_spft import recipe

    if mode == "none":
        return recipe.METHODS
    if mode == "reference":
        return recipe.PGM_METHODS   # per-element radii: not learned ones
    return recipe.PGM_METHODS + recipe.SP_METHODS + recipe.LEARNED_METHODS


def _unrecorded_delta_maps(model):
    """The feature maps of a DELTA run recorded before they were: other than
    today's for a ResNet (its block outputs), the same for the others."""
    if str(model or "").lower().startswith("resnet"):
        return "li2019 (ResNet: block outputs, keras-spft before 2026-11-28)"
    return DELTA_MAPS


def _finished(session, path, method, settings, values=None):
    """The stored result if `path` is a finished run with the same settings and values."""
    if not os.path.isfile(path):
        return None
    done = _read_json(path, "run record")
    old = session.comparable(done.get("settings", {}), method)
    diff = [k for k in SETTING_KEYS if old.get(k) != settings.get(k)]
    shown = ", ".join(f"{k}: {old.get(k)!r} on disk vs {settings.get(k)!r} now" for k in diff)
    if values is not None:
        stored = done.get("values", {})
        vdiff = [k for k in sorted(set(values) | set(stored))
                 if k not in values or k not in stored
                 or not math.isclose(stored[k], values[k], rel_tol=1e-9)]
        shown = ", ".join([shown] * bool(shown) + [
            f"{k}: {stored.get(k)!r} on disk vs {values.get(k)!r} now" for k in vdiff])
        diff += vdiff
    if diff:
        raise UsageError(
            f"'{path}' is a finished run with other settings ({shown}); "
            "use another --out or remove that file."
        )
    return done


def _run_lr(args, values):
    """The learning rate a run uses: its value, else --lr, else the default."""
    from keras_spft import recipe

    return values.get("lr", args.lr or recipe.DEFAULT_LR)


def _fmt_values(values):
    return ", ".join(f"{k}={v:.4g}" for k, v in values.items()) or "-"


def run_splits(session, stage, seed):
    """The data of one run: the stage's splits, shuffled (and augmented) by
    `seed`. tf.data draws the order from the global seed too, so it is set
    first: the same seed gives the same order whatever ran before."""
    import keras

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    return session.splits(stage).reseeded(seed)


def train_one(session, method, values, seed, stage, epochs=None):
    """Trains and evaluates one model; returns the result dict (not saved)."""
    import keras

    import keras_spft
    from keras_spft import recipe

    args = session.args
    epochs = epochs or args.epochs
    splits = run_splits(session, stage, seed)
    session.check_batches(splits)
    options = session.wrap_options(method)          # (DELTA: its attention, computed once)
    xb, yb = session.probe(stage)
    # The head's initial weights: seeded after the attention and the probe,
    # which may or may not have been computed in this process.
    keras.utils.set_random_seed(seed)
    lr = _run_lr(args, values)
    radius_lr = session.radius_lr
    with session.scope():                           # build, load, wrap, compile
        model = session.build_fn(splits.num_classes)()
        wrapped = recipe.wrap(model, method, values, **options)
        # DELTA trains the DeltaModel around `model`; the others train `model` itself.
        trained = wrapped if method in recipe.DELTA_METHODS else model
        recipe.compile_model(trained, lr, radius_lr=radius_lr)
        if trained is not model:
            recipe.compile_model(model, lr)         # the plain network is what is evaluated
    _log(f"[{method} seed {seed}] {recipe.describe(wrapped)}")
    start = time.time()
    callbacks = [keras_spft.DistanceMonitor(), keras_spft.GradientNormMonitor(xb, yb),
                 recipe.lr_schedule(lr, epochs)]
    history = trained.fit(splits.train, epochs=epochs, verbose=args.verbose, shuffle=False,
                          callbacks=callbacks)
    scores = model.evaluate(splits.eval, verbose=0, return_dict=True)
    wall = time.time() - start
    learned = keras_spft.learned_radii(model)
    return {
        "method": method,
        "seed": seed,
        "values": {**values, "lr": lr},
        "eval_split": splits.eval_split,
        "accuracy": float(scores["accuracy"]),
        # Keras' loss adds an SP method's penalty: the cross-entropy compares between methods.
        "loss": float(scores["loss"]),
        "cross_entropy": float(scores["cross_entropy"]),
        "history": {k: [None if x is None else float(x) for x in v] for k, v in history.history.items()},
        "train_images": splits.train_size,
        "eval_images": splits.eval_size,
        **({"learned_radii": learned, "radius_lr": radius_lr} if learned else {}),
        "wall_s": round(wall, 2),
        "settings": session.settings(stage, method, epochs),
        "keras_backend": keras.backend.backend(),
        "versions": _versions(),
        "distribute": args.distribute,
        "replicas": session.replicas,
    }


def _versions():
    """The versions a run was made with (recorded, not compared for reuse)."""
    from importlib import metadata

    import keras

    import keras_spft

    out = {"keras_spft": keras_spft.__version__, "keras": keras.__version__}
    lib = keras.backend.backend()   # the backends' names are their packages' names
    if lib in ("tensorflow", "jax", "torch"):
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:   # tensorflow-cpu, tf-nightly, ...
            out[lib] = getattr(sys.modules.get(lib), "__version__", None)
    return out


def run_seeds(session, method, values, seeds, stage="final"):
    """Runs `method` for every seed, skipping the ones finished on disk."""
    args = session.args
    folder = "runs" if stage == "final" else "runs_tune"
    # The learning rate the run uses, as train_one records it with the run.
    values = {**values, "lr": _run_lr(args, values)}
    results = []
    for seed in seeds:
        path = os.path.join(args.out, folder, method, f"seed{seed}.json")
        done = _finished(session, path, method, session.settings(stage, method), values)
        if done is not None:
            import keras

            made_on = done.get("keras_backend")
            other = (f"; made on the {made_on} backend, this is {keras.backend.backend()}"
                     if made_on and made_on != keras.backend.backend() else "")
            _log(f"[{method} seed {seed}] done already: {done['eval_split']} accuracy "
                 f"{done['accuracy']:.4f} ({path}{other})")
            results.append(done)
            continue
        result = train_one(session, method, values, seed, stage)
        atomic_json(path, result)
        _log(f"[{method} seed {seed}] {result['eval_split']} accuracy {result['accuracy']:.4f}, "
             f"cross-entropy {result['cross_entropy']:.4f} ({_fmt_values(result['values'])}; {args.epochs} epochs, "
             f"{result['train_images']} train images, {result['wall_s']:.0f} s) -> {path}")
        results.append(result)
    return results


def _given_values(args, method):
    """The command line's values of `method`'s hyper-parameters (and `lr`);
    options the method has no use for were refused by `_refuse_unused_options`
    (in `compare`, they apply to the methods that have them)."""
    from keras_spft import recipe

    given = {}
    for name in recipe.hyperparameter_names(method):
        v = getattr(args, ARG_NAMES.get(name, name))
        if v is not None:
            given[name] = v
    if args.lr is not None:
        given["lr"] = args.lr
    return given


def _refuse_unused_options(args, methods):
    """An option none of `methods` has a use for is an error naming it, not
    silently dropped (for `compare`, an option that some of its methods use
    applies to those)."""
    from keras_spft import recipe

    methods = [methods] if isinstance(methods, str) else list(methods)
    own = {n for m in methods for n in recipe.hyperparameter_names(m)}
    names = sorted({n for m in recipe.METHODS for n in recipe.hyperparameter_names(m)} - own)
    unused = []
    for name in names:
        arg = ARG_NAMES.get(name, name)
        for suffix in ("", "_range"):
            if getattr(args, arg + suffix, None) is not None:
                unused.append("--" + (arg + suffix).replace("_", "-"))
    if "none" not in methods and getattr(args, "lr_range", None) is not None:
        unused.append("--lr-range")   # only the baseline searches its learning rate
    if (args.command != "finetune" and set(methods) == {"none"} and args.lr is not None
            and getattr(args, "trials", 0) > 0):
        unused.append("--lr")         # the baseline searches its own (--lr-range)
    if args.radius_lr is not None and not set(methods) & set(recipe.LEARNED_METHODS):
        unused.append("--radius-lr")  # only learned radii have a step size
    if not set(methods) & set(batchnorm_methods(args.batchnorm)):
        unused.append(f"--batchnorm {args.batchnorm}")
    if unused:
        uses = ", ".join("--" + ARG_NAMES.get(n, n).replace("_", "-") for n in sorted(own)) or "none"
        which = (f"{methods[0]} (its hyper-parameters: {uses})" if len(methods) == 1 else
                 f"any of {', '.join(methods)} (their hyper-parameters: {uses})")
        raise UsageError(
            f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to {which}."
        )
    # A value fixes a hyper-parameter, a range searches it: both at once
    # (the value won, the range was dropped without a word) is an error.
    # (--lr with --lr-range is not: the range is the baseline's, the value
    # the regularised methods'.)
    both = [arg for arg in sorted({ARG_NAMES.get(n, n) for n in own} - {"lr"})
            if getattr(args, arg, None) is not None and getattr(args, arg + "_range", None) is not None]
    if both:
        flags = "; ".join(f"--{a.replace('_', '-')} and --{a.replace('_', '-')}-range" for a in both)
        raise UsageError(f"{flags} both given: a value fixes it, a range searches it; give one.")


def _differences(old, new):
    """'key: old on disk vs new now' for every setting that differs."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} on disk vs {new.get(k)!r} now" for k in keys)


def tune_method(session, method):
    """Searches `method` on train -> val (resuming); returns the values to use."""
    from keras_spft import recipe

    args = session.args
    given = _given_values(args, method)
    ranges = {}
    for name in recipe.hyperparameter_names(method):
        rng = getattr(args, f"{ARG_NAMES.get(name, name)}_range", None)
        if rng is not None:
            ranges[name] = tuple(rng)
    ranges.update({k: v for k, v in given.items() if k != "lr"})   # given on the command line: fixed
    if method == "none":
        # The baseline's fair shot: its learning rate is searched (--lr-range).
        ranges["lr"] = tuple(args.lr_range) if args.lr_range else recipe.LR_RANGE
    else:
        ranges["lr"] = given.get("lr", recipe.DEFAULT_LR)          # fixed for regularised methods
    searched = [k for k, v in {**recipe.default_ranges(method), **ranges}.items() if isinstance(v, tuple)]
    if args.trials <= 0 or not searched:
        values = recipe.method_values(method, given)
        values["lr"] = given.get("lr", recipe.DEFAULT_LR)
        why = ("--trials 0" if args.trials <= 0 else
               "all values given" if recipe.default_ranges(method) else "nothing to search")
        _log(f"[{method}] no search ({why}): "
             f"{_fmt_values(values)}")
        return values, None

    folder = os.path.join(args.out, "search", method)
    best_path = os.path.join(folder, "best.json")
    epochs = args.tune_epochs or args.epochs
    settings = session.settings("tune", method, epochs)
    settings_search = {**settings, "trials": args.trials, "tuner": args.tuner, "objective": args.objective,
                       "ranges": {k: list(v) if isinstance(v, tuple) else v for k, v in ranges.items()}}
    as_stored = session.comparable(json.loads(json.dumps(settings_search)), method)   # tuples as lists, as read back
    if os.path.isfile(best_path):
        done = _read_json(best_path, "search record")
        stored = session.comparable(done.get("search_settings") or {}, method)
        if stored == as_stored:
            _log(f"[{method}] search done already: {_fmt_values(done['best'])} "
                 f"({done['objective']} {done['best_score']:.4f}, {best_path})")
            if done.get("objective") == "val_loss" and method in recipe.SP_METHODS:
                _log(f"[{method}] note: that search scored Keras' val_loss, which adds the {method} penalty "
                     "(keras-spft before 2026-11-28), so it favoured weak strengths; remove "
                     f"'{folder}' to search again on the cross-entropy.")
            return done["best"], done
        raise UsageError(
            f"'{best_path}' is a finished search with other settings "
            f"({_differences(stored, as_stored)}); "
            "use another --out or remove that folder."
        )
    # An unfinished search resumes from KerasTuner's state in `folder` (its
    # finished trials are kept): only with the settings it was started with.
    started_path = os.path.join(folder, "search_settings.json")
    if os.path.isfile(started_path) and set(os.listdir(folder)) <= {"search_settings.json"}:
        # A command that failed before KerasTuner wrote anything (a bad
        # weights file or image size fails when it first builds the model):
        # nothing to resume, so its record blocks nothing.
        _log(f"[{method}] '{folder}' holds a search that never started: started afresh")
        os.remove(started_path)
    if os.path.isfile(started_path):
        started = session.comparable(_read_json(started_path, "search record"), method)
        if started != as_stored:
            raise UsageError(
                f"'{folder}' holds an unfinished search started with other "
                f"settings ({_differences(started, as_stored)}); rerun with those settings to resume it, or use "
                "another --out or remove that folder."
            )
    from keras_spft.tuning import _require_sklearn, _grid_min_trials, search

    # What search() would refuse, refused before the data loads, in the command's words.
    if args.tuner == "grid" and args.trials < _grid_min_trials(len(searched)):
        raise UsageError(f"--tuner grid over {len(searched)} searched value(s) ({', '.join(searched)}) needs "
                         f"--trials of at least {_grid_min_trials(len(searched))} (both ends of each range), "
                         f"got {args.trials}.")
    if args.tuner == "bayesian":
        try:
            _require_sklearn()
        except ImportError:
            raise UsageError("--tuner bayesian (the default) needs scikit-learn: pip install "
                             "'keras-tuner[bayesian]', or pass --tuner random.") from None
    # Data (and DELTA's attention) first: a command that fails before the
    # search starts leaves no record that would block the corrected one.
    # Every method's search starts from the same data order (seed 0), not
    # from where the methods searched before it in this process left it.
    splits = run_splits(session, "tune", 0)
    session.check_batches(splits)
    if session.distribution is not None:   # the final runs' batches too, before the search, not after it
        session.check_batches(session.splits("final"))
    wrap_options = session.wrap_options(method)
    atomic_json(started_path, settings_search)
    budget = (f"its own budget (--trials does not apply; up to {epochs} epochs per model, factor 3)"
              if args.tuner == "hyperband" else f"{args.trials} trials of {epochs} epochs")
    _log(f"[{method}] searching {', '.join(searched)} with {args.tuner}, {budget}, "
         f"objective {args.objective} (train -> val); KerasTuner state in {folder}")
    start = time.time()
    session.activate()   # (the search keeps it current across KerasTuner's clear_session)
    result = search(
        session.build_fn(splits.num_classes), splits.train, splits.eval, method,
        epochs=epochs, tuner=args.tuner, max_trials=args.trials, objective=args.objective,
        ranges=ranges, lr=given.get("lr", recipe.DEFAULT_LR), radius_lr=session.radius_lr,
        wrap_options=wrap_options,
        directory=os.path.join(args.out, "search"), project_name=method,
        verbose=args.verbose,
        **({"distribution_strategy": session.strategy} if session.strategy is not None else {}),
    )
    _log(f"[{method}] search result:\n{result}")
    best = {k: v for k, v in result.best.items()}
    record = {
        "method": method, "best": best, "best_score": result.best_score, "objective": result.objective,
        "trials": result.trials, "search_settings": settings_search, "wall_s": round(time.time() - start, 2),
        "defaults": recipe.method_values(method),
    }
    atomic_json(best_path, record)
    return best, record


# ----------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------


def summarise(results_by_method, searches, column):
    """Mean and std (sample, ddof=1) of final-run accuracy per method."""
    import numpy as np

    rows = []
    split = "/".join(sorted({r.get("eval_split", "test") for rs in results_by_method.values() for r in rs})) or "test"
    for method, results in results_by_method.items():
        accs = np.array([r["accuracy"] for r in results], dtype="float64") * 100
        rows.append({
            "method": method,
            "name": DISPLAY.get(method, method),
            "seeds": [r["seed"] for r in results],
            "accuracy": [float(a) for a in accs],
            "mean": float(accs.mean()),
            "std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
            "values": results[0]["values"] if results else {},
            "search": None if searches.get(method) is None else {
                k: searches[method][k] for k in ("best", "best_score", "objective", "defaults")
                if k in searches[method]},
            "wall_s": float(sum(r["wall_s"] for r in results)),
        })
    return {"column": column, "accuracy_label": f"{split} accuracy (%)",
            "metric": f"{split} accuracy (%), final epoch, mean +- std over seeds", "rows": rows}


def markdown_table(summary):
    """The table in the layout of the paper's Tables 2/3 (methods x data set)."""
    col = summary["column"]
    best = max((r["mean"] for r in summary["rows"]), default=None)
    lines = [f"| Method | {col} | seeds | hyper-parameters |", "|---|---|---|---|"]
    for r in summary["rows"]:
        cell = f"{r['mean']:.2f} ± {r['std']:.2f}" if len(r["seeds"]) > 1 else f"{r['mean']:.2f}"   # no spread from one seed
        if r["mean"] == best and len(summary["rows"]) > 1:
            cell = f"**{cell}**"
        lines.append(f"| {r['name']} | {cell} | {len(r['seeds'])} | {_fmt_values(r['values'])} |")
    return "\n".join(lines)


def plot(summary, path):
    """Bar chart of mean +- std with each seed's accuracy as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2, 3.5))
    xs = range(len(rows))
    ax.bar(xs, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=4, color="#8fb3d9")
    for x, r in zip(xs, rows):
        ax.plot([x] * len(r["accuracy"]), r["accuracy"], "k.", alpha=0.6)
    ax.set_xticks(list(xs), [r["name"] for r in rows])
    ax.set_ylabel(summary.get("accuracy_label", "test accuracy (%)"))
    ax.set_title(summary["column"])
    lo = min((min(r["accuracy"]) for r in rows if r["accuracy"]), default=0)
    ax.set_ylim(max(0, lo - 10), 100)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


#: Methods whose radius is a MARS radius (drawn on the distance histograms).
MARS_RADIUS_METHODS = ("mars-pgm", "mars-pgm-exact")


def plot_diagnostics(results_by_method, folder):
    """`distances.png` and `gradient_norms.png` in `folder`, from one seed per method.

    Uses the first seed of each method whose history holds the diagnostics
    (`spft/*` from `DistanceMonitor`, `grad/*` from `GradientNormMonitor`);
    runs finished before keras-spft logged them are left out.

    Returns:
        The list of paths written (a plot without any data is skipped).
    """
    from keras_spft import plots

    def first(key_test):
        out = {}
        for method, results in results_by_method.items():
            for r in results:
                if any(key_test(k) for k in r.get("history", {})):
                    out[DISPLAY.get(method, method)] = (method, r)
                    break
        return out

    written = []
    dist = first(lambda k: k.startswith("spft/") and k.endswith("/mars"))
    if dist:
        radius = {name: r["values"].get("radius") for name, (m, r) in dist.items()
                  if m in MARS_RADIUS_METHODS}
        path = os.path.join(folder, "distances.png")
        plots.plot_distance_histograms(
            {name: r["history"] for name, (m, r) in dist.items()}, path, radius=radius,
            title="Per-layer MARS distance to the pre-trained weights, final epoch (seed "
                  + ", ".join(sorted({str(r["seed"]) for m, r in dist.values()})) + ")")
        written.append(path)
    grads = first(lambda k: k == "grad/global")
    if grads:
        path = os.path.join(folder, "gradient_norms.png")
        plots.plot_gradient_norms({name: r["history"] for name, (m, r) in grads.items()}, path)
        written.append(path)
    return written


def _write_tables(args, results_by_method, searches, column, stem, extra, diagnostics=False):
    summary = summarise(results_by_method, searches, column)
    summary.update(extra)
    os.makedirs(args.out, exist_ok=True)
    figures = plot_diagnostics(results_by_method, args.out) if diagnostics else []
    if diagnostics:
        summary["diagnostics"] = [os.path.basename(p) for p in figures]
    table = markdown_table(summary)
    atomic_json(os.path.join(args.out, stem + ".json"), summary)
    atomic_write(os.path.join(args.out, stem + ".md"),
                  lambda f: f.write(table + "\n\n" + summary["metric"] + ".\n"))
    plot(summary, os.path.join(args.out, stem + ".png"))
    _log("\n" + table)
    _log(f"\nwritten: {os.path.join(args.out, stem)}.md, .json, .png")
    if figures:
        _log(f"diagnostics: {', '.join(figures)}")
    elif diagnostics:
        _log("diagnostics: none (no run on disk holds spft/* or grad/* values)")
    return summary


def _column(args):
    if getattr(args, "name", None):
        return args.name
    if args.data.startswith("tfds:"):
        return args.data[len("tfds:"):]
    return os.path.basename(os.path.normpath(args.data))


# ----------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------


def cmd_finetune(args):
    _refuse_unused_options(args, args.method)
    session = Session(args)
    from keras_spft import recipe

    values = recipe.method_values(args.method, _given_values(args, args.method))
    results = run_seeds(session, args.method, values, args.seeds, stage=args.stage)
    if len(results) > 1:   # --stage tune scores val: its own files, never the final table
        stem = "finetune" if args.stage == "final" else "finetune_tune"
        _write_tables(args, {args.method: results}, {}, _column(args), stem, {})
    return results


def _pipeline(args, methods, stem, diagnostics=False):
    start = time.time()
    session = Session(args)
    results, searches = {}, {}
    for method in methods:
        values, record = tune_method(session, method)
        searches[method] = record
        results[method] = run_seeds(session, method, values, args.seeds, stage="final")
    extra = {"command": "keras-spft " + " ".join(args.argv) if getattr(args, "argv", None) else None,
             "wall_s_this_invocation": round(time.time() - start, 1)}
    return _write_tables(args, results, searches, _column(args), stem, extra, diagnostics=diagnostics)


def cmd_tune(args):
    _refuse_unused_options(args, args.method)
    return _pipeline(args, [args.method], "tune")


def cmd_compare(args):
    _refuse_unused_options(args, args.methods)
    return _pipeline(args, args.methods, "compare", diagnostics=True)


def check_distribute(choice, backend):
    """Raises `ValueError` when `--distribute choice` cannot run on `backend`."""
    need = DISTRIBUTE_BACKEND.get(choice)
    if need is None or need == backend:
        return
    fits = [c for c, b in DISTRIBUTE_BACKEND.items() if b == backend]
    hint = (f"; on {backend} use --distribute {fits[0]}" if fits else
            f"; the {backend} backend has no --distribute option here (use --distribute none)")
    raise ValueError(
        f"--distribute {choice} needs the {need} backend (KERAS_BACKEND={need}), "
        f"but Keras runs on {backend}{hint}."
    )


def main(argv=None):
    """Entry point of the `keras-spft` console script.

    Args:
        argv: the arguments (default `sys.argv[1:]`).

    Returns:
        0, the exit status (console scripts call `sys.exit(main())`); errors
        exit with status 2 and a line naming the option or path (after
        argparse's usage line, for the errors argparse reports).

    Example:

    ```python
    import sys
    from keras_spft import cli
    sys.exit(cli.main(["finetune", "--data", "flowers17/", "--method", "l2-pgm", "--radius", "3"]))
    ```
    """
    run(argv)
    return 0


def run(argv=None):
    """Runs a `keras-spft` command from Python and returns its results.

    Args:
        argv: the arguments, as on the command line.

    Returns:
        The command's results (a list of run dicts, or the summary dict).

    Example:

    ```python
    from keras_spft import cli
    summary = cli.run(["compare", "--data", "flowers17/", "--model", "mobilenet", "--alpha", "0.25",
                       "--seeds", "3", "--out", "runs/"])
    [(row["method"], row["mean"], row["std"]) for row in summary["rows"]]
    ```
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in RANGE_OPTIONS:
        rng = getattr(args, name.replace("-", "_"), None)
        if rng is not None and not rng[0] < rng[1]:
            parser.error(f"--{name} {rng[0]:g} {rng[1]:g}: LOW must be below HIGH.")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if hasattr(args, "trials"):
        search_only = [f"--{o.replace('_', '-')}" for o in ("tuner", "objective", "tune_epochs")
                       if getattr(args, o) is not None]
        search_only += [f"--{o}" for o in RANGE_OPTIONS if getattr(args, o.replace("-", "_")) is not None]
        if args.trials == 0 and search_only:
            parser.error(f"{', '.join(search_only)} {'applies' if len(search_only) == 1 else 'apply'} "
                         "to the search, and --trials 0 runs none.")
        args.tuner = args.tuner or "bayesian"
        args.objective = args.objective or "val_accuracy"
    if args.data_dir is not None and not str(args.data).startswith("tfds:"):
        parser.error(f"--data-dir applies to TFDS data (--data tfds:NAME) only, not to the image folder {args.data!r}.")
    if args.distribute != "none":
        import keras

        try:
            check_distribute(args.distribute, keras.backend.backend())
        except ValueError as e:
            parser.error(str(e))
        from keras_spft.recipe import LEARNED_METHODS

        chosen = getattr(args, "methods", None) or [getattr(args, "method", None)]
        learned = [m for m in chosen if m in LEARNED_METHODS]
        if learned and args.distribute == "mirrored":
            parser.error(f"--distribute mirrored does not support learned radii ({', '.join(learned)}); "
                         "run them without --distribute, or on JAX with --distribute data-parallel.")
    try:
        return {"finetune": cmd_finetune, "tune": cmd_tune, "compare": cmd_compare}[args.command](args)
    except ValueError as e:
        # Bad data, model or option: one clear line, no traceback.
        parser.exit(2, f"keras-spft: error: {e}\n")
    except UsageError as e:
        sys.stderr.write(f"{e}\n")
        raise


if __name__ == "__main__":
    sys.exit(main())
