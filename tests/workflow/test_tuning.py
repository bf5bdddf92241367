"""keras_spft.tuning and keras_spft.recipe: KerasTuner search over radii/strengths."""

import math
import os

import keras_tuner
import numpy as np
import pytest

from keras_spft import recipe
from keras_spft.tuning import SPFTHyperModel, search
from tests.workflow.conftest import tiny_model


def _data(n=12, size=16):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, size, size, 3)).astype("float32")
    y = (np.arange(n) % 2).astype("int32")
    x[y == 1, ..., 0] += 2.0
    return x, y


class Spy:
    """build_model that remembers the models it built."""

    def __init__(self):
        self.models = []

    def __call__(self):
        m = tiny_model()
        self.models.append(m)
        return m


def test_search_varies_radii_within_range_reaches_the_model_and_resumes(tmp_path):
    x, y = _data()
    spy = Spy()
    result = _run(spy, x, y, tmp_path, tuner="random")
    assert len(result.trials) == 2
    radii = [t["radius"] for t in result.trials]
    heads = [t["head_radius"] for t in result.trials]
    assert all(2.0 <= r <= 4.0 for r in radii) and all(5.0 <= h <= 9.0 for h in heads)
    assert radii[0] != radii[1] and heads[0] != heads[1]
    # Each trial's model carries that trial's radii (KerasTuner also builds
    # one model with the default values to see the search space).
    built = {(round(float(m.get_layer("base").get_layer("c1").kernel.constraint.radius), 4),
              round(float(m.get_layer("head").kernel.constraint.radius), 4)) for m in spy.models}
    assert {(round(r, 4), round(h, 4)) for r, h in zip(radii, heads)} <= built
    # lr is not searched for constraint methods: the recipe's lr is used.
    assert all("lr" not in t for t in result.trials)
    assert all(float(m.optimizer.learning_rate) == pytest.approx(recipe.DEFAULT_LR) for m in spy.models if m.optimizer)
    # The best is the first row, the table lists every trial with its score.
    assert result.best == {k: v for k, v in result.trials[0].items() if k not in ("trial_id", "score")}
    assert result.best_score == max(t["score"] for t in result.trials)
    table = result.table()
    assert "radius" in table and "val_accuracy" in table and len(table.splitlines()) == 4
    assert "best radius=" in str(result)

    # Started again on the same directory, the search resumes: nothing is retrained.
    again = _run(spy, x, y, tmp_path, tuner="random")
    trained = sum(1 for m in spy.models if m.optimizer is not None and m.optimizer.iterations > 0)
    assert trained == 2, "finished trials were trained again"
    by_id = lambda r: {t["trial_id"]: (t["radius"], t["head_radius"], t["score"]) for t in r.trials}  # noqa: E731
    assert by_id(again) == by_id(result) and again.best_score == result.best_score


def _run(build, x, y, tmp_path, method="mars-pgm", ranges=None, **kw):
    import tensorflow as tf

    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(6)
    val = tf.data.Dataset.from_tensor_slices((x, y)).batch(6)
    if ranges is None and method in ("mars-pgm", "l2-pgm"):
        ranges = {"radius": (2.0, 4.0), "head_radius": (5.0, 9.0)}
    kw.setdefault("max_trials", 2)
    kw.setdefault("epochs", 1)
    return search(build, train, val, method, verbose=0,
                  directory=str(tmp_path), ranges=ranges, **kw)


def test_default_tuner_is_bayesian_optimization(tmp_path):
    pytest.importorskip("sklearn", reason="BayesianOptimization needs scikit-learn (keras-tuner[bayesian])")
    x, y = _data()
    res = _run(tiny_model, x, y, tmp_path, max_trials=1)
    assert isinstance(res.tuner, keras_tuner.BayesianOptimization)
    assert res.tuner.oracle.max_trials == 1 and len(res.trials) == 1


def test_penalty_method_searches_strengths_and_none_searches_lr(tmp_path):
    x, y = _data()
    res = _run(tiny_model, x, y, tmp_path, method="l2-sp", tuner="random")
    assert isinstance(res.tuner, keras_tuner.RandomSearch)
    lo, hi = recipe.STRENGTH_RANGE
    for t in res.trials:
        assert set(t) == {"trial_id", "strength", "head_strength", "score"}
        assert lo <= t["strength"] <= hi and lo <= t["head_strength"] <= hi
    res = _run(tiny_model, x, y, tmp_path, method="none", tuner=keras_tuner.RandomSearch)
    lrs = [t["lr"] for t in res.trials]
    assert all(recipe.LR_RANGE[0] <= v <= recipe.LR_RANGE[1] for v in lrs) and lrs[0] != lrs[1]


def test_grid_search_spreads_the_trials_over_every_range(tmp_path):
    """KerasTuner's grid takes 10 values per unstepped range: 4 trials of a
    10 x 10 grid would move one radius only. The grid has as many values per
    range as the trials allow: here 2 x 2, the ends of each log range."""
    x, y = _data()
    res = _run(tiny_model, x, y, tmp_path, tuner="grid", max_trials=4)
    assert isinstance(res.tuner, keras_tuner.GridSearch) and len(res.trials) == 4
    pairs = {(round(t["radius"], 6), round(t["head_radius"], 6)) for t in res.trials}
    assert pairs == {(2.0, 5.0), (2.0, 9.0), (4.0, 5.0), (4.0, 9.0)}
    # 3 trials of that 2 x 2 grid would leave a corner untried: refused.
    with pytest.raises(ValueError, match=r"tuner='grid' over 2 searched range\(s\) needs at least 4 trials.*"
                                         r"got max_trials=3"):
        _run(tiny_model, x, y, tmp_path / "three", tuner="grid", max_trials=3)


def test_hypermodel_options_and_errors():
    hm = SPFTHyperModel(tiny_model, "l2-pgm", ranges={"head_radius": 3.0, "radius": (1.0, 2.0)})
    hp = keras_tuner.HyperParameters()
    model = hm.build(hp)
    assert hp.values["head_radius"] == 3.0 and 1.0 <= hp.values["radius"] <= 2.0
    assert float(model.get_layer("head").kernel.constraint.radius) == pytest.approx(3.0)
    assert model.optimizer.amsgrad
    with pytest.raises(ValueError, match="'strength' does not apply to method 'l2-pgm'"):
        SPFTHyperModel(tiny_model, "l2-pgm", ranges={"strength": (1e-3, 1e-2)})
    with pytest.raises(ValueError, match="0 < low < high"):
        SPFTHyperModel(tiny_model, "mars-pgm", ranges={"radius": (5.0, 1.0)})
    with pytest.raises(ValueError, match="unknown method"):
        SPFTHyperModel(tiny_model, "delta-x")
    # A review found these accepted: a negative learning rate trained by
    # gradient ascent; max_trials=0 is "no limit" to KerasTuner (it searched on).
    for kwargs, match in ((dict(lr=-1e-4), r"SPFTHyperModel: `lr` must be positive and finite"),
                          (dict(radius_lr=0.0), r"`radius_lr` must be positive"),
                          (dict(ranges={"radius": (1, 2, 3)}), r"range of 'radius' must be \(low, high\)"),
                          (dict(ranges={"lr": -1e-3}), r"`ranges\['lr'\]` must be positive"),
                          (dict(ranges={"radius": ("a", 2.0)}), r"`ranges\['radius'\]` must be a positive number"),
                          (dict(wrap_options={"radius": 3}), r"wrap option 'radius' is set by the method"),
                          (dict(wrap_options={"foo": 1}), r"unknown wrap option\(s\) \['foo'\] for method 'mars-pgm'"),
                          (dict(grid_points=1), r"`grid_points` must be an integer of at least 2")):
        with pytest.raises(ValueError, match=match):
            SPFTHyperModel(tiny_model, "mars-pgm", **kwargs)
    with pytest.raises(ValueError, match=r"unknown wrap option\(s\) \['batchnorm'\] for method 'delta'"):
        SPFTHyperModel(tiny_model, "delta", wrap_options={"batchnorm": "gamma"})
    x, y = np.zeros((4, 8), "float32"), np.zeros(4, "int64")
    for kwargs, match in ((dict(max_trials=0), r"search: `max_trials` must be an integer of at least 1"),
                          (dict(epochs=0), r"search: `epochs` must be an integer of at least 1"),
                          (dict(lr=-1.0), r"`lr` must be positive")):
        with pytest.raises(ValueError, match=match):
            search(tiny_model, (x, y), (x, y), tuner="random", **kwargs)
    with pytest.raises(ValueError, match=r"compile_model: `lr` must be positive"):
        recipe.compile_model(tiny_model(), lr=-1e-2)
    with pytest.raises(ValueError, match=r"method 'mars-pgm': `radius` must be a positive number, got 'learned'"):
        recipe.method_values("mars-pgm", {"radius": "learned"})



def test_what_the_new_checks_must_still_take(tmp_path):
    """A diff review found today's checks refusing valid input: max_trials=None
    where it is unused (hyperband), a learning-rate schedule, DELTA's alpha or
    beta at 0, a grid count given as a whole float, DeltaModel's name=."""
    import keras

    x, y = np.random.default_rng(0).random((8, 16, 16, 3)).astype("float32"), np.arange(8) % 3
    # A Hyperband subclass (the string "hyperband": test_hyperband_bookkeeping)
    # was given max_trials and no max_epochs: "Unrecognized arguments".
    search(lambda: tiny_model(3, size=16), (x, y), (x, y), method="mars-pgm", max_trials=None,
           tuner=type("MyHyperband", (keras_tuner.Hyperband,), {}),
           epochs=1, verbose=0, directory=str(tmp_path), batch_size=4)
    recipe.compile_model(tiny_model(), lr=keras.optimizers.schedules.CosineDecay(1e-3, 10))
    recipe.compile_model(tiny_model(), lr=np.float32(1e-3))
    assert recipe.method_values("delta", {"alpha": 0.0, "beta": 0})["beta"] == 0.0
    hm = SPFTHyperModel(tiny_model, "delta", ranges={"beta": 0.0}, grid_points=3.0, wrap_options={"name": "d"})
    assert hm.ranges["beta"] == 0.0 and hm.grid_points == 3
    with pytest.raises(ValueError, match=r"`ranges\['alpha'\]` must be positive"):
        SPFTHyperModel(tiny_model, "delta", ranges={"alpha": (0.0, 1.0)})
    with pytest.raises(ValueError, match=r"method 'delta': `beta` must be positive and finite, got -1"):
        recipe.method_values("delta", {"beta": -1.0})
    with pytest.raises(ValueError, match=r"search: `max_trials` must be an integer of at least 1, got None"):
        search(tiny_model, (x, y), (x, y), method="l2-sp", tuner="grid", max_trials=None, directory=str(tmp_path))
    result = search(lambda: tiny_model(3, size=16), (x, y), (x, y), method="mars-pgm", tuner="random",
                    max_trials=1, epochs=1.0, verbose=0, directory=str(tmp_path / "f"), batch_size=4)
    assert result.best   # epochs=1.0 is read as 1
    with pytest.raises(ValueError, match="unknown tuner 'tpe'"):
        search(tiny_model, None, None, tuner="tpe")
    with pytest.raises(ValueError, match="unknown objective"):
        search(tiny_model, None, None, objective="f1")
    with pytest.raises(ValueError, match=r"unknown objective 'accuracy'.*scores the validation data"):
        search(tiny_model, None, None, objective="accuracy")


def test_recipe_defaults_and_schedule():
    assert recipe.default_ranges("mars-pgm") == {"radius": recipe.RADIUS_RANGE, "head_radius": recipe.RADIUS_RANGE}
    assert recipe.RADIUS_RANGE == pytest.approx((math.exp(0.5), math.exp(3.5)))
    assert recipe.default_ranges("mars-sp")["strength"] == pytest.approx((math.exp(-10), math.exp(-1)))
    assert recipe.method_values("l2-pgm", {"radius": 2.0, "strength": 9.0}) == {
        "radius": 2.0, "head_radius": pytest.approx(math.exp(2))}
    assert recipe.halving_epochs(30) == 20 and recipe.halving_epochs(6) == 4 and recipe.halving_epochs(1) == 1
    sched = recipe.lr_schedule(1e-4, 30)
    assert [sched.schedule(e, None) for e in (0, 19, 20, 29)] == [1e-4, 1e-4, 5e-5, 5e-5]


@pytest.mark.parametrize("method", ["mars-pgm", "l2-sp", "mars-pgm-learned"])
def test_head_none_wraps_and_searches_without_head_values(method):
    """head=[] (every kernel pre-trained): recipe.wrap gave wrap_pretrained a
    default head_radius, which it refuses as bounding nothing, so neither
    recipe.wrap nor a search with wrap_options={"head": []} could express it."""
    report = recipe.wrap(tiny_model(), method, {}, head=[])
    assert report.wrapped and all(w.role == "backbone" for w in report.wrapped)
    report = recipe.wrap(tiny_model(), method, {}, head={})   # an empty dict of names says the same
    assert report.wrapped and all(w.role == "backbone" for w in report.wrapped)
    model = tiny_model()
    head_name = model.layers[-1].name
    report = recipe.wrap(model, method, {}, head=(n for n in [head_name]))   # an iterator, read once
    assert [w.path for w in report.wrapped if w.role == "head"] == [head_name]
    head_key = "head_strength" if method.endswith("-sp") else "head_radius"
    with pytest.raises(ValueError, match=f"{head_key} is given but head=\\[\\] says the model has no new head"):
        recipe.wrap(tiny_model(), method, {head_key: 2.0}, head=[])
    hm = SPFTHyperModel(tiny_model, method, wrap_options={"head": []})
    assert not set(hm.ranges) & {"head_radius", "head_strength"}
    hp = keras_tuner.HyperParameters()
    hm.build(hp)
    assert not set(hp.values) & {"head_radius", "head_strength"}
    with pytest.raises(ValueError, match=f"`ranges` key '{head_key}' does not apply"):
        SPFTHyperModel(tiny_model, method, ranges={head_key: (1.0, 2.0)}, wrap_options={"head": []})


def test_hyperband_bookkeeping_is_not_reported_as_values(tmp_path):
    x, y = _data()
    res = _run(tiny_model, x, y, tmp_path, tuner="hyperband", max_epochs=2, factor=3)
    assert isinstance(res.tuner, keras_tuner.Hyperband)
    assert set(res.best) == {"radius", "head_radius"}   # no "tuner/epochs", "tuner/bracket", ...
    assert all(set(t) == {"trial_id", "radius", "head_radius", "score"} for t in res.trials)


def test_hyperband_continues_delta_trials(tmp_path):
    """Hyperband rebuilds a model and load_weights into it for each continued
    trial: a fresh DeltaModel refused the weights, and those trials failed
    with no word in the result."""
    x, y = _data()
    res = _run(tiny_model, x, y, tmp_path, method="delta", tuner="hyperband", max_epochs=2, factor=2,
               wrap_options={"feature_layers": ["c1"]})
    trials = res.tuner.oracle.trials.values()
    assert res.failed == [] and len(res.trials) == len(trials) >= 3
    assert any(t.hyperparameters.values.get("tuner/trial_id") for t in trials)   # a continued trial ran


def test_failed_trials_are_reported(tmp_path):
    x, y = _data()
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 3:    # KerasTuner builds once to see the space; then trials 1, 2
            raise RuntimeError("out of memory (simulated)")
        return tiny_model()

    with pytest.warns(RuntimeWarning, match=r"1 of 2 trials failed.*out of memory \(simulated\)"):
        res = _run(flaky, x, y, tmp_path, tuner="random")
    assert len(res.trials) == 1 and [f["error"] for f in res.failed] == ["RuntimeError: out of memory (simulated)"]
    assert "1 trials, 1 failed" in str(res)


def test_seed_zero_fixes_the_search_and_each_trials_start(tmp_path):
    # KerasTuner reads seed=0 as "no seed" (the default here drew new radii on
    # every run), and trials were unseeded (a value scored differently in
    # another search).
    x, y = _data()
    runs = [_run(tiny_model, x, y, tmp_path / str(i), tuner="random", seed=0, max_trials=1) for i in range(2)]
    rows = [[(t["radius"], t["head_radius"], t["score"]) for t in sorted(r.trials, key=lambda t: t["trial_id"])]
            for r in runs]
    assert [r[:2] for r in rows[0]] == [r[:2] for r in rows[1]]
    np.testing.assert_allclose([r[2] for r in rows[0]], [r[2] for r in rows[1]], rtol=1e-6)
    other = _run(tiny_model, x, y, tmp_path / "other", tuner="random", seed=1, max_trials=1)
    assert {t["radius"] for t in other.trials}.isdisjoint({r[0] for r in rows[0]})

    # Every trial builds its model after the same seed: the same new head.
    heads = []
    hm = SPFTHyperModel(lambda: heads.append(tiny_model()) or heads[-1], "mars-pgm", seed=3)
    for _ in range(2):
        hm.build(keras_tuner.HyperParameters())
    np.testing.assert_array_equal(*(m.get_layer("head").kernel.numpy() for m in heads))
    with pytest.raises(ValueError, match=r"`seed` must be an int from 0 to 2\*\*32 - 1, or None, got 4294967296"):
        SPFTHyperModel(tiny_model, "mars-pgm", seed=2**32)
    for bad in (-1, 2**32 - 1):
        with pytest.raises(ValueError, match=rf"`seed` must be an int from 0 to 2\*\*32 - 2.*got {bad}"):
            search(tiny_model, None, None, tuner="random", seed=bad)


def test_resuming_with_other_settings_is_an_error(tmp_path):
    x, y = _data()
    first = _run(tiny_model, x, y, tmp_path, tuner="random", objective="val_loss")
    with pytest.raises(ValueError, match=r"holds a search made with other settings \(objective: "
                                         r"\['val_cross_entropy', 'min'\] stored vs \['val_accuracy', 'max'\] now\)"):
        _run(tiny_model, x, y, tmp_path, tuner="random", objective="val_accuracy")
    with pytest.raises(ValueError, match=r"epochs: 1 stored vs 2 now.*lr: 0.0001 stored vs 0.001 now"):
        _run(tiny_model, x, y, tmp_path, tuner="random", objective="val_loss", lr=1e-3, epochs=2)
    with pytest.raises(ValueError, match=r"ranges: .*Pass overwrite=True"):
        _run(tiny_model, x, y, tmp_path, tuner="random", objective="val_loss",
             ranges={"radius": (2.0, 5.0), "head_radius": (5.0, 9.0)})
    # Tuner arguments compare by content (HyperParameters by its config; a
    # repr with a memory address blocked every resume).
    hp = keras_tuner.HyperParameters()
    hp.Fixed("head_radius", 7.0)
    first_hp = _run(tiny_model, x, y, tmp_path / "hp", tuner="random", hyperparameters=hp, max_trials=1)
    hp_again = keras_tuner.HyperParameters()
    hp_again.Fixed("head_radius", 7.0)
    again = _run(tiny_model, x, y, tmp_path / "hp", tuner="random", hyperparameters=hp_again, max_trials=1)
    assert again.trials == first_hp.trials
    # More trials with the same settings: the search goes on.
    more = _run(tiny_model, x, y, tmp_path, tuner="random", objective="val_loss", max_trials=3)
    assert len(more.trials) == 3 and {t["trial_id"] for t in first.trials} < {t["trial_id"] for t in more.trials}
    # overwrite=True starts afresh with the new settings, which are then stored.
    fresh = _run(tiny_model, x, y, tmp_path, tuner="random", objective="val_accuracy", overwrite=True, max_trials=1)
    assert fresh.objective == "val_accuracy" and len(fresh.trials) == 1
    _run(tiny_model, x, y, tmp_path, tuner="random", objective="val_accuracy")


def test_settings_fingerprints_tell_functions_partials_and_classes_apart():
    import functools

    import keras

    from keras_spft.tuning import _fingerprint

    def f(layer, scale=1.0):
        return 1.0 * scale

    def g(layer, scale=1.0):
        return 2.0 * scale

    assert _fingerprint(lambda layer: 1.0) != _fingerprint(lambda layer: 2.0)
    assert _fingerprint(f) != _fingerprint(g) and _fingerprint(f) == _fingerprint(f)
    assert _fingerprint(functools.partial(f, scale=2.0)) != _fingerprint(functools.partial(f, scale=3.0))
    assert _fingerprint(keras.layers.Dense) != _fingerprint(keras.optimizers.Adam)   # classes: no crash

    def radius_of(r):   # its code holds a nested code object, whose repr has an address
        return lambda layer: r
    assert _fingerprint(radius_of(1.0)) != _fingerprint(radius_of(2.0))          # closures by their values
    import json
    assert json.loads(json.dumps(_fingerprint({"f": f}))) == _fingerprint({"f": f})   # stored and compared as JSON
    assert "0x" not in json.dumps(_fingerprint(radius_of))                         # the same in every process


def test_val_loss_objective_scores_the_cross_entropy_without_the_penalty(tmp_path):
    # Keras' val_loss adds the L2-SP penalty (head_strength * ||V||^2), which
    # grows with the strength searched: the search scored the penalty.
    x, y = _data()
    result = _run(tiny_model, x, y, tmp_path, method="l2-sp", objective="val_loss", tuner="random",
                  ranges={"strength": 0.3, "head_strength": (0.1, 0.5)}, max_trials=1)
    assert result.objective == "val_cross_entropy"
    for row in result.trials:
        metrics = result.tuner.oracle.get_trial(row["trial_id"]).metrics
        ce, loss = metrics.get_last_value("val_cross_entropy"), metrics.get_last_value("val_loss")
        assert row["score"] == pytest.approx(ce)
        assert loss > ce + 1e-3, "the penalty is in val_loss, not in the score"


def test_executions_of_a_trial_are_seeded_apart_and_arrays_are_searched(tmp_path):
    # With executions_per_trial=2 both executions were seeded alike: the same
    # head, the same order (copies averaged); a retried trial started at the
    # next execution's seed. Arrays are passed as (x, y).
    x, y = _data()
    # The trial's first try fails once: KerasTuner retries it from execution 0.
    spy, built = Spy(), []

    def build():
        built.append(spy().get_layer("head").kernel.numpy().copy())   # as built, before training
        if len(built) == 2:
            raise RuntimeError("flaky")
        return spy.models[-1]

    search(build, (x, y), (x, y), "mars-pgm", tuner="random", max_trials=1, epochs=1, verbose=0,
           directory=str(tmp_path), executions_per_trial=2, batch_size=4, max_retries_per_trial=1,
           ranges={"radius": (2.0, 4.0), "head_radius": (5.0, 9.0)})
    # built: the tuner's probe build, the failed try, then the retry's two executions
    assert len(built) == 4
    assert not np.array_equal(built[2], built[3]), "both executions started from the same head"
    np.testing.assert_array_equal(built[0], built[2])   # execution 0 (of the retry too): the seed itself
    assert all(m.optimizer.iterations == 3 for m in spy.models[2:])   # 12 examples, batch_size 4


def test_a_build_model_returning_the_same_weights_again_is_refused():
    # A backbone kept in a closure: every trial started from the previous
    # one's fine-tuned weights, silently.
    model = tiny_model()
    hm = SPFTHyperModel(lambda: model, "mars-pgm")
    hm.build(keras_tuner.HyperParameters())
    with pytest.raises(ValueError, match=r"`build_model` returned weights it returned before \(.*c1/kernel"):
        hm.build(keras_tuner.HyperParameters())
    with pytest.raises(ValueError, match=r"`build_model` must return a Keras model, got str"):
        SPFTHyperModel(lambda: "model", "mars-pgm").build(keras_tuner.HyperParameters())


def test_resuming_checks_build_model_and_seed_and_explains_a_grid(tmp_path):
    import json
    import os

    from tests.workflow.conftest import tiny_model as other_model

    x, y = _data()
    _run(tiny_model, x, y, tmp_path, tuner="random", max_trials=1)
    with pytest.raises(ValueError, match=r"other settings \(build_model: .* stored vs .* now\)"):
        _run(lambda: other_model(size=16), x, y, tmp_path, tuner="random", max_trials=1)
    with pytest.raises(ValueError, match=r"other settings \(seed: 0 stored vs 7 now\)"):
        _run(tiny_model, x, y, tmp_path, tuner="random", max_trials=1, seed=7)
    # not recorded before: trials of one batch size were resumed with another
    arrays = dict(tuner="random", max_trials=1, epochs=1, verbose=0, directory=str(tmp_path / "b"),
                  ranges={"radius": (2.0, 4.0), "head_radius": (5.0, 9.0)})
    search(tiny_model, (x, y), (x, y), "mars-pgm", batch_size=4, **arrays)
    with pytest.raises(ValueError, match=r"other settings \(batch_size: 4 stored vs 8 now\)"):
        search(tiny_model, (x, y), (x, y), "mars-pgm", batch_size=8, **arrays)
    # A settings file of an earlier version, without these keys, still resumes.
    path = os.path.join(tmp_path, "spft_mars-pgm", "keras_spft_search.json")
    with open(path) as f:
        stored = json.load(f)
    with open(path, "w") as f:
        json.dump({k: v for k, v in stored.items() if k not in ("build_model", "seed")}, f)
    assert len(_run(tiny_model, x, y, tmp_path, tuner="random", max_trials=1, seed=7).trials) == 1
    # A grid's points follow max_trials: the message says why it cannot grow.
    one_range = {"radius": (2.0, 4.0), "head_radius": 7.0}
    _run(tiny_model, x, y, tmp_path / "g", tuner="grid", max_trials=2, ranges=one_range)
    with pytest.raises(ValueError, match=r"grid_points: 2 stored vs 3 now; with tuner='grid', `max_trials` sets"):
        _run(tiny_model, x, y, tmp_path / "g", tuner="grid", max_trials=3, ranges=one_range)


def test_the_trial_checkpoint_is_the_final_epoch_it_scores(tmp_path):
    # KerasTuner saved each trial's best epoch: get_best_models() (and a
    # Hyperband round's continuation) loaded other weights than those scored.
    x, y = _data()
    spy = Spy()
    result = _run(spy, x, y, tmp_path, tuner="random", max_trials=1, epochs=4, lr=0.3, objective="val_loss")
    trained = spy.models[-1]
    scores = trained.history.history["val_cross_entropy"]
    assert result.trials[0]["score"] == pytest.approx(scores[-1])
    assert min(scores) < scores[-1], "the final epoch is the best one here: the test would not tell"
    best = result.tuner.get_best_models(1)[0]
    for a, b in zip(best.weights, trained.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_search_without_validation_data_and_a_misspelt_value_are_named_up_front(tmp_path):
    x, y = _data()
    import tensorflow as tf

    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(6)
    with pytest.raises(ValueError, match=r"search needs validation data `val`"):
        search(tiny_model, train, None, tuner="random", max_trials=1, epochs=1, directory=str(tmp_path))
    with pytest.raises(ValueError, match=r"`batch_size` applies to array data `\(x, y\)`; a dataset"):
        search(tiny_model, train, train, tuner="random", max_trials=1, epochs=1, directory=str(tmp_path),
               batch_size=4)
    for bad, what in (((x,), "a sequence of 1"), ((x, y, y, y), "a sequence of 4"), ([x], "a sequence of 1"),
                      (x, "an array alone"), (tf.constant(x), "an array alone")):
        for name, args in (("train", (bad, (x, y))), ("val", ((x, y), bad))):
            with pytest.raises(ValueError, match=f"search: array data `{name}` must be " + r"`\(x, y\)` or "
                                                 r"`\(x, y, sample_weight\)`, got " + what):
                search(tiny_model, *args, tuner="random", max_trials=1, epochs=1, directory=str(tmp_path))
    assert not (tmp_path / "spft_mars-pgm").exists()   # nothing trained, nothing stored
    with pytest.raises(ValueError, match=r"unknown hyper-parameter\(s\) \['head-radius'\] for method 'mars-pgm'"):
        recipe.wrap(tiny_model(), "mars-pgm", {"radius": 2.0, "head-radius": 5.0})
    assert recipe.method_values("l2-sp", {"radius": 3.0, "strength": 0.1})["strength"] == 0.1   # another method's key


def test_a_string_choice_of_the_tuners_own_hyperparameters_is_reported():
    # float() of every value crashed after the whole search had run.
    x, y = _data()

    class Hyper(keras_tuner.HyperModel):
        def build(self, hp):
            hp.Choice("optimizer", ["adam", "sgd"])
            model = tiny_model()
            model.compile(optimizer=hp.get("optimizer"), loss="sparse_categorical_crossentropy",
                          metrics=["accuracy"])
            return model

    import tempfile

    tuner = keras_tuner.RandomSearch(Hyper(), objective="val_accuracy", max_trials=1,
                                     directory=tempfile.mkdtemp(), seed=1)
    result = search(None, (x, y), (x, y), tuner=tuner, epochs=1, verbose=0)
    assert result.best["optimizer"] in ("adam", "sgd") and "optimizer=" in str(result)


def test_fingerprints_of_set_literals_do_not_follow_the_hash_seed():
    # repr of a frozenset constant follows PYTHONHASHSEED: a resumed search was
    # refused in about half of new processes.
    import subprocess
    import sys

    code = ("from keras_spft.tuning import _fingerprint\n"
            "def build():\n    return 'resnet' in {'tiny', 'small', 'resnet', 'mobilenet', 'efficientnet'}\n"
            "print(_fingerprint(build)['code'])")
    env = {**__import__("os").environ, "KERAS_BACKEND": "jax"}   # the quickest import
    out = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**env, "PYTHONHASHSEED": str(seed)}).stdout
           for seed in (2, 3)}   # two orders of that set (the digests differed before)
    assert len(out) == 1, out


def test_a_val_loss_search_of_an_earlier_version(tmp_path):
    # Earlier versions scored Keras' val_loss: the same as the cross-entropy
    # without a penalty (resumes), not with L2-SP's (refused, saying why).
    from keras_spft.tuning import _check_resumed, _store_settings

    for method in ("mars-pgm", "l2-sp"):
        now = {"method": method, "objective": ["val_cross_entropy", "min"], "epochs": 1}
        project = str(tmp_path / method)
        _store_settings(project, dict(now, objective=["val_loss", "min"]))
        if method == "mars-pgm":
            _check_resumed(project, now)
        else:
            with pytest.raises(ValueError, match=r"before 2026-11-28 scored 'val_loss', which adds the l2-sp "
                                                 r"penalty.*on the command line: another --out"):
                _check_resumed(project, now)


def test_a_write_that_fails_midway_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    from keras_spft._files import atomic_json, atomic_write, read_json

    path = str(tmp_path / "record.json")
    atomic_json(path, {"a": 1})

    def half(f):
        f.write('{"a": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half)
    assert read_json(path, "record", "redo it") == {"a": 1}
    assert os.listdir(tmp_path) == ["record.json"]
    with open(path, "w") as f:
        f.write('{"a": ')
    with pytest.raises(ValueError, match=r"record.json' is not a readable keras-spft record .*; redo it\."):
        read_json(path, "record", "redo it")
    # valid JSON that is no record (each is an object): named, not an
    # AttributeError from the reader's first `.get`
    with open(path, "w") as f:
        f.write("[1, 2]")
    with pytest.raises(ValueError, match=r"record.json' is not a readable keras-spft record \(it holds a JSON "
                                         r"list, not an object\); redo it\."):
        read_json(path, "record", "redo it")


def test_sample_weights_reach_fit_and_compile_model_refuses_two_outputs(tmp_path):
    """Also given as a list, as Keras' own data handling takes it: a list
    went to `fit` as the inputs of a model with three."""
    import keras

    x, y = _data()
    spy = Spy()
    start = []
    search(lambda: start.append(spy().get_layer("base").get_layer("c1").kernel.numpy().copy()) or spy.models[-1],
           [x, y, np.zeros(len(y), "float32")], (x, y), "mars-pgm", tuner="random", max_trials=1, epochs=1,
           verbose=0, directory=str(tmp_path), ranges={"radius": (2.0, 4.0), "head_radius": (5.0, 9.0)})
    # Zero weights, zero loss, zero gradients: the trained kernel did not move.
    np.testing.assert_array_equal(spy.models[-1].get_layer("base").get_layer("c1").kernel.numpy(), start[-1])

    inputs = keras.Input((4,))
    two = keras.Model(inputs, [keras.layers.Dense(3)(inputs), keras.layers.Dense(5)(inputs)], name="two")
    with pytest.raises(ValueError, match=r"compile_model compiles a classifier with one output; 'two' has 2"):
        recipe.compile_model(two)


@pytest.mark.parametrize("direction", ["max", "min"])
def test_tied_trials_resolve_to_the_earliest_whatever_order_keras_tuner_lists_them(direction):
    """After a reload KerasTuner lists tied trials in the order of their files
    on disk, so the same finished search named another best on each read."""
    import types

    import keras_tuner

    from keras_spft.tuning import _result

    def trial(tid, score, radius):
        hp = keras_tuner.HyperParameters()
        hp.Fixed("radius", radius)
        t = keras_tuner.engine.trial.Trial(hp, trial_id=tid, status="COMPLETED")
        t.score = score
        return t
    worse = 0.1 if direction == "max" else 0.9
    listed = [trial("10", 0.5, 3.0), trial("2", worse, 1.0), trial("01", 0.5, 2.0), trial("03", 0.5, 4.0)]
    oracle = types.SimpleNamespace(objective=types.SimpleNamespace(direction=direction),
                                   trials={t.trial_id: t for t in listed})
    oracle.get_best_trials = lambda num_trials: [t for t in listed if t.score == 0.5] + [listed[1]]
    result = _result(types.SimpleNamespace(oracle=oracle), "mars-pgm", "val_accuracy")
    assert result.best == {"radius": 2.0} and result.best_score == 0.5
    assert [r["trial_id"] for r in result.trials] == ["01", "03", "10", "2"]
