"""Searching radii (or strengths) with KerasTuner.

`SPFTHyperModel` is a `keras_tuner.HyperModel`: each trial builds a fresh
pre-trained model, wraps it with the method and the trial's radii, and
trains it with the paper's recipe. `search(...)` runs any KerasTuner tuner
(Bayesian optimisation with 20 trials by default, as the paper's 20 TPE
evaluations) and returns a `SearchResult` with the best values and the trial
table.
"""

import functools
import math
import numbers
import os
import warnings
from dataclasses import dataclass, field

import keras_tuner

from keras_spft import recipe
from keras_spft._files import atomic_json, read_json
from keras_spft.anchors import check_count, check_positive
from keras_spft.recipe import METHODS

try:   # KerasTuner's per-trial checkpoint (not public API)
    from keras_tuner.src.engine.tuner_utils import SaveBestEpoch as _SaveBestEpoch
except ImportError:   # another layout: its best-epoch checkpoints stay
    _SaveBestEpoch = type("_NoSaveBestEpoch", (), {})

__all__ = ["SPFTHyperModel", "SearchResult", "search"]

TUNERS = {
    "bayesian": keras_tuner.BayesianOptimization,
    "random": keras_tuner.RandomSearch,
    "hyperband": keras_tuner.Hyperband,
    "grid": keras_tuner.GridSearch,
}
#: Objective names `search` takes -> (the metric KerasTuner scores, direction).
#: "val_loss" scores the validation cross-entropy (`recipe.compile_model`'s
#: `cross_entropy` metric): Keras' `val_loss` adds the L2-SP / MARS-SP
#: penalties, whose size depends on the very strength searched.
OBJECTIVES = {"val_accuracy": ("val_accuracy", "max"), "val_loss": ("val_cross_entropy", "min"),
              "val_cross_entropy": ("val_cross_entropy", "min")}


def _checked_seed(seed, highest, highest_text):
    """`seed` as an int (or None); a ValueError unless it is an int from 0 to
    `highest` (`highest_text` says so in the message)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= highest:
        raise ValueError(f"`seed` must be an int from 0 to {highest_text}, or None, got {seed!r}.")
    return int(seed)


class SPFTHyperModel(keras_tuner.HyperModel):
    """A KerasTuner `HyperModel` searching a method's radii or strengths.

    Hyper-parameters (log-uniform): `radius` and `head_radius` for constraint
    methods, `strength` and `head_strength` for penalty methods, `alpha`
    (feature maps) and `beta` (head L2) for `"delta"` (in the strengths'
    range), `lr` for `"none"` (so the baseline gets a tuned learning rate).
    Each trial calls `build_model()` for a fresh model with the pre-trained
    weights, `keras_spft.wrap_pretrained` with the trial's values (for
    `"delta"`: a `keras_spft.DeltaModel` around it, which is what is trained),
    and compiles it with
    Adam(amsgrad); `fit` halves the learning rate every 2/3 of the epochs and
    reports the final epoch's metrics (the paper scores the final epoch).

    Args:
        build_model: a function with no arguments returning a new, uncompiled
            model whose backbone holds the pre-trained weights and whose head
            outputs logits (e.g. `keras_spft.backbones.build_model`).
        method: a `wrap_pretrained` method name or `"delta"`.
        ranges: `{name: (low, high)}` overriding the default ranges
            (`keras_spft.recipe.default_ranges(method)`); a name with a
            single number instead of a pair is fixed, not searched. An `lr`
            range makes the learning rate searched for any method.
        lr: learning rate when it is not searched.
        radius_lr: step size of the learned radii (methods `*-learned`; see
            `keras_spft.recipe.compile_model`).
        grid_points: values per searched range on a log grid (for
            `keras_tuner.GridSearch`; `search(tuner="grid")` sets it from
            `max_trials`); `None`: continuous ranges.
        wrap_options: further `wrap_pretrained` keyword arguments
            (e.g. `{"batchnorm": "gamma"}`); for `"delta"` `DeltaModel` ones,
            e.g. `{"attention": att}` with channel weights computed once by
            `keras_spft.compute_attention` (otherwise they stay uniform).
        seed: `keras.utils.set_random_seed(seed)` before each trial builds
            its model, so every trial starts from the same new head and
            draws the same dropout (and, with NumPy inputs, the same data
            order); with `executions_per_trial=k`, execution `i` of each
            trial is seeded `seed + i`. A `tf.data` pipeline shuffled with
            `reshuffle_each_iteration` keeps its own sequence: each trial
            gets the next epochs' orders, which depend on the trials run
            before it in the process. `None`: not seeded.
        name: the hypermodel's name.

    Example:

    ```python
    hm = SPFTHyperModel(lambda: build_model("mobilenet", 17, alpha=0.25),
                        method="mars-pgm", ranges={"head_radius": 10.0})
    ```
    """

    def __init__(self, build_model, method="mars-pgm", *, ranges=None, lr=recipe.DEFAULT_LR,
                 radius_lr=recipe.DEFAULT_RADIUS_LR, wrap_options=None, grid_points=None, seed=None, name=None):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}.")
        if not callable(build_model):
            raise ValueError("`build_model` must be a function returning a new model.")
        super().__init__(name=name or f"spft_{method}", tunable=True)
        self.build_model = build_model
        self.method = method
        for what, value in (("lr", lr), ("radius_lr", radius_lr)):
            check_positive(value, what, "SPFTHyperModel")
        self.lr = float(lr)
        self.radius_lr = float(radius_lr)
        self.grid_points = None if grid_points is None else check_count(grid_points, "grid_points", "SPFTHyperModel", 2)
        self.wrap_options = dict(wrap_options or {})
        recipe._check_wrap_options(method, self.wrap_options)
        if "head" in self.wrap_options:   # read by every trial: an iterator would be used up
            self.wrap_options["head"] = recipe._head_list(self.wrap_options["head"])
        self.seed = _checked_seed(seed, 2**32 - 1, "2**32 - 1")
        self._last_hp, self._execution, self._built_before = None, 0, {}
        # A Keras distribution (JAX DataParallel) current when the search is
        # set up: KerasTuner clears the session before every trial, which
        # drops it, so each build makes it current again.
        import keras

        self._distribution = keras.distribution.distribution()
        allowed = set(recipe.hyperparameter_names(method)) | {"lr"}
        self.ranges = dict(recipe.default_ranges(method))
        if method not in recipe.DELTA_METHODS and recipe._no_head(self.wrap_options.get("head")):
            # wrap_options={"head": []}: no new head, so no head value to search.
            allowed -= set(recipe.HEAD_VALUES)
            self.ranges = {k: v for k, v in self.ranges.items() if k not in recipe.HEAD_VALUES}
        for key, value in (ranges or {}).items():
            if key not in allowed:
                raise ValueError(
                    f"`ranges` key {key!r} does not apply to method {method!r} (expected one of {sorted(allowed)})."
                )
            if isinstance(value, (tuple, list)):
                if len(value) != 2:
                    raise ValueError(f"range of {key!r} must be (low, high), got {value!r}.")
                for v in value:
                    check_positive(v, f"ranges[{key!r}]", "SPFTHyperModel")
                lo, hi = (float(v) for v in value)
                if not lo < hi:
                    raise ValueError(f"range of {key!r} must satisfy 0 < low < high, got {value}.")
                self.ranges[key] = (lo, hi)
            else:
                recipe._check_value(value, key, "SPFTHyperModel", f"ranges[{key!r}]")
                self.ranges[key] = float(value)

    def values(self, hp):
        """The trial's hyper-parameter values, registering them with `hp`."""
        out = {}
        for key, rng in self.ranges.items():
            if isinstance(rng, tuple):
                step = None
                if self.grid_points:
                    # A log grid of exactly `grid_points` values from low to high
                    # (the factor a hair small, so rounding keeps the last one).
                    step = (rng[1] / rng[0]) ** (1.0 / (self.grid_points - 1)) * (1 - 1e-9)
                out[key] = hp.Float(key, rng[0], rng[1], sampling="log", step=step)
            else:
                out[key] = hp.Fixed(key, rng)
        return out

    def build(self, hp):
        values = self.values(hp)
        # KerasTuner builds once per execution of a trial (`executions_per_trial`),
        # with the trial's own `hp`: execution k is seeded `seed + k`, so the
        # executions averaged are independent draws, not copies. k counts the
        # executions trained since the trial started; a failure resets it, as
        # KerasTuner retries a failed trial from its first execution.
        if hp is not self._last_hp:
            self._last_hp, self._execution = hp, 0
        try:
            import keras

            if self._distribution is not None and keras.distribution.distribution() is None:
                keras.distribution.set_distribution(self._distribution)
            if self.seed is not None:
                keras.utils.set_random_seed((self.seed + self._execution) % 2**32)
            model = self.build_model()
            self._refuse_reused(model)
            wrapped = recipe.wrap(model, self.method, values, **self.wrap_options)
            if self.method in recipe.DELTA_METHODS:
                model = wrapped   # the DeltaModel is trained (and scored: inference runs `.model` only)
            return recipe.compile_model(model, values.get("lr", self.lr), radius_lr=self.radius_lr)
        except BaseException:
            self._execution = 0
            raise

    def _refuse_reused(self, model):
        """A `build_model` returning weights it returned before (one backbone
        kept in a closure) would start each trial from the last one's
        fine-tuned weights."""
        import weakref

        variables = getattr(model, "variables", None)
        if variables is None:
            raise ValueError(f"`build_model` must return a Keras model, got {type(model).__name__}.")
        shared = [v.path for v in variables
                  if (ref := self._built_before.get(id(v))) is not None and ref() is v]
        if shared:
            raise ValueError(
                f"`build_model` returned weights it returned before ({', '.join(shared[:3])}"
                f"{', ...' if len(shared) > 3 else ''}): each trial would start from the previous "
                "one's fine-tuned weights. Build the backbone inside `build_model` (e.g. "
                "`keras_spft.backbones.build_model`) so that every call returns a new model."
            )
        self._built_before = {id(v): weakref.ref(v) for v in variables}

    def fit(self, hp, model, *args, epochs=1, callbacks=None, **kwargs):
        lr = hp.values.get("lr", self.lr)
        # KerasTuner checkpoints each trial's best epoch (what `get_best_models`
        # and Hyperband's promoted trials load); a trial scores its final
        # epoch here, so the checkpoint is the final epoch too.
        callbacks = [_SaveFinalEpoch(c) if isinstance(c, _SaveBestEpoch) else c for c in callbacks or []]
        callbacks = callbacks + [recipe.lr_schedule(lr, epochs)]
        if args and hasattr(args[0], "element_spec"):
            kwargs.setdefault("shuffle", False)  # a tf.data pipeline shuffles itself
        try:
            history = model.fit(*args, epochs=epochs, callbacks=callbacks, **kwargs)
        except BaseException:
            self._execution = 0
            raise
        if hp is self._last_hp:
            self._execution += 1
        # Score the final epoch, as the paper does (KerasTuner would take the best).
        return {k: float(v[-1]) for k, v in history.history.items() if k != "learning_rate"}


class _SaveFinalEpoch(_SaveBestEpoch):
    """KerasTuner's checkpoint of a trial, taken at the end of `fit` (the
    final epoch) instead of at its best epoch; across the executions of a
    trial, the one whose final value is best (as KerasTuner's own)."""

    def __init__(self, best_epoch):
        super().__init__(best_epoch.objective, best_epoch.filepath)
        self._shared = best_epoch   # one per trial: holds the best value over its executions
        self._logs = None

    def on_epoch_end(self, epoch, logs=None):
        self._logs = dict(logs or {})

    def on_train_end(self, logs=None):
        if self._logs is None:
            return
        if not self.objective.has_value(self._logs):
            self._save_model()
            return
        value = self.objective.get_value(self._logs)
        if self.objective.better_than(value, self._shared.best_value):
            self._shared.best_value = value
            self._save_model()


@dataclass
class SearchResult:
    """What a search found.

    Attributes:
        method: the method searched.
        best: the best trial's values, e.g. `{"radius": 5.2, "head_radius": 11.0}`.
        best_score: its objective value.
        objective: the objective's name, e.g. `"val_accuracy"`.
        trials: one dict per completed trial (`trial_id`, the values, `score`),
            best first; tied scores in the order the trials were made (the
            earliest tied trial is the best).
        tuner: the KerasTuner tuner (for `tuner.results_summary()` etc.).
        failed: one dict per failed trial (`trial_id`, `error`: the last line
            of its traceback); a search with failed trials also warns.
    """

    method: str
    best: dict
    best_score: float
    objective: str
    trials: list = field(default_factory=list)
    tuner: object = field(default=None, repr=False)
    failed: list = field(default_factory=list)

    def table(self):
        """The trial table as text, best first."""
        if not self.trials:
            return "(no completed trial)"
        keys = [k for k in self.trials[0] if k not in ("trial_id", "score")]
        head = ["trial"] + keys + [self.objective]
        rows = [head] + [
            [t["trial_id"]] + [_fmt(t.get(k)) for k in keys] + [f"{t['score']:.4f}"] for t in self.trials
        ]
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
        fmt = "  ".join("{:>%d}" % w for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows[1:]]
        return "\n".join(lines)

    def __str__(self):
        best = ", ".join(f"{k}={_fmt(v)}" for k, v in self.best.items())
        return (
            f"{self.method}: best {best} ({self.objective} {self.best_score:.4f}, "
            f"{len(self.trials)} trials{f', {len(self.failed)} failed' if self.failed else ''})\n{self.table()}"
        )

    __repr__ = __str__


def _without_tensorboard(tuner):
    """KerasTuner 1.4 imports tensorboard in every trial on the TensorFlow
    backend, only to patch TensorBoard callbacks; TensorFlow >= 2.20 no longer
    installs it. Without tensorboard (so without such callbacks) skip that."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        if hasattr(tuner, "_configure_tensorboard_dir"):
            tuner._configure_tensorboard_dir = lambda *args, **kwargs: None


def _grid_min_trials(searched):
    """The fewest trials of a grid over `searched` ranges that tries both
    ends of each: `2 ** searched`."""
    return 2 ** searched


def _require_sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise ImportError(
            "the default tuner 'bayesian' (keras_tuner.BayesianOptimization) needs scikit-learn: "
            "pip install 'keras-tuner[bayesian]', or pass tuner='random'."
        ) from None


#: The file in a KerasTuner project folder that records a search's settings.
SETTINGS_FILE = "keras_spft_search.json"


def _fingerprint(value):
    """`value` as JSON data that compares by content: arrays as their shape,
    dtype and SHA-1, functions by name, code and closure, partials by their
    parts, objects with `get_config` as their config, others as their type."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _fingerprint(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_fingerprint(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        import hashlib

        arr = np.ascontiguousarray(np.asarray(value))
        return {"shape": list(arr.shape), "dtype": str(arr.dtype), "sha1": hashlib.sha1(arr.tobytes()).hexdigest()}
    if isinstance(value, type):
        return f"<class {value.__module__}.{value.__qualname__}>"
    if isinstance(value, functools.partial):
        return {"partial": _fingerprint(value.func), "args": _fingerprint(value.args),
                "keywords": _fingerprint(value.keywords)}
    code = getattr(value, "__code__", None)
    if code is not None:   # a function or lambda: its name, code, constants and closure
        import hashlib

        def const(k):
            if hasattr(k, "co_code"):   # nested code objects by content (their repr holds an address)
                return digest(k)
            if isinstance(k, frozenset):   # a set literal: its repr's order follows the hash seed
                return "frozenset" + repr(sorted(const(e) for e in k))
            if isinstance(k, tuple):
                return "tuple" + repr([const(e) for e in k])
            return repr(k)

        def digest(c):
            consts = [const(k) for k in c.co_consts]
            return hashlib.sha1(c.co_code + repr(consts).encode()).hexdigest()

        body = digest(code)
        cells = [_fingerprint(c.cell_contents) for c in (getattr(value, "__closure__", None) or ())]
        return {"function": f"{value.__module__}.{value.__qualname__}", "code": body, "closure": cells}
    if callable(getattr(value, "get_config", None)):   # keras_tuner.HyperParameters, Keras objects
        return {"type": type(value).__name__, "config": _fingerprint(value.get_config())}
    # Other objects by their type only: a repr holds a memory address, which
    # differs in every process.
    return f"<{type(value).__module__}.{getattr(type(value), '__qualname__', type(value).__name__)}>"


def _check_resumed(project, settings):
    """Raises `ValueError` when `project` holds a search made with other settings."""
    path = os.path.join(project, SETTINGS_FILE)
    if os.path.isfile(path):
        stored = read_json(path, "search record",
                           "remove it (and that search's folder, to search again)")
        legacy = stored.get("objective") == ["val_loss", "min"]   # scored by versions before 2026-11-28
        if legacy and settings.get("objective") == ["val_cross_entropy", "min"] \
                and settings.get("method") not in recipe.SP_METHODS:
            # Earlier versions scored Keras' val_loss, which is the cross-entropy
            # for methods without a penalty: the same search.
            stored = dict(stored, objective=settings["objective"])
        # A key the file lacks was not recorded by the version that wrote it.
        differ = [k for k in sorted(set(stored) | set(settings)) if k in stored and stored[k] != settings.get(k)]
        if differ:
            diff = ", ".join(f"{k}: {_short(stored.get(k))} stored vs {_short(settings.get(k))} now" for k in differ)
            if legacy and "objective" in differ:
                diff += ("; keras-spft before 2026-11-28 scored 'val_loss', which adds the "
                         f"{settings.get('method')} penalty, so those trials do not compare with these")
            if "grid_points" in differ:
                diff += ("; with tuner='grid', `max_trials` sets the points per range, "
                         "so a grid search cannot grow")
            raise ValueError(
                f"'{project}' holds a search made with other settings ({diff}); resuming would mix its "
                "trials with these. Pass overwrite=True, another project_name or another directory "
                "(on the command line: another --out, or remove that folder)."
            )
    elif os.path.isfile(os.path.join(project, "oracle.json")) and os.environ.get(
            "KERASTUNER_TUNER_ID", "chief") == "chief":   # a worker may start before the chief writes it
        warnings.warn(f"'{project}' holds a search whose settings were not recorded; resuming it "
                      "as if they were these.", RuntimeWarning, stacklevel=3)


def _short(value):
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _store_settings(project, settings):
    atomic_json(os.path.join(project, SETTINGS_FILE), settings)   # several workers may write


def _require_val(val):
    if val is None:   # KerasTuner would fail each trial only after training it
        raise ValueError("search needs validation data `val` (the objective is scored on it), got None.")


def _number(value):
    """A numeric hyper-parameter as a float; a string or bool one (an
    `hp.Choice` of the tuner's own `hyperparameters=`) as it is."""
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else value


def _fmt(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _result(tuner, method, objective):
    trials = [
        t for t in tuner.oracle.get_best_trials(num_trials=10**6)
        if t.score is not None
    ]
    # Best first, ties to the earliest trial: KerasTuner leaves tied trials in
    # the order of their files on disk after a reload, so the same finished
    # search could name another best each time it was read.
    sign = -1.0 if tuner.oracle.objective.direction == "max" else 1.0
    trials.sort(key=lambda t: (sign * float(t.score), _trial_order(t.trial_id)))
    # Hyperband adds its own bookkeeping ("tuner/epochs", "tuner/bracket",
    # ...) to each trial's values: not hyper-parameters of the method.
    rows = [
        {"trial_id": t.trial_id,
         **{k: _number(v) for k, v in t.hyperparameters.values.items() if not k.startswith("tuner/")},
         "score": float(t.score)}
        for t in trials
    ]
    failed = [{"trial_id": t.trial_id, "error": ((t.message or "").strip().splitlines() or ["?"])[-1]}
              for t in tuner.oracle.trials.values() if t.status == keras_tuner.engine.trial.TrialStatus.FAILED]
    if failed:
        # KerasTuner logs a failed trial and goes on: its scores are missing
        # from the result (with Hyperband, whole successive-halving rounds).
        warnings.warn(f"{len(failed)} of {len(tuner.oracle.trials)} trials failed; the first "
                      f"(trial {failed[0]['trial_id']}): {failed[0]['error']}", RuntimeWarning)
    if not rows:
        raise RuntimeError("the search completed no trial; see the tuner's log above."
                           + (f" First error: {failed[0]['error']}" if failed else ""))
    best = {k: v for k, v in rows[0].items() if k not in ("trial_id", "score")}
    return SearchResult(method, best, rows[0]["score"], objective, rows, tuner, failed)


def _trial_order(trial_id):
    """KerasTuner's trial ids ("00", "01", ...; Hyperband's too) in the order
    they were made."""
    return (0, int(trial_id), "") if str(trial_id).isdigit() else (1, 0, str(trial_id))


def _array_data(data, what):
    """`data` as `search` hands it on: arrays come as `(x, y)` or `(x, y,
    sample_weight)`, a list taken as a tuple (as in Keras' own data
    handling); any other tuple or list, or an array alone (no targets), is
    refused up front, not in every trial."""
    if isinstance(data, list):
        data = tuple(data)
    if (isinstance(data, tuple) and len(data) not in (2, 3)) or getattr(data, "shape", None) is not None:
        got = f"a sequence of {len(data)}" if isinstance(data, tuple) else "an array alone"
        raise ValueError(f"search: array data `{what}` must be `(x, y)` or `(x, y, sample_weight)`, got {got}.")
    return data


def search(
    build_model,
    train,
    val,
    method="mars-pgm",
    *,
    epochs=30,
    tuner="bayesian",
    max_trials=20,
    objective="val_accuracy",
    ranges=None,
    lr=recipe.DEFAULT_LR,
    radius_lr=recipe.DEFAULT_RADIUS_LR,
    wrap_options=None,
    directory=None,
    project_name=None,
    overwrite=False,
    seed=0,
    verbose=1,
    batch_size=None,
    **tuner_kwargs,
):
    """Searches a method's radii (or strengths) on train -> val with KerasTuner.

    Args:
        build_model: function with no arguments returning a new pre-trained
            model with its head (see `SPFTHyperModel`).
        train: training data, e.g. `load_data(..., stage="tune").train`
            (a `tf.data.Dataset`, a `keras.utils.PyDataset`...), or NumPy
            arrays as a tuple (or list) `(x, y)` or `(x, y, sample_weight)`.
        val: validation data, e.g. `load_data(..., stage="tune").eval`,
            or `(x_val, y_val)`.
        method: a `wrap_pretrained` method name or `"delta"`.
        epochs: epochs per trial.
        tuner: `"bayesian"` (default), `"random"`, `"hyperband"`, `"grid"`,
            or any `keras_tuner.Tuner` subclass (built with the hypermodel,
            objective, `max_trials`, directory and seed; add its other
            arguments as `**tuner_kwargs`) or an already built tuner instance
            (then `build_model`, `method`, `ranges`, `objective` and
            `max_trials` are the instance's business).
        max_trials: trials to run (20 as in the paper). Not used by
            `"hyperband"`, whose budget is `max_epochs` (default: `epochs`)
            and `factor` (pass them as `**tuner_kwargs`).
        objective: `"val_accuracy"` (default) or `"val_loss"`, which scores
            the validation cross-entropy (`"val_cross_entropy"`, also taken):
            Keras' own `val_loss` adds the penalties of L2-SP and MARS-SP,
            whose size depends on the strength searched. Or a
            `keras_tuner.Objective` (of a metric the trials log).
        ranges: overrides of the search ranges, see `SPFTHyperModel`.
        lr: learning rate when it is not searched.
        radius_lr: step size of the learned radii (methods `*-learned`).
        wrap_options: further `wrap_pretrained` keyword arguments.
        directory: where KerasTuner keeps its trials; a search started again
            with the same directory and project name resumes (finished trials
            are not redone) unless `overwrite=True`. The search's settings
            (build_model by its code and closure, seed, method, objective,
            tuner, ranges, epochs, lr, radius_lr, wrap_options) are stored
            there, and resuming with other ones is an error (`max_trials` may
            grow, except for `"grid"`, whose grid it sets; the data is yours
            to keep the same). Default: a temporary folder (no resume).
        project_name: sub-folder name (default `spft_<method>`).
        overwrite: start afresh.
        seed: fixes the search: the tuner's choices (KerasTuner gets
            `seed + 1`, as it reads 0 as "no seed") and each trial's start
            (see `SPFTHyperModel`), from 0 to 2**32 - 2. `None`: neither is
            seeded.
        verbose: passed to `fit`.
        batch_size: passed to `fit` for array data (Keras' default: 32);
            an error with a dataset, which is batched already.
        **tuner_kwargs: further arguments of the tuner class.

    Returns:
        A `SearchResult`: `.best` (dict of values), `.best_score`, `.trials`,
        `.table()`; `print(result)` shows both.

    Raises:
        ValueError: an unknown tuner name, method or objective, a bad range,
            a resumed search whose stored settings differ.

    Example:

    ```python
    result = search(lambda: build_model("mobilenet", 17, alpha=0.25),
                    splits.train, splits.eval, method="mars-pgm", epochs=10)
    print(result)
    ```
    """
    epochs = check_count(epochs, "epochs", "search")
    train, val = _array_data(train, "train"), _array_data(val, "val")
    arrays = isinstance(train, tuple)   # `fit` takes them apart
    if batch_size is not None and not arrays:
        raise ValueError("`batch_size` applies to array data `(x, y)`; a dataset or generator is batched already.")
    if isinstance(objective, str):
        if objective not in OBJECTIVES:
            hint = (" (a search scores the validation data, not the training data)"
                    if "val_" + objective in OBJECTIVES else "")
            raise ValueError(f"unknown objective {objective!r}; expected one of {sorted(OBJECTIVES)}{hint}.")
        objective = keras_tuner.Objective(*OBJECTIVES[objective])
    if isinstance(tuner, keras_tuner.Tuner):
        instance = tuner
        method = getattr(instance.hypermodel, "method", method)
        _require_val(val)
    else:
        if isinstance(tuner, str):
            if tuner not in TUNERS:
                raise ValueError(f"unknown tuner {tuner!r}; expected one of {sorted(TUNERS)} or a keras_tuner.Tuner class.")
            cls = TUNERS[tuner]
            if tuner == "bayesian":
                _require_sklearn()
        elif isinstance(tuner, type) and issubclass(tuner, keras_tuner.Tuner):
            cls = tuner
        else:
            raise ValueError(f"`tuner` must be a name, a keras_tuner.Tuner subclass or instance, got {tuner!r}.")
        _checked_seed(seed, 2**32 - 2, "2**32 - 2 (KerasTuner gets seed + 1)")
        hypermodel = SPFTHyperModel(build_model, method, ranges=ranges, lr=lr, radius_lr=radius_lr,
                                    wrap_options=wrap_options, seed=seed)
        searched = sum(isinstance(v, tuple) for v in hypermodel.ranges.values())
        if not issubclass(cls, keras_tuner.Hyperband):
            # KerasTuner reads max_trials=0 (or None) as no limit: it would search forever.
            max_trials = check_count(max_trials, "max_trials", "search")
        if issubclass(cls, keras_tuner.GridSearch) and searched:
            # KerasTuner's grid over an unstepped range takes 10 values each,
            # so 20 trials of a 10 x 10 grid would hardly move the first
            # hyper-parameter: as many values per range as the trials allow.
            if max_trials < _grid_min_trials(searched):
                raise ValueError(
                    f"tuner='grid' over {searched} searched range(s) needs at least {_grid_min_trials(searched)} trials "
                    f"(both ends of each range), got max_trials={max_trials}: it would leave grid points "
                    "untried. Raise max_trials, fix some values, or use tuner='random'.")
            hypermodel.grid_points = int(math.floor(max_trials ** (1.0 / searched) + 1e-9))
        _require_val(val)
        if directory is None:
            import tempfile

            directory = tempfile.mkdtemp(prefix="keras_spft_search_")
        project_name = project_name or f"spft_{method}"
        kwargs = dict(
            hypermodel=hypermodel,
            objective=objective,
            directory=directory,
            project_name=project_name,
            overwrite=overwrite,
            seed=None if seed is None else int(seed) + 1,
        )
        if issubclass(cls, keras_tuner.Hyperband):
            kwargs["max_epochs"] = tuner_kwargs.pop("max_epochs", epochs)
        else:
            kwargs["max_trials"] = max_trials
        settings = _fingerprint({
            "build_model": build_model, "seed": seed,
            "method": method, "objective": [objective.name, objective.direction], "tuner": cls.__name__,
            "ranges": hypermodel.ranges, "grid_points": hypermodel.grid_points, "epochs": epochs,
            "batch_size": None if batch_size is None else int(batch_size),
            "lr": hypermodel.lr, "radius_lr": hypermodel.radius_lr, "wrap_options": hypermodel.wrap_options,
            "tuner_kwargs": {k: v for k, v in {**tuner_kwargs, **({"max_epochs": kwargs["max_epochs"]}
                                                                  if "max_epochs" in kwargs else {})}.items()
                             if k != "distribution_strategy"},
        })
        project = os.path.join(directory, project_name)
        if not overwrite:
            _check_resumed(project, settings)
        instance = cls(**kwargs, **tuner_kwargs)
        _store_settings(project, settings)
    _without_tensorboard(instance)
    fit_kwargs = {} if batch_size is None else {"batch_size": int(batch_size)}
    if arrays and len(train) == 3:
        fit_kwargs["sample_weight"] = train[2]
    instance.search(*(train[:2] if arrays else (train,)), validation_data=val, epochs=epochs, verbose=verbose,
                    **fit_kwargs)
    return _result(instance, method, instance.oracle.objective.name)
