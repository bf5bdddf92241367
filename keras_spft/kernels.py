"""How each Keras layer type maps its kernels to rows (output units).

This is the one place that knows Keras kernel layouts. For a layer it returns
the weights that carry pre-trained structure, with the axes summed per row in
the `keras.constraints.MaxNorm` convention and the layer attributes through
which a constraint or regularizer reaches the layer config:

| layer | kernel shape | axes summed per row |
|---|---|---|
| Dense | (in, out) | 0 |
| Conv1D/2D/3D | (*k, in, out) | all but the last |
| Conv1D/2D/3DTranspose | (*k, out, in) | all but the output-channel axis |
| DepthwiseConv1D/2D | (*k, in, mult) | the spatial axes: one row per output channel |
| SeparableConv1D/2D | depthwise (*k, in, mult) + pointwise (*1, in*mult, out) | as the two above |
| EinsumDense | from the equation | the kernel axes absent from the output |
| BatchNormalization gamma | (channels,) | none: each element is its own row |
"""

import math
from dataclasses import dataclass

import keras

__all__ = ["KernelSpec", "UnsupportedLayerError", "kernel_specs", "walk_layers", "einsum_kernel_axis"]


class UnsupportedLayerError(ValueError):
    """A layer's weights cannot be wrapped; the message says why."""


@dataclass(frozen=True)
class KernelSpec:
    """One wrappable weight of a layer.

    Attributes:
        variable: the `keras.Variable` holding the weight.
        weight: the weight's role in the layer, e.g. `"kernel"`.
        constraint_attr: layer attribute that serialises its constraint.
        regularizer_attr: layer attribute that serialises its regularizer.
        axis: axes summed per row.
        kind: layer class name, with the weight for multi-kernel layers.
    """

    variable: object
    weight: str
    constraint_attr: str
    regularizer_attr: str
    axis: tuple
    kind: str

    @property
    def rows(self):
        shape = tuple(self.variable.shape)
        return math.prod(d for i, d in enumerate(shape) if i not in self.axis)

    @property
    def params(self):
        return math.prod(tuple(self.variable.shape))


def einsum_kernel_axis(equation):
    """Axes of an EinsumDense kernel that are contracted (absent from output).

    Args:
        equation: an EinsumDense equation such as `"abc,cde->abde"`.

    Returns:
        Tuple of kernel axes summed per row; the remaining kernel axes index
        the output units.

    Example:

    >>> einsum_kernel_axis("ab,bc->ac")
    (0,)
    >>> einsum_kernel_axis("abcd,cde->abe")
    (0, 1)
    """
    try:
        inputs, output = equation.replace(" ", "").split("->")
        _, kernel = inputs.split(",")
    except ValueError:
        raise UnsupportedLayerError(
            f"cannot parse EinsumDense equation {equation!r}."
        ) from None
    if "." in kernel:
        raise UnsupportedLayerError(
            f"EinsumDense equation {equation!r} has an ellipsis in the kernel."
        )
    return tuple(i for i, ch in enumerate(kernel) if ch not in output)


def _check_plain(layer):
    if getattr(layer, "lora_enabled", False):
        raise UnsupportedLayerError(
            f"layer '{layer.name}' has LoRA enabled: its kernel is frozen and "
            "it trains the factors `lora_kernel_a/b`, which keras-spft does "
            "not bound. Wrap the model before `enable_lora` (Keras then "
            "refuses LoRA on the constrained layers) or pass the layer in "
            "`exclude=`."
        )
    if getattr(layer, "quantization_mode", None):
        raise UnsupportedLayerError(
            f"layer '{layer.name}' is quantized "
            f"({layer.quantization_mode}); only float kernels can be anchored."
        )


def _spec(layer, var, weight, prefix, axis):
    return KernelSpec(
        variable=var,
        weight=weight,
        constraint_attr=f"{prefix}_constraint",
        regularizer_attr=f"{prefix}_regularizer",
        axis=tuple(axis),
        kind=type(layer).__name__ + ("" if weight == "kernel" else f".{weight}"),
    )


def kernel_specs(layer, batchnorm=False):
    """The wrappable weights of `layer` (empty if it has none).

    Args:
        layer: a built Keras layer.
        batchnorm: include BatchNormalization `gamma`.

    Returns:
        List of `KernelSpec`.

    Raises:
        UnsupportedLayerError: the layer has LoRA enabled, is quantized, or its
            kernel layout is not understood.

    Example:

    ```python
    conv = keras.layers.Conv2D(4, 3)
    conv.build((None, 8, 8, 2))
    [(s.weight, s.axis, s.rows) for s in kernel_specs(conv)]   # [('kernel', (0, 1, 2), 4)]
    ```
    """
    L = keras.layers
    _check_plain(layer)
    if isinstance(layer, (L.SeparableConv1D, L.SeparableConv2D)):
        dw, pw = layer.depthwise_kernel, layer.pointwise_kernel
        return [
            _spec(layer, dw, "depthwise_kernel", "depthwise", range(len(dw.shape) - 2)),
            _spec(layer, pw, "pointwise_kernel", "pointwise", range(len(pw.shape) - 1)),
        ]
    if isinstance(layer, (L.DepthwiseConv1D, L.DepthwiseConv2D)):
        k = layer.kernel
        return [_spec(layer, k, "kernel", "depthwise", range(len(k.shape) - 2))]
    if isinstance(layer, (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)):
        k = layer.kernel
        nd = len(k.shape)
        return [_spec(layer, k, "kernel", "kernel", [a for a in range(nd) if a != nd - 2])]
    if isinstance(layer, (L.Conv1D, L.Conv2D, L.Conv3D)):
        k = layer._kernel
        return [_spec(layer, k, "kernel", "kernel", range(len(k.shape) - 1))]
    if isinstance(layer, L.Dense):
        return [_spec(layer, layer._kernel, "kernel", "kernel", (0,))]
    if isinstance(layer, L.EinsumDense):
        axis = einsum_kernel_axis(layer.equation)
        return [_spec(layer, layer._kernel, "kernel", "kernel", axis)]
    if batchnorm and isinstance(layer, L.BatchNormalization) and layer.scale:
        return [_spec(layer, layer.gamma, "gamma", "gamma", ())]
    return []


def walk_layers(layer, prefix=""):
    """Yields `(path, sublayer)` for every sublayer of `layer`, depth first.

    Nested models are entered through `model.layers`, other layers through
    their tracked sublayers; paths join names with "/" (e.g. "base/conv1").

    Args:
        layer: a layer or model (not itself yielded).
        prefix: path prefix of its sublayers (`""` at the top).

    Returns:
        A generator of `(path, sublayer)` pairs, parents before their
        sublayers; a layer shared by several models comes once per path.

    Example:

    ```python
    model = keras.Sequential([base, keras.layers.Dense(5, name="head")])
    [path for path, _ in walk_layers(model)][:2]   # ['base', 'base/conv1']
    ```
    """
    children = layer.layers if isinstance(layer, keras.Model) else getattr(layer, "_layers", [])
    for sub in children:
        path = prefix + sub.name
        yield path, sub
        yield from walk_layers(sub, path + "/")


def own_weights(layer):
    """The variables a layer owns itself (not through sublayers)."""
    return list(layer._trainable_variables) + list(layer._non_trainable_variables)
