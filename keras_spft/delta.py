"""DELTA: attention-weighted feature-map regularisation (Li et al., 2019).

DELTA keeps the *behaviour* of the pre-trained network instead of its weights:
while fine-tuning, the feature maps of the model at a few layers are pulled
towards the feature maps that a frozen copy of the pre-trained backbone
computes on the same batch, channel by channel, with more weight on the
channels that matter for the new task.

`DeltaModel(model, ...)` wraps a built model (pre-trained backbone plus new
head) into a `keras.Model` whose forward pass, in training mode, also runs the
frozen copy and adds the DELTA term with `add_loss`. Plain
`compile`/`fit`/`evaluate`/`save` work on TensorFlow, JAX and PyTorch.

Two variants:

| `variant` | default feature maps | channel weights `w_c` | term per feature map |
|---|---|---|---|
| `"li2019"` (original) | ResNet: last convolution of each stage, as Li et al.; EfficientNet, MobileNet: last block at each resolution (4 maps) | `softmax(zscore(importance) / 5)` per map | `0.5 * sum_c w_c * (C / (H W)) * ||F_c - F0_c||^2` |
| `"last-layer"` (Gouk et al.'s baseline) | the last feature map | `sigmoid(importance)` | `mean_{h,w,c} w_c * (F - F0)^2` |

`importance` of a channel is the mean increase of the cross-entropy of a head
trained on the frozen features when that channel of the frozen feature map is
set to zero (`compute_attention`). The term is averaged over the batch (Keras
losses are means; Li et al.'s code sums over the batch, so their `alpha`
corresponds to `alpha / batch_size` here).
"""

import itertools
import json
import os
import re
import warnings

import numpy as np
import keras
from keras import ops

from keras_spft._files import atomic_write
from keras_spft.anchors import check_count, is_number
from keras_spft.kernels import UnsupportedLayerError, kernel_specs, walk_layers

__all__ = [
    "DeltaModel",
    "add_delta",
    "compute_attention",
    "default_feature_layers",
    "attention_from_importance",
    "save_attention",
    "load_attention",
]

VARIANTS = ("li2019", "last-layer")


# -- finding layers -------------------------------------------------------------
# Layers that keep their input's layout: the channel axis of their output is
# their input's (a ReLU, an Add, a BatchNorm after a convolution).
_SAME_LAYOUT = (keras.layers.ReLU, keras.layers.Activation, keras.layers.LeakyReLU, keras.layers.PReLU,
                keras.layers.ELU, keras.layers.BatchNormalization, keras.layers.Dropout, keras.layers.GaussianNoise,
                keras.layers.GaussianDropout, keras.layers.Add, keras.layers.Subtract, keras.layers.Multiply,
                keras.layers.Average, keras.layers.Maximum, keras.layers.Minimum)
_SAME_LAYOUT_OPS = ("Add", "Subtract", "Multiply", "Maximum", "Minimum", "Relu", "Sigmoid", "Tanh")


def _channels_first(layer, rank):
    """Whether a feature map of `rank` from `layer` has its channels on axis 1:
    the `data_format` of the layer, else of the layers before it through
    layers that keep the layout (a ReLU or an Add after a convolution), when
    they all agree; else Keras' `image_data_format()` (by which
    keras.applications builds its layers)."""
    if rank < 3:
        return False
    found, seen, todo = set(), set(), [layer]
    while todo:
        op = todo.pop()
        if id(op) in seen:
            continue
        seen.add(id(op))
        fmt = getattr(op, "data_format", None)
        if fmt in ("channels_first", "channels_last"):
            found.add(fmt)
            continue
        passes = isinstance(op, _SAME_LAYOUT) or (
            not isinstance(op, keras.layers.Layer) and type(op).__name__ in _SAME_LAYOUT_OPS)
        if not passes:
            found.add(None)   # a Permute, Reshape, Dense...: the layout is not known from before it
            continue
        for node in getattr(op, "_inbound_nodes", []):
            todo.extend(p.operation for p in node.parent_nodes)
    if len(found) == 1 and None not in found:
        return found == {"channels_first"}
    return keras.config.image_data_format() == "channels_first"


def _output_shape(layer):
    try:
        return tuple(layer.output.shape)
    except (AttributeError, ValueError):
        return None


# A ResNet block's last convolution, with its stage (ResNets are grouped by
# stage). Li et al. tap the last convolution of each stage, before its
# BatchNorm, the shortcut and the ReLU (torchvision's `layer1.2.conv3`, ...).
_RESNET_BLOCK = re.compile(r"conv(\d)_block\d+_3_conv")
_BLOCK_PATTERNS = (
    # ResNet / ResNetV2 (keras.applications): last convolution of every block.
    r"conv\d_block\d+_3_conv",
    # EfficientNet / EfficientNetV2: output of every block.
    r"block\d+[a-z]_(add|project_bn|project_activation)",
    # MobileNet: output of every depthwise-separable block.
    r"conv_pw_\d+_relu",
    # MobileNetV2 / V3: output of every inverted-residual block.
    r"(block_\d+_(add|project_BN)|expanded_conv_project_BN)",
    r"expanded_conv(_\d+)?_(add|project_bn)",
    r"expanded_conv(_\d+)?/(Add|project/BatchNorm)",
)


def default_feature_layers(model, variant="li2019", max_maps=4):
    """Default DELTA feature maps of a model.

    `"li2019"`: ResNet: the output of the last convolution of each stage
    `convN`, as Li et al. (before its BatchNorm, the shortcut and the ReLU);
    other families: the last block output at each spatial resolution; for
    the deepest `max_maps` stages (ResNet50: `conv2_block3_3_conv`,
    `conv3_block4_3_conv`, `conv4_block6_3_conv`, `conv5_block3_3_conv`;
    EfficientNetB0: `block2b_add`, `block3b_add`,
    `block5c_add`, `block7a_project_bn`; MobileNet: `conv_pw_3_relu`,
    `conv_pw_5_relu`, `conv_pw_11_relu`, `conv_pw_13_relu`). Blocks are
    recognised by the layer names of `keras.applications` ResNet, EfficientNet
    and MobileNet models; for other models this falls back to the last feature
    map with a warning (pass `feature_layers=` explicitly). EfficientNet and
    MobileNet maps are told apart by their spatial size: a base built without
    `input_shape` (sizes `None`) is a `ValueError`.
    `"last-layer"`: the last layer with a 2-D or 3-D map as output (rank 4
    or more with the batch axis; a 1-D model's layers need
    `feature_layers=`).

    Args:
        model: a built model, possibly with the backbone nested inside.
        variant: `"li2019"` or `"last-layer"`.
        max_maps: at most this many maps (deepest resolutions first kept).

    Returns:
        List of layer paths (`"resnet50/conv2_block3_3_conv"` for a nested base).

    Example:

    >>> base = keras.applications.ResNet50(weights=None, include_top=False,
    ...                                    input_shape=(64, 64, 3))
    >>> default_feature_layers(base)[-1]
    'conv5_block3_3_conv'
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown DELTA variant {variant!r}; expected one of {VARIANTS}.")
    spatial = []
    for path, layer in walk_layers(model):
        if isinstance(layer, keras.Model):
            continue
        shape = _output_shape(layer)
        if shape is not None and len(shape) >= 4:
            # the spatial sizes, wherever the channel axis is
            spatial.append((path, layer, shape[2:] if _channels_first(layer, len(shape)) else shape[1:-1]))
    if not spatial:
        raise ValueError("the model has no layer with a spatial output; pass `feature_layers=`.")
    last = spatial[-1][0]
    if variant == "last-layer":
        return [last]
    blocks = [(p, s) for p, l, s in spatial
              if any(re.fullmatch(pat, l.name) for pat in _BLOCK_PATTERNS)]
    if not blocks:
        warnings.warn(
            "DELTA: no known block names (ResNet, EfficientNet, MobileNet); "
            f"using the last feature map '{last}' only. Pass `feature_layers=`.",
            stacklevel=2,
        )
        return [last]
    unknown = [p for p, s in blocks
               if not _RESNET_BLOCK.fullmatch(p.rsplit("/", 1)[-1])
               and any(d is None for d in s)]
    if unknown:
        raise ValueError(
            f"DELTA: the feature maps of the model have no known spatial size "
            f"(e.g. '{unknown[0]}'), so its resolutions cannot be told apart: "
            "build the base with `input_shape=(height, width, 3)`, or pass "
            "`feature_layers=`."
        )
    by_group = {}
    for p, s in blocks:  # topological order: the last one of a group wins
        stage = _RESNET_BLOCK.fullmatch(p.rsplit("/", 1)[-1])
        # ResNet: group by stage (ResNetV2 downsamples inside a stage's last
        # block); others: by spatial resolution.
        by_group[("stage", stage.group(1)) if stage else tuple(s)] = p
    keep = [p for p, _ in blocks if p in by_group.values()]
    return keep[-max_maps:]


def _find(model, names):
    """Resolves layer names or paths to full paths; errors name what is missing."""
    paths = {}
    for path, layer in walk_layers(model):
        paths.setdefault(path, path)
        paths.setdefault(layer.name, path)
    out = []
    for n in names:
        if n not in paths:
            raise ValueError(f"feature layer '{n}' does not exist in the model.")
        out.append(paths[n])
    return out


# -- rebuilding graphs ----------------------------------------------------------
def _functional(model):
    if isinstance(model, keras.Sequential):
        f = getattr(model, "_functional", None)
        if f is None:
            raise ValueError(
                f"Sequential model '{model.name}' has no known input shape: "
                "start it with keras.Input(...) or build it first."
            )
        return f
    if not hasattr(model, "_run_through_graph"):
        raise ValueError(
            f"model '{model.name}' is a subclassed model; DELTA needs a "
            "Functional or Sequential model to read intermediate feature maps."
        )
    return model


def _rebuild(model, targets, transform, prefix=""):
    """A Functional model sharing `model`'s layers, with its outputs followed
    by the outputs of the layers at `targets` (full paths), channels last.
    `transform(path, layer, output)` gives the tensor that goes on through
    the graph (and is tapped).

    Returns `(new_model, n_outputs, found_paths)`.
    """
    fn = _functional(model)
    inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype) for t in fn.inputs]
    found, tapped = [], []

    def operation_fn(op):
        path = prefix + op.name
        if isinstance(op, keras.Model) and any(t.startswith(path + "/") for t in targets):
            sub, n_sub, sub_found = _rebuild(op, targets, transform, path + "/")

            def call_sub(*args, **kwargs):
                outs = sub(*args, **kwargs)
                outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
                tapped.extend(outs[n_sub:])
                found.extend(sub_found)
                return outs[0] if n_sub == 1 else outs[:n_sub]

            return call_sub
        if path in targets:
            def call_tap(*args, **kwargs):
                out = transform(path, op, op(*args, **kwargs))
                # Taps are channels-last whatever the layer's data_format.
                tapped.append(ops.moveaxis(out, 1, -1) if _channels_first(op, len(out.shape)) else out)
                found.append(path)
                return out

            return call_tap
        return op

    outputs = fn._run_through_graph(inputs, operation_fn=operation_fn)
    outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    new = keras.Model(inputs if len(inputs) > 1 else inputs[0], outputs + tapped)
    return new, len(outputs), found


def _inputs_of(model):
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


def _plain_clone(layer):
    """Clones a layer from its config without constraints/regularizers."""
    if isinstance(layer, keras.layers.InputLayer):
        return layer
    cfg = layer.get_config()
    for k in list(cfg):
        if k.endswith("_constraint") or k.endswith("_regularizer"):
            cfg[k] = None
    return layer.__class__.from_config(cfg)


def _frozen_copy(features, name):
    """An independent, non-trainable copy of the feature model `features`."""
    frozen = keras.models.clone_model(features, clone_function=_plain_clone, recursive=True)
    src, dst = features.weights, frozen.weights
    if len(src) != len(dst):
        raise RuntimeError("DELTA: the frozen copy does not mirror the backbone's weights.")
    for s, d in zip(src, dst):
        if tuple(s.shape) != tuple(d.shape):
            raise RuntimeError(f"DELTA: weight {s.path} was not copied ({s.shape} vs {d.shape}).")
        # a host copy: on JAX two variables must not share one device buffer
        d.assign(np.array(ops.convert_to_numpy(s)))
    frozen.trainable = False
    frozen.name = name
    return frozen


# -- the model ------------------------------------------------------------------
def _head_names(model, head):
    """`head` as a list of top-level layer names (default: `_default_head`);
    a single name is one layer, and every name must exist."""
    if head is None:
        return _default_head(model)
    head = [head] if isinstance(head, (str, keras.layers.Layer)) else list(head)
    top_layers = getattr(model, "layers", [])
    # Layer objects stand for their names (top-level ones only).
    head = [next((l.name for l in top_layers if l is h), h.name) if isinstance(h, keras.layers.Layer) else h
            for h in head]
    top = {l.name for l in top_layers}
    missing = [h for h in head if h not in top]
    if missing:
        raise ValueError(
            f"DELTA: head layer(s) {missing} are not top-level layers of the model "
            f"(top-level layers: {sorted(top)})."
        )
    return head


def _default_head(model):
    """The top-level layers holding the head `wrap_pretrained` would find
    (the same rules, and the same error where it cannot tell)."""
    from keras_spft.wrap import _default_head as head_paths

    names = []
    for path in head_paths(model, list(walk_layers(model))):
        top = path.split("/")[0]
        if top not in names:
            names.append(top)
    return names


def _head_kernels(model, head):
    """The kernels of the head layers, and of the layers inside a head
    layer that is a model (`Sequential([base, Sequential([Dense, Dense])])`)."""
    by = {l.name: l for l in model.layers}
    out = []
    for n in head:
        if n not in by:
            raise ValueError(f"head layer '{n}' is not a top-level layer of the model.")
        for layer in [by[n]] + [l for _, l in walk_layers(by[n])]:
            try:
                specs = kernel_specs(layer)
            except UnsupportedLayerError:
                continue
            out.extend(spec.variable for spec in specs
                       if not any(spec.variable is k for k in out))
    return out


@keras.saving.register_keras_serializable(package="keras_spft")
class DeltaModel(keras.Model):
    """Fine-tunes `model` with the DELTA regulariser of Li et al. (2019).

    In training mode the forward pass also runs a frozen copy of the
    pre-trained network (never trained, BatchNorm in inference mode) and adds

    `alpha * sum_l Omega_l(x) + beta / 2 * ||V||_F^2`

    to the loss with `add_loss`, where `Omega_l` compares the feature map `l`
    of the model with the frozen one (see the module docstring for the two
    variants) and `V` are the head kernels. In inference mode
    (`predict`/`evaluate`) only `model` runs, so `val_loss` excludes the term.

    The wrapped `model` shares its weights with this one: after `fit`,
    `delta_model.model` is the fine-tuned plain model, ready to save or serve.

    Extra cost per training step: one forward pass of the frozen copy up to
    the deepest feature layer (no backward pass through it), plus element-wise
    work on the feature maps and memory for the frozen weights and maps.

    Args:
        model: a built Functional or Sequential model (pre-trained backbone,
            possibly nested, and a new head), with its pre-trained weights.
        feature_layers: names or paths of the layers whose outputs are
            compared; `None` uses `default_feature_layers(model, variant)`.
        alpha: strength of the feature-map term (a batch mean here; Li et
            al.'s 0.01 is on a batch sum, i.e. `0.01 * batch_size` here).
        beta: strength of the L2 penalty `beta / 2 * ||V||^2` on the head
            kernels (Li et al.: 0.01; `0` disables it).
        variant: `"li2019"` (attention softmax(zscore / 5), several maps) or
            `"last-layer"` (sigmoid attention, mean squared difference).
        head: names of the head layers (top-level); default: those holding
            the head `wrap_pretrained` finds (the kernel layers outside a
            nested backbone, else the last one; where it cannot tell, as for
            a head model on a flat base, an error asks for `head=`).
        attention: optional list of per-channel weight arrays, one per feature
            layer (e.g. from `compute_attention` or a cache). Until set, the
            weights are uniform: `1 / C` (li2019) or `1` (last-layer).

    Returns:
        A `keras.Model`; call `compile`/`fit` as usual.

    Example:

    ```python
    delta = keras_spft.DeltaModel(model, alpha=0.01, beta=0.01)
    delta.compute_attention(x, y, cache="attention.npz")
    delta.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    delta.fit(x, y, epochs=1)
    delta.model.save("finetuned.keras")      # the plain fine-tuned model
    ```
    """

    def __init__(self, model, feature_layers=None, alpha=0.01, beta=0.01,
                 variant="li2019", head=None, attention=None, **kwargs):
        super().__init__(**kwargs)
        if variant not in VARIANTS:
            raise ValueError(f"unknown DELTA variant {variant!r}; expected one of {VARIANTS}.")
        for what, v in (("alpha", alpha), ("beta", beta)):
            if not (is_number(v) and np.isfinite(v) and v >= 0):
                raise ValueError(f"DeltaModel: `{what}` must be a finite number >= 0, got {v!r}.")
        if not getattr(model, "built", False):
            raise ValueError("the model is not built: call it on data or build it first.")
        self.model = model
        self.variant = variant
        self.alpha = float(alpha)
        self.beta = float(beta)
        if feature_layers is None:
            feature_layers = default_feature_layers(model, variant)
        self.feature_layers = _find(model, _feature_list(feature_layers, "DeltaModel"))
        self.head = _head_names(model, head)
        # Found once (not at every training step); kept out of tracking (the
        # model's own variables).
        object.__setattr__(self, "_head_vars", _head_kernels(model, self.head))
        if self.beta > 0 and not self._head_vars:
            warnings.warn(
                f"DELTA: beta={self.beta:g} has no head kernel to act on (head: {self.head}); "
                "name the new head's layers with head=[...] (a nested head model by its name).",
                UserWarning, stacklevel=2)
        tap, n_out, found = _rebuild(model, set(self.feature_layers), lambda p, l, t: t)
        order = [found.index(p) for p in self.feature_layers]
        self._n_out = n_out
        self._order = order
        # The tapped graph shares the model's layers; keep it out of tracking
        # so it is neither saved nor counted twice.
        object.__setattr__(self, "_tap", tap)
        features = keras.Model(_inputs_of(tap), [tap.outputs[n_out + i] for i in order])
        self.frozen = _frozen_copy(features, name=f"{model.name}_frozen")
        self._channels = [int(t.shape[-1]) for t in features.outputs]
        self.attention_weights = []
        for path, c in zip(self.feature_layers, self._channels):
            init = _uniform_attention(c, variant)
            self.attention_weights.append(keras.Variable(
                # PyTorch registers the variables as parameters, whose names
                # may not contain "." (mobilenet_0.25_224/...).
                init, trainable=False, dtype="float32", name="attention_" + re.sub(r"\W", "_", path)))
        self.attention_computed = False
        if attention is not None:
            self.set_attention(attention)
        # Every variable exists now: a fresh DeltaModel can load_weights (as
        # KerasTuner's Hyperband and checkpoint resumption do) without a call.
        self.built = True

    # -- attention -------------------------------------------------------------
    def set_attention(self, attention):
        """Sets the channel weights: a list of arrays, one per feature layer."""
        attention = list(attention)
        if len(attention) != len(self.attention_weights):
            raise ValueError(
                f"expected {len(self.attention_weights)} attention arrays "
                f"(layers {self.feature_layers}), got {len(attention)}."
            )
        for path, var, a in zip(self.feature_layers, self.attention_weights, attention):
            a = np.asarray(a, "float32")
            if a.shape != tuple(var.shape):
                raise ValueError(f"attention for '{path}' has shape {a.shape}, expected {tuple(var.shape)}.")
            if not np.all(np.isfinite(a)) or np.any(a < 0):
                raise ValueError(f"attention for '{path}' must be finite and >= 0.")
            var.assign(a)
        self.attention_computed = True

    def get_attention(self):
        """The channel weights, a list of numpy arrays (one per feature layer)."""
        return [np.asarray(ops.convert_to_numpy(v)) for v in self.attention_weights]

    def compute_attention(self, x, y=None, **kwargs):
        """Computes and sets the channel weights; see `compute_attention`.

        The weights come from the pre-trained backbone: once training has
        moved it away from the frozen copy (after `fit`), this raises a
        `ValueError` instead of computing them from fine-tuned weights.
        """
        if y is None and iter(x) is x:   # a one-shot iterator: no batch to spare
            return self._set_computed_attention(x, y, **kwargs)
        bx = _batches(x, y, 8, 1)[0][0]
        outs = self._tap(bx, training=False)
        now = [outs[self._n_out + i] for i in self._order]
        ref = self.frozen(bx, training=False)
        ref = ref if isinstance(ref, (list, tuple)) else [ref]
        for path, f, f0 in zip(self.feature_layers, now, ref):
            f, f0 = (np.asarray(ops.convert_to_numpy(t), "float64") for t in (f, f0))
            if not np.allclose(f, f0, rtol=1e-4, atol=1e-5 * (np.abs(f0).max() + 1e-12)):
                raise ValueError(
                    f"DeltaModel.compute_attention: the backbone has moved from its "
                    f"pre-trained copy (feature map '{path}' differs), so the channel "
                    "weights would come from fine-tuned weights; compute them before "
                    "`fit` (or with `keras_spft.compute_attention` on the pre-trained model)."
                )
        return self._set_computed_attention(x, y, **kwargs)

    def _set_computed_attention(self, x, y, **kwargs):
        att = compute_attention(self.model, x, y, feature_layers=self.feature_layers,
                                variant=self.variant, head=self.head, **kwargs)
        self.set_attention(att)
        return att

    # -- forward -------------------------------------------------------------
    def call(self, inputs, training=None):
        outs = self._tap(inputs, training=training)
        y = outs[: self._n_out]
        if training:
            feats = [outs[self._n_out + i] for i in self._order]
            if self.alpha > 0:
                ref = self.frozen(inputs, training=False)
                ref = ref if isinstance(ref, (list, tuple)) else [ref]
                self.add_loss(self.alpha * self._feature_term(feats, ref))
            if self.beta > 0:
                kernels = self._head_vars
                if kernels:
                    self.add_loss(0.5 * self.beta * sum(
                        ops.sum(ops.square(ops.cast(k, "float32"))) for k in kernels))
        return y[0] if self._n_out == 1 else y

    def _feature_term(self, feats, ref):
        total = 0.0
        for f, f0, w in zip(feats, ref, self.attention_weights):
            f = ops.cast(f, "float32")
            d = ops.square(f - ops.stop_gradient(ops.cast(f0, "float32")))
            spatial = tuple(range(1, len(d.shape) - 1))
            if self.variant == "li2019":
                c = d.shape[-1]
                hw = 1   # positions: from the traced shape (TensorFlow: unknown for any-size inputs)
                for a in spatial:
                    hw = hw * ops.shape(d)[a]
                per_channel = ops.sum(d, axis=spatial) if spatial else d  # (B, C)
                term = 0.5 * (c / ops.cast(hw, "float32")) * ops.sum(per_channel * w, axis=-1)
                total = total + ops.mean(term)
            else:
                total = total + ops.mean(d * w)
        return total

    def delta_loss(self, x):
        """The feature-map term `Omega(x)` (without `alpha`) for a batch `x`."""
        outs = self._tap(x, training=False)
        feats = [outs[self._n_out + i] for i in self._order]
        ref = self.frozen(x, training=False)
        ref = ref if isinstance(ref, (list, tuple)) else [ref]
        return self._feature_term(feats, ref)

    # -- saving --------------------------------------------------------------
    def get_config(self):
        return {
            "model": keras.saving.serialize_keras_object(self.model),
            "feature_layers": list(self.feature_layers),
            "alpha": self.alpha,
            "beta": self.beta,
            "variant": self.variant,
            "head": list(self.head),
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(
            config["model"], custom_objects=custom_objects)
        return cls(**config)

    def load_own_variables(self, store):
        super().load_own_variables(store)
        # Loaded weights say whether attention was set: uniform is the default.
        self.attention_computed = any(not np.array_equal(a, _uniform_attention(a.size, self.variant))
                                      for a in self.get_attention())


def _uniform_attention(channels, variant):
    """The channel weights before attention is set: `1 / C` (li2019) or `1`."""
    return np.full((channels,), 1.0 / channels if variant == "li2019" else 1.0, "float32")


# -- attention ------------------------------------------------------------------
class _ChannelAblation(keras.layers.Layer):
    """Multiplies a tiled batch `(k * B, ...)` by `k` channel masks along
    the channel `axis` (of the untiled shape)."""

    def __init__(self, k, channels, axis, **kwargs):
        super().__init__(**kwargs)
        self.k, self.channels, self.axis = k, channels, axis
        self.mask = self.add_weight(shape=(k, channels), initializer="ones",
                                    trainable=False, name="mask")

    def compute_output_shape(self, input_shape):
        return input_shape

    def call(self, x):
        shape = ops.shape(x)
        rank = len(x.shape)
        xr = ops.reshape(x, (self.k, -1) + tuple(shape[1:]))
        per_example = [1] * (rank - 1)
        per_example[self.axis - 1] = self.channels
        m = ops.reshape(ops.cast(self.mask, x.dtype), (self.k, 1) + tuple(per_example))
        return ops.reshape(xr * m, shape)


def _feature_list(feature_layers, owner):
    names = [feature_layers] if isinstance(feature_layers, str) else list(feature_layers)
    if not names:
        raise ValueError(f"{owner}: `feature_layers` is empty: name at least one layer, or pass None for the "
                         "default feature maps.")
    return names


def _batches(x, y, batch_size, steps):
    if y is None:
        it = iter(x)
    else:
        x, y = np.asarray(x), np.asarray(y)
        it = ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size))
    out = [(np.asarray(bx), np.asarray(by)) for bx, by in itertools.islice(it, steps)]
    if not out:
        raise ValueError("compute_attention: no data.")
    return out


def _sparse_labels(labels):
    """Integer labels from sparse ones, `(N,)` or `(N, 1)`, or one-hot `(N, C)`."""
    labels = np.asarray(labels)
    if labels.ndim > 1 and labels.shape[-1] > 1:   # one-hot
        labels = labels.argmax(-1)
    return labels.reshape(-1).astype(int)


def _cross_entropy(pred, labels, from_logits):
    pred = np.asarray(pred, "float64")
    labels = _sparse_labels(labels)
    if from_logits:
        z = pred - pred.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    else:
        logp = np.log(np.clip(pred, 1e-12, 1.0))
    return -logp[np.arange(len(labels)), labels]


def _output_layer(model):
    """The layer that makes `model`'s (first) output, inside nested models."""
    layer = model
    while isinstance(layer, keras.Model) and layer.layers:
        try:
            inner = layer.outputs[0]._keras_history.operation
        except (AttributeError, IndexError, TypeError, ValueError):
            inner = layer.layers[-1]
        if inner is layer:
            break
        layer = inner
    return layer


def _output_units(model):
    try:
        return int(model.outputs[0].shape[-1])
    except (AttributeError, IndexError, TypeError, ValueError):
        return None


def _ends_in_softmax(model):
    last = _output_layer(model)
    act = getattr(last, "activation", None)
    return getattr(act, "__name__", "") == "softmax" or isinstance(last, keras.layers.Softmax)


def compute_attention(model, x, y=None, *, feature_layers=None, variant="li2019",
                      head=None, head_epochs=3, head_learning_rate=1e-3,
                      batch_size=32, steps=4, from_logits=None, chunk=256,
                      cache=None, verbose=0):
    """Channel attention of DELTA from channel ablation on frozen features.

    1. A copy of `model` is made; its backbone is frozen (not trainable,
       BatchNorm in inference mode) and only its head is trained for
       `head_epochs` epochs (Adam, cross-entropy) on `(x, y)`.
    2. On `steps` batches, for every feature layer `l` and channel `c`, the
       channel `c` of the frozen feature map `l` is set to zero and the
       increase of the mean cross-entropy is recorded (channels are ablated
       `chunk // batch_size` at a time in one tiled forward pass).
    3. `importance_lc` is the mean increase over the batches; the weights are
       `softmax(zscore(importance_l) / 5)` per layer (`"li2019"`, each layer
       sums to 1) or `sigmoid(importance_l)` (`"last-layer"`).

    The model itself is not changed. Cost: `head_epochs` epochs of head
    training plus `steps * sum_l ceil(C_l / k)` forward passes of `k * batch`
    examples, with `k = max(1, chunk // batch_size)`.

    Args:
        model: the model to fine-tune (pre-trained backbone + new head).
        x, y: arrays of inputs and integer labels (`(N,)` or `(N, 1)`) or
            one-hot ones; or `x` a finite iterable of `(inputs, labels)`
            batches and `y=None` (read once into memory for the head
            training; with `head_epochs=0` only its first `steps` batches).
        feature_layers: names/paths; default `default_feature_layers`.
        variant: `"li2019"` or `"last-layer"`.
        head: top-level head layer names (default as in `DeltaModel`).
        head_epochs, head_learning_rate: head training (0 epochs: use the
            head as it is).
        batch_size: batch size for arrays.
        steps: batches used for the ablation (`None`: all).
        from_logits: whether the model outputs logits; default: `True`
            unless the last layer is a softmax.
        chunk: examples per ablation forward pass (memory/speed trade-off).
        cache: optional `.npz` path. If it exists and matches the layers and
            channel counts, the weights are read from it and nothing is
            computed; otherwise they are computed and written to it.
        verbose: passed to the head's `fit`.

    Returns:
        List of float32 arrays, one `(C_l,)` array per feature layer.

    Example:

    ```python
    att = keras_spft.compute_attention(model, x, y, cache="attention.npz")
    [a.sum() for a in att]     # each 1.0 for variant "li2019"
    ```
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown DELTA variant {variant!r}; expected one of {VARIANTS}.")
    if feature_layers is None:
        feature_layers = default_feature_layers(model, variant)
    paths = _find(model, _feature_list(feature_layers, "compute_attention"))
    batch_size = check_count(batch_size, "batch_size", "compute_attention")
    steps = None if steps is None else check_count(steps, "steps", "compute_attention")
    if cache is not None and os.path.exists(cache):
        try:
            loaded = load_attention(cache)
        except ValueError as e:
            warnings.warn(f"DELTA: {e} Recomputing it.", stacklevel=2)
            loaded = None
        if loaded is not None and loaded[0] == paths and loaded[2] == variant:
            att = loaded[1]
            shapes_ok = True
            tap, n_out, found = _rebuild(model, set(paths), lambda p, l, t: t)
            for p, a in zip(paths, att):
                if a.shape[0] != int(tap.outputs[n_out + found.index(p)].shape[-1]):
                    shapes_ok = False
            if shapes_ok:
                return att
        if loaded is not None:
            warnings.warn(f"DELTA: attention cache {cache} does not match; recomputing.", stacklevel=2)
    units = _output_units(model)
    if units == 1:
        raise ValueError(
            "compute_attention: the model has one output unit (a sigmoid or binary logit); the channel "
            "importances are cross-entropies over classes: give the head 2 units (sparse labels 0/1).")
    if from_logits is None:
        from_logits = not _ends_in_softmax(model)
    head = _head_names(model, head)
    # Head training goes over all of the data, once per epoch (an iterable is
    # read once, so it must be finite); the ablation needs `steps` batches only.
    data = _batches(x, y, batch_size, None if head_epochs > 0 else steps)

    # 1. a copy with a frozen backbone and a trained head
    probe = keras.models.clone_model(model, clone_function=_plain_clone, recursive=True)
    for s, d in zip(model.weights, probe.weights):
        d.assign(np.array(ops.convert_to_numpy(s)))
    head_set = set(head)
    for layer in probe.layers:
        layer.trainable = layer.name in head_set
    if head_epochs > 0:
        probe.compile(optimizer=keras.optimizers.Adam(head_learning_rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits))
        for _ in range(head_epochs):
            for bx, by in data:
                probe.train_on_batch(bx, _sparse_labels(by))
    data = data[:steps] if steps is not None else data

    # 2. ablation, one feature layer at a time
    out = []
    for path in paths:
        base_b = data[0][0].shape[0]
        k = max(1, chunk // max(1, base_b))
        masks = {}

        def insert(p, tapped_layer, t, _k=k, _masks=masks):
            axis = 1 if _channels_first(tapped_layer, len(t.shape)) else len(t.shape) - 1
            layer = _ChannelAblation(_k, int(t.shape[axis]), axis)
            _masks[p] = layer
            return layer(t)

        ablate, n_out, _ = _rebuild(probe, {path}, insert)
        ablate = keras.Model(_inputs_of(ablate), ablate.outputs[:n_out])
        mask = masks[path].mask
        c = mask.shape[1]
        k = mask.shape[0]
        sums = np.zeros(c)
        for bx, by in data:
            b = bx.shape[0]
            if b != base_b:
                continue  # the tiled reshape needs a fixed batch size
            mask.assign(np.ones((k, c), "float32"))
            base_pred = ablate.predict_on_batch(np.concatenate([bx] * k))[:b]
            base_loss = _cross_entropy(base_pred, by, from_logits).mean()
            for j0 in range(0, c, k):
                m = np.ones((k, c), "float32")
                idx = np.arange(j0, min(c, j0 + k))
                m[np.arange(len(idx)), idx] = 0.0
                mask.assign(m)
                pred = np.asarray(ablate.predict_on_batch(np.concatenate([bx] * k)))
                pred = pred.reshape((k, b) + pred.shape[1:])
                for r, j in enumerate(idx):
                    sums[j] += _cross_entropy(pred[r], by, from_logits).mean() - base_loss
        n = sum(1 for bx, _ in data if bx.shape[0] == base_b)
        importance = sums / n
        out.append(attention_from_importance(importance, variant))
    if cache is not None:
        save_attention(cache, paths, out, variant)
    return out


def attention_from_importance(importance, variant="li2019"):
    """Channel weights from channel importances (loss increases).

    `"li2019"`: `softmax(zscore(importance) / 5)` (sums to 1; uniform when
    all importances are equal). `"last-layer"`: `sigmoid(importance)`.

    Args:
        importance: per-channel importances of one feature map, shape `(C,)`.
        variant: `"li2019"` or `"last-layer"`.

    Returns:
        float32 array of shape `(C,)`.

    Example:

    >>> attention_from_importance(np.array([0.0, 0.0])).tolist()
    [0.5, 0.5]
    """
    imp = np.asarray(importance, "float64")
    if variant == "li2019":
        std = imp.std()
        z = (imp - imp.mean()) / std if std > 0 else np.zeros_like(imp)
        e = np.exp(z / 5.0 - (z / 5.0).max())
        return (e / e.sum()).astype("float32")
    if variant == "last-layer":
        return (1.0 / (1.0 + np.exp(-imp))).astype("float32")
    raise ValueError(f"unknown DELTA variant {variant!r}; expected one of {VARIANTS}.")


def save_attention(path, feature_layers, attention, variant="li2019"):
    """Writes channel weights to an `.npz` file (one array per layer).

    Args:
        path: the `.npz` file (written whole, then renamed into place).
        feature_layers: the layer paths the weights belong to.
        attention: one `(C_l,)` array per layer.
        variant: `"li2019"` or `"last-layer"`.

    Returns:
        None.

    Example:

    ```python
    att = compute_attention(model, x, y)
    save_attention("attention.npz", default_feature_layers(model), att)
    ```
    """
    arrays = {f"layer_{i}": np.asarray(a, "float32") for i, a in enumerate(attention)}
    meta = json.dumps({"feature_layers": list(feature_layers), "variant": variant})
    atomic_write(path, lambda f: np.savez(f, meta=np.array(meta), **arrays), binary=True)


def load_attention(path):
    """Reads `(feature_layers, attention, variant)` written by `save_attention`.

    Raises:
        ValueError: `path` is not such a file (truncated, or something else).

    Args:
        path: an `.npz` file written by `save_attention` (or
            `compute_attention(..., cache=path)`).

    Returns:
        `(feature_layers, attention, variant)`: the layer paths, one float32
        array per layer, the variant name.

    Example:

    ```python
    paths, att, variant = load_attention("attention.npz")
    delta_model = keras_spft.DeltaModel(model, feature_layers=paths, attention=att, variant=variant)
    ```
    """
    try:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            att = [z[f"layer_{i}"] for i in range(len(meta["feature_layers"]))]
        return meta["feature_layers"], att, meta["variant"]
    except Exception as e:   # zipfile, pickle, JSON and key errors alike
        raise ValueError(f"cannot read the DELTA attention file {path} ({type(e).__name__}: {e}); "
                         "remove it to compute the attention again.") from None


def add_delta(model, x=None, y=None, *, feature_layers=None, alpha=0.01, beta=0.01,
              variant="li2019", head=None, cache=None, **attention_kwargs):
    """`DeltaModel` with its attention computed (or read from `cache`).

    With `x=None` (and no existing `cache`), the weights stay uniform.

    Args:
        model, feature_layers, alpha, beta, variant, head: as `DeltaModel`.
        x, y, cache, **attention_kwargs: as `compute_attention`.

    Returns:
        A `DeltaModel`, ready to `compile` and `fit`.

    Example:

    ```python
    delta_model = keras_spft.add_delta(model, x_train, y_train, alpha=0.01, beta=0.01,
                                       cache="attention.npz")
    delta_model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    delta_model.fit(x_train, y_train, epochs=10)
    model.predict(x_test)   # the fine-tuned network itself is `model`
    ```
    """
    if x is None and y is not None:
        raise ValueError("add_delta: `y` is given without `x`: pass both to compute the attention, or neither.")
    dm = DeltaModel(model, feature_layers=feature_layers, alpha=alpha, beta=beta,
                    variant=variant, head=head)
    if x is not None or (cache is not None and os.path.exists(cache)):
        if x is None:
            feature, att, var = load_attention(cache)
            if feature != dm.feature_layers or var != variant:
                raise ValueError(f"attention cache {cache} was written for {feature} ({var}).")
            dm.set_attention(att)
        else:
            dm.compute_attention(x, y, cache=cache, **attention_kwargs)
    return dm
