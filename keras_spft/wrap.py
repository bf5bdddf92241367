"""`wrap_pretrained`: anchor every pre-trained kernel of a model in one call."""

import json
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import keras

from keras_spft.anchors import Anchored, _SharedAnchor, check_flag, check_positive
from keras_spft.constraints import MIN_LEARNED_RADIUS, FrobeniusDistance, MARSDistance
from keras_spft.kernels import UnsupportedLayerError, kernel_specs, own_weights, walk_layers
from keras_spft.regularizers import L2SP, MARSSP

__all__ = ["WrapReport", "wrap_pretrained"]

METHODS = ("none", "l2-sp", "mars-sp", "l2-pgm", "mars-pgm", "mars-pgm-exact")
PGM_METHODS = ("l2-pgm", "mars-pgm", "mars-pgm-exact")
SP_METHODS = ("l2-sp", "mars-sp")
BATCHNORM_MODES = (None, "gamma", "reference")
#: `radius=LEARNED`: one radius per kernel, learned by `RadiusOptimizer`.
LEARNED = "learned"


@dataclass
class WrappedWeight:
    """One weight that `wrap_pretrained` attached an object to."""

    path: str
    weight: str
    kind: str
    role: str
    rows: int
    value: str
    params: int
    obj: object = field(repr=False)
    note: str = ""

    @property
    def shown(self):
        """`value`, with the current radius when it is learned."""
        if getattr(self.obj, "learn_radius", False):
            return f"learned, now {float(keras.ops.convert_to_numpy(self.obj.radius.value)):.4g}"
        return self.value


@dataclass
class SkippedLayer:
    """A layer with weights that `wrap_pretrained` left alone, and why."""

    path: str
    kind: str
    reason: str
    weights: tuple = ()   # the names of the weights left alone, where it says


@dataclass
class WrapReport:
    """What `wrap_pretrained` did. `print(report)` shows it as a table.

    Attributes:
        method: the method applied.
        wrapped: list of `WrappedWeight`, one per anchored weight or head kernel.
        skipped: list of `SkippedLayer`, layers with weights left alone.
    """

    method: str
    wrapped: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    @property
    def params(self):
        """Parameters covered by a constraint or penalty."""
        return sum(w.params for w in self.wrapped)

    @property
    def anchor_bytes(self):
        """Extra memory held by the anchors (one copy of each anchored weight)."""
        seen, total = set(), 0
        for w in self.wrapped:
            a = w.obj.anchor
            if a is not None and id(a) not in seen:
                seen.add(id(a))
                total += math.prod(a.shape) * np.dtype(a.dtype).itemsize
        return total

    def __getitem__(self, path):
        """The object on the weight at `path`: a layer's path or name, or
        `"<layer>/<weight>"` for a layer with two (SeparableConv's
        `depthwise_kernel`, `pointwise_kernel`). KeyError if none or several match."""
        found = [w for w in self.wrapped
                 if any(full == path or full.endswith("/" + path) for full in (w.path, f"{w.path}/{w.weight}"))]
        if len(found) == 1:
            return found[0].obj
        if not found:
            raise KeyError(path)
        raise KeyError(f"{path!r} matches {len(found)} wrapped weights: "
                       + ", ".join(f"{w.path}/{w.weight}" for w in found) + "; give one of these")

    def summary(self):
        roles = {}
        for w in self.wrapped:
            roles[w.role] = roles.get(w.role, 0) + 1
        parts = ", ".join(f"{k} {v}" for k, v in roles.items())
        learned = any(getattr(w.obj, "learn_radius", False) for w in self.wrapped)
        return (
            f"{self.method}{' (learned radii)' if learned else ''}: {len(self.wrapped)} weights wrapped ({parts or 'none'}), "
            f"{self.params:,} parameters covered, anchors {self.anchor_bytes:,} bytes; "
            f"{len(self.skipped)} layers with weights skipped"
        )

    def __str__(self):
        head = ("layer", "weight", "kind", "role", "rows", "radius/strength", "params")
        rows = [head] + [
            (w.path, w.weight, w.kind, w.role, f"{w.rows:,}", w.shown + (f" ({w.note})" if w.note else ""), f"{w.params:,}")
            for w in self.wrapped
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        fmt = "  ".join("{:<%d}" % n for n in widths)
        lines = [self.summary(), fmt.format(*head), fmt.format(*("-" * n for n in widths))]
        lines += [fmt.format(*r) for r in rows[1:]]
        if self.skipped:
            lines.append("skipped:")
            by_reason = {}
            for s in self.skipped:
                by_reason.setdefault(s.reason, []).append(s.path)
            for reason, paths in by_reason.items():
                shown = ", ".join(paths[:6]) + (f", ... ({len(paths)} layers)" if len(paths) > 6 else "")
                lines.append(f"  {reason}: {shown}")
        return "\n".join(lines)

    __repr__ = __str__


def _default_head(model, layers):
    """Layers outside the nested pre-trained model(s); else the last kernel layer.

    With several nested models and no kernel layer outside them, one of them
    may be a new head (`Sequential([base, Sequential([..., Dense(n)])])`) or
    all may be pre-trained: that cannot be told apart, so the user says.
    """
    top = model.layers if isinstance(model, keras.Model) else []
    nested = [l for l in top if isinstance(l, keras.Model)]
    if nested:
        inside, with_kernels = set(), []
        for base in nested:
            walked = [l for _, l in walk_layers(base)]
            inside.update(id(l) for l in walked)
            inside.add(id(base))
            if any(_has_kernel(l) for l in walked):
                with_kernels.append(base.name)
        outside = [p for p, l in layers if id(l) not in inside and _has_kernel(l)]
        if not outside and len(with_kernels) > 1:
            raise ValueError(
                f"cannot tell the new head: every kernel is inside the nested models {with_kernels} "
                f"of '{model.name}'. Name the new head, e.g. head=[{with_kernels[-1]!r}], or head=[] if all "
                "are pre-trained.")
        _refuse_nested_after_kernels(model, [m for m in nested if m.name in with_kernels], outside)
        return outside
    with_kernel = [p for p, l in layers if _has_kernel(l)]
    return with_kernel[-1:]


def _upstream(model):
    """`{id(top-level layer): ids of the top-level layers it takes input from,
    directly or not}` for a Sequential or Functional model; `None` for a
    subclassed one (no graph to read)."""
    top = list(model.layers)
    if isinstance(model, keras.Sequential):
        return {id(l): {id(u) for u in top[:k]} for k, l in enumerate(top)}
    nodes = getattr(model, "_nodes", None)
    if not isinstance(nodes, (set, dict)):
        return None
    # Through every operation of the graph, not only its layers: a residual
    # written `x + block(x)` (ConvNeXt) joins the paths in an operation.
    parents = {}
    for op in getattr(model, "operations", top):
        parents[id(op)] = {id(p.operation) for i, n in enumerate(op._inbound_nodes)
                           if f"{id(op)}_ib-{i}" in nodes for p in n.parent_nodes}
    layer_ids = {id(l) for l in top}
    out = {}
    for l in top:
        seen, stack = set(), list(parents.get(id(l), ()))
        while stack:
            u = stack.pop()
            if u not in seen:
                seen.add(u)
                stack.extend(parents.get(u, ()))
        out[id(l)] = seen & layer_ids
    return out


def _refuse_nested_after_kernels(model, nested, outside):
    """A nested model that takes the output of kernel layers may be a new head
    on a flat pre-trained base (`keras.Model(base.input, head(base.output))`)
    or pre-trained layers behind new ones: guessing either way would anchor a
    random head or leave pre-trained kernels free. The user says which."""
    upstream = _upstream(model)
    if upstream is None:
        return
    by_name = {l.name: l for l in model.layers}
    # The top-level layers holding kernels outside the nested models, in order.
    outside_top = [n for n in dict.fromkeys(p.split("/")[0] for p in outside) if n in by_name]
    kernel_ids = {id(by_name[n]) for n in outside_top} | {id(m) for m in nested}
    for m in nested:
        before = [l.name for l in model.layers if id(l) in kernel_ids and id(l) in upstream.get(id(m), ())]
        if not before:
            continue
        after = [l.name for l in model.layers if id(l) in kernel_ids and id(m) in upstream.get(id(l), ())]
        shown = ", ".join(repr(n) for n in before[:3]) + (f" and {len(before) - 3} more" if len(before) > 3 else "")
        if_pretrained = (f"head={outside_top!r}" if 0 < len(outside_top) <= 6
                         else "head=[...] with the new layers' names")
        raise ValueError(
            f"cannot tell the new head of '{model.name}': its nested model '{m.name}' takes the output of "
            f"layers with kernels ({shown}), so it may be a new head on a pre-trained base, or pre-trained "
            f"layers behind new ones. Name the new layers: head={[m.name] + after!r} if '{m.name}' is new "
            f"(every other kernel is then anchored as pre-trained), {if_pretrained} if '{m.name}' is "
            "pre-trained, or head=[] if all are.")


def _has_kernel(layer):
    try:
        return bool(kernel_specs(layer))
    except UnsupportedLayerError:
        return True


def _rebuilt_without_objects(path, by_path, model):
    """The enclosing layer or model (a description) that `keras.models.load_model`
    rebuilds the layer at `path` from, without the keras-spft object attached
    to it here, or `None` when the file restores it.

    Functional and Sequential models record each layer's config, and so do
    wrappers such as TimeDistributed. A layer that builds its sublayers from
    its own arguments does not: MultiHeadAttention's query/key/value/output
    layers, the layers a subclassed model creates in `__init__`, the layers of
    a Functional subclass whose `__init__` builds its graph (keras_hub models).
    """
    from keras.src.models.functional import Functional

    parts = path.split("/")
    chain = [("", model)] + [("/".join(parts[:k]), by_path.get("/".join(parts[:k]))) for k in range(1, len(parts))]
    for k, (parent_path, parent) in enumerate(chain):
        child = by_path.get("/".join(parts[:k + 1]))
        shown = f"'{parent_path}' ({type(parent).__name__})" if parent_path else f"the model ({type(parent).__name__})"
        if isinstance(parent, keras.Model):
            if type(parent) not in (Functional, keras.Sequential):
                return shown
            continue
        try:
            config = json.dumps(parent.get_config(), default=str)
        except Exception:   # no config: load_model cannot rebuild it anyway
            continue
        if f'"name": {json.dumps(child.name)}' not in config:
            return shown
    return None


def _selectors(path):
    """The names that select the layer at `path`: its path and name, then
    those of every enclosing layer or model, nearest first ("base/block/conv":
    "base/block/conv", "conv", "base/block", "block", "base", "base")."""
    parts = path.split("/")
    keys = []
    for k in range(len(parts), 0, -1):
        keys += ["/".join(parts[:k]), parts[k - 1]]
    return keys


def _named_layers(model, layers, names, what):
    """`names` (a layer name or path, or a list of them) as a set, each a
    layer of `model` (`layers`: its `walk_layers` pairs); else a ValueError
    naming the `what` option. Layer objects stand for their paths."""
    if isinstance(names, (str, keras.layers.Layer)):
        names = [names]
    try:
        given = list(names)
    except TypeError:
        raise ValueError(f"`{what}` must be a layer name or path, a layer, or a list of them; "
                         f"got {names!r}.") from None
    names = set()
    for n in given:
        if isinstance(n, keras.layers.Layer):
            paths = [p for p, l in layers if l is n]
            if not paths:
                raise ValueError(f"{what}: layer {n.name!r} (a {type(n).__name__} object) is not a layer of "
                                 "the model.")
            names.update(paths)
        elif isinstance(n, str):
            names.add(n)
        else:
            raise ValueError(f"`{what}` must list layer names, paths or layers; got {n!r}.")
    known = {p for p, _ in layers} | {l.name for _, l in layers}
    for n in sorted(names - known):
        top = ", ".join(l.name for l in getattr(model, "layers", []))
        raise ValueError(f"{what}: layer '{n}' does not exist in the model (top-level layers: {top}).")
    return names


def _selected(names, path):
    """Whether the layer at `path` is one of `names` or inside one of them."""
    return bool(names.intersection(_selectors(path)))


def _resolve(value, layer, path, what, shared_paths=()):
    """A per-layer number from a scalar, a dict or a callable. A dict entry
    for a nested model or layer applies to everything inside it; the nearest
    enclosing entry wins. A layer shared by several models (`shared_paths`,
    its other paths) must get the same value from a dict through each."""
    if isinstance(value, dict) and shared_paths:
        got = {p: _resolve(value, layer, p, what) for p in (path,) + tuple(shared_paths)}
        if len(set(got.values())) > 1:
            raise ValueError(
                f"layer '{path}' is shared and the `{what}` dict gives it different values through "
                f"its paths ({', '.join(f'{p}: {v if isinstance(v, str) else _fmt(v)}' for p, v in got.items())}): one layer, one "
                "kernel, one value; give the layer's own name an entry.")
        return got[path]
    if isinstance(value, dict):
        for key in _selectors(path) + ["*"]:
            if key in value:
                value = value[key]
                break
        else:
            raise ValueError(
                f"`{what}` dict has no entry for layer '{path}' and no '*' default."
            )
    elif callable(value):
        value = value(layer)
        if value is None:
            return None
    if isinstance(value, str) and value == LEARNED and what == "radius":
        return LEARNED
    if isinstance(value, str):
        raise ValueError(
            f"layer '{path}': `{what}` must be a positive number"
            + (f" or {LEARNED!r}" if what == "radius" else "") + f", got {value!r}."
        )
    check_positive(value, what, f"layer '{path}'")
    number = keras.ops.convert_to_numpy(value) if hasattr(value, "shape") else value
    if np.ndim(number) != 0:
        raise ValueError(f"layer '{path}': `{what}` must be one number per layer, got {value!r} "
                         "(per-row radii: give the constraint itself an array).")
    return float(number)


def _refuse_idle_keys(planned, left_out, backbone_value, head_value, sp):
    """A dict entry that selects no weight of its option's role would be
    ignored without a word (a head layer's radius given in `radius`).
    `planned`: `(path, is_head)` of every weight to wrap; `left_out`: paths
    excluded or skipped with a reason in the report (an entry for them may
    stay in a dict written for the whole model)."""
    options = (("strength" if sp else "radius", backbone_value, False),
               ("head_strength" if sp else "head_radius", head_value, True))
    for what, value, head in options:
        if not isinstance(value, dict):
            continue
        for key in value:
            if key == "*" or any(_selected({key}, p) for p, h in planned if h == head):
                continue
            if any(_selected({key}, p) for p, _ in planned):
                other = options[0][0] if head else options[1][0]
                why = (f"it is not in the head: give its value in `{other}`" if head
                       else f"it is in the new head: give its value in `{other}`")
            elif any(_selected({key}, p) for p in left_out):
                continue
            else:
                why = "it holds no weight to bound"
            raise ValueError(f"`{what}` names layer '{key}', but {why}.")


def _fmt(x):
    return f"{x:.4g}"


def wrap_pretrained(
    model,
    radius=None,
    method="mars-pgm",
    head=None,
    head_radius=None,
    *,
    strength=None,
    head_strength=None,
    projection=None,
    relative=False,
    batchnorm=None,
    exclude=(),
    drop_anchors=False,
):
    """Anchors every pre-trained kernel of `model` at its current value.

    Attaches a constraint (PGM methods) or a penalty (SP methods) to every
    kernel of the supported layer types, inside nested models too, so that
    an ordinary `model.compile(...)`/`model.fit(...)` fine-tunes with the
    chosen method. Call it after loading the pre-trained weights and adding
    the new head, before training. Biases, BatchNorm beta and the moving
    statistics are never touched.

    | method | backbone kernel | head kernel |
    |---|---|---|
    | `"none"` | nothing (removes keras-spft objects) | nothing |
    | `"l2-sp"` | `L2SP(anchor, strength)` | `L2SP(None, head_strength)` |
    | `"mars-sp"` | `MARSSP(anchor, strength)` | `MARSSP(None, head_strength)` |
    | `"l2-pgm"` | `FrobeniusDistance(anchor, radius)` | `FrobeniusDistance(None, head_radius)` |
    | `"mars-pgm"` | `MARSDistance(anchor, radius)` | `MARSDistance(None, head_radius)` |
    | `"mars-pgm-exact"` | as mars-pgm with `projection="exact"` | same |

    Args:
        model: a built Keras model (e.g. a keras.applications base inside a
            Sequential or functional model with a new head).
        radius: PGM methods: the distance bound. A float, a dict
            `{layer name or path: radius}` (key `"*"` is the default; the
            name of a nested model or layer covers everything inside it, the
            nearest entry winning), or a
            callable `layer -> radius` (returning `None` leaves that layer
            free, and the report says so). `"learned"` (also as a dict value
            or callable result): one radius per kernel, starting at 1e-4
            (the weights start at the anchor; wrapping a learned radius
            again goes on from its current value, and kernels already
            fine-tuned under a fixed radius or a penalty start at their
            current distance) and learned during training;
            compile with `optimizer=keras_spft.RadiusOptimizer(...)`, which
            learns it (FTP, Tian et al. 2023).
        method: one of `"none"`, `"l2-sp"`, `"mars-sp"`, `"l2-pgm"`,
            `"mars-pgm"`, `"mars-pgm-exact"`.
        head: names (or paths) of the new head layers, or the layers
            themselves, bounded around zero
            (a nested model's name: all of its layers; a BatchNorm gamma in
            the head is anchored at its value, as in the backbone).
            Default: the kernel layers outside the nested pre-trained
            model(s), or, when the model has no nested model, its last kernel
            layer; a nested model that takes the output of kernel layers is
            an error (name the head). `[]`: no head, every kernel is anchored.
        head_radius: PGM methods: radius of the head around zero (scalar,
            dict or callable). `None` leaves the head free.
        strength: SP methods: the penalty strength (scalar, dict or callable).
        head_strength: SP methods: penalty strength on the head (around zero).
            `None` leaves the head free.
        projection: MARS-PGM only: `"scale"` (the paper's, default) or
            `"exact"` (Euclidean projection onto each row's L1 ball).
        relative: if `True`, backbone radii are fractions of each anchor row's
            own norm (MARS: row L1 norm; L2: the kernel's Frobenius norm).
        batchnorm: `None` (default) leaves BatchNorm gamma free, as in
            L2-SP; `"gamma"` bounds or penalises gamma around its pre-trained
            value (element-wise for MARS, as one vector for L2) with the
            backbone radius; `"reference"` (PGM only) follows the authors'
            code: the effective scale `gamma / sqrt(moving_variance + eps)`
            stays within `radius` of its pre-trained value, element-wise,
            with the pre-trained moving variance.
        exclude: names (or paths) of layers to leave alone, with everything
            inside them; listed in the report.
        drop_anchors: wrapping a wrapped model again raises when the call
            would leave free (or treat as head) a weight that an earlier call
            anchored and that has moved from its anchor since, as the anchor
            would be lost and a later call would anchor it at its fine-tuned
            value; `True` lets it go, forgetting the anchor. `method="none"`
            removes every object and anchor without it.

    Returns:
        A `WrapReport`; `print(report)` shows every wrapped weight (kind,
        rows, radius, parameters) and the skipped layers with the reason.

    Raises:
        ValueError: unknown method or option, a radius/strength that is not
            positive and finite, a head or excluded name that does not exist,
            a layer with LoRA enabled or quantized, a kernel that already has a
            foreign constraint or regularizer, no eligible layer, or a call
            that would drop an earlier call's anchor (see `drop_anchors`).

    Example:

    ```python
    base = keras.applications.MobileNet(
        alpha=0.25, include_top=False, weights=None, pooling="avg",
        input_shape=(96, 96, 3))
    model = keras.Sequential([base, keras.layers.Dense(5)])
    report = keras_spft.wrap_pretrained(model, radius=10.0, head_radius=8.0)
    print(report)
    ```
    """
    if method == "delta":
        raise ValueError(
            "method 'delta' regularises feature maps, not weights, and needs a new model: "
            "use `delta_model = keras_spft.add_delta(model, x, y, alpha=..., beta=...)` "
            "(or `keras_spft.DeltaModel`) and train `delta_model`."
        )
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}.")
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(
            f"unknown batchnorm option {batchnorm!r}; expected one of {BATCHNORM_MODES}."
        )
    if method == "none":   # removes keras-spft's objects
        given = [n for n, v in (("radius", radius), ("head_radius", head_radius), ("strength", strength),
                                ("head_strength", head_strength), ("projection", projection),
                                ("batchnorm", batchnorm)) if v is not None] + (["relative"] if relative is True else [])
        if given:
            raise ValueError(f"method 'none' removes keras-spft's objects (plain fine-tuning): "
                             f"`{given[0]}` does not apply.")
    if method == "mars-pgm-exact":
        if projection not in (None, "exact"):
            raise ValueError(f"method 'mars-pgm-exact' conflicts with projection={projection!r}.")
        method, projection = "mars-pgm", "exact"
    if projection is not None and method != "mars-pgm":
        raise ValueError(f"`projection` applies to mars-pgm only, not {method!r}.")
    projection = projection or "scale"
    relative = check_flag(relative, "relative", "wrap_pretrained")
    drop_anchors = check_flag(drop_anchors, "drop_anchors", "wrap_pretrained")
    pgm, sp = method in PGM_METHODS, method in SP_METHODS
    if sp:
        if radius is not None or head_radius is not None:
            raise ValueError(
                f"method {method!r} is a penalty: pass `strength=`/`head_strength=`, "
                "not `radius=`/`head_radius=`."
            )
        if strength is None:
            raise ValueError(f"method {method!r} needs `strength=`.")
        if relative:
            raise ValueError("`relative=True` applies to PGM radii only.")
        if batchnorm == "reference":
            raise ValueError("batchnorm='reference' applies to PGM methods only.")
    elif pgm:
        if strength is not None or head_strength is not None:
            raise ValueError(
                f"method {method!r} is a constraint: pass `radius=`/`head_radius=`, "
                "not `strength=`/`head_strength=`."
            )
        if radius is None:
            raise ValueError(f"method {method!r} needs `radius=`.")
    if isinstance(head_radius, str):
        raise ValueError(
            f"head_radius={head_radius!r} is not supported: the head starts at random values "
            "around zero; give it a number, or None to leave it free."
        )
    if _mentions_learned(radius):
        if relative:
            raise ValueError("radius='learned' learns absolute radii; it cannot be combined with relative=True.")
        if batchnorm == "reference":
            raise ValueError("radius='learned' cannot be combined with batchnorm='reference' (per-element radii).")
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"wrap_pretrained takes a Keras model, got {type(model).__name__} "
            f"{getattr(model, 'name', '')!r}: wrap the model that holds it (to bound one layer, "
            "name the others in exclude=[...], or attach a constraint yourself as in the "
            "MARSDistance example of the API reference).")
    if not getattr(model, "built", False):
        raise ValueError("the model is not built: call it on data or `model.build(...)` first.")

    layers = list(walk_layers(model))
    by_path = dict(layers)
    paths_of = {}   # id(layer) -> its paths (several for a layer shared by nested models)
    for path, layer in layers:
        paths_of.setdefault(id(layer), []).append(path)
    others = {k: tuple(paths[1:]) for k, paths in paths_of.items()}   # the paths after the first
    not_restored = {}   # enclosing layer -> paths load_model rebuilds without their objects
    known = {p for p, _ in layers} | {l.name for _, l in layers}   # paths and bare names

    def lookup(names, what):
        """Ids of the layers named, and of every layer inside them."""
        names = _named_layers(model, layers, names, what)
        return {id(l) for path, l in layers if _selected(names, path)}

    for what, value in (("radius", radius), ("head_radius", head_radius),
                        ("strength", strength), ("head_strength", head_strength)):
        if isinstance(value, dict):
            for key in value:
                if not isinstance(key, str):
                    raise ValueError(f"`{what}` dict keys must be layer names or paths (or '*'), got {key!r}.")
                if key != "*" and key not in known:
                    raise ValueError(f"`{what}` names layer '{key}' which does not exist in the model.")
    excluded = lookup(exclude or (), "exclude")
    if method == "none":
        head_ids = set()   # removing keras-spft's objects needs no head
    elif head is None:
        default_head = _default_head(model, layers)
        head_ids = lookup(default_head, "head")
        outputs = len(getattr(model, "outputs", None) or ())
        if outputs > 1 and default_head and not any(isinstance(l, keras.Model) for l in model.layers):
            warnings.warn(
                f"'{model.name}' has {outputs} outputs and no nested pre-trained model: only its last kernel "
                f"layer '{default_head[0]}' is taken as the new head; a new head on another output would be "
                "anchored at its random start. Name every new head layer, head=[...] (which also silences "
                "this warning).", UserWarning, stacklevel=2)
    else:
        head_ids = lookup(head, "head")
        head_kernels = [(p, l) for p, l in layers if id(l) in head_ids and _has_kernel(l)]
        if head_kernels and all(id(l) in excluded for _, l in head_kernels):
            raise ValueError(f"every kernel layer of head={head!r} is also in `exclude` "
                             f"({', '.join(p for p, _ in head_kernels[:4])}"
                             f"{', ...' if len(head_kernels) > 4 else ''}): a layer is the new head or left out, "
                             "not both.")

    backbone_value = strength if sp else radius
    head_value = head_strength if sp else head_radius
    report = WrapReport(method=method + ("-exact" if projection == "exact" else ""))
    seen = set()
    plan = []
    attachments = []
    matrices = []  # (path, type) of unsupported layers with weight matrices
    dropped = []   # (weight path, why): anchors an earlier call set, of moved weights, this one would remove
    for path, layer in layers:
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        kind = type(layer).__name__
        try:
            specs = kernel_specs(layer, batchnorm=True)
        except UnsupportedLayerError as e:
            if id(layer) in excluded:
                report.skipped.append(SkippedLayer(path, kind, "excluded by the user"))
                continue
            raise ValueError(str(e)) from None
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        reason = None
        if id(layer) in excluded:
            reason = "excluded by the user"
        elif is_bn and batchnorm is None and getattr(layer, "scale", True):
            reason = "BatchNorm: gamma left free (batchnorm=None); beta and moving statistics are never touched"
        elif not specs and own_weights(layer):
            if is_bn:
                reason = "BatchNorm without a scale (gamma)"
            elif not isinstance(layer, keras.Model) and layer._trainable_variables:
                # Made trainable, frozen or not: a frozen layer trains once
                # unfrozen (freeze, wrap, fit the head, unfreeze).
                reason = f"layer type {kind} is not supported: its weights are not bounded"
                if any(len(v.shape) >= 2 for v in layer._trainable_variables):
                    matrices.append((path, kind))
        if reason is not None:
            report.skipped.append(SkippedLayer(path, kind, reason, tuple(v.name for v in own_weights(layer))))
        if reason is not None or not specs:
            # After a call, the model's keras-spft objects are exactly those
            # in the report: clear any left by an earlier call here.
            attachments.extend((layer, spec, None, None) for spec in specs)
            dropped.extend((f"{path}/{spec.weight}", reason) for spec in specs if _moved_from_anchor(spec.variable))
            continue
        # A BatchNorm gamma starts at 1 by design, not at random: in a head
        # too it is anchored at its current value (as where the head is
        # found by itself, whose BatchNorm layers hold no kernel), never
        # bounded around zero.
        is_head = id(layer) in head_ids and not is_bn
        if method != "none":
            rebuilt = _rebuilt_without_objects(path, by_path, model)
            if rebuilt is not None:
                not_restored.setdefault(rebuilt, []).append(path)
        for spec in specs:
            plan.append((path, layer, spec, is_head))

    if method != "none" and head_value is not None and not any(h for *_, h in plan):
        option = "head_strength" if sp else "head_radius"
        raise ValueError(
            f"`{option}` is given but no head kernel was found "
            + (f"among head={sorted(_named_layers(model, layers, head, 'head'))}"
               if head is not None else "outside the nested pre-trained model(s)")
            + f": name the head layer(s) with head=[...], or leave `{option}` out.")
    if method != "none" and not any(not h for *_, h in plan):
        raise ValueError(
            "no eligible layer: the model has no pre-trained kernel of a supported "
            "type outside the head (supported: Dense, Conv1D/2D/3D, their Transpose, "
            "DepthwiseConv1D/2D, SeparableConv1D/2D, EinsumDense)."
        )

    if method != "none":
        # Every path of a planned layer (a shared one has several).
        planned = [(q, h) for p, layer, _, h in plan for q in (p,) + tuple(others[id(layer)])]
        left_out = [p for p, l in layers if id(l) in excluded or own_weights(l)]
        _refuse_idle_keys(planned, left_out, backbone_value, head_value, sp)

    for path, layer, spec, is_head in plan:
        var = spec.variable
        if method == "none":
            attachments.append((layer, spec, None, None))
            continue
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        if is_head:
            value = (_resolve(head_value, layer, path, "head_strength" if sp else "head_radius", others[id(layer)])
                     if head_value is not None else None)
            if _moved_from_anchor(var):
                dropped.append((f"{path}/{spec.weight}", "now head, bounded around zero"
                                if value is not None else "head left free"))
            if value is None:
                report.skipped.append(SkippedLayer(path, spec.kind, "head left free (no head_radius/head_strength)"))
                attachments.append((layer, spec, None, None))
                continue
            _existing(var, path)
            anchor, note, shown = None, "", _fmt(value)
        else:
            value = _resolve(backbone_value, layer, path, "strength" if sp else "radius", others[id(layer)])
            if value is None:
                report.skipped.append(SkippedLayer(path, spec.kind, "the radius callable returned None"))
                attachments.append((layer, spec, None, None))
                if _moved_from_anchor(var):
                    dropped.append((f"{path}/{spec.weight}", "the radius callable returned None"))
                continue
            existing = _existing(var, path)
            if existing is not None and existing.anchor is not None:
                if not existing._anchor_ready:
                    raise ValueError(existing._not_ready_because or
                        f"layer '{path}': weight '{var.name}' has a keras-spft "
                        f"{type(existing).__name__} rebuilt from a config whose "
                        "anchor was never loaded (e.g. after "
                        "`keras.models.clone_model`): load the saved model or "
                        "weights first (`keras.models.load_model`, "
                        "`model.load_weights`), or remove the constraint and "
                        "regularizer to anchor at the current weights.")
                anchor, note = _SharedAnchor(existing), "kept existing anchor"
            else:
                anchor, note = var, ""
            shown = (LEARNED if value == LEARNED else f"{_fmt(value)} x {'kernel' if method == 'l2-pgm' else 'row'} norm" if relative and not (is_bn and batchnorm == "reference") else _fmt(value))
        obj = _make(method, projection, anchor, value, spec, layer, path, relative and not is_head,
                    is_bn and batchnorm == "reference")
        if not is_head and value == LEARNED and existing is not None and existing.anchor is not None:
            # Wrapping a learned radius again (say, for another head radius)
            # goes on from the radius learned so far; kernels fine-tuned under
            # a fixed radius or a penalty start at their current distance. A
            # start at 1e-4 would pull them back to their anchors.
            if (getattr(existing, "learn_radius", False)
                    and type(existing) is {"mars-pgm": MARSDistance, "l2-pgm": FrobeniusDistance}.get(method)):
                start, note = existing.radius, note + ", kept learned radius"
            else:
                start = max(obj.min_radius, float(keras.ops.convert_to_numpy(obj.distance(var))))
                note += ", learned radius starts at the current distance"
            obj.radius.assign(keras.ops.convert_to_numpy(start).astype("float32"))
        if is_bn and batchnorm == "reference":
            shown = f"{_fmt(value)} on gamma/sqrt(var+eps)"
        role = "head" if is_head else ("batchnorm" if is_bn else "backbone")
        report.wrapped.append(WrappedWeight(path, spec.weight, spec.kind, role, spec.rows, shown, spec.params, obj, note))
        attachments.append((layer, spec, obj, pgm))

    if dropped and method != "none" and not drop_anchors:
        shown = "; ".join(f"{p} ({why})" for p, why in dropped[:6])
        raise ValueError(
            f"this call would remove the anchors an earlier wrap_pretrained call set on {len(dropped)} "
            f"weight(s) that have moved from them: {shown}{', ...' if len(dropped) > 6 else ''}. A later "
            "call would anchor them at their fine-tuned values. To keep them, pass the earlier call's options for these layers "
            "(e.g. batchnorm=, exclude=, head=); to free them and forget their anchors, pass drop_anchors=True.")
    # A RadiusOptimizer already built for this model takes up the new objects
    # at the end (`rebind`); one that cannot (learned radii, kernels stepped
    # by an accumulating optimizer) is refused before anything changes.
    _check_radius_optimizer_takes(model, [spec.variable for _, spec, obj, pgm in attachments
                                          if pgm and getattr(obj, "learn_radius", False)])
    for layer, spec, obj, is_constraint in attachments:
        _attach(layer, spec, obj, is_constraint)
    if not_restored:
        lost = {p for paths in not_restored.values() for p in paths}
        for w in report.wrapped:
            if w.path in lost:
                w.note = (w.note + ", " if w.note else "") + "not restored by load_model"
        warnings.warn(
            "keras.models.load_model would rebuild these layers without their keras-spft "
            "objects (their anchors would be lost): " + "; ".join(
                f"{', '.join(paths[:4])}{', ...' if len(paths) > 4 else ''} (built by {parent})"
                for parent, paths in not_restored.items())
            + ". Save with `model.save_weights(...)` and restore by rebuilding the model, "
            "wrapping it the same way and calling `load_weights`; or leave them out with `exclude=[...]`.",
            UserWarning, stacklevel=2)
    if matrices and method != "none":
        # Layers with weight matrices (Embedding, RNNs, custom ones): a
        # pre-trained model's knowledge that trains unbounded. Vectors
        # (LayerNormalization, LayerScale, PReLU) are left free without a
        # word, as BatchNorm's are by default; all are in report.skipped.
        kinds = {}
        for path, kind in matrices:
            kinds.setdefault(kind, []).append(path)
        warnings.warn(
            f"{len(matrices)} layer(s) with weight matrices of types keras-spft does not bound train "
            "unbounded (frozen ones once unfrozen): " + "; ".join(
                f"{kind} {', '.join(repr(p) for p in paths[:4])}{', ...' if len(paths) > 4 else ''}"
                for kind, paths in kinds.items())
            + " (all in report.skipped). Pass exclude=[...] to say they are meant to train freely.",
            UserWarning, stacklevel=2)
    # The head taken, for the diagnostics: a head left free (no head_radius /
    # head_strength) carries no object that tells it from the backbone.
    if method == "none":   # objects removed: the diagnostics work the head out again
        model.__dict__.pop("_keras_spft_head", None)
    else:
        object.__setattr__(model, "_keras_spft_head", frozenset(head_ids))
    _forget_compiled_steps([model] + [l for _, l in layers if isinstance(l, keras.Model)])
    _rebind_radius_optimizer(model, removed=method == "none")
    return report


def _radius_optimizer(model):
    """The `RadiusOptimizer` `model` is compiled with (also inside a
    LossScaleOptimizer), or `None`."""
    from keras_spft.learned import RadiusOptimizer

    opt = getattr(model, "optimizer", None)
    while opt is not None and not isinstance(opt, RadiusOptimizer):
        opt = getattr(opt, "inner_optimizer", None)   # LossScaleOptimizer(RadiusOptimizer(...))
    return opt


def _check_radius_optimizer_takes(model, learned_variables):
    from keras_spft.learned import _check_learned_accumulation

    opt = _radius_optimizer(model)
    if opt is not None and opt.built:
        _check_learned_accumulation(
            opt.inner_optimizer, learned_variables,
            f"wrap_pretrained (nothing was changed): in the RadiusOptimizer '{model.name}' is compiled with, ")


def _rebind_radius_optimizer(model, removed=False):
    """A `RadiusOptimizer` already built for this model holds the state of
    the objects just replaced: it takes up the new ones (see its `rebind`)."""
    opt = _radius_optimizer(model)
    if opt is not None and removed:
        # method="none": the model holds no keras-spft object, but its
        # compiled optimizer is one, which `model.save` records.
        warnings.warn(
            f"'{model.name}' is compiled with keras_spft.RadiusOptimizer, which a saved file records: "
            "loading it compiled still needs keras-spft. For a plain copy, load it with "
            "`keras.models.load_model(path, compile=False)`, or compile the model with a plain "
            "optimizer (e.g. `model.optimizer.inner_optimizer`) before saving.", UserWarning, stacklevel=3)
    if opt is not None and opt.built:
        opt.rebind()


def _forget_compiled_steps(models):
    """A train (or test) step traced before holds the objects it found then:
    drop those of `models`, so the next `fit`/`evaluate` traces one with the
    new objects."""
    for m in models:
        for attr in ("train_function", "test_function"):
            if getattr(m, attr, None) is not None:
                setattr(m, attr, None)


def _moved_from_anchor(var):
    """Whether `var` carries a keras-spft object with a loaded anchor that it
    has moved from: removing that object would lose the anchor (one the
    weight still equals comes back the same from a later call)."""
    for obj in (getattr(var, "constraint", None), getattr(var, "regularizer", None)):
        if isinstance(obj, Anchored) and obj.anchor is not None and obj._anchor_ready:
            return not np.array_equal(keras.ops.convert_to_numpy(var), keras.ops.convert_to_numpy(obj.anchor))
    return False


def _existing(var, path):
    """The keras-spft object already on `var`, or None; refuses foreign ones."""
    found = None
    for what in ("constraint", "regularizer"):
        obj = getattr(var, what, None)
        if obj is None:
            continue
        if not isinstance(obj, Anchored):
            raise ValueError(
                f"layer '{path}': weight '{var.name}' already has a {what} "
                f"{type(obj).__name__}, which keras-spft would replace; remove it first."
            )
        found = found or obj
    return found


def _mentions_learned(value):
    if isinstance(value, dict):
        return any(v == LEARNED for v in value.values() if isinstance(v, str))
    return isinstance(value, str) and value == LEARNED


def _make(method, projection, anchor, value, spec, layer, path, relative, reference):
    name = f"{path}/{spec.weight}"
    learn = isinstance(value, str) and value == LEARNED
    if learn:
        if reference or relative:
            raise ValueError(
                f"layer '{path}': radius='learned' cannot be combined with "
                + ("batchnorm='reference'." if reference else "relative=True.")
            )
        value = MIN_LEARNED_RADIUS
    if reference:
        kept = anchor.owner if isinstance(anchor, _SharedAnchor) else None
        if getattr(kept, "batchnorm_reference", None) is not None:
            # Wrapped so before (anchor kept): its radii came from the
            # pre-trained moving variance, which fine-tuning has moved since.
            scale = keras.ops.convert_to_numpy(kept.radius).astype("float64") / kept.batchnorm_reference
        else:
            if getattr(kept, "_bn_reference_lost", False):
                warnings.warn(
                    f"layer '{path}': its batchnorm='reference' radii were saved by keras-spft before "
                    "2026-11-28, without the pre-trained moving variance: the new radii scale by the "
                    "current one (moved by fine-tuning, if it was).", UserWarning, stacklevel=3)
            var0 = keras.ops.convert_to_numpy(layer.moving_variance)
            scale = np.sqrt(var0.astype("float64") + layer.epsilon)
        obj = MARSDistance(anchor, (value * scale).astype("float32"), axis=(), projection="exact", name=name)
        # The radius per unit of sqrt(var0 + eps), kept for a later call.
        obj.batchnorm_reference = float(value)
        return obj
    if method in ("mars-pgm", "l2-pgm"):
        obj = (MARSDistance(anchor, value, axis=spec.axis, projection=projection, relative=relative,
                            learn_radius=learn, name=name) if method == "mars-pgm" else
               FrobeniusDistance(anchor, value, relative=relative, learn_radius=learn, name=name))
        if learn:   # a 16-bit kernel's floor is higher: see `min_radius`
            obj.radius.assign(np.asarray(obj.min_radius, "float32"))
        return obj
    if method == "mars-sp":
        return MARSSP(anchor, value, axis=spec.axis, name=name)
    return L2SP(anchor, value, name=name)


def _attach(layer, spec, obj, is_constraint):
    var = spec.variable
    if obj is None:
        # Leave the weight free: remove keras-spft objects, keep anything else.
        for what, attr in (("constraint", spec.constraint_attr), ("regularizer", spec.regularizer_attr)):
            if isinstance(getattr(var, what, None), Anchored):
                setattr(var, what, None)
                setattr(layer, attr, None)
        return
    c = obj if is_constraint else None
    r = obj if (obj is not None and not is_constraint) else None
    var.constraint = c
    var.regularizer = r
    setattr(layer, spec.constraint_attr, c)
    setattr(layer, spec.regularizer_attr, r)
