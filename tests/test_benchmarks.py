"""The benchmarks compare the core against candidate and reference forms of the
same projection: those must compute what the core computes, or the timings
compare different things."""

import numpy as np
import pytest

from keras import ops

from benchmarks import projection
from benchmarks.overhead import AnchorFloor
from keras_spft import ops as sops

AXIS = (0, 1, 2)


@pytest.fixture
def offsets():
    rng = np.random.default_rng(3)
    t = rng.normal(size=(3, 3, 4, 6)).astype("float32")
    t[..., :2] *= 0.01  # two rows inside the ball, four outside
    return ops.convert_to_tensor(t)


@pytest.mark.parametrize("candidate, core", [
    ("scale-div", "scale"),
    ("naive-scale", "scale"),
    ("exact-sort", "exact"),
    ("frobenius-rows", "frobenius"),
    ("learned-scale-unshared", "learned-scale"),
])
def test_candidates_compute_the_core_projection(offsets, candidate, core):
    got = ops.convert_to_numpy(projection.IMPLS[candidate](offsets, 2.0, AXIS))
    want = ops.convert_to_numpy(projection.IMPLS[core](offsets, 2.0, AXIS))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(want, ops.convert_to_numpy(offsets))  # the ball was active


def test_learned_scale_projects_into_the_ball(offsets):
    out = ops.convert_to_numpy(projection.learned_scale(offsets, 2.0, AXIS))
    norms = np.abs(out).sum(axis=AXIS)
    assert norms.max() <= 2.0 + 1e-3 + 1e-5  # radius moved by at most the 1e-3 step
    assert norms.max() > 1.9


def test_anchor_floor_reads_the_anchor_and_leaves_the_kernel():
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(5, 4)).astype("float32")
    w = w0 + rng.normal(size=(5, 4)).astype("float32")
    c = AnchorFloor(w0, radius=1e-3, axis=0)
    np.testing.assert_allclose(ops.convert_to_numpy(c(w)), w, rtol=0, atol=1e-6)


def test_grouped_candidate_projects_every_kernel_like_the_core():
    rng = np.random.default_rng(1)
    shapes = [(3, 3, 4, 6), (1, 1, 6, 4), (3, 3, 4, 6), (5, 2), (3, 3, 4, 6)]
    axes = [AXIS, AXIS, AXIS, (0,), AXIS]
    anchors = [ops.convert_to_tensor(rng.normal(size=s).astype("float32")) for s in shapes]
    ws = [a + ops.convert_to_tensor(rng.normal(size=s).astype("float32")) for a, s in zip(anchors, shapes)]
    got = projection.scale_grouped(ws, anchors, 2.0, axes)
    for w, a, axis, g in zip(ws, anchors, axes, got):
        want = a + sops.scale_to_l1_ball(w - a, 2.0, axis)
        np.testing.assert_allclose(ops.convert_to_numpy(g), ops.convert_to_numpy(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("passes", [1, 3])
def test_chained_passes_each_project_the_previous_result(monkeypatch, passes):
    """`--passes N` must run N real passes, each on the last one's output (so a
    compiler can neither hoist nor drop them): a "projection" that adds one
    moves every kernel by exactly N."""
    rng = np.random.default_rng(2)
    shapes = [(3, 3, 4, 6), (5, 2)]
    monkeypatch.setattr(projection, "AXES", [AXIS, (0,)], raising=False)
    monkeypatch.setattr(projection, "RADIUS", 2.0, raising=False)
    monkeypatch.setitem(projection.IMPLS, "plus-one", lambda t, radius, axis: t + 1.0)
    anchors = [ops.convert_to_tensor(rng.normal(size=s).astype("float32")) for s in shapes]
    ws = [a + ops.convert_to_tensor(rng.normal(size=s).astype("float32")) for a, s in zip(anchors, shapes)]
    out = projection.make_fn("plus-one", passes)(ws, anchors)
    projection.wait_for(out)
    for w, o in zip(ws, out):
        np.testing.assert_allclose(ops.convert_to_numpy(o), ops.convert_to_numpy(w) + passes, rtol=1e-6, atol=1e-5)


HLO = """HloModule jit_step, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%fused_computation (param_0: f32[4]) -> f32[4] {
  %param_0 = f32[4]{0} parameter(0)
  %multiply.1 = f32[4]{0} multiply(%param_0, %param_0)
  ROOT %add.2 = f32[4]{0} add(%multiply.1, %param_0)
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  %gte.0 = s32[] get-tuple-element(%p), index=0
  %gte.1 = f32[4]{0} get-tuple-element(%p), index=1
  %fusion.1 = f32[4]{0} fusion(%gte.1), kind=kLoop, calls=%fused_computation
  %custom-call.1 = f32[4]{0} custom-call(%fusion.1), custom_call_target="__cublas$gemm"
  ROOT %tuple.1 = (s32[], f32[4]{0}) tuple(%gte.0, %custom-call.1)
}

%cond (q: (s32[], f32[4])) -> pred[] {
  %q = (s32[], f32[4]{0}) parameter(0)
  %gte.2 = s32[] get-tuple-element(%q), index=0
  %c = s32[] constant(3)
  ROOT %lt = pred[] compare(%gte.2, %c), direction=LT
}

ENTRY %main.9 (Arg_0.1: f32[4]) -> f32[4] {
  %Arg_0.1 = f32[4]{0} parameter(0)
  %copy.3 = f32[4]{0} copy(%Arg_0.1)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4]{0}) tuple(%zero, %copy.3)
  %while.1 = (s32[], f32[4]{0}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[4]{0} get-tuple-element(%while.1), index=1
}
"""


def test_kernel_counts_follow_loops_but_not_into_fusions():
    from benchmarks import hlo_kernels

    counts = hlo_kernels.kernel_counts(HLO)
    # entry: copy; loop body: fusion, custom-call; condition: compare. Not the
    # multiply/add inside the fusion, nor parameters, tuples, constants, while.
    assert counts == {"copy": 1, "fusion": 1, "custom-call": 1, "compare": 1}
    assert hlo_kernels.summary(counts) == (4, 1, 1, 2)
    with pytest.raises(ValueError, match="no ENTRY computation"):
        hlo_kernels.kernel_counts("%f (a: f32[]) -> f32[] {\n}\n")


def test_kernel_counts_read_a_real_xla_dump(tmp_path):
    """A dump XLA itself wrote (JAX on the CPU, in a fresh process)."""
    import subprocess
    import sys

    from benchmarks import hlo_kernels
    from tests.workflow.conftest import REPO

    code = ("import jax, jax.numpy as jnp\n"
            "f = jax.jit(lambda w, g: jnp.where(jnp.abs(w - g).sum(0) > 1, w / 2, w - g))\n"
            "f(jnp.ones((8, 4)), jnp.ones((8, 4))).block_until_ready()\n")
    env = {**__import__("os").environ, "XLA_FLAGS": f"--xla_dump_to={tmp_path} --xla_dump_hlo_as_text"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env, timeout=120)
    mods = hlo_kernels.modules(str(tmp_path), pattern="lambda")
    assert len(mods) == 1
    total, fusions, _, _ = hlo_kernels.summary(hlo_kernels.kernel_counts(mods[0][1]))
    assert 1 <= fusions <= total


def test_gpu_kernels_compiles_the_step_fit_runs(tmp_path):
    """`gpu_kernels.compiled_step` (compiled ahead of time, here for the CPU)
    counts the kernels of the very step `fit` compiles and runs, read from
    XLA's own dump of that run (JAX, in a fresh process)."""
    import json
    import subprocess
    import sys

    from tests.workflow.conftest import REPO

    code = f"""
import json, jax, keras, numpy as np, keras_spft
from benchmarks import gpu_kernels, hlo_kernels
def model():
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3), keras.layers.Flatten(),
                          keras.layers.Dense(3)])
    keras_spft.wrap_pretrained(m, method="mars-pgm", radius=0.1, head_radius=0.1)
    m.compile(optimizer=keras.optimizers.Adam(1e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m
x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
model().fit(x, np.array([0, 2]), batch_size=2, epochs=1, verbose=0)
ran = [hlo_kernels.kernel_counts(t) for _, t in hlo_kernels.modules({str(tmp_path)!r}, "train_step")]
text = gpu_kernels.compiled_step(model(), (2, 8, 8, 3), gpu_kernels.target_device("cpu"))
json.dump(dict(ran=ran, aot=hlo_kernels.kernel_counts(text)), open({str(tmp_path / "counts.json")!r}, "w"))
"""
    env = {**__import__("os").environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_dump_to={tmp_path} --xla_dump_hlo_as_text"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env, timeout=300)
    counts = json.load(open(tmp_path / "counts.json"))
    assert len(counts["ran"]) == 1          # fit compiled one train step
    assert counts["aot"] == counts["ran"][0]
    assert counts["aot"].get("fusion", 0) > 0


def test_gpu_kernels_target_errors():
    from benchmarks import gpu_kernels

    with pytest.raises(ValueError, match="--target 'h300'"):
        gpu_kernels.target_device("h300")
    assert gpu_kernels.target_device("cpu").platform == "cpu"


def test_kernel_names_are_stems_of_kernels_only():
    from benchmarks import hlo_kernels

    # the kernels kernel_counts finds, by name with XLA's numbering removed
    assert hlo_kernels.kernel_names(HLO) == {"copy": 1, "fusion": 1, "custom-call": 1, "lt": 1}


def test_grouped_adam_steps_like_adam_with_the_core_constraints():
    """"mars-pgm-grouped" stacks same-shape kernels into one projection: one
    step from the same gradients lands where Adam with the per-kernel
    constraints lands (a group of 2 kernels with different radii, one of 1;
    the head, anchored at the origin, is left to its constraint)."""
    import keras

    import keras_spft
    from benchmarks.overhead import GroupedAdam

    def model():
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((6, 6, 4)), keras.layers.Conv2D(4, 3, padding="same"),
                              keras.layers.Conv2D(4, 3, padding="same"), keras.layers.Conv2D(5, 1),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
        keras_spft.wrap_pretrained(m, radius=0.02, head_radius=0.5)
        return m
    core, grouped = model(), model()
    for m in (core, grouped):   # two radii within one group
        m.layers[0].kernel.constraint.radius.assign(0.01)
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=v.shape).astype("float32") for v in core.trainable_variables]
    keras.optimizers.Adam(0.05).apply([ops.convert_to_tensor(g) for g in grads], core.trainable_variables)
    # Grouped kernels are projected by GroupedAdam, not by their constraints
    # one by one (plain Adam in its place passed the comparison below).
    anchored = keras_spft.MARSDistance.__call__

    def per_kernel(self, w):
        assert self.anchor is None, f"{self.name}: projected per kernel"
        return anchored(self, w)
    keras_spft.MARSDistance.__call__ = per_kernel
    try:
        GroupedAdam(0.05).apply([ops.convert_to_tensor(g) for g in grads], grouped.trainable_variables)
    finally:
        keras_spft.MARSDistance.__call__ = anchored
    moved = 0
    for a, b in zip(core.trainable_variables, grouped.trainable_variables):
        np.testing.assert_allclose(ops.convert_to_numpy(b), ops.convert_to_numpy(a), rtol=1e-6, atol=1e-7)
        if a.constraint is not None and a.constraint.anchor is not None:
            d = np.abs(ops.convert_to_numpy(b) - ops.convert_to_numpy(b.constraint.anchor)).sum(axis=tuple(range(b.ndim - 1)))
            moved += int(np.isclose(d, np.broadcast_to(ops.convert_to_numpy(b.constraint.radius).reshape(-1), d.shape)).sum())
    assert moved >= 8    # rows projected onto their radius in every constrained conv
    assert all(v.constraint is not None for v in grouped.trainable_variables if v.name == "kernel")


def test_importing_gpu_kernels_leaves_the_environment_alone():
    """It set KERAS_BACKEND=jax in os.environ on import, which every later
    subprocess of the test run (and of a user's script) inherited."""
    import importlib
    import os
    import sys

    before = dict(os.environ)
    sys.modules.pop("benchmarks.gpu_kernels", None)
    importlib.import_module("benchmarks.gpu_kernels")
    assert dict(os.environ) == before
