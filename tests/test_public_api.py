"""The public surface: what the top level and each subpackage export, and the names
that moved, which still import from the top level with a DeprecationWarning."""

import importlib

import pytest

import flowcorrect as fc

SUBPACKAGES = ("constraints", "rtc", "train", "verifiers")


@pytest.mark.parametrize("module", ["flowcorrect", *(f"flowcorrect.{s}" for s in SUBPACKAGES)])
def test_every_exported_name_resolves_without_a_warning(module, recwarn):
    mod = importlib.import_module(module)
    assert len(mod.__all__) == len(set(mod.__all__))
    for name in mod.__all__:
        assert getattr(mod, name) is not None, name
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


def test_the_top_level_is_the_core_and_no_moved_name_is_in_it():
    assert not set(fc.__all__) & set(fc._MOVED)
    for core in ("sample", "correct", "BestOfN", "Guided", "EnergyModel", "reference_recipe",
                 "RealTimeChunking", "Project", "AbstractPolicy", "train", "verifiers"):
        assert core in fc.__all__, core
    for moved in ("fit", "Rollouts", "Box", "ActionQueue"):
        assert moved not in fc.__all__ and moved not in dir(fc), moved
    assert len(fc.__all__) < 100


@pytest.mark.parametrize("name", sorted(fc._MOVED))
def test_a_moved_name_still_imports_with_a_warning_naming_its_place(name):
    where = fc._MOVED[name]
    with pytest.warns(DeprecationWarning, match=rf"flowcorrect\.{where}\.{name}\b"):
        old = getattr(fc, name)
    assert old is getattr(getattr(fc, where), name)
    assert name in getattr(fc, where).__all__


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fc.nope  # noqa: B018


def test_a_policy_written_with_the_old_prefix_name_samples_as_before_with_a_warning():
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    def body(name):
        def one(self, observation):
            return observation * 2.0

        return {
            "chunk_shape": (3, 2),
            "convention": fc.OpenPI(),
            name: one,
            "velocity": lambda self, cond, x_t, t: x_t - cond,
            "energy_context": lambda self, cond: cond,
            "__annotations__": {"chunk_shape": tuple, "convention": fc.AbstractConvention},
        }

    New = type("New", (fc.AbstractPolicy,), body("condition"))
    with pytest.warns(DeprecationWarning, match=r"Old\.prefix: .*rename the method to `condition`"):
        Old = type("Old", (fc.AbstractPolicy,), body("prefix"))
    obs = jnp.array([[0.5, -1.5], [2.0, 0.25], [-3.0, 1.0]])
    key = jax.random.key(3)
    new, _ = fc.sample(New(), obs, key)
    old, _ = fc.sample(Old(), obs, key)
    assert jnp.array_equal(new, old)
    assert not jnp.allclose(new, 0.0)
    with pytest.warns(DeprecationWarning, match=r"New\.prefix\(\.\.\.\): .*call `condition`"):
        assert jnp.array_equal(New().prefix(obs), obs * 2.0)
    assert eqx.is_array(Old().condition(obs))
