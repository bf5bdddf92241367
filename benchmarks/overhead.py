"""Step-time and memory overhead of each method against plain fine-tuning.

Every method trains its own copy of the same model (same seed, weights=None,
identical inputs). Repetitions are interleaved in a shuffled order so that
machine noise hits all methods alike; the figure is the median over
repetitions of (method step time / plain step time), with the min-max spread.
"delta" trains `keras_spft.add_delta(model, ...)`, whose extra memory is the
frozen copy and the attention weights. "mars-pgm-state" ("l2-pgm-state") is
mars-pgm (l2-pgm) with a fixed radius compiled through
`keras_spft.RadiusOptimizer` (anchors as optimizer state: what the CLI does on
JAX). "mars-pgm-grouped" is mars-pgm with the projections of same-shape kernels
stacked into one (`GroupedAdam`), a candidate for fewer kernels on a GPU.
"floor" ("floor-state") gives every kernel the least an anchored
constraint can do (`AnchorFloor`: read W and W0, write W), so its ratio is the
floor of any per-kernel projection. "naive" is a reference port of the MARS
projection written the obvious way (rows moved into a matrix, norms, rescale,
moved back: separate passes), kept here for comparison only. A method
written "name#2" is a second copy of "name", built and compiled separately:
"none,none#2,..." shows how far two compilations of the same model differ.
`--count-kernels` (JAX) has XLA dump each compiled step into a temporary
folder and counts the kernels each method's step launches
(`benchmarks/hlo_kernels.py`); the dumps (hundreds of MB) are then removed.

    python benchmarks/overhead.py --model resnet101 --image-size 64 --batch 8
    KERAS_BACKEND=jax python benchmarks/overhead.py --model resnet101 --image-size 224 --batch 32
"""

import argparse
import json
import os
import platform
import shutil
import tempfile
import random
import statistics
import time

import numpy as np
import keras
from keras import ops

import keras_spft
from keras_spft import ops as sops

try:
    from benchmarks import hlo_kernels
except ImportError:   # run as a script: benchmarks/ itself is on the path
    import hlo_kernels

METHODS = ["none", "l2-sp", "mars-sp", "l2-pgm", "mars-pgm", "mars-pgm-exact", "delta", "naive",
           "mars-pgm-learned", "l2-pgm-learned", "mars-pgm-state", "l2-pgm-state",
           "floor", "floor-state", "mars-pgm-grouped"]
APPS = {"resnet101": keras.applications.ResNet101, "efficientnetb0": keras.applications.EfficientNetB0,
        "mobilenet": keras.applications.MobileNet}


class NaiveMARS(keras.constraints.Constraint):
    """MARS-PGM 'scale' projection as a naive port would write it."""

    def __init__(self, anchor, radius, axis):
        self.anchor = keras.Variable(ops.convert_to_numpy(anchor), trainable=False)
        self.radius = radius
        nd = len(anchor.shape)
        keep = [a for a in range(nd) if a not in axis]
        self.perm = keep + list(axis)
        self.inv = [self.perm.index(a) for a in range(nd)]
        self.moved = tuple(anchor.shape[a] for a in self.perm)
        self.rows = int(np.prod([anchor.shape[a] for a in keep]))

    def __call__(self, w):
        t = ops.subtract(w, self.anchor)
        rows = ops.reshape(ops.transpose(t, self.perm), (self.rows, -1))
        norms = ops.sum(ops.abs(rows), axis=1, keepdims=True)
        factor = ops.divide(1.0, ops.maximum(1.0, ops.divide(norms, self.radius)))
        rows = ops.multiply(rows, factor)
        return ops.add(self.anchor, ops.transpose(ops.reshape(rows, self.moved), self.inv))


class AnchorFloor(keras_spft.MARSDistance):
    """The least any anchored constraint can do: `W <- W0 + (W - W0)` reads W and
    W0 and writes W (no compiler folds it away in floating point). Its step
    time is the floor of a per-kernel projection inside a real training step."""

    def _project(self, t, radius, distances=None):
        return t


class GroupedAdam(keras.optimizers.Adam):
    """Adam whose MARS-PGM "scale" projections run per group of kernels of
    one shape, stacked (one row-norm reduction and one rescale per group
    instead of per kernel), after the update ("mars-pgm-grouped"): a
    candidate for fewer kernels per step on a GPU, where each launch costs
    a few microseconds whatever it moves (`benchmarks/gpu_kernels.py` counts
    them). Other constraints are left to Keras, per kernel."""

    def apply(self, grads, trainable_variables=None):
        tvs = self._trainable_variables if trainable_variables is None else list(trainable_variables)
        grouped = [(v, v.constraint) for v in tvs
                   if isinstance(v.constraint, keras_spft.MARSDistance) and v.constraint.anchor is not None
                   and v.constraint.projection == "scale" and not v.constraint.learn_radius]
        for v, _ in grouped:
            v.constraint = None   # Keras would project each one in its update
        try:
            super().apply(grads, tvs)
        finally:
            for v, c in grouped:
                v.constraint = c
        ws = [v.value for v, _ in grouped]
        projected = project_grouped(ws, [c._anchor_value(w.dtype, traced_with=v) for w, (v, c) in zip(ws, grouped)],
                                    [c._scale_value(w.dtype, traced_with=v) for w, (v, c) in zip(ws, grouped)],
                                    [c._axis_for(v) for v, c in grouped])
        for (v, _), p in zip(grouped, projected):
            v.assign(p)


def project_grouped(ws, anchors, radius, axes):
    """MARS-PGM "scale" of every kernel in `ws` towards its anchor, the
    kernels of one shape and row axes stacked on a new leading axis and
    projected together (one row-norm reduction and one rescale per group).

    Args:
        ws, anchors: lists of kernels and their anchors.
        radius: one radius for all, or a list of one per kernel (each
            broadcastable to that kernel's row shape).
        axes: each kernel's row axes.

    Returns:
        The projected kernels, in the order of `ws`.
    """
    groups = {}
    for i, (w, axis) in enumerate(zip(ws, axes)):
        groups.setdefault((tuple(w.shape), tuple(axis)), []).append(i)
    out = [None] * len(ws)
    for (shape, axis), idx in groups.items():
        w = ops.stack([ws[i] for i in idx])
        a = ops.stack([anchors[i] for i in idx])
        r = radius
        if isinstance(radius, (list, tuple)):
            rows = tuple(1 if d in axis else n for d, n in enumerate(shape))
            r = ops.stack([ops.broadcast_to(radius[i], rows) for i in idx])
        p = a + sops.scale_to_l1_ball(w - a, r, tuple(x + 1 for x in axis))
        for k, i in enumerate(idx):
            out[i] = p[k]
    return out


def make_optimizer(kind):
    """The optimizer a method trains with (Adam 1e-4, as every method)."""
    if kind.endswith("-grouped"):
        return GroupedAdam(1e-4)
    optimizer = keras.optimizers.Adam(1e-4)
    if kind.endswith(("-learned", "-state")):
        optimizer = keras_spft.RadiusOptimizer(optimizer)
    return optimizer


def build(name, size, classes, seed, alpha=None):
    keras.utils.set_random_seed(seed)
    extra = {} if alpha is None else {"alpha": alpha}
    base = APPS[name](include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg", **extra)
    return keras.Sequential([keras.Input((size, size, 3)), base, keras.layers.Dense(classes)])


def wrap(model, method):
    if method == "none":
        return 0
    if method == "naive":
        report = keras_spft.wrap_pretrained(model, radius=1.0, head_radius=1.0)
        for w in report.wrapped:
            var = next(v for v in model.trainable_variables if v.constraint is w.obj)
            axis = w.obj.axis if w.obj.axis is not None else tuple(range(len(var.shape) - 1))
            naive = NaiveMARS(var if w.obj.anchor is None else w.obj.anchor, 1.0, axis)
            if w.obj.anchor is None:
                naive.anchor.assign(np.zeros(var.shape, "float32"))
            var.constraint = naive
        return report.anchor_bytes
    if method in ("floor", "floor-state"):
        report = keras_spft.wrap_pretrained(model, method="mars-pgm", radius=1.0, head_radius=1.0)
        for w in report.wrapped:
            w.obj.__class__ = AnchorFloor  # same anchor variable, identity projection
        return report.anchor_bytes
    if method.endswith(("-state", "-grouped")):  # fixed radius, anchors as optimizer state / grouped
        method = method.rsplit("-", 1)[0]
    if method.endswith("-learned"):
        report = keras_spft.wrap_pretrained(model, method=method[: -len("-learned")], radius="learned",
                                            head_radius=1.0)
    elif method.endswith("-sp"):
        report = keras_spft.wrap_pretrained(model, method=method, strength=1e-3, head_strength=1e-3)
    else:
        report = keras_spft.wrap_pretrained(model, method=method, radius=1.0, head_radius=1.0)
    return report.anchor_bytes


def _repeat(x, y):
    while True:
        yield x, y


def _fit_block(model, x, y, steps):
    """`steps` training steps in one `fit` call (one host round trip)."""
    model.fit(_repeat(x, y), epochs=1, steps_per_epoch=steps, verbose=0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet101", choices=sorted(APPS))
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None, help="width multiplier (mobilenet)")
    p.add_argument("--steps", type=int, default=3, help="steps per timed block")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--jit-compile", default="auto")
    p.add_argument("--loop", choices=("train_on_batch", "fit"), default="train_on_batch",
                   help="time `train_on_batch` calls (a host round trip per step), or one `fit` call "
                        "per block with steps_per_execution=--steps (no per-step synchronisation)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--count-kernels", action="store_true",
                   help="JAX: count the kernels of each method's compiled step (from XLA's HLO dumps)")
    a = p.parse_args()
    dump = None
    if a.count_kernels:
        if keras.backend.backend() != "jax":
            p.error("--count-kernels needs the JAX backend (XLA_FLAGS dumps of jax.jit modules).")
        dump = tempfile.mkdtemp(prefix="spft_hlo_")
        # Read by XLA when the backend starts, i.e. at the first array below.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}"
                                   " --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train.*").strip()
    kernels = {}
    methods = a.methods.split(",")
    assert methods[0] == "none", "the first method must be the plain baseline 'none'"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(a.batch, a.image_size, a.image_size, 3)).astype("float32")
    y = rng.integers(0, 10, a.batch)
    jit = {"auto": "auto", "true": True, "false": False}[a.jit_compile.lower()]
    models, extra = {}, {}
    if dump:   # each method's rows follow as it compiles: a run cut short by its time limit keeps them
        print("| method | compiled train function | kernels | fusions | custom calls | other |")
        print("|---|---|---|---|---|---|", flush=True)
    # Timed steps read a batch already on the device: no host-to-device copy
    # of the images inside the timed blocks (19 MB a step at 224 px, batch 32).
    # The warm-ups take the same tensors, so they compile the very step the
    # timed blocks run (the retrace on TensorFlow had another cause: below).
    xd, yd = ops.convert_to_tensor(x), ops.convert_to_tensor(y)
    for m in methods:
        model = build(a.model, a.image_size, 10, seed=0, alpha=a.alpha)
        kind = m.split("#")[0]  # "none#2": a second, separately compiled copy
        if kind == "delta":
            # DELTA trains a DeltaModel (frozen copy + feature-map term); its
            # channel attention comes from the benchmark batch (not timed).
            model = keras_spft.add_delta(model, x, y, steps=1, head_epochs=1)
            extra[m] = sum(int(np.prod(v.shape)) * 4 for v in model.non_trainable_variables
                           if not any(v is w for w in model.model.non_trainable_variables))
        else:
            extra[m] = wrap(model, kind)
        model.compile(optimizer=make_optimizer(kind),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit,
                      steps_per_execution=a.steps if a.loop == "fit" else 1)
        models[m] = model
    # Warm-ups after every model is built: on TensorFlow the next model's
    # build (its set_random_seed) made the steps traced before it trace
    # again, inside the first timed block.
    for m in methods:
        model = models[m]
        t0 = time.perf_counter()
        if a.loop == "fit":
            # fit hands the step (x, y), train_on_batch (x, y, None): on JAX
            # each compiles its own step, so warm up with fit only. (Keras
            # 3.15 runs steps_per_execution as a Python loop over one
            # compiled step, dispatched without waiting in between.)
            _fit_block(model, xd, yd, a.steps)
            _fit_block(model, xd, yd, a.steps)
        else:
            model.train_on_batch(xd, yd)
            model.train_on_batch(xd, yd)
        print(f"built {m}: warm-up {time.perf_counter() - t0:.1f}s", flush=True)
        if dump:   # the train functions this method compiled; then the dumps go
            kernels[m] = [(n, hlo_kernels.summary(hlo_kernels.kernel_counts(t)))
                          for n, t in hlo_kernels.modules(dump)]
            shutil.rmtree(dump)
            os.makedirs(dump)
            for name, (total, fusion, custom, other) in kernels[m]:
                print(f"| {m} | {name} | {total} | {fusion} | {custom} | {other} |", flush=True)
            if a.out:
                with open(a.out, "w") as f:
                    json.dump({"model": a.model, "partial": True, "kernels": kernels}, f, indent=1)
    kernel_bytes = sum(int(np.prod(v.shape)) * 4 for v in models["none"].trainable_variables
                       if v.name in ("kernel", "depthwise_kernel", "pointwise_kernel"))
    times = {m: [] for m in methods}
    order = list(methods)
    for rep in range(a.reps):
        random.Random(rep).shuffle(order)
        for m in order:
            t0 = time.perf_counter()
            if a.loop == "fit":
                _fit_block(models[m], xd, yd, a.steps)   # returns after the last step's loss is read
            else:
                for _ in range(a.steps):
                    loss = models[m].train_on_batch(xd, yd)
                float(np.asarray(loss).ravel()[0])  # synchronise
            times[m].append((time.perf_counter() - t0) / a.steps)
        # Each rep as it ends, so a run stopped at its time limit keeps them.
        print(f"rep {rep + 1}/{a.reps} (ms per step): "
              + ", ".join(f"{m} {1000 * times[m][-1]:.2f}" for m in methods), flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"model": a.model, "partial": True, "step_s": times,
                           **({"kernels": kernels} if dump else {})}, f, indent=1)
    rows = []
    for m in methods:
        ratios = [t / b for t, b in zip(times[m], times["none"])]
        rows.append(dict(method=m, step_s=statistics.median(times[m]), ratio=statistics.median(ratios),
                         ratio_min=min(ratios), ratio_max=max(ratios), anchor_bytes=extra[m]))
    result = dict(model=a.model, image_size=a.image_size, batch=a.batch, steps=a.steps, reps=a.reps, loop=a.loop,
                  backend=keras.backend.backend(), jit_compile=a.jit_compile, machine=platform.node(),
                  processor=platform.processor() or platform.machine(), kernel_bytes=kernel_bytes, rows=rows,
                  **({"kernels": kernels} if dump else {}))
    print(f"\n{a.model} {a.image_size}x{a.image_size} batch {a.batch}, backend {result['backend']}, "
          f"jit_compile={a.jit_compile}, {a.reps} interleaved reps x {a.steps} steps; kernels {kernel_bytes:,} bytes")
    # One copy of the anchors (DELTA: its frozen copy). On JAX a plain
    # optimizer's compiled step holds more, as constants: docs/benchmarks.md.
    print("| method | median step (s) | ratio to plain (median) | spread (min-max) | anchor copy (bytes) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['step_s']:.4f} | {r['ratio']:.3f} | {r['ratio_min']:.3f}-{r['ratio_max']:.3f} | {r['anchor_bytes']:,} |")
    if dump:
        shutil.rmtree(dump, ignore_errors=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
