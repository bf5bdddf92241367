"""Training diagnostics: distances to the anchors and gradient norms.

`DistanceMonitor` reproduces the per-layer quantities of Gouk et al. (2021),
Figure 2 (MARS distance of each fine-tuned kernel to its pre-trained value)
and the fraction of rows held on the constraint boundary; `GradientNormMonitor`
the quantity of their Figure 1 (Euclidean norm of the gradient of the training
loss). Both are `keras.callbacks.Callback`s that write into `logs`, so
`History`, `TensorBoard` and `CSVLogger` record them, on every backend.
"""

import warnings
import weakref
from dataclasses import dataclass

import numpy as np
import keras
from keras import ops

from keras_spft.anchors import Anchored, check_count, check_flag, is_number
from keras_spft import ops as spft_ops
from keras_spft.constraints import _UNIT_ROUNDOFF, FrobeniusDistance, MARSDistance
from keras_spft.kernels import UnsupportedLayerError, kernel_specs
from keras_spft.kernels import walk_layers
from keras_spft.regularizers import MARSSP
from keras_spft.wrap import _default_head, _named_layers, _selected

__all__ = ["DistanceMonitor", "GradientNormMonitor", "gradient_norms"]


@dataclass
class TrackedKernel:
    """One kernel followed by the diagnostics.

    Attributes:
        path: layer path, e.g. `"resnet50/conv1_conv"`.
        weight: the weight's role in the layer (`"kernel"`, ...).
        variable: the `keras.Variable`.
        axis: axes summed per row (MARS): its MARS object's, else the
            layer type's (`keras_spft.kernels`).
        role: `"backbone"` or `"head"`.
        obj: the keras-spft constraint/regularizer on it, or `None`.
        frozen: the weight or its layer is not trainable (listed only with
            `include_frozen=True`).
    """

    path: str
    weight: str
    variable: object
    axis: tuple
    role: str
    obj: object = None
    frozen: bool = False

    @property
    def name(self):
        return self.path if self.weight == "kernel" else f"{self.path}.{self.weight}"


def _unwrap(model):
    from keras_spft.delta import DeltaModel

    return model.model if isinstance(model, DeltaModel) else model


def tracked_kernels(model, head=None, include_frozen=False, unreadable=None):
    """The trainable kernels of `model` with their row axes and roles.

    A kernel is `"head"` when its keras-spft object is centred at the origin,
    when its layer is in `head`, or (no keras-spft object, `head=None`) when
    it is in the head `wrap_pretrained` took (a head left free), or would
    take for a model it has not wrapped. BatchNorm gamma is not
    tracked. For a `DeltaModel` the wrapped model is used (not its frozen copy).

    Args:
        model: a built model.
        head: optional names or paths of head layers, or of models or
            layers enclosing them (as `wrap_pretrained`'s `head`).
        include_frozen: also list the kernels that are not trainable
            (`frozen=True`): they do not move, but they are still layers of
            the network (the bounds multiply over every layer).
        unreadable: optional list to which `(path, error)` is appended for
            every kernel layer whose kernels cannot be read (LoRA enabled,
            quantized): left out of the result.

    Returns:
        List of `TrackedKernel`, in layer order.

    Raises:
        ValueError: a `head` name that is no layer of the model.
    """
    model = _unwrap(model)
    layers = list(walk_layers(model))
    in_head = _head_test(model, layers, head)
    out, seen = [], set()
    for path, layer in layers:
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        try:
            specs = kernel_specs(layer)
        except UnsupportedLayerError as e:
            if unreadable is not None:
                unreadable.append((path, e))
            continue
        for spec in specs:
            var = spec.variable
            frozen = not (var.trainable and layer.trainable)
            if frozen and not include_frozen:
                continue
            obj = None
            for what in ("constraint", "regularizer"):
                cand = getattr(var, what, None)
                if isinstance(cand, Anchored):
                    obj = cand
            if obj is not None:
                role = "head" if obj.anchor is None else "backbone"
            else:
                role = "head" if in_head(path, layer) else "backbone"
            axis = tuple(spec.axis)
            if isinstance(obj, (MARSDistance, MARSSP)):
                # Rows as the object itself sums them (one attached by hand may
                # take other axes than the layer's default).
                axis = tuple(spft_ops.normalize_axis(obj._axis_arg, len(var.shape)))
            out.append(TrackedKernel(path, spec.weight, var, axis, role, obj, frozen))
    return out


def _head_test(model, layers, head):
    """A function telling whether a layer (path, layer) is in the head: the
    layers in `head` (names or paths, and what they enclose), else the head
    `wrap_pretrained` took when it wrapped `model`, else the one it would
    take (worked out only when first asked: a model whose kernels all carry
    keras-spft objects needs none)."""
    names = None if head is None else _named_layers(model, layers, head, "head")
    taken = getattr(model, "_keras_spft_head", None)
    if names is None and taken is not None:
        return lambda path, layer: id(layer) in taken
    default = []

    def in_head(path, layer):
        if names is None and not default:
            default.append(set(_default_head(model, layers)))
        return _selected(names if names is not None else default[0], path)

    return in_head


def anchor_value(kernel):
    """`W0` of a tracked kernel that carries a keras-spft object, as a float64
    NumPy array: zeros for one centred at the origin.

    Raises:
        RuntimeError: the object's anchor was never set or loaded (a model
            rebuilt from its config, a clone, weights of an unwrapped model
            loaded after wrapping): measuring from it would be wrong.
    """
    obj = kernel.obj
    if obj.anchor is None:
        return np.zeros(tuple(kernel.variable.shape))
    return _np(obj._anchor_value(obj.anchor.dtype))


def _np(x):
    return np.asarray(ops.convert_to_numpy(x), dtype="float64")


def _row_l1(t, axis):
    return np.abs(t) if len(axis) == 0 else np.abs(t).sum(axis=axis, keepdims=True)


def kernel_distances(kernel, value, anchor, tol=1e-3):
    """MARS and Frobenius distance of `value` to `anchor` for one kernel.

    Args:
        kernel: a `TrackedKernel` (gives the row axes and the constraint).
        value: the kernel's current value (numpy).
        anchor: its anchor (numpy; zeros for a head centred at the origin).
        tol: a row is *at the bound* when its distance is at least
            `(1 - tol) * radius`, less the rounding of the kernel's dtype
            (its unit roundoff times the row's L1 norm: 16-bit kernels are
            stored rounded), if it has moved at all (where that rounding
            exceeds the radius, any row that moved counts).

    Returns:
        Dict with `mars` (largest row L1 distance), `frobenius`, `rows` (the
        per-row L1 distances, flat) and, for a MARS-PGM or L2-PGM constraint,
        `at_bound` (fraction of rows at the bound; for L2-PGM 0 or 1) and
        `radius` (largest radius).
    """
    value = np.asarray(value, "float64")
    t = value - np.asarray(anchor, "float64")
    rows = _row_l1(t, kernel.axis)
    out = {"mars": float(rows.max()), "frobenius": float(np.sqrt((t ** 2).sum())),
           "rows": rows.reshape(-1)}
    obj = kernel.obj
    # A projected kernel is stored rounded to its dtype: a row at the bound
    # may land below it by up to the unit roundoff times the row's L1 norm
    # (a few percent in 16 bits, more than a small radius in bfloat16), so
    # that much counts as at the bound, if the row has moved at all.
    u = _UNIT_ROUNDOFF.get(keras.backend.standardize_dtype(kernel.variable.dtype), 0.0)
    if isinstance(obj, MARSDistance):
        r = np.broadcast_to(_np(obj.radius), rows.shape)
        slack = u * _row_l1(value, kernel.axis)
        out["at_bound"] = float(((rows >= (1.0 - tol) * r - slack) & (rows > 0)).mean())
        out["radius"] = float(r.max())
    elif isinstance(obj, FrobeniusDistance):
        r = float(_np(obj.radius))
        slack = u * float(np.sqrt((value ** 2).sum()))
        out["at_bound"] = float(out["frobenius"] >= (1.0 - tol) * r - slack and out["frobenius"] > 0)
        out["radius"] = r
    return out


def snapshot_anchors(model, head=None):
    """Anchors for every tracked kernel: keras-spft anchors where present,
    zeros for heads centred at the origin, else the current value.

    Returns:
        Dict `{TrackedKernel.name: numpy array}`.
    """
    out = {}
    # Frozen kernels too: unfrozen later (two-stage fine-tuning), they are
    # measured from the same starting point as the others.
    for k in tracked_kernels(model, head, include_frozen=True):
        if k.obj is not None:
            out[k.name] = anchor_value(k)
        else:
            out[k.name] = _np(k.variable)
    return out


class _EpochSchedule(keras.callbacks.Callback):
    """A callback that logs at the end of every `every`-th epoch and of the
    first and last epochs of each `fit` (the monitors below)."""

    def __init__(self, every):
        super().__init__()
        self.every = check_count(every, "every", type(self).__name__)
        self._epochs = None
        self._first = False

    def on_train_begin(self, logs=None):
        self._epochs = self.params.get("epochs") if self.params else None
        self._first = True

    def _due(self, epoch):
        """Whether to log at the end of `epoch` (call once per epoch)."""
        last = self._epochs is not None and epoch + 1 == self._epochs
        first, self._first = self._first, False
        return not (epoch + 1) % self.every or last or first


class DistanceMonitor(_EpochSchedule):
    """Logs per-layer distances of the kernels to their anchors.

    At the end of every `every`-th epoch, for every trainable kernel, it adds
    to `logs` (so `History`, `TensorBoard` and `CSVLogger` receive them):

    | key | value |
    |---|---|
    | `spft/<layer>/mars` | MARS distance: largest row L1 norm of `W - W0` |
    | `spft/<layer>/frobenius` | `||W - W0||_F` |
    | `spft/<layer>/at_bound` | PGM only: fraction of rows with distance `>= (1 - tol) * radius` |
    | `spft/head/<layer>/...` | the same for head kernels (distance to the origin if the head is anchored at 0, else to its value at the start) |
    | `spft/mars_max`, `spft/mars_mean`, `spft/frobenius_mean` | over backbone kernels |
    | `spft/at_bound` | over the constrained backbone kernel rows (BatchNorm gamma is not tracked) |
    | `spft/head_at_bound` | over the constrained head kernel rows |
    | `spft/<layer>/radius`, `spft/radius_mean`, `spft/radius_max` | learned radii (`radius="learned"`): per kernel, mean and max |

    The anchor `W0` is the keras-spft anchor of a wrapped kernel (read when
    logging, so a kernel wrapped between two `fit` calls is measured from its
    anchor), the origin for a head wrapped around zero, and otherwise a
    snapshot taken at the first `on_train_begin` (so unwrapped and DELTA runs
    get the same numbers; a monitor passed on to another model's `fit`
    snapshots that model, and its history goes on). Cost: one host copy of every kernel (and anchor)
    per logged epoch. With `every > 1` it also logs the first epoch of each
    `fit`, so `CSVLogger`, which fixes its columns then, has them (and writes
    "NA" on the epochs skipped).

    Place it *before* `keras.callbacks.TensorBoard` (and `CSVLogger`) in the
    callbacks list: Keras passes one `logs` dict to the callbacks in order,
    and `History` is always last. `monitor.history` keeps one dict per logged
    epoch with every value, per-layer rows included, whatever `per_layer` is.

    Args:
        every: log every this many epochs (the first and last epochs of a
            `fit` call are always logged).
        tol: relative tolerance for `at_bound`.
        per_layer: write per-layer keys to `logs` (`False`: aggregates only,
            which keeps the progress bar short for deep models).
        prefix: key prefix.
        head: head layer names, for unwrapped models (see `tracked_kernels`).

    Example:

    ```python
    monitor = keras_spft.DistanceMonitor()
    history = model.fit(x, y, epochs=2, callbacks=[monitor,
                        keras.callbacks.TensorBoard("logs")])
    history.history["spft/mars_max"]
    ```
    """

    def __init__(self, every=1, tol=1e-3, per_layer=True, prefix="spft", head=None):
        super().__init__(every)
        if not is_number(tol) or not 0 <= tol < 1:
            raise ValueError(f"DistanceMonitor: `tol` (relative tolerance of at_bound) must be a number in "
                             f"[0, 1), got {tol!r}.")
        self.tol = float(tol)
        self.per_layer = check_flag(per_layer, "per_layer", "DistanceMonitor")
        self.prefix = prefix
        self.head = head
        self.history = []
        self._anchors = None
        self._snapshot_of = lambda: None   # a weak reference to the model snapshot

    def _snapshot(self, model):
        # Once per model: later `fit` calls of the same model (two-stage
        # fine-tuning) measure from the first start; another model from its own.
        inner = _unwrap(model)   # a DeltaModel and its .model are one network
        if self._anchors is None or self._snapshot_of() is not inner:
            self._anchors = snapshot_anchors(model, self.head)
            self._snapshot_of = weakref.ref(inner)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._snapshot(self.model)

    def compute(self):
        """Distances now, as a flat dict of log entries plus `"_rows"`."""
        model = self.model  # on JAX this syncs the variables
        self._snapshot(model)
        out, rows = {}, {}
        mars, fro, radii = [], [], []
        at = {"backbone": [0.0, 0], "head": [0.0, 0]}   # rows at the bound, rows
        p = self.prefix
        for k in tracked_kernels(model, self.head):
            if k.obj is None and k.name not in self._anchors:
                continue   # a layer added after the snapshot: no start to measure from
            anchor = anchor_value(k) if k.obj is not None else self._anchors[k.name]
            d = kernel_distances(k, _np(k.variable), anchor, self.tol)
            key = f"{p}/{k.name}" if k.role == "backbone" else f"{p}/head/{k.name}"
            out[f"{key}/mars"] = d["mars"]
            out[f"{key}/frobenius"] = d["frobenius"]
            if "at_bound" in d:
                out[f"{key}/at_bound"] = d["at_bound"]
                n = d["rows"].size if isinstance(k.obj, MARSDistance) else 1
                share = at["backbone" if k.role == "backbone" else "head"]
                share[0] += d["at_bound"] * n
                share[1] += n
            if getattr(k.obj, "learn_radius", False):
                r = float(_np(k.obj.radius.value))
                out[f"{key}/radius"] = r
                radii.append(r)
            rows[k.name] = d["rows"]
            if k.role == "backbone":
                mars.append(d["mars"])
                fro.append(d["frobenius"])
        if mars:
            out[f"{p}/mars_max"] = float(np.max(mars))
            out[f"{p}/mars_mean"] = float(np.mean(mars))
            out[f"{p}/frobenius_mean"] = float(np.mean(fro))
        # Backbone and head apart: a bounded head's rows would keep the
        # backbone's share off 0 when its constraint never acts.
        if at["backbone"][1]:
            out[f"{p}/at_bound"] = at["backbone"][0] / at["backbone"][1]
        if at["head"][1]:
            out[f"{p}/head_at_bound"] = at["head"][0] / at["head"][1]
        if radii:
            out[f"{p}/radius_mean"] = float(np.mean(radii))
            out[f"{p}/radius_max"] = float(np.max(radii))
        out["_rows"] = rows
        return out

    def on_epoch_end(self, epoch, logs=None):
        if not self._due(epoch):
            return
        values = self.compute()
        rows = values.pop("_rows")
        self.history.append(dict(values, epoch=epoch, rows=rows))
        if logs is not None:
            for key, v in values.items():
                if self.per_layer or "/" not in key[len(self.prefix) + 1:]:   # aggregates: prefix/name
                    logs[key] = v

    def get_config(self):
        return {"every": self.every, "tol": self.tol, "per_layer": self.per_layer,
                "prefix": self.prefix, "head": self.head}


# -- gradients ------------------------------------------------------------------
def _as_tensor(x):
    if x is None:   # y of a model trained with add_loss alone
        return None
    if isinstance(x, (list, tuple)):
        return type(x)(_as_tensor(v) for v in x)
    if isinstance(x, dict):
        return {k: _as_tensor(v) for k, v in x.items()}
    return ops.convert_to_tensor(np.asarray(x))


def _gradients(model, x, y, sample_weight, training):
    """Gradients of `model.compute_loss` w.r.t. `model.trainable_variables`."""
    backend = keras.backend.backend()
    variables = model.trainable_variables
    x, y = _as_tensor(x), _as_tensor(y)
    sw = None if sample_weight is None else _as_tensor(sample_weight)
    if backend == "jax":
        import jax

        tv = [v.value for v in variables]
        ntv = [v.value for v in model.non_trainable_variables]
        mv = [v.value for v in model.metrics_variables]

        opt = getattr(model, "optimizer", None)
        ov = [v.value for v in opt.variables] if opt is not None else None

        def f(tv_):
            _, aux = model.compute_loss_and_updates(
                tv_, ntv, mv, x, y, sw, training=training, optimizer_variables=ov)
            return aux[0], aux  # the unscaled loss (no mixed-precision scaling)

        (loss, _), grads = jax.value_and_grad(f, has_aux=True)(tv)
        return float(loss), [np.asarray(g) for g in grads]
    saved = [np.array(ops.convert_to_numpy(v)) for v in model.non_trainable_variables]
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            with tf.GradientTape() as tape:
                y_pred = model(x, training=training)
                loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sw, training=training)
            grads = tape.gradient(loss, [v.value for v in variables])
        elif backend == "torch":
            import torch

            with torch.enable_grad():
                y_pred = model(x, training=training)
                loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sw, training=training)
                grads = torch.autograd.grad(loss, [v.value for v in variables], allow_unused=True)
        else:
            raise NotImplementedError(f"gradient norms are not implemented for backend {backend!r}.")
    finally:
        if training:
            for v, s in zip(model.non_trainable_variables, saved):
                v.assign(s)
    grads = [np.zeros(v.shape) if g is None else np.asarray(ops.convert_to_numpy(g)) for v, g in zip(variables, grads)]
    return float(ops.convert_to_numpy(loss)), grads


def gradient_norms(model, x, y, sample_weight=None, training=True, head=None):
    """Euclidean norms of the gradient of the training loss on one batch.

    The loss is `model.compute_loss`: the compiled loss plus `model.losses`
    (keras-spft penalties, DELTA's term, other regularizers), with the model
    in training mode by default (dropout active, BatchNorm on batch
    statistics). Non-trainable state (BatchNorm moving statistics, seeds)
    is restored afterwards, so calling this does not change the model.
    Constraints are not involved: it is the gradient the optimizer receives
    before any projection. The model must be compiled.

    Args:
        model: a compiled model.
        x, y: one batch (arrays; `y=None` for a model whose loss is added
            with `add_loss` alone).
        sample_weight: optional per-example weights.
        training: run the forward pass in training mode.
        head: head layer names for unwrapped models (see `tracked_kernels`).

    Returns:
        Dict: `"global"`: `||dL/dtheta||_2` over all trainable variables (the
        quantity of Gouk et al., Figure 1); `"loss"`: the loss; and one entry
        per tracked kernel (`TrackedKernel.name`, head kernels prefixed
        `"head/"`; the kernel of a layer named `global` or `loss` is keyed
        `"global.kernel"` / `"loss.kernel"`): the norm of that kernel's
        gradient.

    Example:

    ```python
    norms = keras_spft.gradient_norms(model, x[:32], y[:32])
    norms["global"], norms["loss"]
    ```
    """
    if not getattr(model, "compiled", False):
        raise ValueError("gradient_norms needs a compiled model (model.compile(loss=...)).")
    training = check_flag(training, "training", "gradient_norms")
    _check_batch(x, y, sample_weight, "gradient_norms")
    loss, grads = _gradients(model, x, y, sample_weight, training)
    by_id = {id(v): g for v, g in zip(model.trainable_variables, grads)}
    out = {"global": float(np.sqrt(sum(float((g.astype("float64") ** 2).sum()) for g in grads))),
           "loss": loss}
    for k in tracked_kernels(model, head):
        g = by_id.get(id(k.variable))
        if g is not None:
            name = k.name if k.role == "backbone" else f"head/{k.name}"
            if name in ("global", "loss"):   # a layer's name: keep both entries
                name = f"{k.path}.{k.weight}"
            out[name] = float(np.sqrt((g.astype("float64") ** 2).sum()))
    return out


def _check_batch(x, y, sample_weight, owner):
    """A ValueError naming `owner` unless every array of the probe batch
    (inputs, targets, sample weights) holds the same number of examples:
    Keras' losses broadcast a single target (or a mean squared error a
    target of shape `(1, n)`) over the whole batch without a word."""
    sizes, scalar_y = {}, 0
    for what, part in (("x", x), ("y", y), ("sample_weight", sample_weight)):
        for leaf in keras.tree.flatten(part):
            if leaf is None:   # y of a model trained with add_loss alone
                continue
            shape = getattr(leaf, "shape", None)
            if shape is None:
                shape = np.shape(leaf)
            if len(shape):
                sizes.setdefault(int(shape[0]), what)
            elif what == "y":   # (a 0-d sample weight is Keras' scalar weight)
                scalar_y += 1
    if len(sizes) > 1 or (scalar_y and sizes):
        single = ["a single value (y)" if scalar_y == 1 else
                  f"{scalar_y} separate numbers (y: a Python list? give an array)"] if scalar_y else []
        found = ", ".join([f"{n} ({what})" for n, what in sizes.items()] + single)
        raise ValueError(f"{owner}: the probe batch's arrays must hold the same number of examples, "
                         f"got {found}.")


def _warn_one_class(y):
    """A probe of one class (`x[:32]` of data ordered by class) measures that
    class only: in training mode its BatchNorm statistics and gradient are
    that class's, and `grad/global` can stay flat while the model learns."""
    if y is None:
        return
    try:
        labels = np.asarray(ops.convert_to_numpy(y))
    except Exception:   # not array-like (a dict of targets): nothing to check
        return
    if labels.ndim >= 2 and labels.shape[-1] > 1:
        labels = labels.reshape(-1, labels.shape[-1]).argmax(axis=-1)   # one-hot
    labels = labels.reshape(-1)
    if labels.size > 1 and np.issubdtype(labels.dtype, np.integer) and len(np.unique(labels)) == 1:
        warnings.warn(
            f"GradientNormMonitor: the probe batch holds one class only ({labels.size} labels, all "
            f"{labels[0]}): its gradient describes that class (and, in training mode, BatchNorm uses its "
            "statistics). Take a shuffled batch that mixes the classes, e.g. one batch of the training data.",
            UserWarning, stacklevel=3)


class GradientNormMonitor(_EpochSchedule):
    """Logs the gradient norm of the training loss on a fixed probe batch.

    At the start of training (epoch `-1` in `monitor.history`, not in `logs`)
    and at the end of every `every`-th epoch, computes `gradient_norms` on the
    probe batch `(x, y)` and writes `grad/global` (the Euclidean norm of the
    gradient w.r.t. all trainable parameters, Gouk et al.'s Figure 1),
    `grad/loss` and, with `per_layer=True`, `grad/<layer>` for every kernel
    into `logs`. A fixed batch makes epochs comparable; a larger batch gives
    a less noisy estimate. Cost per logged epoch: one forward and backward
    pass on the probe batch, eager (not compiled). Place it before
    `TensorBoard` in the callbacks list. With `every > 1` the first epoch of
    each `fit` is logged too (so `CSVLogger` has the columns).

    Args:
        x, y: the probe batch (arrays).
        sample_weight: optional per-example weights.
        every: log every this many epochs (the first and last epochs of a
            `fit` call are always logged).
        training: forward pass in training mode (see `gradient_norms`).
        per_layer: write per-kernel norms to `logs`.
        prefix: key prefix.
        head: head layer names for unwrapped models.

    Example:

    ```python
    grads = keras_spft.GradientNormMonitor(x[:32], y[:32])
    model.fit(x, y, epochs=2, callbacks=[grads])
    [h["grad/global"] for h in grads.history]
    ```
    """

    def __init__(self, x, y, sample_weight=None, every=1, training=True,
                 per_layer=True, prefix="grad", head=None):
        super().__init__(every)
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.training = check_flag(training, "training", "GradientNormMonitor")
        self.per_layer = check_flag(per_layer, "per_layer", "GradientNormMonitor")
        self.prefix = prefix
        self.head = head
        self.history = []
        self._measured = lambda: None   # a weak reference to the model measured at epoch -1
        _check_batch(x, y, sample_weight, "GradientNormMonitor")
        _warn_one_class(y)

    def _measure(self, epoch):
        norms = gradient_norms(self.model, self.x, self.y, self.sample_weight,
                               self.training, self.head)
        values = {f"{self.prefix}/{k}": v for k, v in norms.items()}
        self.history.append(dict(values, epoch=epoch))
        return values

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        inner = _unwrap(self.model)   # the start of each network it is given
        if self._measured() is not inner:
            self._measure(-1)
            self._measured = weakref.ref(inner)

    def on_epoch_end(self, epoch, logs=None):
        if not self._due(epoch):
            return
        values = self._measure(epoch)
        if logs is not None:
            for key, v in values.items():
                if self.per_layer or key in (f"{self.prefix}/global", f"{self.prefix}/loss"):
                    logs[key] = v
