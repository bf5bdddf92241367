"""BatchNorm moving statistics re-estimated for the weights a model has now.

During fine-tuning, Keras' BatchNormalization keeps exponential moving
averages (momentum 0.99 by default) of batch statistics taken while the
weights moved, so after `fit` they trail the final weights; inference uses
them. `reestimate_batchnorm` replaces them with the average over the data
of the batch statistics the final weights give (the idea of PyTorch's
`torch.optim.swa_utils.update_bn`, in Keras' convention: batches weighted by
their size, and the biased batch variance that Keras' own moving average
takes, where `update_bn` weights batches equally and takes the unbiased one).
"""

import inspect
import warnings

import keras
import numpy as np

from keras_spft.anchors import check_count
from keras_spft.kernels import walk_layers

__all__ = ["reestimate_batchnorm"]


def _record_mode(path, layer, seen):
    """Shadows `layer.call` (until popped from its `__dict__`) so that each
    call in training mode, which updates the moving statistics, first sets
    `momentum` to `seen / (seen + n)` for its `n` examples: the running
    average weighted by examples over every call (a layer shared by two
    paths is called twice a batch). `seen[id(layer)]` counts them; a layer
    called only with `training=False` (by the layer holding it) has none.
    The first such call zeroes the statistics (momentum 0 alone would keep
    a NaN that `fit` left: 0 * NaN is NaN)."""
    call = type(layer).call.__get__(layer)
    signature = inspect.signature(call)

    def recording(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        inputs = next(iter(bound.arguments.values()))
        # What the layer's own call reads: its `training` argument (its
        # default, None, is inference mode), else Keras' call context.
        training = bound.arguments["training"] if "training" in signature.parameters else \
            layer._get_call_context().training
        if training:
            shape = tuple(keras.tree.flatten(inputs)[0].shape)
            n = int(shape[0])
            if int(np.prod(shape)) == shape[layer.axis]:
                raise ValueError(
                    f"reestimate_batchnorm: BatchNormalization '{path}' got a batch of one value per channel "
                    f"(input shape {shape}), whose variance is 0. Use a batch_size that leaves no batch of a "
                    "single example (or `steps` to stop before it).")
            before = seen.get(id(layer), 0)
            if not before:   # the first call replaces what fit left
                for v in (layer.moving_mean, layer.moving_variance):
                    v.assign(keras.ops.zeros(v.shape, v.dtype))
            layer.momentum = before / (before + n)
            seen[id(layer)] = before + n
        return call(*args, **kwargs)

    layer.__dict__["call"] = recording


def _batchnorm_layers(model):
    """`(path, layer)` of every BatchNormalization layer, each layer once."""
    seen, found = set(), []
    for path, layer in walk_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization) and id(layer) not in seen:
            seen.add(id(layer))
            found.append((path, layer))
    return found


def _batches(model, x, batch_size, steps):
    """The inputs of each batch, as Keras' `fit` would read `x` (arrays, a
    `tf.data.Dataset`, a `PyDataset`, a generator, a PyTorch `DataLoader`;
    tuples `(x, y[, sample_weight])` give their `x`)."""
    from keras.src.trainers.data_adapters import get_data_adapter   # the adapter `fit` uses

    if isinstance(x, tuple) and len(x) in (2, 3):
        if len(getattr(model, "inputs", None) or ()) > 1 and not isinstance(x[0], (list, tuple, dict)):
            raise ValueError(f"reestimate_batchnorm: '{model.name}' takes {len(model.inputs)} inputs: give them "
                             "as a list or dict (a tuple reads as (x, y) or (x, y, sample_weight)).")
        x = x[0]   # `(x, y)` arrays
    adapter = get_data_adapter(x, batch_size=batch_size, steps_per_epoch=steps, shuffle=False)
    for i, batch in enumerate(adapter.get_numpy_iterator()):
        if steps is not None and i >= steps:
            return
        inputs, _, _ = keras.utils.unpack_x_y_sample_weight(batch)
        yield inputs


def reestimate_batchnorm(model, x, batch_size=32, steps=None):
    """Sets BatchNorm moving statistics to their average over `x` for the current weights.

    Runs the model forward in training mode on each batch of `x` (no weight
    changes) and sets every trainable BatchNormalization layer's moving mean
    and variance to the average, weighted by batch size, of the batch means
    and variances it sees (over every call: a layer shared by two paths
    averages both; the biased batch variance, as Keras' own moving average
    takes it): statistics of the final weights, where `fit`
    leaves moving averages of statistics taken while the weights moved.
    Call it after `fit`, before evaluating or saving. Trainable weights,
    other non-trainable variables (random seeds, other layers' state) and
    each layer's `momentum` are as before. Layers that run in inference mode
    (`trainable=False`, or called with `training=False` by a layer's `call`)
    keep their statistics, as in `fit`, and are named by a warning. (A
    `base(x, training=False)` recorded in a functional model does not keep
    its BatchNorm layers in inference mode in Keras 3: `fit` overrides it,
    and so does this function.) Forward passes
    run eagerly, one batch at a time.

    Args:
        model: a built model with BatchNormalization layers (nested models
            included).
        x: the data, as `fit` takes it: an array (or list/dict of arrays for
            several inputs), `(x, y)` arrays, a `tf.data.Dataset`, a
            `keras.utils.PyDataset`, a generator or a PyTorch `DataLoader`;
            labels are ignored. Usually the training data, without
            augmentation that the test data does not get.
        batch_size: batch size for array data (as in training: BatchNorm's
            batch statistics depend on it); `None` as in `fit`.
        steps: use at most this many batches (`None`: all of `x`; needed for
            an endless dataset).

    Returns:
        The paths of the layers whose statistics were re-estimated.

    Raises:
        ValueError: the model has no trainable BatchNormalization layer, a
            layer uses batch renormalization (`renorm=True`, whose moving
            statistics Keras updates differently), `x` holds no batch, or a
            batch gives a layer one value per channel (a variance of 0: a
            batch of one example before a Dense layer's BatchNorm).

    Example:

    ```python
    model.fit(x_train, y_train, epochs=10)
    keras_spft.reestimate_batchnorm(model, x_train, batch_size=32)
    model.evaluate(x_test, y_test)
    ```
    """
    if batch_size is not None:   # None: Keras' default for arrays (32); a dataset is batched already
        batch_size = check_count(batch_size, "batch_size", "reestimate_batchnorm")
    if steps is not None:
        steps = check_count(steps, "steps", "reestimate_batchnorm")
    layers = _batchnorm_layers(model)
    renorm = [p for p, l in layers if getattr(l, "renorm", False)]
    if renorm:
        raise ValueError(f"reestimate_batchnorm: layer '{renorm[0]}' uses batch renormalization (renorm=True), "
                         "whose moving statistics Keras updates with renorm_momentum; not supported.")
    active = [(p, l) for p, l in layers if l.trainable]
    if not active:
        what = (f"all {len(layers)} are frozen (trainable=False: Keras runs them in inference mode)"
                if layers else "it has none")
        raise ValueError(f"reestimate_batchnorm: '{model.name}' has no trainable BatchNormalization layer to "
                         f"re-estimate: {what}.")
    saved = [(v, keras.ops.convert_to_numpy(v.value)) for v in model.non_trainable_variables]   # BatchNorm statistics included
    stats = {id(v) for _, l in active for v in (l.moving_mean, l.moving_variance)}
    momentum = {p: l.momentum for p, l in active}
    seen = {}   # id(layer) -> examples it has seen in training mode
    for path, layer in active:
        _record_mode(path, layer, seen)
    batches, done = 0, False
    try:
        for inputs in _batches(model, x, batch_size, steps):
            model(inputs, training=True)
            batches += 1
        done = batches > 0
    finally:
        for p, layer in active:
            layer.momentum = momentum[p]
            layer.__dict__.pop("call", None)
        for v, value in saved:   # all of it back if anything failed
            if not done or id(v) not in stats:
                v.assign(value)
    if not done:
        raise ValueError("reestimate_batchnorm: `x` gave no batch.")
    unchanged = [p for p, l in active if id(l) not in seen]
    frozen = [p for p, l in layers if not l.trainable]
    if unchanged or frozen:
        def names(paths):
            return ", ".join(f"'{p}'" for p in paths[:6]) + (" ..." if len(paths) > 6 else "")
        why = [f"{len(frozen)} frozen (trainable=False): {names(frozen)}"] if frozen else []
        why += [f"{len(unchanged)} called with training=False by a layer: "
                f"{names(unchanged)}"] if unchanged else []
        warnings.warn(
            f"reestimate_batchnorm: BatchNormalization layers kept their statistics, as in fit, since they run "
            f"in inference mode: {'; '.join(why)}.", UserWarning, stacklevel=2)
    return [p for p, _ in active if p not in unchanged]
