"""The distance-based generalisation bounds of Gouk et al. (2021), evaluated.

For a network `x -> V phi_L(... phi_1(x))` with `phi_j(x) = act(W_j x)`, a
1-Lipschitz activation, a `rho`-Lipschitz loss, `m` training examples, `c`
classes, and for every layer `||W_j|| <= B_j`, `||W0_j|| <= B_j`,
`||W_j - W0_j|| <= D_j`, `||V|| <= B_V`, the paper bounds the empirical
Rademacher complexity of the fine-tuned class:

Theorem 2 (MARS norm `||M||_inf = max_r sum_i |M_ri|`, inputs `x in R^d`
with `||x||_inf <= C_inf`):

    R(F_inf) <= 2 sqrt(log(2d)) * c * rho * C_inf * B_V
                * (sum_j D_j / B_j) * (prod_j 2 B_j) / sqrt(m)

Theorem 3 (Frobenius norm, ReLU activations, `||x||_2 <= C_2`):

    R(F_F) <= sqrt(2c) * rho * C_2 * B_V
              * (sum_j D_j / B_j) * (prod_j 2 B_j) / sqrt(m)

These are the statements of the main text, and `BoundTerms.value` follows
them. The appendix announces `sum_j D_j / (2 B_j)`, but its own step (iii)
gives `D_L / B_L * prod_j 2 B_j` per layer, as stated; and its iteration,
carried down to the input, leaves one more term that the statements omit:
the same expression with `sum_j D_j / B_j` replaced by 1 (Massart's bound on
`E ||sum_i sigma_i x_i||`, Theorem 2; `sqrt(m) C_2`, Theorem 3), which does
not depend on the distances. `BoundTerms.value_with_input_term` adds it:
`constant * B_V * (1 + sum_j D_j / B_j) * prod_j 2 B_j`.

Here the `W_j` are the backbone kernels of a (wrapped) model, in layer
order, taken as if they formed a plain chain (residual connections,
BatchNorm and biases are outside the theorems' class), and `V` is its head
kernel. Norms are those of each layer's linear map: for a convolution the
MARS norm is the largest row L1 norm of its kernel (exact when some output
position sees the whole kernel); its Frobenius norm is
`sqrt(P) * ||K||_F` with `P` the number of output positions (exact for
"valid" padding, an upper bound otherwise; for a transposed convolution, the
adjoint of a convolution over its inputs, `P` counts its input positions).
A Dense or EinsumDense kernel applied at several positions (a Dense on a
sequence) is one block per position: the MARS norm is the kernel's, the
Frobenius norm `sqrt(P) * ||K||_F` again; an EinsumDense that sums its
kernel over `T` input positions (`"abc,cd->ad"`) has `T` times the kernel's
MARS norm. The theorems hold for any upper
bounds `B_j`, `D_j`, `B_V`, and the bound increases with each of them, so
upper bounds keep it valid.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import keras

from keras_spft.anchors import check_count, check_positive
from keras_spft.constraints import FrobeniusDistance, MARSDistance
from keras_spft.diagnostics import _np, _row_l1, anchor_value, tracked_kernels
from keras_spft.kernels import kernel_specs, walk_layers
from keras_spft.wrap import _named_layers, _selected

__all__ = ["theorem2_bound", "theorem3_bound", "BoundTerms", "LayerTerm"]

_CONV = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
         keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D,
         keras.layers.SeparableConv1D, keras.layers.SeparableConv2D,
         keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
         keras.layers.Conv3DTranspose)


@dataclass
class LayerTerm:
    """One layer's contribution to a bound.

    Attributes:
        path: the kernel's name (layer path, `.weight` for a second kernel).
        bound: `B_j`.
        distance: `D_j`.
    """

    path: str
    bound: float
    distance: float


@dataclass
class BoundTerms:
    """The terms of a bound and its value.

    Attributes:
        theorem: 2 (MARS) or 3 (Frobenius).
        value: the bound (may be `inf` when the product overflows; see
            `log_value`).
        log_value: natural log of `value`.
        constant: the data-dependent prefactor, `2 sqrt(log(2d)) c rho C_inf`
            (Theorem 2) or `sqrt(2c) rho C_2` (Theorem 3), over `sqrt(m)`.
        head_bound: `B_V`.
        distance_sum: `sum_j D_j / B_j`.
        log_product: `log prod_j 2 B_j`.
        layers: list of `LayerTerm`.
        value_with_input_term: what the appendix's proof gives when its
            iteration is carried to the input: `sum_j D_j / B_j` replaced by
            `1 + sum_j D_j / B_j` (see the module docstring).
        log_value_with_input_term: its natural log.
    """

    theorem: int
    value: float
    log_value: float
    constant: float
    head_bound: float
    distance_sum: float
    log_product: float
    layers: list = field(default_factory=list)
    value_with_input_term: float = math.nan
    log_value_with_input_term: float = math.nan


_TRANSPOSE = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)


def _shapes(layer):
    """`(input shape, output shape)` of a built layer: from the graph when it
    has been called on a symbolic input, else from the shape it was built
    with (a subclassed model's layers, a layer inside a custom layer)."""
    try:
        return tuple(layer.input.shape), tuple(layer.output.shape)
    except (AttributeError, ValueError):
        pass
    built = list((getattr(layer, "_build_shapes_dict", None) or {}).values())
    if len(built) != 1 or built[0] is None:
        raise ValueError("no input shape recorded")
    shape = tuple(built[0])
    return shape, tuple(layer.compute_output_shape(shape))


def _einsum_axes(layer):
    """`(input axes, kernel axes, output axes)` of an EinsumDense's equation."""
    inputs, out_axes = layer.equation.replace(" ", "").split("->")
    in_axes, kernel_axes = inputs.split(",")
    return in_axes, kernel_axes, out_axes


def _positions(layer):
    """Number of positions P a kernel is applied at: output positions of a
    convolution (its Frobenius norm as a linear map is `sqrt(P) * ||K||_F`),
    input positions of a transposed one (the adjoint of the convolution from
    its output back to its input), the positions a Dense (all but the batch
    and last axes) or an EinsumDense (the axes of its input and output that
    the kernel lacks, but the batch: kept or summed, each repeats the
    kernel) is applied at. Raises rather than guess: taking P = 1 would make
    the bound too small for every larger input."""
    what = "convolution" if isinstance(layer, _CONV) else "layer"
    fix = ("build the model on a fixed input size (e.g. `input_shape=(224, 224, 3)`), or pass "
           "`conv_positions=False` to use the kernels' own norms (then not a bound on the layer's map)")
    try:
        in_shape, out_shape = _shapes(layer)
    except (AttributeError, ValueError, TypeError) as e:
        raise ValueError(f"the Frobenius bound needs the input and output shapes of {what} {layer.name!r}, "
                         f"which Keras cannot give ({e}); {fix}.") from None
    shape = in_shape if isinstance(layer, _TRANSPOSE) else out_shape
    if isinstance(layer, _CONV):
        data_format = getattr(layer, "data_format", None) or keras.config.image_data_format()
        dims = shape[1:-1] if data_format == "channels_last" else shape[2:]
    elif isinstance(layer, keras.layers.EinsumDense):
        in_axes, kernel_axes, out_axes = _einsum_axes(layer)
        if "..." in layer.equation:
            if not (in_axes.startswith("...") and out_axes.startswith("...")):
                raise ValueError(f"the Frobenius bound cannot count the positions of EinsumDense {layer.name!r} "
                                 f"(equation {layer.equation!r}); {fix}.")
            in_axes, out_axes = in_axes[3:], out_axes[3:]
            # the ellipsis: the batch, then positions kept in the output
            dims = tuple(out_shape[1:len(out_shape) - len(out_axes)])
            skip = set()
        else:
            dims, skip = (), {in_axes[0]}   # the batch axis
        size = dict(zip(in_axes, in_shape[len(in_shape) - len(in_axes):]))
        size.update(zip(out_axes, out_shape[len(out_shape) - len(out_axes):]))
        dims += tuple(d for a, d in size.items() if a not in kernel_axes and a not in skip)
    else:   # Dense: the last axis is the units, the batch axis first
        dims = shape[1:-1]
    if any(d is None for d in dims):
        raise ValueError(f"the Frobenius bound needs the number of positions of {what} "
                         f"{layer.name!r}, whose shape {shape} has unknown sizes; {fix}.")
    return int(np.prod(dims)) if dims else 1


def _summed_positions(layer):
    """How many input positions an EinsumDense sums its kernel over (axes of
    its input that neither the kernel nor the output has, but the batch):
    its map's MARS norm is that many times the kernel's largest row L1 norm
    (1 for a Dense, or for positions kept in the output: one block each)."""
    if not isinstance(layer, keras.layers.EinsumDense):
        return 1
    in_axes, kernel_axes, out_axes = _einsum_axes(layer)
    ellipsis = in_axes.startswith("...")
    in_axes = in_axes[3:] if ellipsis else in_axes
    summed = [i for i, a in enumerate(in_axes)
              if a not in kernel_axes and a not in out_axes and (ellipsis or i > 0)]
    if not summed:
        return 1
    try:
        in_shape, _ = _shapes(layer)
    except (AttributeError, ValueError, TypeError) as e:
        raise ValueError(f"the MARS bound needs the input shape of EinsumDense {layer.name!r}, which sums "
                         f"its kernel over input positions; Keras cannot give it ({e}).") from None
    sizes = [in_shape[len(in_shape) - len(in_axes) + i] for i in summed]
    if any(d is None for d in sizes):
        raise ValueError(f"the MARS bound needs the number of input positions EinsumDense {layer.name!r} "
                         f"sums over, whose input shape {in_shape} has unknown sizes; build the model on a "
                         "fixed input size.")
    return int(np.prod(sizes))


def _terms(model, norm, distances, head, layer_bounds, head_bound, conv_positions):
    if distances not in ("current", "radius"):
        raise ValueError(f"unknown distances={distances!r}; expected 'current' or 'radius'.")
    # Frozen layers are layers of the network too: they add their factor
    # 2 B_j to the product, with D_j = 0.
    unread = []
    kernels = tracked_kernels(model, head, include_frozen=True, unreadable=unread)
    if unread:
        # Left out, its factor 2 B_j would be missing from the product: a bound too small.
        raise ValueError("the bound needs every kernel layer of the chain, and cannot read "
                         + "; ".join(f"'{path}' ({e})" for path, e in unread))
    walked = list(_walk_paths(model))
    if head is not None:
        # V is the kernel of the layer named; other kernels wrapped as heads
        # (around the origin) are layers of the chain like any other.
        names = _named_layers(model, walked, head, "head")
        heads = [k for k in kernels if _selected(names, k.path)]
    else:
        heads = [k for k in kernels if k.role == "head"]
    if len(heads) > 1 or (head_bound is None and len(heads) != 1):
        raise ValueError(
            f"the bound needs exactly one head kernel V, found {len(heads)} "
            f"({[k.name for k in heads]}); name V with `head=[...]` (the others count as layers), "
            "or give `head_bound=` for a model without one."
        )
    body = [k for k in kernels if k not in heads]
    if not body:
        raise ValueError("the model has no backbone kernel.")
    layers = dict(walked)
    scaled = (_CONV + (keras.layers.Dense, keras.layers.EinsumDense)) if conv_positions else ()
    want = MARSDistance if norm == "mars" else FrobeniusDistance   # the theorem's constraint

    def row_axes(k):
        """The axes of the layer's rows (its output units), whatever axis a
        constraint attached by hand sums."""
        ndim = len(k.variable.shape)
        spec = next((sp for sp in kernel_specs(layers[k.path]) if sp.weight == k.weight), None)
        return {a % ndim for a in (spec.axis if spec is not None else k.axis)}

    def mat_norm(t, k):
        if norm == "mars":
            return _summed_positions(layers[k.path]) * float(_row_l1(t, tuple(sorted(row_axes(k)))).max())
        scale = math.sqrt(_positions(layers[k.path])) if isinstance(layers[k.path], scaled) else 1.0
        return scale * float(np.sqrt((t ** 2).sum()))

    def anchor_and_distance(k, w):
        """`(W0_j or None, D_j)` of a trained kernel."""
        if k.obj is not None:
            w0 = anchor_value(k)   # zeros around the origin; raises if never loaded
        elif distances == "current":
            raise ValueError(
                f"kernel '{k.name}' has no keras-spft anchor, so no W0 to measure D_j from: "
                "wrap the model with `wrap_pretrained` before training (its anchors are the W0_j)."
            )
        else:
            w0 = None
        if distances == "current":
            return w0, mat_norm(w - w0, k)
        if not isinstance(k.obj, want):
            raise ValueError(
                f"distances='radius' needs a {want.__name__} on '{k.name}' "
                f"for this theorem, found {type(k.obj).__name__}."
            )
        d = float(_np(k.obj.radius).max())
        if norm == "frobenius" and isinstance(layers[k.path], scaled):
            d *= math.sqrt(_positions(layers[k.path]))
        elif norm == "mars":
            d *= _summed_positions(layers[k.path])
            # A constraint summing fewer axes than the layer's rows bounds
            # slices of a row: the row is at most the sum of its slices.
            shape, summed = k.variable.shape, {a % len(k.variable.shape) for a in k.axis}
            d *= math.prod(int(shape[a]) for a in row_axes(k) - summed)
        return w0, d

    out = []
    unknown = sorted(set(layer_bounds or ()) - {k.name for k in body})
    if unknown:
        raise ValueError(f"layer_bounds names {unknown}, which are no backbone kernels of the chain "
                         f"(kernel names: {', '.join(k.name for k in body[:6])}{', ...' if len(body) > 6 else ''}).")
    for k in body:
        w = _np(k.variable)
        # A frozen kernel never moves (D_j = 0) but is still a layer of the
        # chain: its factor 2 B_j stays in the product.
        w0, d = (None, 0.0) if k.frozen else anchor_and_distance(k, w)
        if layer_bounds is not None and k.name in layer_bounds:
            b = float(layer_bounds[k.name])
        elif distances == "radius" and not k.frozen and w0 is not None:
            # B_j must hold for every weight of the class, not only the
            # current one: ||W_j|| <= ||W0_j|| + D_j (triangle inequality).
            b = mat_norm(w0, k) + d
        else:
            b = max(mat_norm(w, k), mat_norm(w0, k) if w0 is not None else 0.0)
        out.append(LayerTerm(k.name, b, d))
    if head_bound is None:
        v = heads[0]
        if distances == "radius" and isinstance(v.obj, want) and v.obj.anchor is None:
            # A head bounded around the origin: its radius bounds ||V||.
            _, head_bound = anchor_and_distance(v, None)
        else:
            head_bound = mat_norm(_np(v.variable), v)
    return out, float(head_bound)


def _walk_paths(model):
    from keras_spft.diagnostics import _unwrap

    return walk_layers(_unwrap(model))


def _assemble(theorem, constant, head_bound, layers):
    dsum = 0.0
    for t in layers:
        if t.distance > 0:
            dsum += t.distance / t.bound if t.bound > 0 else math.inf
    log_prod = sum(math.log(2 * t.bound) if t.bound > 0 else -math.inf for t in layers)
    def log_bound(log_sum):  # log(constant * B_V * sum * prod_j 2 B_j)
        if constant == 0 or head_bound == 0 or log_sum == -math.inf or log_prod == -math.inf:
            return -math.inf
        return math.log(constant) + math.log(head_bound) + log_sum + log_prod

    log_value = log_bound(math.log(dsum) if dsum > 0 else -math.inf)
    log_full = log_bound(math.log1p(dsum))
    value, full = (math.exp(v) if v < 709 else math.inf for v in (log_value, log_full))
    return BoundTerms(theorem, value, log_value, constant, head_bound, dsum, log_prod, layers,
                      full, log_full)


def _check_constants(owner, input_bound, lipschitz, head_bound, layer_bounds):
    """The theorems' constants are positive and finite: a negative one gave a
    math domain error, a zero B_j a bound of 0."""
    check_positive(input_bound, "input_bound", owner)
    check_positive(lipschitz, "lipschitz", owner)
    if head_bound is not None:
        check_positive(head_bound, "head_bound", owner)
    for name, b in (layer_bounds or {}).items():
        check_positive(b, f"layer_bounds[{name!r}]", owner)


def theorem2_bound(model, *, num_examples, num_classes, input_dim, input_bound,
                   lipschitz=1.0, distances="current", head=None,
                   layer_bounds=None, head_bound=None):
    """Theorem 2 of Gouk et al. (2021): the MARS-norm bound.

        2 sqrt(log(2d)) c rho C_inf B_V (sum_j D_j / B_j) (prod_j 2 B_j) / sqrt(m)

    with `D_j = ||W_j - W0_j||_inf` (the MARS distance), `B_j =
    max(||W_j||_inf, ||W0_j||_inf)` unless given, `B_V = ||V||_inf`. With
    `distances="radius"`, `D_j` is the radius and the bound covers every
    weight the radii allow: `B_j = ||W0_j||_inf + D_j`, and `B_V` the head's
    radius when the head is constrained around the origin.

    Args:
        model: a model wrapped with keras-spft (the anchors are `W0_j`).
        num_examples: `m`.
        num_classes: `c`.
        input_dim: `d`, the input dimension.
        input_bound: `C_inf >= max_i ||x_i||_inf` over the training inputs.
        lipschitz: `rho`, the Lipschitz constant of the loss.
        distances: `"current"` (measured `D_j`, the bound at the current
            weights) or `"radius"` (the MARS-PGM radii: the bound for every
            weight the training can reach, see above).
        head: the layer of the head kernel V (name or path, or a model
            enclosing only it). Needed when several kernels are heads
            (wrapped around the origin, or taken as new by
            `wrap_pretrained`): V is the one named, the others count as
            layers of the chain (`D_j` their distance to 0).
        layer_bounds: optional `{kernel name: B_j}` overrides.
        head_bound: optional `B_V` override.

    Returns:
        `BoundTerms` (value, log_value and every term).

    Example:

    ```python
    terms = keras_spft.bounds.theorem2_bound(
        model, num_examples=1000, num_classes=10, input_dim=32 * 32 * 3,
        input_bound=1.0)
    terms.value, terms.distance_sum
    ```
    """
    m, c, d = (check_count(v, what, "theorem2_bound") for what, v in
               (("num_examples", num_examples), ("num_classes", num_classes), ("input_dim", input_dim)))
    _check_constants("theorem2_bound", input_bound, lipschitz, head_bound, layer_bounds)
    layers, hb = _terms(model, "mars", distances, head, layer_bounds, head_bound, False)
    constant = 2.0 * math.sqrt(math.log(2 * d)) * c * float(lipschitz) * float(input_bound) / math.sqrt(m)
    return _assemble(2, constant, hb, layers)


def theorem3_bound(model, *, num_examples, num_classes, input_bound,
                   lipschitz=1.0, distances="current", head=None,
                   layer_bounds=None, head_bound=None, conv_positions=True):
    """Theorem 3 of Gouk et al. (2021): the Frobenius-norm bound (ReLU nets).

        sqrt(2c) rho C_2 B_V (sum_j D_j / B_j) (prod_j 2 B_j) / sqrt(m)

    with `D_j = ||W_j - W0_j||_F`, `B_j = max(||W_j||_F, ||W0_j||_F)` unless
    given, `B_V = ||V||_F` (with `distances="radius"`: `B_j = ||W0_j||_F + D_j`
    and `B_V` the head's radius, as in `theorem2_bound`); convolutions, and
    Dense layers applied at several positions, scaled by `sqrt(positions)`
    (`conv_positions=True`, see the module docstring).

    Args:
        model: a model wrapped with keras-spft.
        num_examples: `m`.
        num_classes: `c`.
        input_bound: `C_2 >= max_i ||x_i||_2`.
        lipschitz: `rho`.
        distances: `"current"` or `"radius"` (the L2-PGM radii).
        head, layer_bounds, head_bound: as `theorem2_bound`.
        conv_positions: scale the norms of convolutions (and of Dense
            layers applied at several positions) to their linear map.

    Returns:
        `BoundTerms`.

    Example:

    ```python
    terms = keras_spft.bounds.theorem3_bound(
        model, num_examples=1000, num_classes=10, input_bound=55.4,
        distances="radius")
    terms.log_value, [(t.path, t.bound, t.distance) for t in terms.layers]
    ```
    """
    m, c = (check_count(v, what, "theorem3_bound") for what, v in
            (("num_examples", num_examples), ("num_classes", num_classes)))
    _check_constants("theorem3_bound", input_bound, lipschitz, head_bound, layer_bounds)
    layers, hb = _terms(model, "frobenius", distances, head, layer_bounds, head_bound, conv_positions)
    constant = math.sqrt(2 * c) * float(lipschitz) * float(input_bound) / math.sqrt(m)
    return _assemble(3, constant, hb, layers)
