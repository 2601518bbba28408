"""Pooled contexts: one vector per observation from a token context."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowcorrect as fc


def _context(key, batch=None, seq=6, dim=5):
    shape = (seq, dim) if batch is None else (batch, seq, dim)
    tokens = jax.random.normal(key, shape) * 3.0 + 1.0
    lengths = 4 if batch is None else jnp.arange(batch)[:, None] % seq + 1
    mask = (jnp.arange(seq)[None, :] < lengths).reshape(shape[:-1])
    return fc.TokenContext(tokens, mask)


def test_pool_is_the_mean_of_real_tokens_and_ignores_padding():
    context = _context(jax.random.key(0))
    expected = np.asarray(context.tokens[:4]).mean(0)
    np.testing.assert_allclose(fc.pool_tokens(context), expected, rtol=1e-6)
    poisoned = fc.TokenContext(context.tokens.at[4:].set(jnp.nan), context.mask)
    np.testing.assert_array_equal(fc.pool_tokens(poisoned), fc.pool_tokens(context))
    empty = fc.TokenContext(context.tokens, jnp.zeros(6, bool))
    np.testing.assert_array_equal(fc.pool_tokens(empty), np.zeros(5, np.float32))
    half = fc.TokenContext(context.tokens.astype(jnp.bfloat16), context.mask)
    assert fc.pool_tokens(half).dtype == jnp.float32
    with pytest.raises(TypeError, match="reads a fc.TokenContext"):
        fc.pool_tokens(context.tokens)


def test_batched_pool_equals_per_sample():
    context = _context(jax.random.key(1), batch=4)
    batched = fc.pool_tokens(context)
    for i in range(4):
        one = fc.TokenContext(context.tokens[i], context.mask[i])
        np.testing.assert_allclose(batched[i], fc.pool_tokens(one), rtol=1e-6)


def test_pooled_context_scores_like_its_energy_on_the_pooled_vector():
    verifier = fc.MLPEnergy(fc.MLPEnergyConfig(obs_dim=5, action_dim=2, horizon=3, hidden=8),
                            key=jax.random.key(2))
    pooled = fc.PooledContext(verifier)
    context = _context(jax.random.key(3))
    chunk = jax.random.normal(jax.random.key(4), (3, 2))
    np.testing.assert_allclose(pooled(context, chunk), verifier(fc.pool_tokens(context), chunk),
                               rtol=1e-6)
    grad = jax.grad(lambda a: pooled(context, a))(chunk)
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).max()) > 0
    with pytest.raises(TypeError, match="PooledContext reads a fc.TokenContext"):
        pooled(context.tokens, chunk)
