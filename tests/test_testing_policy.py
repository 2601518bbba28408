"""flowcorrect.testing.GaussianPolicy: its flow lands on N(mean, std^2) in both conventions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowcorrect as fc
from flowcorrect.testing import GaussianPolicy

H, D = 6, 3


@pytest.mark.parametrize("convention", [fc.OpenPI(), fc.Reverse()], ids=["openpi", "reverse"])
@pytest.mark.parametrize("std", [0.05, 0.7])
def test_samples_have_the_policys_mean_and_std(convention, std):
    mean = jnp.linspace(-1.5, 2.0, H * D).reshape(H, D)
    policy = GaussianPolicy(mean, std, convention)
    noise = jax.random.normal(jax.random.key(0), (4000, H, D))
    # Exact velocity, so a fine Euler grid lands near the target law.
    out, _ = fc.sample(policy, None, noise=noise, num_steps=200)
    np.testing.assert_allclose(out.mean(0), mean, atol=0.05 * max(std, 0.2))
    np.testing.assert_allclose(out.std(0), std, rtol=0.1)
    # The flow is deterministic given the noise: a sample is its noise's image.
    one, _ = fc.sample(policy, None, noise=noise[7], num_steps=200)
    np.testing.assert_allclose(one, out[7], atol=1e-5)


def test_the_two_conventions_are_the_same_flow():
    mean = jax.random.normal(jax.random.key(1), (H, D))
    noise = jax.random.normal(jax.random.key(2), (64, H, D))
    a, _ = fc.sample(GaussianPolicy(mean, 0.3, fc.OpenPI()), None, noise=noise, num_steps=50)
    b, _ = fc.sample(GaussianPolicy(mean, 0.3, fc.Reverse()), None, noise=noise, num_steps=50)
    np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("mean, std, match", [
    (jnp.zeros(4), 1.0, "mean.*horizon, action_dim.*shape \\(4,\\)"),
    (jnp.zeros((2, 3)), 0.0, "std.*> 0"),
    (jnp.zeros((2, 3)), jnp.ones(2), "std.*scalar"),
])
def test_bad_arguments_are_refused(mean, std, match):
    with pytest.raises(ValueError, match=match):
        GaussianPolicy(mean, std)
