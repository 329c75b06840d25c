"""The training state: one pytree holding everything a run needs to continue."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sgdjax._averaging import EmaState, ema_init, ema_value


@flax.struct.dataclass
class TrainState:
    """Step, parameters, model state, optimizer state and PRNG key, as one pytree.

    Attributes:
      step: int32 number of training steps taken.
      params: the model parameters.
      model_state: the model's other collections, e.g. ``{"batch_stats": ...}``.
      opt_state: the optimizer state.
      rng: the run's training key, fixed for the whole run: step ``t`` draws its
        randomness from ``fold_in(rng, t)``, so every step's keys are functions of
        the seed and the step alone (a resumed run draws exactly the same ones).
      ema: ``None``, or an :class:`sgdjax.EmaState` averaging
        ``{"params": params, **model_state}`` (kept by steps built with
        ``ema_decay``), so the averaged model has matching BatchNorm statistics.
      slow: ``None``, or lookahead's slow copy of ``{"params": params, **model_state}``
        (see ``Config.lookahead_period``).
      apply_fn: the model's ``apply`` (static, not part of the pytree).
      tx: the gradient transformation (static).
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    rng: jax.Array
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    ema: EmaState | None = None
    slow: Any = None

    def averaged(self, decay: float, *, debias: bool = True) -> TrainState:
        """This state with the moving averages in place of parameters and model state.

        Evaluate the returned state to score the averaged model. ``decay`` must be the
        one the steps used (it sets the debiasing factor ``1 - decay^t``).
        """
        if self.ema is None:
            raise ValueError("this state keeps no average: create it with ema=True")
        average = ema_value(self.ema, decay, debias=debias)
        return self.replace(
            params=average["params"],
            model_state={name: value for name, value in average.items() if name != "params"},
        )

    @classmethod
    def create(
        cls,
        *,
        model: nn.Module,
        tx: optax.GradientTransformation,
        rng: jax.Array,
        sample_input: jax.Array,
        ema: bool = False,
        slow: bool = False,
    ) -> TrainState:
        """Initialises the model's variables and the optimizer state.

        Args:
          model: a Flax module called as ``model(x, train=...)``.
          tx: any sgdjax or optax transform.
          rng: a PRNG key; split into the init key and the training key.
          sample_input: a batch of the input shape (its values are not used).
          ema: also start a moving average of the parameters and model state
            (see ``make_train_step(ema_decay=...)``).
          slow: also keep lookahead's slow copy of the parameters and model state.

        Returns:
          A new :class:`TrainState` at step 0.
        """
        init_key, train_key = jax.random.split(rng)
        variables = model.init(init_key, sample_input, train=False)
        params = variables["params"]
        model_state = {name: value for name, value in variables.items() if name != "params"}
        return cls(
            step=jnp.zeros([], jnp.int32),
            params=params,
            model_state=model_state,
            opt_state=tx.init(params),
            rng=train_key,
            apply_fn=model.apply,
            tx=tx,
            ema=ema_init({"params": params, **model_state}) if ema else None,
            slow={"params": params, **model_state} if slow else None,
        )
