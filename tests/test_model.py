import json
import pathlib
import zipfile

import equinox as eqx
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import flowcorrect as fc
from flowcorrect._model.energy_model import _pool
from flowcorrect._model.layers import Linear

SEQ, DIM, HORIZON, ACT = 6, 8, 5, 3


def small_config(**kwargs):
    options = dict(context_dim=DIM, action_dim=ACT, hidden=16, num_heads=2, dropout=0.0)
    options.update(kwargs)
    return fc.EnergyModelConfig(**options)


def small_model(seed=0, **kwargs):
    return eqx.nn.inference_mode(fc.EnergyModel(small_config(**kwargs), key=jax.random.key(seed)))


def context(seed=0, num_real=4, seq=SEQ):
    tokens = jax.random.normal(jax.random.key(seed), (seq, DIM))
    return fc.TokenContext(tokens, jnp.arange(seq) < num_real)


def chunk(seed=1):
    return jax.random.normal(jax.random.key(seed), (HORIZON, ACT))


def tree_bitwise_equal(xs, ys):
    # Local rather than from tests/helpers.py, so this file imports the same way whether
    # or not tests/ is a package.
    xs, ys = jax.tree.leaves(xs), jax.tree.leaves(ys)
    return len(xs) == len(ys) and all(
        x.shape == y.shape
        and x.dtype == y.dtype
        and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(xs, ys)
    )


def leaves(model):
    return jax.tree.leaves(eqx.filter(model, eqx.is_array))


@pytest.mark.parametrize("action_dim", [7, 32])
def test_default_model_size_and_shapes(action_dim):
    config = fc.EnergyModelConfig(context_dim=2048, action_dim=action_dim)
    assert (config.hidden, config.num_heads) == (512, 8)
    model = eqx.nn.inference_mode(fc.EnergyModel(config, key=jax.random.key(0)))
    assert 2.0e6 <= model.num_parameters() <= 2.6e6
    ctx = fc.TokenContext(jnp.ones((3, 2048)), jnp.array([True, True, False]))
    encoded = model.encode(ctx)
    # Three tokens plus the null token, split over 8 heads of width 64.
    assert encoded.kv.keys.shape == (4, 8, 64)
    assert encoded.kv.values.shape == (4, 8, 64)
    energy = model(ctx, jnp.zeros((10, action_dim)))
    assert energy.shape == () and energy.dtype == jnp.float32
    assert model.step_energies(encoded, model.embed_actions(jnp.zeros((10, action_dim)))).shape == (
        10,
    )


def test_split_energy_composes_and_works_with_the_core():
    model = small_model()
    ctx, a = context(), chunk()
    assert isinstance(model, fc.SplitEnergyFn)
    direct = model(ctx, a)
    split = model.score(model.encode(ctx), a)
    assert jnp.array_equal(direct, split)
    assert jnp.array_equal(fc.bind(model, ctx)(None, a), direct)
    # Batched correction vmaps over contexts and chunks.
    batch = jax.tree.map(lambda x: jnp.stack([x, x]), ctx)
    out, info = fc.correct(model, batch, jnp.stack([a, a + 1]), corrector=fc.reference_recipe(1))
    assert out.shape == (2, HORIZON, ACT)
    assert jnp.allclose(info.energy_before[0], direct, rtol=1e-6)
    assert bool(jnp.all(jnp.isfinite(out)))


MODELS = {pool: small_model(context_pool=pool) for pool in (1, 4)}


@eqx.filter_jit
def _energy_and_grad(model, tokens, mask, actions):
    bound = fc.bind(model, fc.TokenContext(tokens, mask))
    return jax.value_and_grad(lambda a: bound(None, a))(actions)


@given(
    garbage=hnp.arrays(
        np.float32,
        (SEQ, DIM),
        elements=st.one_of(
            st.floats(-1e6, 1e6, width=32), st.sampled_from([np.nan, np.inf, -np.inf])
        ),
    ),
    num_real=st.integers(1, SEQ),
    pool=st.sampled_from([1, 4]),
)
def test_padding_tokens_do_not_change_the_energy(garbage, num_real, pool):
    model = MODELS[pool]
    ctx = context(num_real=num_real)
    a = chunk()
    e0, g0 = _energy_and_grad(model, ctx.tokens, ctx.mask, a)
    e1, g1 = _energy_and_grad(model, jnp.where(ctx.mask[:, None], ctx.tokens, garbage), ctx.mask, a)
    assert jnp.isfinite(e0)
    assert jnp.array_equal(e0, e1)
    assert jnp.array_equal(g0, g1) and bool(jnp.all(jnp.isfinite(g1)))


def test_appending_padding_does_not_change_the_energy():
    model = small_model()
    ctx = context(num_real=SEQ)
    longer = fc.TokenContext(
        jnp.concatenate([ctx.tokens, 5.0 * jnp.ones((3, DIM))]),
        jnp.concatenate([ctx.mask, jnp.zeros(3, bool)]),
    )
    assert jnp.allclose(model(ctx, chunk()), model(longer, chunk()), rtol=1e-6, atol=1e-6)
    # ...while a real token does change it, so the comparison above can fail.
    extra_real = fc.TokenContext(longer.tokens, jnp.ones(SEQ + 3, bool))
    assert not jnp.allclose(model(ctx, chunk()), model(extra_real, chunk()), atol=1e-4)


@pytest.mark.parametrize("pool", [1, 4])
def test_all_padding_context_is_finite_and_defined_under_jit(pool):
    model = MODELS[pool]
    a = chunk()
    none = jnp.zeros(SEQ, bool)
    e1, g1 = _energy_and_grad(model, jnp.full((SEQ, DIM), jnp.nan), none, a)
    e2, g2 = _energy_and_grad(model, jax.random.normal(jax.random.key(3), (SEQ, DIM)), none, a)
    assert jnp.isfinite(e1) and bool(jnp.all(jnp.isfinite(g1)))
    # Defined: an empty context means the same thing whatever its padding holds.
    assert jnp.array_equal(e1, e2) and jnp.array_equal(g1, g2)
    # And it differs from a context with real tokens.
    e3, _ = _energy_and_grad(model, jax.random.normal(jax.random.key(3), (SEQ, DIM)), ~none, a)
    assert not jnp.allclose(e1, e3)
    # The corrector core sees finite values and does not fall back.
    _, info = fc.correct(model, fc.TokenContext(jnp.zeros((SEQ, DIM)), none), a)
    assert not bool(info.fell_back)


def test_mask_conventions():
    tokens = jnp.ones((4, DIM))
    padding = jnp.array([False, False, True, True])
    ctx = fc.TokenContext.from_padding_mask(tokens, padding)
    assert jnp.array_equal(ctx.mask, ~padding)
    assert bool(fc.TokenContext(tokens).mask.all())
    with pytest.raises(ValueError, match="boolean"):
        fc.TokenContext(tokens, jnp.array([1, 1, 0, 0]))
    with pytest.raises(ValueError, match="needs shape"):
        fc.TokenContext(tokens, jnp.ones(3, bool))
    with pytest.raises(ValueError, match="True = padding"):
        fc.TokenContext.from_padding_mask(tokens, jnp.array([0, 0, 1, 1]))
    model = small_model()
    # The same tokens under the two conventions give the same energy.
    a = chunk()
    assert jnp.array_equal(model(ctx, a), model(fc.TokenContext(tokens, ~padding), a))


def test_shape_mistakes_raise_clear_errors():
    model = small_model()
    with pytest.raises(ValueError, match="action_dim=3"):
        model(context(), jnp.zeros((HORIZON, 4)))
    with pytest.raises(ValueError, match="width 8"):
        model(fc.TokenContext(jnp.zeros((SEQ, DIM + 1))), chunk())
    with pytest.raises(ValueError, match="ONE observation"):
        model.encode(fc.TokenContext(jnp.zeros((2, SEQ, DIM))))
    with pytest.raises(TypeError, match="TokenContext"):
        model.encode({"tokens": jnp.zeros((SEQ, DIM))})
    with pytest.raises(TypeError, match="EnergyModelConfig"):
        fc.EnergyModel({"context_dim": 8}, key=jax.random.key(0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden=10, num_heads=4), "must divide"),
        (dict(dropout=1.0), "dropout"),
        (dict(energy="softplus"), "energy"),
        (dict(context_pool=0), "context_pool"),
        (dict(action_dim=0), "action_dim"),
    ],
)
def test_config_validation(kwargs, match):
    # Under the test suite's runtime type checks a wrong literal is caught as a TypeError
    # before our own ValueError; both name the field.
    with pytest.raises((ValueError, TypeError), match=match):
        small_config(**kwargs)


def test_dropout_needs_a_key_in_training_only():
    model = fc.EnergyModel(small_config(dropout=0.5), key=jax.random.key(0))
    ctx, a = context(), chunk()
    with pytest.raises(RuntimeError, match="inference_mode"):
        model(ctx, a)
    encoded = model.encode(ctx)
    e1 = model.score(encoded, a, key=jax.random.key(1))
    e2 = model.score(encoded, a, key=jax.random.key(2))
    assert not jnp.allclose(e1, e2)  # dropout is active in training
    inference = eqx.nn.inference_mode(model)
    assert jnp.array_equal(inference(ctx, a), inference.score(encoded, a, key=jax.random.key(1)))


def test_bounded_energy_is_the_reference_squashing():
    key = jax.random.key(0)
    bounded = eqx.nn.inference_mode(fc.EnergyModel(small_config(energy="bounded"), key=key))
    ctx, a = context(), 3 * chunk()
    enc, emb = bounded.encode(ctx), bounded.embed_actions(a)
    h = bounded.head_values(enc, emb)
    expected = jax.nn.sigmoid(0.5 * h) * 2.0 + 0.1
    assert jnp.allclose(bounded.step_energies(enc, emb), expected, rtol=1e-6)
    assert jnp.allclose(bounded(ctx, a), jnp.mean(expected), rtol=1e-6)
    # Saturating the head pins the energy to the ends of [0.1, 2.1] and kills the slope.
    big = eqx.tree_at(lambda m: m.head_out.bias, bounded, jnp.array([40.0]))
    assert jnp.allclose(big(ctx, a), 2.1, atol=1e-6)
    assert float(jnp.abs(jax.grad(lambda x: fc.bind(big, ctx)(None, x))(a)).max()) < 1e-6
    unbounded = small_model()
    assert unbounded.head_out.bias is None  # InfoNCE cannot train a constant offset


def test_pool_is_a_masked_window_mean():
    h = jnp.arange(10.0 * 2).reshape(10, 2)
    mask = jnp.array([1, 0, 1, 1, 0, 0, 0, 0, 1, 0], bool)
    pooled, pmask = _pool(h, mask, 4)
    assert pooled.shape == (3, 2)
    assert jnp.array_equal(pmask, jnp.array([True, False, True]))
    assert jnp.allclose(pooled[0], (h[0] + h[2] + h[3]) / 3)
    assert jnp.allclose(pooled[2], h[8])
    model = small_model(context_pool=4)
    assert model.encode(context()).kv.keys.shape[0] == 2 + 1  # ceil(6 / 4) + null


def test_spectral_norm_bounds_the_layers():
    layer = Linear(12, 7, spectral_norm=True, power_iterations=100, key=jax.random.key(0))
    layer = eqx.tree_at(lambda lin: lin.weight, layer, 5 * layer.weight)
    sigma = np.linalg.svd(np.asarray(layer.effective_weight()), compute_uv=False)[0]
    assert abs(sigma - 1) < 1e-3
    plain = Linear(12, 7, key=jax.random.key(0))
    assert np.linalg.svd(np.asarray(5 * plain.weight), compute_uv=False)[0] > 2
    model = small_model(spectral_norm=True)
    assert model.action_net.proj.spectral_norm and not model.context_net.proj.spectral_norm
    grads = eqx.filter_grad(lambda m: m(context(), chunk()))(model)
    assert float(jnp.abs(grads.head_out.weight).max()) > 0
    assert jnp.isfinite(model(context(), chunk()))


def test_save_and_load_round_trip(tmp_path):
    model = fc.EnergyModel(small_config(dropout=0.3, context_pool=2), key=jax.random.key(4))
    path = fc.save_model(model, tmp_path / "energy")
    assert path.is_absolute() and sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "weights.npz",
    ]
    loaded = fc.load_model(tmp_path / "energy", action_dim=ACT)
    assert loaded.config == model.config
    assert tree_bitwise_equal(leaves(loaded), leaves(model))
    assert loaded.dropout.inference  # loaded for inference: no key needed
    inference = eqx.nn.inference_mode(model)
    assert jnp.array_equal(loaded(context(), chunk()), inference(context(), chunk()))
    assert tree_bitwise_equal(leaves(fc.load_model(path)), leaves(model))


@pytest.fixture
def saved(tmp_path):
    return fc.save_model(small_model(), tmp_path / "m")


def test_load_missing_files(tmp_path, saved):
    with pytest.raises(fc.ModelFileError, match="config.json is missing"):
        fc.load_model(tmp_path / "nowhere")
    (saved / "weights.npz").unlink()
    with pytest.raises(fc.ModelFileError, match="missing"):
        fc.load_model(saved)


def test_load_truncated_files(saved):
    weights = saved / "weights.npz"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(fc.ModelFileError, match="truncated"):
        fc.load_model(saved)
    config = saved / "config.json"
    text = config.read_text()
    config.write_text(text[: len(text) // 2])
    with pytest.raises(fc.ModelFileError, match="not valid JSON"):
        fc.load_model(saved)


def _edit_config(path: pathlib.Path, *, drop=(), reseal=False, **changes):
    meta = json.loads((path / "config.json").read_text())
    meta["config"].update(changes)
    for name in drop:
        del meta["config"][name]
    if reseal:
        # A consistent checksum, as a forger (or a buggy tool) would write: only the
        # content checks then stand between this file and a load.
        from flowcorrect._model.serialise import _config_digest

        meta["checksum"] = _config_digest(meta)
    (path / "config.json").write_text(json.dumps(meta))


def test_load_other_width_is_an_error_not_a_partial_load(saved):
    _edit_config(saved, hidden=32, reseal=True)
    with pytest.raises(fc.ModelFileError, match="different models"):
        fc.load_model(saved)


def test_load_checks_expected_fields(saved):
    with pytest.raises(fc.ModelFileError, match="action_dim=3, but action_dim=7"):
        fc.load_model(saved, action_dim=7)
    with pytest.raises(fc.ModelFileError, match="hidden=16"):
        fc.load_model(saved, hidden=512)
    with pytest.raises(TypeError, match="unknown expected field"):
        fc.load_model(saved, widht=16)
    _edit_config(saved, colour="red", reseal=True)
    with pytest.raises(fc.ModelFileError, match=r"unknown fields \['colour'\]"):
        fc.load_model(saved)


def _rewrite_weights(path: pathlib.Path, arrays: dict):
    with open(path / "weights.npz", "wb") as f:
        np.savez(f, **arrays)
    # A consistent checksum, so only the content checks stand between this file and a load.
    from flowcorrect._model.serialise import _config_digest, _sha256

    meta = json.loads((path / "config.json").read_text())
    meta["weights"]["sha256"] = _sha256(path / "weights.npz")
    meta["checksum"] = _config_digest(meta)
    (path / "config.json").write_text(json.dumps(meta))


def test_load_never_unpickles(saved):
    with np.load(saved / "weights.npz") as data:
        arrays = {k: data[k] for k in data.files}
    name = next(iter(arrays))
    arrays[name] = np.array([{"payload": 1}], dtype=object)  # stored with pickle
    _rewrite_weights(saved, arrays)
    with pytest.raises(fc.ModelFileError, match="cannot be read"):
        fc.load_model(saved)


def test_load_rejects_missing_and_extra_leaves(saved):
    with np.load(saved / "weights.npz") as data:
        arrays = {k: data[k] for k in data.files}
    first = next(iter(arrays))
    _rewrite_weights(saved, {**arrays, "extra": np.zeros(3, np.float32)})
    with pytest.raises(fc.ModelFileError, match="unexpected"):
        fc.load_model(saved)
    del arrays[first]
    _rewrite_weights(saved, arrays)
    with pytest.raises(fc.ModelFileError, match="missing"):
        fc.load_model(saved)
    assert zipfile.is_zipfile(saved / "weights.npz")


@pytest.mark.parametrize(
    "changes", [dict(num_heads=4), dict(context_pool=2), dict(spectral_norm=True)]
)
def test_load_refuses_an_edited_config(saved, changes):
    # Each edit keeps every weight shape, so only the checksum can catch it: before the
    # checksum covered the config, these loaded and computed different energies.
    _edit_config(saved, **changes)
    with pytest.raises(fc.ModelFileError, match="checksum"):
        fc.load_model(saved)


def test_load_names_missing_config_keys(saved):
    _edit_config(saved, drop=("num_heads",))
    with pytest.raises(fc.ModelFileError, match="checksum"):
        fc.load_model(saved)
    # Even with a consistent checksum, a missing key is never filled by a default.
    _edit_config(saved, drop=("context_pool",), reseal=True)
    with pytest.raises(fc.ModelFileError, match=r"missing fields \['context_pool', 'num_heads'\]"):
        fc.load_model(saved)


def test_power_iterations_takes_effect_in_every_layer():
    # A matrix whose top two singular values are close makes power iteration converge
    # slowly, so 1 and 50 iterations give visibly different estimates.
    few = small_model(spectral_norm=True, power_iterations=1)
    many = small_model(spectral_norm=True, power_iterations=50)
    linears = [
        x
        for x in jax.tree.leaves(few, is_leaf=lambda x: isinstance(x, Linear))
        if isinstance(x, Linear) and x.spectral_norm
    ]
    assert linears and all(x.power_iterations == 1 for x in linears)
    sigma = lambda w: np.linalg.svd(np.asarray(w), compute_uv=False)[0]  # noqa: E731
    # The converged estimate normalises the largest singular value to 1; one iteration
    # from a fixed start vector underestimates sigma, so leaves it above 1.
    assert abs(sigma(many.action_net.proj.effective_weight()) - 1) < 1e-3
    assert sigma(few.action_net.proj.effective_weight()) > 1 + 1e-3
    assert not jnp.allclose(few(context(), chunk()), many(context(), chunk()), rtol=1e-4)


def test_energy_model_crosses_a_plain_jax_jit():
    # openpi jits with jax.jit, which traces the dropout flag too; that used to raise
    # TracerBoolConversionError.
    config = fc.EnergyModelConfig(context_dim=8, action_dim=4, hidden=16, num_heads=2)
    model = fc.EnergyModel(config, key=jax.random.key(0))
    ctx = fc.TokenContext(jax.random.normal(jax.random.key(1), (5, 8)))
    a = jax.random.normal(jax.random.key(2), (3, 4))
    eval_model = eqx.nn.inference_mode(model)
    jitted = jax.jit(lambda m, c, x: m(c, x))
    assert float(jitted(eval_model, ctx, a)) == pytest.approx(float(eval_model(ctx, a)), rel=1e-6)
    # A training-mode model without a key scores as in inference under a plain jit...
    assert float(jitted(model, ctx, a)) == pytest.approx(float(eval_model(ctx, a)), rel=1e-6)
    # ...and with a key it drops out.
    keyed = jax.jit(lambda m, c, x, k: m.score(m.encode(c), x, key=k))
    with_key = keyed(model, ctx, a, jax.random.key(3))
    assert bool(jnp.isfinite(with_key))
