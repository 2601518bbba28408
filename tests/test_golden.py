"""Outputs of a fixed set of public calls against the golden files in tests/golden.

Every placement in both conventions, `correct` with three correctors, a few steps of
`fit` and `fit_verifier`, and (where openpi is installed) the openpi adapter on the
test-size Pi0 and Pi0.5. A change that alters any of them fails here; re-record with
`python -m tests.golden.calls --write` only for a change of output that is intended,
and say why in the commit. The files were recorded with the newest jax; openpi's pinned
jax 0.5.3 rounds differently (largest difference 7e-7), hence the tolerance.
"""

import importlib.util

import numpy as np
import pytest

from .golden import calls

TOL = dict(rtol=1e-5, atol=1e-5)


def _check(got, path):
    with np.load(path) as f:
        want = dict(f)
    assert sorted(got) == sorted(want)
    # An output that does not move from call to call would match itself trivially.
    assert any(float(np.std(v)) > 0.05 for v in got.values())
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_allclose(got[name], want[name], err_msg=name, **TOL)


def test_core_calls_match_the_golden_file():
    _check(calls.core_calls(), calls.HERE / "core.npz")


# flax 0.10.2 (openpi's pin) calls jax 0.5.3 APIs in ways jax deprecates: openpi's
# pinned stack, not our code (as in tests/test_openpi.py).
@pytest.mark.filterwarnings("ignore:linear_util.wrap_init is missing:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:shape requires ndarray or scalar arguments:DeprecationWarning")
@pytest.mark.skipif(importlib.util.find_spec("openpi") is None,
                    reason="openpi is not installed (it is not on PyPI); see docs/openpi.md")
def test_openpi_calls_match_the_golden_file():
    _check(calls.openpi_calls(), calls.HERE / "openpi.npz")
