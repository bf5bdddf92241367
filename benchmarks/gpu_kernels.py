"""Kernels each method's training step launches on a GPU, counted without one.

XLA compiles for a GPU it cannot reach when it is given that GPU's description
(JAX's compile-only devices, `jax.experimental.topologies`): the optimized
program is the one the GPU would run, minus autotuning (which picks among
cuDNN algorithms, not what is fused). This script builds each method's model
as `benchmarks/overhead.py` does (same seed, weights=None), compiles its JAX
train step for the chosen device, and counts the kernels the step launches
(`benchmarks/hlo_kernels.py`), with the kinds of kernel each method adds to
plain fine-tuning. No time is measured: counts only.

A GPU target needs XLA's CUDA compiler, which the CUDA plugin of JAX brings
(no GPU or driver needed; a virtual environment keeps it away from the JAX
the tests use):

    pip install "jax-cuda12-plugin[with-cuda]==$(python -c 'import jax; print(jax.__version__)')" \\
                "jax-cuda12-pjrt==$(python -c 'import jax; print(jax.__version__)')"
    JAX_PLATFORMS=cpu KERAS_BACKEND=jax python -m benchmarks.gpu_kernels --target h200 \\
        --model resnet101 --methods none,floor,mars-pgm,l2-pgm

`--target cpu` compiles for the CPU this runs on (no plugin needed).
"""

import argparse
import json
import os
import time

import numpy as np
import keras

try:
    from benchmarks import hlo_kernels, overhead
except ImportError:   # run as a script: benchmarks/ itself is on the path
    import hlo_kernels
    import overhead

SPECS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_specs")
TARGETS = {"h100": "h100_sxm.txtpb", "h200": "h200_sxm.txtpb"}


def target_device(target):
    """A JAX device to compile for.

    Args:
        target: "cpu", a name in `TARGETS`, or the path of an XLA GPU target
            description (a `GpuTargetConfigProto` in text format).

    Returns:
        A `jax.Device`: the local CPU, or a compile-only CUDA device.
    """
    import jax
    from jax.experimental import topologies

    if target == "cpu":
        return jax.devices("cpu")[0]
    path = os.path.join(SPECS, TARGETS[target]) if target in TARGETS else target
    if not os.path.isfile(path):
        raise ValueError(f"--target {target!r}: not 'cpu', one of {sorted(TARGETS)}, or a file.")
    with open(path) as f:
        config = f.read()
    try:
        topology = topologies.get_topology_desc("spft", "cuda", target_config=config, topology="1x1x1")
    except Exception as e:   # no CUDA plugin: JAX says so in its own words
        raise RuntimeError(
            f"--target {target!r} needs JAX's CUDA plugin (XLA's GPU compiler), see this module's "
            f"docstring for the pip command; JAX said: {e}") from e
    return topology.devices[0]


def compiled_step(model, x_shape, device):
    """`model`'s JAX train step compiled for `device` with abstract inputs.

    Args:
        model: a compiled Keras model (JAX backend) training on integer labels.
        x_shape: the shape of one batch of inputs (float32); the labels are
            one int32 class index per example.
        device: from `target_device`.

    Returns:
        The optimized HLO module, as text: the step `fit` runs, traced with
        `(x, y)` and the model's state as inputs, as Keras' JAX trainer jits
        it (state donated).
    """
    import jax
    from jax.sharding import SingleDeviceSharding

    x = np.zeros(x_shape, "float32")
    y = np.zeros(x_shape[:1], "int32")
    model._symbolic_build(data_batch=(x, y))   # builds the optimizer and metrics, runs nothing
    state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                 optimizer_variables=True, metrics_variables=True)
    on = SingleDeviceSharding(device)
    spec = lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=on)   # noqa: E731
    state = jax.tree.map(spec, state)
    data = (spec(x), spec(y))
    return jax.jit(model.train_step, donate_argnums=0).lower(state, data).compile().as_text()


def build_compiled(name, size, method, alpha=None):
    """`overhead.py`'s model for `method`, compiled as there (Adam 1e-4)."""
    model = overhead.build(name, size, 10, seed=0, alpha=alpha)
    kind = method.split("#")[0]
    overhead.wrap(model, kind)
    model.compile(optimizer=overhead.make_optimizer(kind),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="h200", help="cpu, h100, h200, or an XLA GPU target file")
    p.add_argument("--model", default="resnet101", choices=sorted(overhead.APPS))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--alpha", type=float, default=None, help="width multiplier (mobilenet)")
    p.add_argument("--methods", default="none,floor,mars-pgm,l2-pgm")
    p.add_argument("--out", default=None, help="write the counts as JSON here")
    a = p.parse_args()
    if keras.backend.backend() != "jax":
        p.error("needs KERAS_BACKEND=jax")
    methods = a.methods.split(",")
    if methods[0] != "none":
        p.error("the first method must be the plain baseline 'none'")
    unknown = sorted({k for k in (m.split("#")[0] for m in methods) if k not in overhead.METHODS or k == "delta"})
    if unknown:
        p.error(f"--methods: not supported here: {', '.join(unknown)} (choose from {', '.join(overhead.METHODS)}, "
                "without delta)")
    device = target_device(a.target)
    import jax
    result = {"model": a.model, "image_size": a.image_size, "batch": a.batch, "target": a.target,
              "device": str(device), "jax": jax.__version__, "keras": keras.__version__, "methods": {}}
    print(f"{a.model} {a.image_size}x{a.image_size} batch {a.batch}, compiled for {device} "
          f"(JAX {jax.__version__}, Keras {keras.__version__})")
    print("| method | kernels | fusions | custom calls | other | added to plain | constrained kernels |")
    print("|---|---|---|---|---|---|---|", flush=True)
    names = {}
    for m in methods:
        t0 = time.perf_counter()
        model = build_compiled(a.model, a.image_size, m, a.alpha)
        constrained = sum(1 for v in model.trainable_variables if v.constraint is not None)
        text = compiled_step(model, (a.batch, a.image_size, a.image_size, 3), device)
        total, fusion, custom, other = hlo_kernels.summary(hlo_kernels.kernel_counts(text))
        names[m] = hlo_kernels.kernel_names(text)
        added = total - result["methods"]["none"]["kernels"] if m != "none" else 0
        result["methods"][m] = dict(kernels=total, fusions=fusion, custom_calls=custom, other=other,
                                    constrained=constrained, names=dict(names[m]),
                                    compile_s=round(time.perf_counter() - t0, 1))
        print(f"| {m} | {total:,} | {fusion:,} | {custom} | {other} | {added:+,} | {constrained} |", flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(result, f, indent=1)
    print("\nKernels added to plain, by kind (XLA's fusion names; numbering removed):")
    for m in methods[1:]:
        diff = {k: names[m][k] - names["none"][k] for k in names[m] | names["none"]}
        kinds = ", ".join(f"{k} {v:+d}" for k, v in sorted(diff.items(), key=lambda kv: -abs(kv[1])) if v)
        print(f"{m}: {kinds or 'none'}")


if __name__ == "__main__":
    main()
