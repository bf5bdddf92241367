"""Learned radii: one radius per kernel, learned online during `model.fit`.

Fast Trainable Projection (FTP, Tian et al., NeurIPS 2023) treats each layer's
radius as a parameter. After a projection `W_t = A + P_r(W~_t - A)`, the
next batch's gradient `g` gives the loss gradient with respect to the radius
by the chain rule, `<g, dW_t/dr>`, and the radius takes an Adam step on it
before the next projection. A Keras constraint never sees gradients, so the
learning lives in an optimizer wrapper, `RadiusOptimizer`, in the manner of
`keras.optimizers.LossScaleOptimizer`: the radii are tracked as optimizer
variables, which makes the whole step stateless on JAX and keeps the radii in
`model.save`/`save_weights` (they are also saved with their constraint).
"""

import warnings

import numpy as np
import keras
from keras import ops
from keras.src.utils import tracking

from keras_spft.anchors import check_positive, is_number
from keras_spft.constraints import (
    _DistanceConstraint,
    radius_learning,
)

__all__ = ["RadiusOptimizer", "learned_radii"]


def distance_constraints(variables):
    """`[(variable, constraint)]` for the variables with a keras-spft constraint."""
    return [(v, v.constraint) for v in variables
            if isinstance(getattr(v, "constraint", None), _DistanceConstraint)]


def learned_constraints(variables):
    """`[(variable, constraint)]` for the variables whose radius is learned."""
    return [(v, c) for v, c in distance_constraints(variables) if c.learn_radius]


def learned_radii(model):
    """The current learned radii of a model, by constraint name.

    Args:
        model: a model wrapped with `radius="learned"` (or holding
            constraints made with `learn_radius=True`).

    Returns:
        `{name: radius}` as Python floats, in layer order.

    Example:

    ```python
    keras_spft.wrap_pretrained(model, radius="learned", head_radius=8.0)
    model.compile(optimizer=keras_spft.RadiusOptimizer(keras.optimizers.Adam(1e-4)), loss=...)
    model.fit(...)
    keras_spft.learned_radii(model)   # {"mobilenet/conv1/kernel": 0.42, ...}
    ```
    """
    return {
        c.name or v.path: float(ops.convert_to_numpy(c.radius.value))
        for v, c in learned_constraints(model.weights)   # frozen layers' radii too
    }


#: The base optimizer's options at their defaults: harmless when passed to
#: RadiusOptimizer (Keras may pass them); any other value belongs on the inner one.
_BASE_DEFAULTS = {"learning_rate": None, "weight_decay": None, "clipnorm": None, "clipvalue": None,
                  "global_clipnorm": None, "use_ema": False, "ema_momentum": 0.99,
                  "ema_overwrite_frequency": None, "loss_scale_factor": None,
                  "gradient_accumulation_steps": None}


@keras.saving.register_keras_serializable(package="keras_spft")
class RadiusOptimizer(keras.optimizers.Optimizer):
    """Wraps an optimizer so that it learns the radii of the constraints.

    Every kernel whose constraint was made with `learn_radius=True` (e.g. by
    `wrap_pretrained(model, radius="learned")`) gets its radius learned as in
    FTP: at each step, before the wrapped optimizer updates the kernels, the
    radius takes one Adam step along `<g, dW/dr>`, the gradient of the loss
    through the last projection (`keras_spft.ops.l1_radius_gradient`); then
    the wrapped optimizer updates the kernels and the constraints project them
    with the new radii. A radius stays in `[1e-4, largest row distance]`, so
    the bound always holds with the current radius.

    On JAX it also carries the anchors and fixed radii of every keras-spft
    constraint it optimizes as optimizer state, which matters with fixed
    radii too: a plain optimizer's compiled step closes over the anchors as
    constants, which held two extra copies of them (measured with XLA's
    memory analysis); carried as state they are inputs of the step, one copy
    in all. The anchors are saved by their constraints, not again with the
    optimizer (except under `mixed_float16` on JAX, where Keras'
    `LossScaleOptimizer` saves all state it holds). TensorFlow and PyTorch
    steps read the variables themselves.

    Args:
        inner_optimizer: the `keras.optimizers.Optimizer` that trains the
            weights (learning rate, schedule, clipping: all its own).
        radius_learning_rate: Adam step size of the radii (FTP: `1e-2`), in
            units of the radius (an L1 or Frobenius distance).
        shrink_factor: FTP's `k` in `[0, 1]`: gradients that would shrink a
            radius are multiplied by it (`1`: plain Adam; `0`: radii only
            grow).
        beta_1, beta_2, epsilon: Adam constants of the radius updates.
        name: optimizer name.

    Example:

    ```python
    keras_spft.wrap_pretrained(model, radius="learned")
    model.compile(
        optimizer=keras_spft.RadiusOptimizer(keras.optimizers.Adam(1e-4)),
        loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=2, callbacks=[keras_spft.DistanceMonitor()])
    keras_spft.learned_radii(model)   # {"conv1/kernel": 0.0213, ...}
    ```
    """

    def __init__(self, inner_optimizer, radius_learning_rate=1e-2, shrink_factor=1.0,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, name=None, **kwargs):
        unsupported = {k: v for k, v in kwargs.items() if k not in _BASE_DEFAULTS or v != _BASE_DEFAULTS[k]}
        if unsupported:
            raise ValueError(
                "RadiusOptimizer does not take "
                f"{', '.join(sorted(unsupported))}: set them on the inner optimizer."
            )
        super().__init__(learning_rate=0.0, name=name)
        if isinstance(inner_optimizer, (dict, str)):
            inner_optimizer = keras.optimizers.get(inner_optimizer)
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise ValueError(
                "RadiusOptimizer: `inner_optimizer` must be a keras optimizer, "
                f"got {inner_optimizer!r}."
            )
        if isinstance(inner_optimizer, RadiusOptimizer):
            raise ValueError("RadiusOptimizer: the inner optimizer already learns radii.")
        if isinstance(inner_optimizer, keras.optimizers.LossScaleOptimizer):
            raise ValueError(
                "RadiusOptimizer: the inner optimizer is a LossScaleOptimizer, "
                "whose gradients are still scaled (and inf on overflow steps) "
                "when the radii read them; wrap the other way round, "
                "`LossScaleOptimizer(RadiusOptimizer(...))`, which "
                "`model.compile` does itself under the mixed_float16 policy."
            )
        try:
            ok = 0 < float(radius_learning_rate) < float("inf")
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"RadiusOptimizer: `radius_learning_rate` must be a positive finite number, got {radius_learning_rate!r}."
            )
        for what, b in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not (is_number(b) and 0.0 <= b < 1.0):
                raise ValueError(f"RadiusOptimizer: `{what}` must be a number in [0, 1), got {b!r}.")
        check_positive(epsilon, "epsilon", "RadiusOptimizer")
        if not (is_number(shrink_factor) and 0.0 <= shrink_factor <= 1.0):
            raise ValueError(
                f"RadiusOptimizer: `shrink_factor` must be a number in [0, 1], got {shrink_factor!r}."
            )
        self.inner_optimizer = inner_optimizer
        self.radius_learning_rate = float(radius_learning_rate)
        self.shrink_factor = float(shrink_factor)
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)

    @tracking.no_automatic_dependency_tracking
    def build(self, var_list):
        if self.built:   # as Keras' optimizers: a second call (e.g. before load_weights) keeps the state
            return
        # Checked before the inner optimizer is built: built on the variables
        # of a refused attempt, it would refuse the next one's.
        self._bind_constraints(var_list)
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @tracking.no_automatic_dependency_tracking
    def rebind(self):
        """Takes up the constraints now on its variables.

        `wrap_pretrained` calls it when it wraps a model whose optimizer this
        is, already built: the state of the old constraints (their radii and
        anchors, the radii's Adam moments) is dropped and that of the new
        ones taken up; the inner optimizer's state is kept. After setting
        constraints by hand, call it and compile the model again
        (`model.compile(optimizer=model.optimizer, ...)`): TensorFlow and JAX
        compiled the train step with the constraints it saw.
        """
        self._check_accumulation(distance_constraints(self._trainable_variables))   # before dropping anything
        drop = {id(v) for v in self._bound}
        # In place: Keras' tracker appends to this very list.
        self._variables[:] = [v for v in self._variables if id(v) not in drop]
        self._tracker.stored_ids["variables"] -= drop
        # No constraint left (wrapped again with "none" or a penalty): it then
        # steps as its inner optimizer alone.
        self._bind_constraints(self._trainable_variables, allow_none=True)

    def _bind_constraints(self, var_list, allow_none=False):
        constrained = distance_constraints(var_list)
        if not list(var_list) and not allow_none:
            raise ValueError(
                "RadiusOptimizer: built on no variables at all. Keras' legacy HDF5 loader does this "
                "(`keras.models.load_model('model.h5')`); that format does not keep keras-spft's anchors "
                "either: save with `model.save('model.keras')` or `model.save_weights('model.weights.h5')`.")
        if not constrained and not allow_none:
            raise ValueError(
                "RadiusOptimizer: none of the weights it trains has a keras-spft constraint: "
                "either the constrained kernels are frozen (e.g. `base.trainable = False` for a "
                "head-only phase: train that phase with the inner optimizer alone, and compile "
                "with a RadiusOptimizer after unfreezing), or the model is not wrapped "
                "(`wrap_pretrained(model, radius=\"learned\")` first)."
            )
        learned = [(v, c) for v, c in constrained if c.learn_radius]
        self._check_accumulation(constrained)
        self._learned = learned
        self._constraint_of = {id(v): id(c) for v, c in constrained}
        before = len(self._variables)
        if learned:
            self._radius_step = self.add_variable(
                shape=(), dtype="float32", initializer="zeros", name="radius_step"
            )
            # Adam moments of all radii as two vectors: the update is a
            # handful of ops however many kernels there are.
            n = len(learned)
            self._radius_m = self.add_variable(shape=(n,), dtype="float32", initializer="zeros", name="radius_m")
            self._radius_v = self.add_variable(shape=(n,), dtype="float32", initializer="zeros", name="radius_v")
        # Only JAX steps are stateless: there the optimizer's state carries
        # the constraints' own radius variables (so a radius assigned or
        # loaded later is the one in force, instead of a constant compiled
        # into the step) and the anchors (inputs of the step instead of
        # constants, which held two extra copies of them). TensorFlow and
        # PyTorch read the variables themselves; tracked there, Keras'
        # LossScaleOptimizer (mixed_float16) saved every anchor again. Neither
        # is written by `save_own_variables` (their constraints save them).
        as_state = keras.backend.backend() == "jax"
        for _, c in constrained:
            if as_state or c.learn_radius:
                self._track_variable(c.radius)
        self._fixed_radii = [c.radius for _, c in constrained if not c.learn_radius and as_state]
        self._anchors = []
        seen = set()
        for _, c in constrained:
            if as_state and c.anchor is not None and id(c.anchor) not in seen:
                seen.add(id(c.anchor))
                self._track_variable(c.anchor)
                self._anchors.append(c.anchor)
        self._bound = self._variables[before:]   # what `rebind` drops

    def _check_accumulation(self, constrained):
        """Refuses learned radii among `constrained` (`[(variable,
        constraint)]`) whose kernels an accumulating optimizer steps."""
        _check_learned_accumulation(self.inner_optimizer, [v for v, c in constrained if c.learn_radius],
                                   "RadiusOptimizer: ")

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    @property
    def _model_variables_moving_average(self):
        # The inner optimizer's moving averages (`use_ema=True`), for Keras'
        # SwapEMAWeights: it looks through one wrapper only, which under
        # mixed_float16 is the LossScaleOptimizer around this one. Missing
        # (AttributeError) where the inner optimizer keeps none.
        return self.inner_optimizer._model_variables_moving_average

    def _update_radii(self, grads, trainable_variables):
        if not self._learned:
            return
        index = {id(v): i for i, v in enumerate(trainable_variables)}
        step = self._radius_step.value + 1.0
        self._radius_step.assign(step)
        rg, has = [], []
        for var, c in self._learned:
            i = index.get(id(var))
            if i is None or grads[i] is None:
                rg.append(ops.zeros((), "float32"))
                has.append(False)
            else:
                rg.append(ops.cast(c.radius_gradient(grads[i], var.value), "float32"))
                has.append(True)
        g = ops.stack(rg)
        g = ops.where(g > 0, g * self.shrink_factor, g)
        b1, b2 = self.beta_1, self.beta_2
        # A radius not stepped (its layer frozen) keeps its moments, as the
        # inner optimizer keeps those of its kernel.
        stepped = ops.convert_to_tensor(np.asarray(has))
        m = ops.where(stepped, b1 * self._radius_m.value + (1.0 - b1) * g, self._radius_m.value)
        v = ops.where(stepped, b2 * self._radius_v.value + (1.0 - b2) * ops.square(g), self._radius_v.value)
        self._radius_m.assign(m)
        self._radius_v.assign(v)
        m_hat = m / (1.0 - ops.power(b1, step))
        v_hat = v / (1.0 - ops.power(b2, step))
        delta = self.radius_learning_rate * m_hat / (ops.sqrt(v_hat) + self.epsilon)
        delta = ops.where(stepped, delta, 0.0)
        for k, (_, c) in enumerate(self._learned):
            c.radius.assign(ops.maximum(c.radius.value - delta[k], c.min_radius))

    def apply(self, grads, trainable_variables=None):
        _refuse_tf_distribution()
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)   # an iterator is read once
        if not self.built:
            if trainable_variables is None:
                raise ValueError(
                    "When passing `grads` without `variables`, the optimizer must already be built on a "
                    "list of variables. Call `optimizer.build(trainable_variables)` first.")
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        tvs = self._trainable_variables if trainable_variables is None else trainable_variables
        known = {id(v) for v in self._trainable_variables}
        unknown = [v.path for v in tvs if id(v) not in known]
        if unknown:
            raise ValueError(
                f"RadiusOptimizer: it was built for other variables than {', '.join(unknown[:3])}"
                f"{', ...' if len(unknown) > 3 else ''} (layers frozen when it was built, unfrozen since?). "
                "Compile the model again with a new RadiusOptimizer, e.g. "
                "`model.compile(optimizer=keras_spft.RadiusOptimizer(...), ...)`.")
        # Each variable stepped must carry the constraint it was bound with
        # (or none, as then); a subset of the variables (a layer frozen since)
        # is fine: its radii simply do not move.
        current = {id(v): id(c) for v, c in distance_constraints(tvs)}
        if current != {id(v): self._constraint_of[id(v)] for v in tvs if id(v) in self._constraint_of}:
            raise ValueError(
                "RadiusOptimizer: the model's keras-spft constraints changed after this "
                "optimizer was built (wrap_pretrained called again?); its state holds "
                "the old radii and anchors. Compile the model again with a new "
                "RadiusOptimizer, e.g. `model.compile(optimizer=keras_spft.RadiusOptimizer(...), ...)`."
            )
        grads = list(grads)
        self._update_radii(grads, tvs)
        with radius_learning():
            self.inner_optimizer.apply(grads, trainable_variables=trainable_variables)

    def _saved_variables(self, with_inner=False):
        # Anchors and fixed radii are saved by their constraints, the inner
        # optimizer's state by the inner optimizer (a child in the file).
        skip = {id(a) for a in self._anchors + self._fixed_radii} if self.built else set()
        return [v for v in (self.variables if with_inner else self._variables) if id(v) not in skip]

    def save_own_variables(self, store):
        for i, variable in enumerate(self._saved_variables()):
            store[str(i)] = variable.numpy()

    def load_own_variables(self, store):
        variables = self._saved_variables()
        if len(store.keys()) != len(variables) and len(store.keys()) == len(self._saved_variables(True)):
            # A file of keras-spft 0.1.0 before 2026-11-28, which saved the inner
            # optimizer's state here too (the same values as its own entry).
            variables = self._saved_variables(True)
        if len(store.keys()) != len(variables):
            warnings.warn(
                f"Skipping variable loading for optimizer '{self.name}': it has "
                f"{len(variables)} variables to restore, the saved state {len(store.keys())}.",
                stacklevel=2,
            )
            return
        for i, variable in enumerate(variables):
            variable.assign(store[str(i)])

    # -- delegated to the inner optimizer --------------------------------
    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)
        if _uses_ema(self.inner_optimizer):
            # Keras updates the moving average before its constraints project
            # the step, so the average of unprojected iterates (and the
            # head's random start) replaces the weights at the end of `fit`:
            # project it once, with the radii in force.
            for var, c in distance_constraints(var_list):
                var.assign(c.project(var))

    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": _portable(keras.saving.serialize_keras_object(self.inner_optimizer)),
            "radius_learning_rate": self.radius_learning_rate,
            "shrink_factor": self.shrink_factor,
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["inner_optimizer"] = keras.saving.deserialize_keras_object(
            _portable(config["inner_optimizer"]), custom_objects=custom_objects
        )
        return cls(**config)


def _steppers(optimizer, variables):
    """The optimizers that step `variables`: for a `MultiOptimizer`, the
    sub-optimizers its map gives them (asked of the map, so built or not);
    else `optimizer` itself."""
    mapping = getattr(optimizer, "_optimizer_map", None)
    if not (callable(mapping) and hasattr(optimizer, "optimizers")):
        return [optimizer]
    found = []
    for v in variables:
        o = mapping(v)
        if all(o is not f for f in found):
            found.append(o)
    return found


def _check_learned_accumulation(optimizer, learned_variables, who):
    """Raises `ValueError` when an optimizer (the inner optimizer, or the
    sub-optimizer of an inner `MultiOptimizer` that trains them) steps
    kernels with learned radii while it accumulates gradients: the radii
    would step on every batch, the kernels only on every k-th."""
    if not learned_variables:
        return
    found = [o for o in _steppers(optimizer, learned_variables) if getattr(o, "gradient_accumulation_steps", None)]
    if found:
        which = ", ".join(f"the {'inner ' if o is optimizer else 'sub-'}optimizer {o.name!r}" for o in found)
        raise ValueError(
            f"{who}{which} accumulates gradients (`gradient_accumulation_steps`), but learned radii "
            "need one update per batch: the radii would step on every batch, the kernels only on every "
            "k-th. Fixed radii work with it.")


def _uses_ema(optimizer):
    """Whether `optimizer`, or a sub-optimizer of it (`MultiOptimizer`),
    keeps a moving average (`use_ema=True`)."""
    return any(getattr(o, "use_ema", False) for o in [optimizer] + list(getattr(optimizer, "optimizers", []) or []))


def _portable(config):
    """An optimizer's serialized form that loads on every backend: Keras names
    the PyTorch backend's own classes (`keras.src.backend.torch.optimizers.
    torch_adam.Adam`), which TensorFlow and JAX cannot train with; the public
    `keras.optimizers.Adam` is that class on PyTorch and the right one elsewhere."""
    if (isinstance(config, dict) and str(config.get("module", "")).startswith("keras.src.backend.")
            and hasattr(keras.optimizers, config.get("class_name", ""))):
        config = dict(config, module="keras.optimizers")
    return config


def _refuse_tf_distribution():
    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    if tf.distribute.has_strategy() and tf.distribute.get_strategy().num_replicas_in_sync > 1:
        raise ValueError(
            "RadiusOptimizer (learned or fixed radii) is not supported under a "
            "tf.distribute strategy with several replicas: for fixed radii, "
            "compile with its inner optimizer (on TensorFlow the constraints "
            "need nothing else); learned radii train on one device."
        )
