"""Flax NNX models in the pure train step: the NNX ConvNet and a Linen-style face for NNX.

The training layer's state holds plain pytrees and calls
``apply_fn(variables, x, train=..., mutable=...)`` as Linen does. :class:`NNXModel`
gives an NNX module that face: ``nnx.split`` once into a static graph definition
and plain dicts of parameters and BatchNorm statistics, and inside every (jitted,
pure) call ``nnx.merge`` them, run the module and split the new statistics out.
Nothing else in the step, the optimizer, the checkpoints or the parallel modes
changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sgdjax._base import check_trees_match
from sgdjax.training._models import conv_for, max_pool_2x2


class NNXConvNet(nnx.Module):
    """The tutorial CNN of :class:`sgdjax.training.ConvNet`, written in Flax NNX.

    conv3x3(32) - BN - ReLU - maxpool2 - conv3x3(64) - BN - ReLU - maxpool2 - dense(10),
    the same layers, initializers, BatchNorm settings (momentum 0.9 in flax's sense,
    epsilon 1e-5) and dtypes as the Linen module. The submodules carry Linen's
    automatic names (``Conv_0``, ``BatchNorm_0``, ..., ``Dense_0``) so that the NNX
    state, as plain dicts, is the very tree of the Linen variables: weights load
    from one into the other with :func:`load_linen_variables`, and checkpoints of
    either API hold the same arrays under the same names.

    Args:
      num_classes: outputs of the classifier.
      widths: channels of the convolutions (one conv-BN-ReLU-pool stage each).
      in_channels: channels of the input images.
      image_size: height and width of the input images (NNX layers are built
        with their input sizes; Linen infers them at ``init``).
      dtype: compute dtype (parameters stay float32).
      bn_axis_name: a mapped axis to average BatchNorm statistics over (``pmap``).
      kernel_grad: the convolutions' kernel gradient, ``"xla"`` or ``"shifted"``
        (:func:`sgdjax.training.choose_kernel_grad`).
      rngs: the initializers' keys, e.g. ``nnx.Rngs(0)``.

    Example::

      model = NNXConvNet(rngs=nnx.Rngs(0))
      logits = model(jnp.zeros((8, 32, 32, 3)))  # (8, 10)

    Raises:
      ValueError: if a size is not positive or the image vanishes under pooling.
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        widths: Sequence[int] = (32, 64),
        in_channels: int = 3,
        image_size: int = 32,
        dtype: Any = jnp.float32,
        bn_axis_name: str | None = None,
        kernel_grad: str = "xla",
        rngs: nnx.Rngs,
    ):
        widths = tuple(widths)
        for name, value in (
            ("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)
        ):  # fmt: skip
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not widths or any(not isinstance(w, int) or w <= 0 for w in widths):
            raise ValueError(f"widths must be positive integers, got {widths!r}")
        size = image_size
        for _ in widths:
            size //= 2
        if size == 0:
            raise ValueError(f"image_size={image_size} vanishes after {len(widths)} 2x2 poolings")
        conv = conv_for(kernel_grad)  # validates it
        self.num_stages = len(widths)
        self.dtype = dtype
        channels = in_channels
        for index, features in enumerate(widths):
            layer = nnx.Conv(
                channels, features, (3, 3), padding="SAME", dtype=dtype,
                conv_general_dilated=conv, rngs=rngs,  # the Linen net's
            )  # fmt: skip
            norm = nnx.BatchNorm(
                features, momentum=0.9, epsilon=1e-5, dtype=dtype, axis_name=bn_axis_name, rngs=rngs
            )
            setattr(self, f"Conv_{index}", layer)
            setattr(self, f"BatchNorm_{index}", norm)
            channels = features
        self.Dense_0 = nnx.Linear(channels * size * size, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits (float32) of NHWC images; BatchNorm as set by ``.train()``/``.eval()``."""
        x = x.astype(self.dtype)
        for index in range(self.num_stages):
            x = getattr(self, f"Conv_{index}")(x)
            x = getattr(self, f"BatchNorm_{index}")(x)
            x = max_pool_2x2(nnx.relu(x))
        x = x.reshape(x.shape[0], -1)
        return self.Dense_0(x).astype(jnp.float32)


def _split(model: nnx.Module) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """The graph definition and ``{"params": ..., "batch_stats": ...}`` as plain dicts."""
    graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    if jax.tree.leaves(rest):
        kinds = sorted({type(v).__name__ for _, v in nnx.to_flat_state(rest)})
        raise ValueError(
            "only nnx.Param and nnx.BatchStat state can live in a pure train step; "
            f"the model also holds {', '.join(kinds)} (e.g. Dropout's Rngs): pass the "
            "randomness in through the batch instead"
        )
    variables = {"params": nnx.to_pure_dict(params)}
    if jax.tree.leaves(batch_stats):
        variables["batch_stats"] = nnx.to_pure_dict(batch_stats)
    return graphdef, variables


def load_linen_variables(model: nnx.Module, variables: dict[str, Any]) -> None:
    """Copies Linen variables (``{"params": ..., "batch_stats": ...}``) into ``model``.

    The NNX model's parameters and BatchNorm statistics must form the same tree as
    the Linen variables, leaf for leaf and shape for shape (as
    :class:`NNXConvNet` does for :class:`~sgdjax.training.ConvNet`). The model
    is changed in place; the arrays are shared, not copied.

    Example::

      linen = ConvNet()
      variables = linen.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
      model = NNXConvNet(rngs=nnx.Rngs(0))
      load_linen_variables(model, variables)  # now model(x) == linen.apply(variables, x)

    Raises:
      ValueError: naming the first leaf that is missing, extra or of another shape.
    """
    _, own = _split(model)
    given = {name: variables[name] for name in ("params", "batch_stats") if name in variables}
    extra = sorted(set(variables) - set(given))
    if extra:
        raise ValueError(f"variables holds collections an NNX model cannot take: {extra}")
    check_trees_match(own, given, expected_name="the NNX model", got_name="the Linen variables")
    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, given["params"])
    states = [params]
    if "batch_stats" in given:
        batch_stats = nnx.state(model, nnx.BatchStat)
        nnx.replace_by_pure_dict(batch_stats, given["batch_stats"])
        states.append(batch_stats)
    nnx.update(model, *states)


class NNXModel:
    """An NNX module behind Linen's ``init``/``apply``, for the pure training steps.

    ``TrainState.create(model=NNXModel(module), ...)``, ``make_train_step``,
    ``make_eval_step`` and the parallel steps then train the NNX module unchanged:
    the state holds plain dicts (``params`` and ``model_state["batch_stats"]``), and
    each ``apply`` merges them with the static graph definition, runs the module in
    train or eval mode and, when ``"batch_stats"`` is mutable, splits the updated
    statistics out again, all inside the traced step.

    Args:
      module: an initialized NNX module called as ``module(x)`` whose state is only
        ``nnx.Param`` and ``nnx.BatchStat``. The module itself is not changed by
        training; rebuild one from the trained state with :meth:`merge`.
      init_from: ``None``: ``init`` returns the module's own weights and ignores
        its key. A Linen module whose variables have the module's tree: ``init``
        is that module's ``init`` (checked against the tree), so a run from a
        seed starts from exactly the Linen model's initial weights.

    Example::

      model = NNXModel(NNXConvNet(rngs=nnx.Rngs(0)))
      state = TrainState.create(model=model, tx=sgdjax.sgd(0.05, momentum=0.9),
                                rng=jax.random.key(0), sample_input=jnp.zeros((1, 32, 32, 3)))

    Raises:
      ValueError: if the module holds other state (``nnx.Rngs`` for dropout, ...).
    """

    def __init__(self, module: nnx.Module, *, init_from: Any = None):
        self.graphdef, self._variables = _split(module)
        if init_from is not None and not callable(getattr(init_from, "init", None)):
            raise ValueError(f"init_from must be a Linen module or None, got {init_from!r}")
        self.init_from = init_from

    def init(self, rng: jax.Array, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Initial variables: ``init_from.init(rng, ...)``, else the module's own.

        Takes Linen's ``init`` arguments (key, sample input, ``train=...``); without
        ``init_from`` they are ignored (an NNX module is initialized when built).
        """
        if self.init_from is None:
            return jax.tree.map(jnp.asarray, self._variables)
        variables = dict(self.init_from.init(rng, *args, **kwargs))
        check_trees_match(self._variables, variables, expected_name="the NNX model",
                          got_name=f"{type(self.init_from).__name__}'s variables")  # fmt: skip
        return variables

    def merge(self, variables: dict[str, Any]) -> nnx.Module:
        """A module holding ``variables`` (e.g. a trained ``{"params": ..., **model_state}``)."""
        states = [nnx.State(variables["params"])]
        if "batch_stats" in self._variables:
            states.append(nnx.State(variables["batch_stats"]))
        return nnx.merge(self.graphdef, *states)

    def apply(
        self,
        variables: dict[str, Any],
        x: jax.Array,
        *,
        train: bool = False,
        mutable: bool | Sequence[str] = False,
    ) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
        """Linen's ``apply``: logits, or ``(logits, updated collections)`` when ``mutable``."""
        module = self.merge(variables)
        if train:
            module.train()
        else:
            module.eval()
        logits = module(x)
        if mutable is False:
            return logits
        names = [mutable] if isinstance(mutable, str) else list(mutable)
        unknown = sorted(set(names) - {"batch_stats"})
        if unknown:
            raise ValueError(f"an NNX model can update only batch_stats, not {unknown}")
        updated = {}
        if "batch_stats" in names and "batch_stats" in self._variables:
            updated["batch_stats"] = nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))
        return logits, updated


def nnx_convnet_like(model: Any, *, image_size: int = 32) -> NNXModel:
    """The NNX twin of a Linen :class:`~sgdjax.training.ConvNet`, initialized as it is.

    An :class:`NNXConvNet` with ``model``'s classes, widths, dtype, BatchNorm axis
    and kernel gradient, behind :class:`NNXModel` with ``init_from=model``: a train state created
    from it with a given key holds the very arrays the Linen model's would, and
    trains to the same numbers through the NNX code path (``Config.api = "nnx"``).

    Raises:
      ValueError: if ``model`` is not a ``ConvNet``.
    """
    from sgdjax.training._models import ConvNet

    if not isinstance(model, ConvNet):
        raise ValueError(f"an NNX twin exists for ConvNet only, got {type(model).__name__}")
    module = NNXConvNet(
        model.num_classes,
        widths=getattr(model, "widths", (32, 64)),
        image_size=image_size,
        dtype=model.dtype,
        bn_axis_name=model.bn_axis_name,
        kernel_grad=model.kernel_grad,
        rngs=nnx.Rngs(0),  # replaced by the Linen model's initial weights
    )
    return NNXModel(module, init_from=model)
