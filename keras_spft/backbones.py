"""Pre-trained backbones from `keras.applications`, by name, with a new head.

`get_backbone("resnet101")` finds the `keras.applications` constructor and
the `preprocess_input` of its module; `build_model(...)` builds
`base + new head` ready for `keras_spft.wrap_pretrained`. TensorFlow-free.
"""

import inspect
import os
import types
from dataclasses import dataclass

import keras

__all__ = ["Backbone", "available_backbones", "get_backbone", "build_model", "check_weights"]

HEADS = ("avg", "flatten")


@dataclass(frozen=True)
class Backbone:
    """A `keras.applications` model family member.

    Attributes:
        name: the constructor's name, e.g. `"MobileNet"`.
        constructor: the `keras.applications` function that builds it.
        preprocess_input: its module's `preprocess_input` (maps raw 0-255
            RGB pixels to the scale the pre-trained weights expect).
        module: the name of that module, e.g. `"mobilenet"`.
    """

    name: str
    constructor: object
    preprocess_input: object
    module: str

    @property
    def has_alpha(self):
        """Whether the constructor takes a width multiplier `alpha`."""
        return "alpha" in inspect.signature(self.constructor).parameters


def _registry():
    apps = keras.applications
    found = {}
    for mod_name in sorted(dir(apps)):
        mod = getattr(apps, mod_name)
        if not isinstance(mod, types.ModuleType) or not hasattr(mod, "preprocess_input"):
            continue
        for attr in dir(mod):
            fn = getattr(mod, attr)
            if attr[0].isupper() and callable(fn) and getattr(apps, attr, None) is fn:
                # A constructor exported by several modules (ResNet50 is in
                # `resnet` and `resnet50`) keeps the first: same preprocessing.
                found.setdefault(attr.lower(), Backbone(attr, fn, mod.preprocess_input, mod_name))
    # Constructors exported only at the top level (MobileNetV3Small/Large: the
    # public `mobilenet_v3` module has just the preprocessing): find their
    # module by where they are defined.
    for attr in sorted(dir(apps)):
        fn = getattr(apps, attr)
        if not (attr[0].isupper() and callable(fn)) or attr.lower() in found:
            continue
        mod_name = getattr(fn, "__module__", "").rsplit(".", 1)[-1]
        mod = getattr(apps, mod_name, None)
        if isinstance(mod, types.ModuleType) and hasattr(mod, "preprocess_input"):
            found[attr.lower()] = Backbone(attr, fn, mod.preprocess_input, mod_name)
    return found


def available_backbones():
    """Names accepted by `get_backbone` / `--model` (lower case), sorted.

    Returns:
        A list of strings such as `"efficientnetb0"`, `"mobilenet"`,
        `"resnet101"`.

    Example:

    >>> "resnet101" in available_backbones()
    True
    """
    return sorted(_registry())


def get_backbone(name):
    """Looks up a `keras.applications` model by name, case-insensitively.

    Args:
        name: e.g. `"resnet101"`, `"EfficientNetB0"`, `"mobilenet"`,
            `"mobilenet_v2"` (underscores and dashes are ignored).

    Returns:
        A `Backbone` (constructor and `preprocess_input`).

    Raises:
        ValueError: no `keras.applications` model has that name; the message
            lists the valid names.

    Example:

    ```python
    from keras_spft.backbones import get_backbone
    bb = get_backbone("resnet101")
    print(bb.name, bb.module, bb.has_alpha)    # ResNet101 resnet False
    ```
    """
    registry = _registry()
    key = str(name).lower().replace("_", "").replace("-", "")
    if key not in registry:
        raise ValueError(
            f"unknown model {name!r}: not a keras.applications model. "
            f"Valid names: {', '.join(sorted(registry))}."
        )
    return registry[key]


def check_weights(weights):
    """Validates a `weights` argument: `"imagenet"`, `None` or a file path.

    Args:
        weights: `"imagenet"` (downloaded by Keras), `None`/`"none"`/`"random"`
            (random initialisation) or the path of a weights file (`.h5` or
            `.weights.h5`) matching the architecture without its top.

    Returns:
        `"imagenet"`, `None` or the absolute path.

    Raises:
        ValueError: a path that does not exist, or a folder.

    Example:

    >>> check_weights("none") is None, check_weights("imagenet")
    (True, 'imagenet')
    """
    if weights is None or str(weights).lower() in ("none", "random"):
        return None
    if weights == "imagenet":
        return weights
    path = os.path.abspath(os.path.expanduser(str(weights)))
    if os.path.isdir(path):
        raise ValueError(f"weights '{path}' is a folder, not a weights file (expected 'imagenet', None or "
                         "the path of a weights file for the model without its top).")
    if not os.path.isfile(path):
        raise ValueError(
            f"weights file '{path}' does not exist (expected 'imagenet', None or the "
            "path of a weights file for the model without its top)."
        )
    return path


def build_model(
    name,
    num_classes,
    *,
    weights="imagenet",
    image_size=224,
    alpha=None,
    head="avg",
    dropout=0.0,
):
    """Builds a pre-trained `keras.applications` backbone with a new head.

    The model is `Input -> base(include_top=False) -> head -> Dense(num_classes)`
    and outputs logits (use a loss with `from_logits=True`). The base is a
    nested model, so `keras_spft.wrap_pretrained(model, ...)` treats the final
    Dense layer as the new head by default. Feed it images already passed
    through `get_backbone(name).preprocess_input` (`keras_spft.data` does).

    Args:
        name: a `keras.applications` model name (see `available_backbones()`).
        num_classes: number of output classes.
        weights: `"imagenet"`, `None` (random) or a weights file path.
        image_size: input height and width in pixels (int or `(h, w)`).
        alpha: width multiplier, only for constructors that take one
            (MobileNet, MobileNetV2, MobileNetV3*).
        head: `"avg"` (global average pooling, the Keras recipe) or
            `"flatten"` (Flatten of the last feature map, as in the paper's
            code).
        dropout: dropout rate before the new Dense layer (0 disables).

    Returns:
        An uncompiled `keras.Model`.

    Raises:
        ValueError: unknown model or head, `alpha` given for a model without
            one, a weights path that does not exist, `num_classes < 1`.

    Example:

    ```python
    from keras_spft.backbones import build_model
    model = build_model("mobilenet", 5, weights=None, image_size=64, alpha=0.25)
    print(model.output_shape)       # (None, 5)
    ```
    """
    backbone = get_backbone(name)
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {HEADS}.")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}.")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    kwargs = {}
    if alpha is not None:
        if not backbone.has_alpha:
            raise ValueError(
                f"--alpha/alpha={alpha} given, but {backbone.name} has no width multiplier "
                "(alpha applies to MobileNet, MobileNetV2, MobileNetV3Small/Large)."
            )
        kwargs["alpha"] = float(alpha)
    weights = check_weights(weights)
    try:
        base = backbone.constructor(
            include_top=False,
            weights=weights,
            input_shape=size + (3,),
            pooling="avg" if head == "avg" else None,
            **kwargs,
        )
    except Exception as e:
        if weights not in (None, "imagenet") and isinstance(e, ValueError) and any(
                m in str(e).lower() for m in ("mismatch", "could not be loaded", "must match")):
            what = f"alpha={kwargs['alpha']:g}" if "alpha" in kwargs else (
                "alpha unset (1.0)" if backbone.has_alpha else "this architecture")
            raise ValueError(
                f"weights file '{weights}' does not fit {backbone.name} with {what} at "
                f"{size[0]}x{size[1]} without its top ({_first_line(e)}); check --weights/weights=, and "
                f"--alpha/alpha= for a width multiplier.") from None
        if isinstance(e, ValueError) and any(m in str(e).lower() for m in ("input size", "input_shape", "should be")):
            raise ValueError(
                f"image size {size[0]}x{size[1]} does not fit {backbone.name} ({_first_line(e)}); check "
                "--image-size/image_size=.") from None
        if weights not in (None, "imagenet") and (
                isinstance(e, OSError) or (isinstance(e, ValueError) and "file format not supported" in str(e).lower())):
            # Not an HDF5 file at all (h5py: "file signature not found"), or unreadable.
            raise ValueError(
                f"weights file '{weights}' cannot be read as Keras weights ({_first_line(e)}); check "
                "--weights/weights= (an .h5 or .weights.h5 file saved by Keras).") from None
        if weights != "imagenet" or "URL fetch failure" not in str(e):
            raise
        # keras.utils.get_file raises a bare Exception when offline.
        raise ValueError(
            f"weights='imagenet': downloading the ImageNet weights of {backbone.name} failed ({e}); "
            "check the network, or pass a local weights file (weights=PATH; --weights PATH on the command line)."
        ) from None
    inputs = keras.Input(size + (3,), name="image")
    x = base(inputs)
    if head == "flatten":
        x = keras.layers.Flatten(name="flatten")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(int(num_classes), name="head")(x)
    return keras.Model(inputs, outputs, name=f"{base.name}_finetune")


def _first_line(error, limit=300):
    """An error's first line, cut: Keras' own loader prints whole weight arrays."""
    text = (str(error).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."
