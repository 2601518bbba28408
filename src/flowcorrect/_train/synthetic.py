"""A synthetic demonstration task with a known matching rule, for tests and measurements.

Each demonstration has a latent `z ~ N(0, I)` of size `action_dim`. Its context is a set
of tokens that all carry `z` (through a fixed projection) plus noise, at random
positions among padding tokens that hold large garbage; its expert chunk is
`a[t] = ramp[t] * z` plus a little noise, with `ramp` rising from 0.5 to 1.5 over the
horizon. So the matching chunk of a context is known in closed form, and a model that
let padding leak in would be visibly wrong.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._model.context import TokenContext
from .batch import Batch


def _projection(action_dim: int, context_dim: int, rule_seed: int) -> np.ndarray:
    rng = np.random.default_rng(rule_seed)
    return rng.standard_normal((action_dim, context_dim)).astype(np.float32)


def matching_task(
    key: PRNGKeyArray,
    num: int,
    *,
    seq: int = 8,
    context_dim: int = 16,
    horizon: int = 4,
    action_dim: int = 4,
    token_noise: float = 0.5,
    action_noise: float = 0.02,
    garbage: float = 10.0,
    rule_seed: int = 0,
) -> Batch:
    """Draws `num` demonstrations of the synthetic matching task.

    **Arguments:**

    - `key`: a PRNG key.
    - `num`: the number of demonstrations.
    - `seq`, `context_dim`, `horizon`, `action_dim`: the shapes.
    - `token_noise`: noise on real tokens; `action_noise`: noise on expert chunks.
    - `garbage`: the scale of the values in padding tokens.
    - `rule_seed`: fixes the projection from `z` to tokens; train and held-out data
        need the same.

    **Returns:**

    A [`flowcorrect.train.Batch`][]: between `seq // 2` and `seq` real tokens per context.
    """
    kz, kt, kc, kp, kg, ka = jax.random.split(key, 6)
    z = jax.random.normal(kz, (num, action_dim))
    proj = jnp.asarray(_projection(action_dim, context_dim, rule_seed))
    tokens = (z @ proj)[:, None, :] + token_noise * jax.random.normal(kt, (num, seq, context_dim))
    count = jax.random.randint(kc, (num, 1), max(1, seq // 2), seq + 1)
    rank = jnp.argsort(jax.random.uniform(kp, (num, seq)), axis=1)
    mask = rank < count
    junk = garbage * jax.random.normal(kg, (num, seq, context_dim))
    tokens = jnp.where(mask[:, :, None], tokens, junk)
    actions = expert_chunks(z, horizon) + action_noise * jax.random.normal(
        ka, (num, horizon, action_dim)
    )
    return Batch(TokenContext(tokens, mask), actions)


def expert_chunks(
    z: Float[Array, "num action_dim"], horizon: int
) -> Float[Array, "num horizon action_dim"]:
    """The noiseless matching chunks of latents `z`: `ramp[t] * z`."""
    ramp = jnp.linspace(0.5, 1.5, horizon)
    return ramp[None, :, None] * z[:, None, :]


def noisy_policy(
    key: PRNGKeyArray, actions: Float[Array, "batch horizon action_dim"], num: int, scale: Any = 0.3
) -> Float[Array, "batch num horizon action_dim"]:
    """A stand-in for a policy's samples: the expert chunk plus Gaussian errors."""
    noise = jax.random.normal(key, (actions.shape[0], num, *actions.shape[1:]))
    return actions[:, None] + scale * noise
