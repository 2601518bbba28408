"""The suite's type checker: internal functions fully checked, exported ones left to
their own argument checks (which name the fix), return values checked everywhere."""

import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import flowcorrect as fc
from flowcorrect._flow import flow as _flow
from flowcorrect.testing import GaussianPolicy

from .typecheck import _return_only, validates_its_arguments


def test_exported_functions_and_constructors_validate_their_own_arguments():
    assert validates_its_arguments("flowcorrect._sample", "sample")
    assert validates_its_arguments("flowcorrect._placements.best_of_n", "BestOfN.__init__")
    assert validates_its_arguments("flowcorrect._constraints.box", "Box.__init__")
    assert validates_its_arguments("flowcorrect._train.loop", "fit")
    # Internal functions, methods, and a Module's fields once built stay checked.
    assert not validates_its_arguments("flowcorrect._flow.flow", "all_finite")
    assert not validates_its_arguments("flowcorrect._misc", "is_int")
    assert not validates_its_arguments("flowcorrect._placements.best_of_n", "BestOfN")
    assert not validates_its_arguments("flowcorrect._placements.best_of_n", "BestOfN.sample")
    assert not validates_its_arguments("flowcorrect._sample", "_sample")


def test_the_hook_checks_internal_arguments_and_leaves_exported_ones_to_their_messages():
    with pytest.raises(jaxtyping.TypeCheckError):
        _flow.all_finite(np.ones((2, 3)))  # a NumPy array where a JAX array is declared
    with pytest.raises(TypeError, match=r"`noise` must be a JAX or NumPy array") as err:
        fc.sample(GaussianPolicy(jnp.zeros((4, 2)), 0.5, fc.OpenPI()), None,
                  noise=[[0.0, 1.0]] * 4)
    assert not isinstance(err.value, jaxtyping.TypeCheckError)


def test_an_exported_function_still_has_its_return_value_checked():
    def f(x: int) -> int:
        return 3

    def g(x: int) -> int:
        return str(x)  # type: ignore[return-value]

    assert _return_only(f)("a string: the argument is not checked") == 3
    with pytest.raises(Exception, match=r"(?i)return"):
        _return_only(g)(1)
