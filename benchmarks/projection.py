"""Time of one projection pass over all kernels of a model, per implementation.

Isolates the constraint from training: every kernel of the model gets an
anchor and an offset (a random step of realistic size), and each
implementation projects all kernels inside one compiled function
(`jit`: tf.function(jit_compile=True) on TensorFlow, jax.jit on JAX; eager on
PyTorch). Interleaved repetitions; median time per pass and its ratio to
"floor", the physical minimum of any projection: read W and W0, write W (here
`W0 + (W - W0)`, which no compiler folds away in floating point).

`--passes N` runs N passes in one call (a `keras.ops.fori_loop` whose carry
is the kernels, so no pass can be hoisted or skipped) and divides by N: the
call's fixed costs (dispatching 2 x 104 arguments, allocating the outputs,
waiting for the device) are then spread over N passes instead of being
counted as projection time, which matters on a GPU where one pass is a
fraction of a millisecond.

    python -m benchmarks.projection --model resnet101
"""

import argparse
import random
import statistics
import time

import numpy as np
import keras
from keras import ops

from keras_spft import ops as sops
from keras_spft.kernels import kernel_specs
from benchmarks.overhead import APPS, project_grouped


def _as_rows(t, axis):
    """`t` as a (rows, row_size) matrix (axes moved and flattened), and the
    function that puts such a matrix back into `t`'s layout."""
    nd = len(t.shape)
    keep = [a for a in range(nd) if a not in axis]
    perm = keep + list(axis)
    inv = [perm.index(a) for a in range(nd)]
    moved = tuple(t.shape[a] for a in perm)
    rows = ops.reshape(ops.transpose(t, perm), (int(np.prod([t.shape[a] for a in keep])), -1))
    return rows, lambda r: ops.transpose(ops.reshape(r, moved), inv)


def exact_sort(t, radius, axis):
    """Reference: the sort-based exact projection (Duchi et al. 2008)."""
    rows, restore = _as_rows(t, axis)
    a = ops.abs(rows)
    u = -ops.sort(-a, axis=-1)
    k = ops.arange(1, rows.shape[-1] + 1, dtype=rows.dtype)
    theta = ops.maximum(ops.max((ops.cumsum(u, axis=-1) - radius) / k, axis=-1, keepdims=True), 0.0)
    return restore(ops.sign(rows) * ops.maximum(a - theta, 0.0))


def naive(t, radius, axis):
    """Reference: the scale projection written with explicit row matrices."""
    rows, restore = _as_rows(t, axis)
    norms = ops.sum(ops.abs(rows), axis=1, keepdims=True)
    return restore(rows / ops.maximum(1.0, norms / radius))


def frobenius_rows(t, radius, axis):
    """Candidate: the Frobenius norm reduced in two stages (rows, then all)."""
    partial = ops.sum(ops.square(t), axis=axis, keepdims=True) if len(axis) else ops.square(t)
    return t / ops.maximum(1.0, ops.sqrt(ops.sum(partial)) / radius)


def scale_div(t, radius, axis):
    """Candidate: the "scale" projection written as a division by the factor."""
    return t / ops.maximum(1.0, sops.row_l1_norms(t, axis) / radius)


def learned_scale(t, radius, axis):
    """What a learned-radius step adds to "scale": the radius gradient (with `t`
    standing in for the loss gradient), FTP's clip to the largest row distance,
    then the projection with the new radius, reusing the clip's row norms as
    `MARSDistance` does."""
    g = sops.l1_radius_gradient(t, t, radius, axis)
    norms = sops.row_l1_norms(t, axis)
    r = ops.minimum(radius + 1e-3 * ops.sign(g), ops.max(norms))
    return sops.scale_to_l1_ball(t, ops.maximum(r, 1e-4), axis, norms)


def learned_scale_unshared(t, radius, axis):
    """Reference: "learned-scale" as the core wrote it before, computing the row
    norms once for the clip and again inside the projection."""
    g = sops.l1_radius_gradient(t, t, radius, axis)
    r = ops.minimum(radius + 1e-3 * ops.sign(g), sops.mars_norm(t, axis))
    return sops.scale_to_l1_ball(t, ops.maximum(r, 1e-4), axis)


def scale_grouped(ws, anchors, radius, axes):
    """Candidate: "scale" over all kernels of one shape at once (stacked on a
    new leading axis), so one group of same-shape kernels is one set of
    element-wise passes instead of one per kernel (`overhead.project_grouped`,
    which `GroupedAdam` runs inside a training step)."""
    return project_grouped(ws, anchors, radius, axes)


#: Implementations that take the whole list of kernels (and anchors) at once.
ALL_AT_ONCE = {"scale-grouped"}

IMPLS = {
    "floor": None,
    "scale": sops.scale_to_l1_ball,
    "scale-div": scale_div,
    "learned-scale": learned_scale,
    "learned-scale-unshared": learned_scale_unshared,
    "exact": sops.project_l1_ball,
    "frobenius": lambda t, r, axis: sops.scale_to_frobenius_ball(t, r),
    "frobenius-rows": frobenius_rows,
    "exact-sort": exact_sort,
    "naive-scale": naive,
    "scale-grouped": scale_grouped,
}


def make_fn(name, passes=1):
    f = IMPLS[name]

    def one_pass(ws, anchors):
        if name in ALL_AT_ONCE:
            return f(ws, anchors, RADIUS, AXES)
        out = []
        for (w, a, axis) in zip(ws, anchors, AXES):
            if f is None:
                # Reads W and W0, writes W. (A form with a loop-invariant part,
                # such as where(isnan(W0), W0, W), has it hoisted out of the
                # --passes loop: 9 bytes an element instead of 12.)
                out.append(a + (w - a))
            else:
                out.append(a + f(w - a, RADIUS, axis))
        return out

    def project_all(ws, anchors):
        if passes == 1:
            return one_pass(ws, anchors)
        return ops.fori_loop(0, passes, lambda i, w: one_pass(w, anchors), list(ws))

    b = keras.backend.backend()
    if b == "tensorflow":
        import tensorflow as tf
        return tf.function(project_all, jit_compile=True)
    if b == "jax":
        import jax
        return jax.jit(project_all)
    return project_all


def wait_for(out):
    """Block until `out` is computed (device work included), without copying
    more than one scalar to the host."""
    b = keras.backend.backend()
    if b == "jax":
        import jax
        jax.block_until_ready(out)
    elif b == "torch":
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    else:
        ops.convert_to_numpy(ops.sum(out[-1][..., :1]))


def main():
    global AXES, RADIUS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet101", choices=sorted(APPS))
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--radius", type=float, default=0.5,
                   help="row L1 radius; the offsets are scaled so about half the rows are outside")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--passes", type=int, default=1,
                   help="projection passes per timed call, chained in a compiled loop; times are per pass")
    a = p.parse_args()
    keras.utils.set_random_seed(0)
    base = APPS[a.model](include_top=False, weights=None, input_shape=(32, 32, 3))
    specs = [s for l in base._flatten_layers() for s in kernel_specs(l)]
    rng = np.random.default_rng(0)
    AXES = [s.axis for s in specs]
    RADIUS = a.radius
    anchors = [ops.convert_to_tensor(np.asarray(ops.convert_to_numpy(s.variable))) for s in specs]
    ws = []
    for s, w0 in zip(specs, anchors):
        rows = np.prod([s.variable.shape[i] for i in s.axis])
        step = (rng.normal(size=s.variable.shape) * (a.radius / rows) * 1.25).astype("float32")
        ws.append(w0 + ops.convert_to_tensor(step))
    nbytes = sum(int(np.prod(s.variable.shape)) * 4 for s in specs)
    names = a.impls.split(",")
    if a.passes < 1:
        p.error(f"--passes must be at least 1, got {a.passes}")
    fns = {n: make_fn(n, a.passes) for n in names}
    for n in names:  # compile and warm up
        wait_for(fns[n](ws, anchors))
    times = {n: [] for n in names}
    for rep in range(a.reps):
        order = list(names)
        random.Random(rep).shuffle(order)
        for n in order:
            t0 = time.perf_counter()
            wait_for(fns[n](ws, anchors))
            times[n].append((time.perf_counter() - t0) / a.passes)
        # Each rep as it ends, so a run stopped at its time limit keeps them.
        print(f"rep {rep + 1}/{a.reps} (ms per pass): "
              + ", ".join(f"{n} {1000 * times[n][-1]:.2f}" for n in names), flush=True)
    floor = statistics.median(times["floor"]) if "floor" in times else None
    print(f"\n{a.model}: {len(specs)} kernels, {nbytes:,} bytes; backend {keras.backend.backend()}; {a.reps} interleaved reps of {a.passes} pass(es)")
    print("| projection | median time per pass (ms) | ratio to floor | effective GB/s (3 x kernel bytes / time) |")
    print("|---|---|---|---|")
    for n in names:
        m = statistics.median(times[n])
        ratio = f"{m / floor:.2f}" if floor else "-"
        print(f"| {n} | {1000 * m:.1f} | {ratio} | {3 * nbytes / m / 1e9:.1f} |")


if __name__ == "__main__":
    main()
