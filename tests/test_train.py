import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowcorrect as fc
from flowcorrect._train.checkpoint import Checkpointer
from flowcorrect._train.negatives import make_negatives
from flowcorrect._train.resume import restore as _restore
from flowcorrect._train.sharding import place_batch as _place_batch
from flowcorrect._train.state import initial_state as _initial_state
from flowcorrect._train.synthetic import matching_task, noisy_policy

SHAPES = dict(seq=8, context_dim=16, horizon=4, action_dim=4)
CONFIG = fc.EnergyModelConfig(context_dim=16, action_dim=4, hidden=32, num_heads=2, dropout=0.1)
# One setting of the compiled step shared by the short fits below, so they compile once.
# (Without the gradient penalty: it is tested on its own, and compiles slowly on CPU.)
SHORT = fc.train.TrainConfig(
    num_steps=8, learning_rate=3e-3, warmup_steps=2, ema_decay=0.9, grad_penalty=0.0,
    log_every=1, checkpoint_every=3, keep_checkpoints=2,
)  # fmt: skip


info_nce_jit = eqx.filter_jit(fc.train.info_nce)


def arrays(tree):
    return jax.tree.leaves(eqx.filter(tree, eqx.is_array))


def allclose(xs, ys, rtol=1e-5, atol=1e-6):
    xs, ys = arrays(xs), arrays(ys)
    return len(xs) == len(ys) and all(
        x.shape == y.shape and np.allclose(x, y, rtol=rtol, atol=atol) for x, y in zip(xs, ys)
    )


def bitwise_equal(xs, ys):
    xs, ys = arrays(xs), arrays(ys)
    return len(xs) == len(ys) and all(
        np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(xs, ys)
    )


@pytest.fixture(scope="module")
def small_batch():
    return matching_task(jax.random.key(10), 5, **SHAPES)


def model_for(seed=0, **kwargs):
    # One residual block in all, for fast compiles; the fits below use CONFIG.
    options = dict(context_blocks=0, action_blocks=0, head_blocks=1)
    config = fc.EnergyModelConfig(**{**CONFIG.to_dict(), **options, **kwargs})
    return fc.EnergyModel(config, key=jax.random.key(seed))


# --------------------------------------------------------------------------------------
# InfoNCE


def naive_info_nce(model, batch, extra, tau, grad_penalty=0.0):
    """The reference's way: copy every context B times and call the model on each pair."""
    b = batch.size
    rep = jax.tree.map(lambda x: jnp.repeat(x, b, axis=0), batch.context)  # row i, i, ...
    tiled = jnp.tile(batch.actions, (b, 1, 1))  # chunk 0, 1, ..., 0, 1, ...
    score = eqx.filter_jit(lambda c, a: jax.vmap(model)(c, a))
    energies = np.asarray(score(rep, tiled), np.float64).reshape(b, b)
    k = extra.shape[1]
    rep_k = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), batch.context)
    e_extra = np.asarray(score(rep_k, extra.reshape(b * k, *extra.shape[2:])), np.float64).reshape(
        b, k
    )
    logits = -np.concatenate([energies, e_extra], axis=1) / tau
    lse = np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1)) + logits.max(1)
    infonce = np.mean(lse - np.diagonal(logits))

    @eqx.filter_jit
    @jax.vmap
    def grad_norm(context, a):
        return jnp.linalg.norm(jax.grad(lambda x: model(context, x))(a))

    pos = np.asarray(grad_norm(batch.context, batch.actions), np.float64)
    neg = np.asarray(grad_norm(rep_k, extra.reshape(b * k, *extra.shape[2:])), np.float64).reshape(
        b, k
    )
    norms = np.concatenate([pos[:, None], neg], axis=1)
    others = np.concatenate([energies + np.where(np.eye(b), np.inf, 0), e_extra], axis=1)
    negs = np.concatenate([energies[~np.eye(b, dtype=bool)].reshape(b, b - 1), e_extra], axis=1)
    return {
        "loss": infonce + grad_penalty * np.mean(norms**2),
        "infonce": infonce,
        "e_pos": np.mean(np.diagonal(energies)),
        "e_neg": energies[~np.eye(b, dtype=bool)].mean(),
        "e_neg_extra": e_extra.mean(),
        "top1_accuracy": np.mean(np.diagonal(energies) < others.min(1)),
        "pairwise_accuracy": np.mean(np.diagonal(energies)[:, None] < negs),
        "grad_norm": pos.mean(),
    }


def test_info_nce_equals_the_replicated_computation(small_batch):
    model = eqx.nn.inference_mode(model_for(1))
    extra = noisy_policy(jax.random.key(2), small_batch.actions, 3)
    loss, metrics = eqx.filter_jit(fc.train.info_nce)(
        model,
        small_batch.context,
        small_batch.actions,
        tau=0.5,
        extra_negatives=extra,
        grad_penalty=0.3,
    )
    expected = naive_info_nce(model, small_batch, extra, 0.5, grad_penalty=0.3)
    assert abs(float(loss) - expected["loss"]) <= 1e-5 * max(1, abs(expected["loss"]))
    for name, value in expected.items():
        assert abs(float(metrics[name]) - value) <= 1e-5 * max(1, abs(value)), name


def test_pair_chunks_give_the_same_loss_and_gradient(small_batch):
    model = model_for(3)  # training mode: dropout keys must line up too
    key = jax.random.key(4)

    @eqx.filter_jit
    def loss_and_grad(m, chunk):
        def fn(m):
            return fc.train.info_nce(m, small_batch.context, small_batch.actions, key=key,
                               pair_chunk=chunk)[0]  # fmt: skip

        return eqx.filter_value_and_grad(fn)(m)

    l1, g1 = loss_and_grad(model, None)
    l2, g2 = loss_and_grad(model, 2)
    assert jnp.allclose(l1, l2, rtol=1e-6)
    assert allclose(g1, g2, rtol=1e-5, atol=1e-7)


def test_pair_energies_scores_every_context_against_every_chunk(small_batch):
    model = eqx.nn.inference_mode(model_for(5))
    enc = jax.vmap(model.encode)(small_batch.context)
    emb = jax.vmap(model.embed_actions)(small_batch.actions[:3])
    energies = fc.train.pair_energies(model, enc, emb)
    assert energies.shape == (5, 3)
    ctx2 = jax.tree.map(lambda x: x[2], small_batch.context)
    assert jnp.allclose(energies[2, 1], model(ctx2, small_batch.actions[1]), rtol=1e-6)


def test_constant_energy_gives_log_batch_size(small_batch):
    model = eqx.nn.inference_mode(model_for(6))
    flat = eqx.tree_at(lambda m: m.head_out.weight, model, jnp.zeros_like(model.head_out.weight))
    loss, metrics = info_nce_jit(flat, small_batch.context, small_batch.actions)
    assert abs(float(loss) - np.log(5)) < 1e-6
    assert float(metrics["top1_accuracy"]) == 0.0  # ties never count as correct
    assert float(metrics["pairwise_accuracy"]) == 0.0
    extra = noisy_policy(jax.random.key(0), small_batch.actions, 3)
    loss, _ = info_nce_jit(flat, small_batch.context, small_batch.actions, extra_negatives=extra)
    assert abs(float(loss) - np.log(5 + 3)) < 1e-6
    # ...and the real model's loss differs, so the check above can fail.
    real, _ = info_nce_jit(model, small_batch.context, small_batch.actions)
    assert abs(float(real) - np.log(5)) > 1e-4


@pytest.mark.parametrize("energy, penalty", [("unbounded", 0.1), ("bounded", 0.0)])
def test_every_parameter_receives_gradient(small_batch, energy, penalty):
    model = model_for(7, energy=energy, context_pool=2, action_blocks=1)
    extra = noisy_policy(jax.random.key(0), small_batch.actions, 2)

    def loss(m):
        return fc.train.info_nce(m, small_batch.context, small_batch.actions, extra_negatives=extra,
                           grad_penalty=penalty, key=jax.random.key(1))[0]  # fmt: skip

    grads = eqx.filter_jit(eqx.filter_grad(loss))(model)
    flat = jax.tree_util.tree_leaves_with_path(eqx.filter(grads, eqx.is_array))
    assert len(flat) == len(arrays(model))
    dead = [jax.tree_util.keystr(p) for p, g in flat if not bool(jnp.any(g != 0))]
    assert not dead, f"no gradient reaches {dead}"


def test_info_nce_errors(small_batch):
    model = eqx.nn.inference_mode(model_for())
    one = jax.tree.map(lambda x: x[:1], small_batch)
    with pytest.raises(ValueError, match="at least 2"):
        fc.train.info_nce(model, one.context, one.actions)
    # The suite's runtime shape checks may catch this first, as a TypeError.
    with pytest.raises((ValueError, TypeError), match="extra_negatives"):
        fc.train.info_nce(model, small_batch.context, small_batch.actions,
                    extra_negatives=jnp.zeros((5, 2, 3, 4)))  # fmt: skip
    with pytest.raises(TypeError, match="TokenContext"):
        fc.train.info_nce(model, small_batch.context.tokens, small_batch.actions)


# --------------------------------------------------------------------------------------
# Negatives and data


def test_noise_and_shift_and_swap_negatives():
    a = jnp.arange(5.0 * 3).reshape(5, 3)
    key = jax.random.key(0)
    noisy = fc.train.NoiseNegatives(num=200, scale=0.5)(key, None, a)
    assert noisy.shape == (200, 5, 3)
    assert abs(float(jnp.std(noisy - a[None])) - 0.5) < 0.03
    shifted = fc.train.TimeShiftNegatives(shifts=(1, -2))(key, None, a)
    assert jnp.array_equal(shifted[0], a[jnp.array([1, 2, 3, 4, 4])])
    assert jnp.array_equal(shifted[1], a[jnp.array([0, 0, 0, 1, 2])])
    swapped = fc.train.SwapDimNegatives(num=50)(key, None, a)
    for s in swapped:
        moved = [d for d in range(3) if not jnp.array_equal(s[:, d], a[:, d])]
        assert len(moved) == 2
        i, j = moved
        assert jnp.array_equal(s[:, i], a[:, j]) and jnp.array_equal(s[:, j], a[:, i])
    with pytest.raises(ValueError, match="action_dim >= 2"):
        fc.train.SwapDimNegatives()(key, None, a[:, :1])
    with pytest.raises(ValueError, match="non-zero"):
        fc.train.TimeShiftNegatives(shifts=(0,))


def test_policy_negatives_and_stacking(small_batch):
    def sample(key, observation):
        # A "policy" that reads its own input (here a plain vector, not the energy's
        # TokenContext): a constant chunk at the observation, plus noise.
        return jnp.broadcast_to(observation, (4, 4)) + jax.random.normal(key, (4, 4))

    observations = jax.random.normal(jax.random.key(9), (5, 4))
    gens = (fc.train.PolicyNegatives(sample, num=3), fc.train.NoiseNegatives(num=2, scale=0.1))
    key = jax.random.key(0)
    out = make_negatives(gens, key, small_batch.context, small_batch.actions, observations)
    assert out.shape == (5, 5, 4, 4)
    # Row 1's policy negatives are the sampler run on observation 1, with that row's keys.
    row_key = jax.random.split(key, (2, 5))[0, 1]
    expected = jax.vmap(lambda k: sample(k, observations[1]))(jax.random.split(row_key, 3))
    assert jnp.allclose(out[1, :3], expected, rtol=1e-6, atol=1e-6)
    noise = out[:, 3:] - small_batch.actions[:, None]
    assert 0.05 < float(jnp.std(noise)) < 0.2
    bad = fc.train.PolicyNegatives(lambda k, c: jnp.zeros((4, 3)), num=1)
    with pytest.raises(ValueError, match="policy sampler"):
        make_negatives(
            (bad,), jax.random.key(0), small_batch.context, small_batch.actions, observations
        )
    # Without the policy's input the error says where to put it.
    with pytest.raises(ValueError, match="Batch.observation"):
        make_negatives(gens, key, small_batch.context, small_batch.actions)


def test_shuffled_batches_are_a_function_of_the_step():
    data = matching_task(jax.random.key(0), 10, **SHAPES)
    a, b = fc.train.ShuffledBatches(data, 4, seed=1), fc.train.ShuffledBatches(data, 4, seed=1)
    assert a.steps_per_epoch == 2
    assert bitwise_equal(a(3), b(3))
    assert not bitwise_equal(a(0), a(2))  # a new epoch is a new order
    rows = np.concatenate([np.asarray(a(s).actions[:, 0, 0]) for s in range(2)])
    assert len(set(rows.tolist())) == 8  # no row twice within an epoch
    with pytest.raises(ValueError, match="batch_size"):
        fc.train.ShuffledBatches(data, 11)


def test_batch_checks_its_shapes():
    data = matching_task(jax.random.key(0), 4, **SHAPES)
    with pytest.raises(ValueError, match="leading batch axis"):
        fc.train.Batch(data.context, data.actions[:3])
    with pytest.raises(ValueError, match="negatives"):
        fc.train.Batch(data.context, data.actions, jnp.zeros((4, 2, 4, 3)))
    # A batch of single actions is refused with the shape it needed, not read as a chunk.
    with pytest.raises(ValueError, match=r"\(batch, horizon, action_dim\).*actions\[:, None, :\]"):
        fc.train.Batch(data.context, data.actions[:, 0])
    with pytest.raises(ValueError, match="observation"):
        fc.train.Batch(data.context, data.actions, observation=jnp.zeros((3, 2)))


# --------------------------------------------------------------------------------------
# Optimiser and configs


def test_weight_decay_touches_matrices_only():
    model = model_for()
    config = fc.train.TrainConfig(num_steps=10, warmup_steps=0, weight_decay=0.5, learning_rate=0.1)
    opt = fc.train.make_optimizer(config)
    params = eqx.filter(model, eqx.is_inexact_array)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    assert bool(jnp.any(updates.head_out.weight != 0))  # decayed
    assert bool(jnp.all(updates.action_net.proj.bias == 0))  # not decayed
    assert bool(jnp.all(updates.attention.null_key == 0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_steps=0), "num_steps"),
        (dict(tau=0.0), "tau"),
        (dict(tau=float("inf")), "`tau` must be a finite number"),
        (dict(tau=float("nan")), "`tau` must be a finite number"),
        (dict(tau=-0.5), "tau"),
        (dict(learning_rate=float("inf")), "`learning_rate` must be a finite"),
        (dict(clip_norm=float("nan")), "`clip_norm` must be a finite"),
        (dict(grad_penalty=float("inf")), "`grad_penalty` must be a finite"),
        (dict(grad_margin=float("nan")), "`grad_margin` must be a finite"),
        (dict(weight_decay=float("inf")), "`weight_decay` must be a finite"),
        (dict(final_learning_rate=float("inf")), "`final_learning_rate` must be a finite"),
        (dict(ema_decay=float("nan")), "ema_decay"),
        (dict(warmup_steps=True), "warmup_steps"),
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(grad_penalty=-1.0), "grad_penalty"),
        (dict(pair_chunk=0), "pair_chunk"),
    ],
)
def test_train_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fc.train.TrainConfig(**kwargs)


# --------------------------------------------------------------------------------------
# Training on the synthetic matching task


@pytest.fixture(scope="module")
def trained():
    train = matching_task(jax.random.key(0), 2048, **SHAPES)
    held = matching_task(jax.random.key(1), 64, **SHAPES)
    policy = noisy_policy(jax.random.key(4), held.actions, 8, scale=0.3)
    config = fc.train.TrainConfig(num_steps=300, learning_rate=3e-3, warmup_steps=20, log_every=100)
    result = fc.train.fit(
        fc.EnergyModel(CONFIG, key=jax.random.key(2)),
        fc.train.ShuffledBatches(train, 64),
        key=jax.random.key(3),
        config=config,
        negatives=[fc.train.NoiseNegatives(4, 0.3)],
        held_out=held,
        held_out_policy_samples=policy,
        progress=False,
    )
    return result, held, policy


@pytest.mark.slow
def test_training_reaches_high_held_out_pair_accuracy(trained):
    result, _, _ = trained
    report = result.report
    assert report.top1_accuracy > 0.9 and report.pairwise_accuracy > 0.95
    assert report.e_pos < report.e_neg
    assert [h["step"] for h in result.history] == [100, 200, 300]
    assert result.history[-1]["infonce"] < result.history[0]["infonce"]
    assert result.model.dropout.inference  # returned ready for inference


@pytest.mark.slow
def test_trained_energy_corrects_a_mismatched_chunk_towards_the_match(trained):
    result, held, _ = trained
    start = jnp.roll(held.actions, 1, axis=0)  # every context gets another's chunk
    corrector = fc.Repeat(fc.Backtrack(fc.GradientStep(0.1)), num_steps=10)
    out, info = fc.correct(result.model, held.context, start, corrector=corrector)
    d0 = jnp.linalg.norm((start - held.actions).reshape(64, -1), axis=1)
    d1 = jnp.linalg.norm((out - held.actions).reshape(64, -1), axis=1)
    assert float(jnp.mean(d1 < d0)) > 0.9
    assert float(jnp.mean(d1)) < float(jnp.mean(d0))
    assert bool(jnp.all(info.energy_after <= info.energy_before))


@pytest.mark.slow
def test_held_out_report_measures_what_it_says(trained):
    result, held, policy = trained
    good = result.report
    assert good.num_policy_samples == 8 and good.num_contexts == 64
    assert good.gradient_cosine > 0.2
    assert good.energy_fall_fraction > 0.8 and good.towards_expert_fraction > 0.5
    assert good.oracle_distance <= good.best_of_n_distance < good.mean_sample_distance
    # The same model with its energy negated ranks and points the wrong way.
    flipped = eqx.tree_at(lambda m: m.head_out.weight, result.model, -result.model.head_out.weight)
    bad = fc.train.evaluate(flipped, held, policy_samples=policy)
    assert bad.top1_accuracy < 0.1 and bad.pairwise_accuracy < 0.1
    assert bad.gradient_cosine < 0
    assert bad.best_of_n_distance > good.mean_sample_distance
    assert set(good.to_dict()) >= {
        "top1_accuracy", "pairwise_accuracy", "gradient_cosine", "best_of_n_distance"
    }  # fmt: skip


# --------------------------------------------------------------------------------------
# Several devices, checkpoints, resume


@pytest.fixture(scope="module")
def short_data():
    data = matching_task(jax.random.key(20), 256, **SHAPES)
    return fc.train.ShuffledBatches(data, 32, seed=3)


def short_fit(data, **kwargs):
    options = dict(key=jax.random.key(5), config=SHORT, progress=False,
                   negatives=[fc.train.NoiseNegatives(2, 0.3)])  # fmt: skip
    options.update(kwargs)
    return fc.train.fit(fc.EnergyModel(CONFIG, key=jax.random.key(6)), data, **options)


@pytest.fixture(scope="module")
def single_device_run(short_data):
    return short_fit(short_data)


@pytest.mark.slow
def test_data_parallel_matches_one_device(short_data, single_device_run):
    assert len(jax.devices()) == 4
    mesh = fc.train.data_parallel_mesh()
    placed = _place_batch(short_data(0), mesh)
    assert len(placed.actions.sharding.device_set) == 4
    assert placed.actions.addressable_shards[0].data.shape[0] == 8  # split, not copied
    sharded = short_fit(short_data, mesh=mesh)
    ref = [h["loss"] for h in single_device_run.history]
    got = [h["loss"] for h in sharded.history]
    assert len(got) == SHORT.num_steps
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    assert allclose(sharded.model, single_device_run.model, rtol=1e-4, atol=1e-5)
    leaf = arrays(sharded.model)[0]
    assert len(leaf.sharding.device_set) == 4 and leaf.sharding.is_fully_replicated
    with pytest.raises(ValueError, match="multiple of 4"):
        _place_batch(matching_task(jax.random.key(0), 6, **SHAPES), mesh)


@pytest.mark.slow
def test_ema_follows_its_formula(tmp_path, short_data, single_device_run):
    # Checkpoints after every step expose consecutive states; only saving changes, so this
    # reuses the compiled step of the runs above.
    ckpt = tmp_path / "every"
    every = fc.train.TrainConfig(
        **{**SHORT.to_dict(), "checkpoint_every": 1, "keep_checkpoints": 8}
    )
    result = short_fit(short_data, config=every, checkpoint_dir=ckpt)
    assert bitwise_equal(result.ema_model, single_device_run.ema_model)
    model = fc.EnergyModel(CONFIG, key=jax.random.key(6))
    like = _initial_state(model, SHORT, fc.train.make_optimizer(SHORT))
    checkpointer = Checkpointer(ckpt, keep=8)
    previous = like
    for step in range(1, SHORT.num_steps + 1):
        state, _ = _restore(checkpointer, step, like, jax.random.key(0))
        assert int(state.step) == step
        for p, e, e0 in zip(arrays(state.model), arrays(state.ema), arrays(previous.ema)):
            np.testing.assert_allclose(e, 0.9 * e0 + 0.1 * p, rtol=1e-6, atol=1e-7)
        previous = state
    checkpointer.close()
    assert bitwise_equal(previous.ema, single_device_run.ema_model)
    assert not allclose(result.model, result.ema_model)


@pytest.mark.slow
def test_interrupted_fit_resumes_exactly(tmp_path, short_data, single_device_run):
    ckpt = tmp_path / "ckpt"

    def crash(step, metrics):
        if step == 5:
            raise KeyboardInterrupt("simulated interruption")

    with pytest.raises(KeyboardInterrupt):
        short_fit(short_data, checkpoint_dir=ckpt, callback=crash)
    assert Checkpointer(ckpt, keep=2).all_steps() == [3]
    resumed = short_fit(short_data, checkpoint_dir=ckpt)
    assert bitwise_equal(resumed.model, single_device_run.model)
    assert bitwise_equal(resumed.ema_model, single_device_run.ema_model)
    assert resumed.history == single_device_run.history
    # Asynchronous saves were finished when fit returned; only the last two are kept.
    assert Checkpointer(ckpt, keep=2).all_steps() == [6, 8]
    # A finished run resumed again does nothing and returns the same model.
    again = short_fit(short_data, checkpoint_dir=ckpt)
    assert bitwise_equal(again.model, resumed.model)


def test_resume_refuses_other_settings(tmp_path, short_data):
    ckpt = tmp_path / "ckpt"
    meta = {"step": 3, "model_config": CONFIG.to_dict(), "train_config": SHORT.to_dict()}
    model = fc.EnergyModel(CONFIG, key=jax.random.key(0))
    checkpointer = Checkpointer(ckpt, keep=2)
    checkpointer.save(3, eqx.filter(model, eqx.is_array), meta)
    checkpointer.close()
    other = fc.train.TrainConfig(**{**SHORT.to_dict(), "learning_rate": 1e-2})
    with pytest.raises(ValueError, match="learning_rate"):
        short_fit(short_data, checkpoint_dir=ckpt, config=other)
    wide = fc.EnergyModelConfig(**{**CONFIG.to_dict(), "hidden": 64})
    with pytest.raises(ValueError, match="same EnergyModelConfig"):
        fc.train.fit(fc.EnergyModel(wide, key=jax.random.key(0)), short_data, key=jax.random.key(0),
               config=SHORT, checkpoint_dir=ckpt, progress=False)  # fmt: skip


def test_fit_from_raw_observations_and_from_an_iterable(short_data, single_device_run):
    # Raw observations: tokens plus a count of real tokens, turned into contexts in the step.
    def observation(batch):
        count = jnp.sum(batch.context.mask, axis=1)
        order = jnp.argsort(~batch.context.mask, axis=1, stable=True)  # real tokens first
        tokens = jnp.take_along_axis(batch.context.tokens, order[:, :, None], axis=1)
        return fc.train.Batch({"tokens": tokens, "count": count}, batch.actions)

    def to_context(obs):
        seq = obs["tokens"].shape[1]
        return fc.TokenContext(obs["tokens"], jnp.arange(seq)[None, :] < obs["count"][:, None])

    raw = short_fit(lambda step: observation(short_data(step)), to_context=to_context)
    # Reordering tokens changes only float summation order inside the model.
    ref = [h["loss"] for h in single_device_run.history]
    np.testing.assert_allclose([h["loss"] for h in raw.history], ref, rtol=1e-4)

    batches = [short_data(s) for s in range(SHORT.num_steps)]
    listed = short_fit(batches, progress=True)  # the tqdm bar must not disturb anything
    assert bitwise_equal(listed.model, single_device_run.model)
    with pytest.raises(ValueError, match="ran out after 7 batches"):
        short_fit(batches[:7])
    with pytest.raises(TypeError, match="Batch"):
        short_fit([short_data(0).actions] * 8)


# --------------------------------------------------------------------------------------
# A run that is really killed


SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import jax
    import flowcorrect as fc
    from flowcorrect._train.checkpoint import Checkpointer
    from flowcorrect._train.synthetic import matching_task

    ckpt, out, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    shapes = dict(seq=8, context_dim=16, horizon=4, action_dim=4)
    data = fc.train.ShuffledBatches(matching_task(jax.random.key(0), 256, **shapes), 32, seed=1)
    config = fc.EnergyModelConfig(context_dim=16, action_dim=4, hidden=16, num_heads=2)
    train = fc.train.TrainConfig(num_steps=30, learning_rate=3e-3, warmup_steps=4, ema_decay=0.9,
                           grad_penalty=0.0, log_every=1, checkpoint_every=4,
                           keep_checkpoints=2)
    print("resumed_from", Checkpointer(ckpt, keep=2).latest_step(), flush=True)
    result = fc.train.fit(
        fc.EnergyModel(config, key=jax.random.key(1)), data, key=jax.random.key(2),
        config=train, checkpoint_dir=ckpt, negatives=[fc.train.NoiseNegatives(2, 0.3)],
        callback=lambda step, m: time.sleep(delay), progress=False,
    )
    fc.save_model(result.model, out + "/model")
    fc.save_model(result.ema_model, out + "/ema")
    with open(out + "/history.json", "w") as f:
        json.dump(result.history, f)
    """
)


def _checkpoint_steps(path):
    if not path.exists():
        return []
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    # Both runs compile alike; the lowest XLA optimisation level compiles ~3x faster.
    flags = "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"
    env = {**os.environ, "XLA_FLAGS": flags}

    def launch(name, delay):
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        args = [sys.executable, str(script), str(folder / "ckpt"), str(folder), str(delay)]
        # Output goes to files: a full pipe would stall the child.
        with open(folder / "out.txt", "w") as out, open(folder / "err.txt", "w") as err:
            return subprocess.Popen(args, env=env, stdout=out, stderr=err)

    def finish(process, name):
        assert process.wait(timeout=240) == 0, (tmp_path / name / "err.txt").read_text()
        return (tmp_path / name / "out.txt").read_text()

    reference = launch("reference", 0.0)
    victim = launch("victim", 0.05)
    deadline = time.monotonic() + 240
    while _checkpoint_steps(tmp_path / "victim" / "ckpt")[-1:] < [8]:
        assert victim.poll() is None, (tmp_path / "victim" / "err.txt").read_text()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.4))  # land at a random step, perhaps mid-save
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (tmp_path / "victim" / "model").exists()
    killed_at = _checkpoint_steps(tmp_path / "victim" / "ckpt")[-1]
    assert 8 <= killed_at < 30

    finish(reference, "reference")
    out = finish(launch("victim", 0.0), "victim")
    step = int(out.split("resumed_from")[1].split()[0])
    assert 8 <= step < 30

    for name in ("model", "ema"):
        a = fc.load_model(tmp_path / "reference" / name)
        b = fc.load_model(tmp_path / "victim" / name)
        assert bitwise_equal(a, b), name
    ref_hist = json.loads((tmp_path / "reference" / "history.json").read_text())
    got_hist = json.loads((tmp_path / "victim" / "history.json").read_text())
    assert got_hist == ref_hist and len(ref_hist) == 30
