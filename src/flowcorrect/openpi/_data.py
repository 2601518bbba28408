"""Energy-training data from openpi: its data loader's batches through the frozen
prefix pass, as [`flowcorrect.train.Batch`][]es for [`flowcorrect.train.fit`][]."""

from collections.abc import Iterable, Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .._misc import is_int, shape_str
from .._model.context import TokenContext
from .._model.pooled import pool_tokens
from .._train.batch import Batch
from ._pi0 import Pi0Policy, _model, as_pi0_policy


def _context(policy: Pi0Policy, observation: Any, pool: bool) -> Any:
    prefix = policy.condition(observation)
    tokens = jax.lax.stop_gradient(prefix.prefix_out).astype(jnp.float32)
    mask = prefix.prefix_mask
    context = TokenContext(tokens, mask)
    # The pooling a served verifier reads (fc.PooledContext), so training and serving
    # see the same vector.
    return pool_tokens(context) if pool else context


_context_jit = eqx.filter_jit(_context)


def energy_batches(
    model: Any,
    batches: Iterable[tuple[Any, Any]],
    *,
    pool: bool = False,
    action_dims: int | None = None,
    keep_observation: bool = False,
) -> Iterator[Batch]:
    """Turns openpi's training batches into energy-training batches, one prefix pass each.

    Each `(observation, actions)` pair, as openpi's data loader yields it
    (`openpi.training.data_loader.create_data_loader(train_config)`, or any iterable of
    a batched `Observation` and its action chunks), goes through the frozen model's
    prefix pass once (openpi's preprocessing, `embed_prefix`, the VLM; compiled once
    per batch shape). The energy's context is that pass's `prefix_out` with
    `prefix_mask` (True = real token): exactly what [`flowcorrect.openpi.Pi0Policy`][]
    hands an energy at inference, so an energy trained on these batches reads the same
    features it will be corrected with. The actions stay in openpi's normalised,
    padded action space, the space the model samples in.

    Alternatively, keep the observations as `Batch.context` and pass
    `to_context=lambda obs: policy.energy_context(policy.condition(obs))` to
    [`flowcorrect.train.fit`][], which then runs the prefix inside its compiled step.

    **Arguments:**

    - `model`: openpi's JAX `Pi0` (Pi0 or Pi0.5) or a
        [`flowcorrect.openpi.Pi0Policy`][] of one: the frozen policy.
    - `batches`: an iterable of `(observation, actions)`: `observation` an openpi
        `Observation` with a leading batch axis, `actions` `(batch, action_horizon,
        action_dim)`.
    - `pool`: `False` (default): the context is `fc.TokenContext(prefix_out,
        prefix_mask)`, tokens `(batch, prefix_len, width)` in float32, for an
        [`flowcorrect.EnergyModel`][]; `True`: the mean of `prefix_out` over real
        tokens, `(batch, width)`, for an [`flowcorrect.MLPEnergy`][].
    - `action_dims`: keep only the first `action_dims` action dims (LIBERO: 7 of 32);
        at inference wrap the trained energy in [`flowcorrect.OnActionDims`][] with
        the same number.
    - `keep_observation`: also keep the observation in `Batch.observation` (what
        [`flowcorrect.train.PolicyNegatives`][] reads to sample the policy's own chunks).

    **Returns:**

    An iterator of [`flowcorrect.train.Batch`][], one per input pair, lazily.

    !!! example

        ```python
        from openpi.training import config as _config, data_loader as _data_loader
        from flowcorrect.openpi import energy_batches

        train_config = _config.get_config("pi05_libero")
        loader = _data_loader.create_data_loader(train_config, shuffle=True)
        data = energy_batches(model, loader, action_dims=7)
        result = fc.train.fit(fc.EnergyModel(fc.EnergyModelConfig(context_dim=2048,
                                                            action_dim=7), key=key),
                        data, key=key)
        ```
    """
    policy = as_pi0_policy(model)
    if not isinstance(pool, bool):
        raise TypeError(f"`pool` must be True or False; got {pool!r}.")
    if action_dims is not None and not (
        is_int(action_dims)
        and 1 <= action_dims <= policy.chunk_shape[1]
    ):
        raise ValueError(
            f"`action_dims` must be an int from 1 to the model's action_dim "
            f"{policy.chunk_shape[1]} (LIBERO: 7), or None; got {action_dims!r}."
        )
    return _energy_batches(policy, batches, pool, action_dims, keep_observation)


def _energy_batches(policy, batches, pool, action_dims, keep_observation):
    for i, item in enumerate(batches):
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise TypeError(
                f"Batch {i} must be a pair (observation, actions), as openpi's data loader "
                f"yields; got {type(item).__name__}."
            )
        observation, actions = item
        if not isinstance(observation, _model.Observation):
            raise TypeError(
                f"Batch {i}: the observation must be an openpi `Observation` with a leading "
                f"batch axis; got {type(observation).__name__}."
            )
        if observation.state.ndim != 2:
            raise ValueError(
                f"Batch {i}: `observation.state` must be (batch, state_dim), with a leading "
                f"batch axis; got {shape_str(observation.state)}."
            )
        actions = jnp.asarray(actions)
        batch = observation.state.shape[0]
        if actions.ndim != 3 or actions.shape[1:] != policy.chunk_shape or (
            actions.shape[0] != batch
        ):
            raise ValueError(
                f"Batch {i}: actions must be (batch, action_horizon, action_dim) = "
                f"({batch}, {policy.chunk_shape[0]}, {policy.chunk_shape[1]}) for this "
                f"model and observation; got {shape_str(actions)}."
            )
        context = _context_jit(policy, observation, pool)
        if action_dims is not None:
            actions = actions[..., :action_dims]
        yield Batch(context, actions, observation=observation if keep_observation else None)
