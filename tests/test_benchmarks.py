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
