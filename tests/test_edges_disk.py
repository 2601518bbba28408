"""What is read from disk and what training is fed: rollout directories, non-finite
training data, model files as untrusted input, and the ensemble's numerics.

Regression tests first, then the fuzz sections. The fuzz tests follow `test_fuzz.py`:
`FLOWCORRECT_FUZZ_EXAMPLES` examples per test (CI default below), seeded
(`derandomize=True`, no example database) and on small fixed shapes, so no example
recompiles. The counts of what ran are printed at the end of the module.
"""

import collections
import json
import logging
import os
import pathlib
import pickle
import tracemalloc
import warnings
import zipfile

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import flowcorrect as fc
from flowcorrect._model import serialise
from flowcorrect._verifiers.rollouts import RolloutFileError

EXAMPLES = int(os.environ.get("FLOWCORRECT_FUZZ_EXAMPLES", "12"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None)
COUNTS: collections.Counter = collections.Counter()

OBS, N, H, D = 5, 4, 3, 2  # one layout, so the training fuzz compiles once


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    yield
    if not COUNTS:
        return
    line = (
        f"edges fuzz ({EXAMPLES} examples per test, FLOWCORRECT_FUZZ_EXAMPLES): "
        + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items()))
    )
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + line)


def rollouts(episodes=3, obs=OBS, n=N, h=H, d=D, seed=0, queries_per_episode=2):
    rng = np.random.default_rng(seed)
    q = episodes * queries_per_episode
    success = rng.random(episodes) < 0.5
    episode = np.repeat(np.arange(episodes), queries_per_episode)
    return fc.verifiers.Rollouts(
        observation=rng.standard_normal((q, obs)).astype(np.float32),
        candidates=rng.standard_normal((q, n, h, d)).astype(np.float32),
        executed=rng.integers(0, n, q).astype(np.int64),
        episode=episode.astype(np.int64),
        step=np.tile(np.arange(queries_per_episode), episodes).astype(np.int64),
        success=success[episode],
        steps_to_success=np.where(success[episode], 5, -1).astype(np.int64),
        episode_seed=np.arange(episodes, dtype=np.int64),
    )


def fields(r: fc.verifiers.Rollouts) -> dict:
    return {f: getattr(r, f) for f in r.__dataclass_fields__}


def same(a: fc.verifiers.Rollouts, b: fc.verifiers.Rollouts) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)


# --- rollouts on disk ------------------------------------------------------------------


@pytest.mark.parametrize(
    "other, field",
    [(dict(n=N + 1), "candidates"), (dict(obs=OBS + 2), "observation"),
     (dict(h=H + 1), "candidates"), (dict(d=D + 1), "candidates")],
)
def test_append_refuses_another_layout_and_keeps_the_directory_readable(tmp_path, other, field):
    writer = fc.verifiers.RolloutWriter(tmp_path / "r", {"task": "x"})
    first = rollouts()
    writer.append(first)
    before = sorted(p.name for p in (tmp_path / "r").iterdir())
    with pytest.raises(ValueError, match=rf"`{field}` rows have shape .* already written"):
        writer.append(rollouts(seed=1, **other))
    # Nothing was written; a new writer on the directory (a resumed collector) refuses too.
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == before
    with pytest.raises(ValueError, match=f"`{field}`"):
        fc.verifiers.RolloutWriter(tmp_path / "r", {"task": "x"}).append(rollouts(seed=1, **other))
    assert same(fc.verifiers.load_rollouts(tmp_path / "r"), first)
    writer.append(rollouts(seed=2))
    assert fc.verifiers.load_rollouts(tmp_path / "r").num_episodes == 6


def test_a_directory_without_a_recorded_layout_is_checked_against_its_first_part(tmp_path):
    writer = fc.verifiers.RolloutWriter(tmp_path / "r")
    writer.append(rollouts())
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    del meta["layout"]
    (tmp_path / "r" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="`candidates` rows have shape"):
        fc.verifiers.RolloutWriter(tmp_path / "r").append(rollouts(n=N + 1))


def test_a_truncated_part_is_named_and_the_rest_can_be_loaded(tmp_path):
    writer = fc.verifiers.RolloutWriter(tmp_path / "r")
    parts = [rollouts(seed=s) for s in range(3)]
    for p in parts:
        writer.append(p)
    broken = tmp_path / "r" / "part-00001.npz"
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(RolloutFileError, match="part-00001.npz.*skip_corrupt=True") as info:
        fc.verifiers.load_rollouts(tmp_path / "r")
    assert "BadZipFile" in str(info.value) or "EOFError" in str(info.value)
    with pytest.warns(RuntimeWarning, match=r"left out 1 unreadable file.*part-00001\.npz"):
        rest = fc.verifiers.load_rollouts(tmp_path / "r", skip_corrupt=True)
    assert same(rest, fc._verifiers.rollouts.concatenate([parts[0], parts[2]]))


def test_a_truncated_meta_json_is_named_and_the_parts_stay_reachable(tmp_path):
    writer = fc.verifiers.RolloutWriter(tmp_path / "r", {"task": "x"})
    parts = [rollouts(seed=s) for s in range(2)]
    for p in parts:
        writer.append(p)
    meta = tmp_path / "r" / "meta.json"
    meta.write_text(meta.read_text()[:20])
    for load in (lambda: fc.verifiers.load_rollouts(tmp_path / "r"),
                 lambda: fc.verifiers.RolloutWriter(tmp_path / "r", {"task": "x"})):
        with pytest.raises(RolloutFileError, match=r"meta\.json cannot be read \(JSONDecodeError"):
            load()
    with pytest.warns(RuntimeWarning, match="meta.json"):
        rest = fc.verifiers.load_rollouts(tmp_path / "r", skip_corrupt=True)
    assert same(rest, fc._verifiers.rollouts.concatenate(parts))


def _bad(name, edit):
    def make():
        f = fields(rollouts())
        f[name] = edit(f[name].copy())
        return f
    return make


def _nan_at(x):
    x = x.astype(np.float32)
    x.flat[1] = np.nan
    return x


def _inf_at(x):
    x.flat[-1] = np.inf
    return x


def _success_at_minus_one(f):
    f["success"] = np.ones_like(f["success"])
    f["steps_to_success"] = np.full_like(f["steps_to_success"], -1)
    return f


def _failure_with_a_count(f):
    f["success"] = np.zeros_like(f["success"])
    f["steps_to_success"] = np.full_like(f["steps_to_success"], 3)
    return f


def _mixed_outcome(f):
    f["success"] = f["success"].copy()
    f["success"][0], f["success"][1] = True, False  # rows 0 and 1: episode 0
    f["steps_to_success"] = np.where(f["success"], 4, -1).astype(np.int64)
    return f


BAD_ROLLOUTS = {
    "NaN observation": ("observation", _bad("observation", _nan_at), "finite"),
    "inf candidates": ("candidates", _bad("candidates", _inf_at), "finite"),
    "NaN steps_to_success": ("steps_to_success", _bad("steps_to_success", _nan_at), "integer"),
    "float executed": ("executed", _bad("executed", lambda x: x.astype(np.float64)), "integer"),
    "float success": ("success", _bad("success", lambda x: x.astype(np.float32)), "bool"),
    "object observation": ("observation", _bad("observation", lambda x: x.astype(object)),
                           "numeric"),
    "object episode_seed": ("episode_seed", _bad("episode_seed", lambda x: x.astype(object)),
                            "numeric"),
    "string step": ("step", _bad("step", lambda x: x.astype(str)), "numeric"),
    "success at -1": ("steps_to_success", lambda: _success_at_minus_one(fields(rollouts())),
                      ">= 0 where `success` is True"),
    "failure with a count": ("steps_to_success",
                             lambda: _failure_with_a_count(fields(rollouts())), "-1 where"),
    "mixed outcome": ("success", lambda: _mixed_outcome(fields(rollouts(episodes=2))),
                      "same for every query of an episode"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROLLOUTS))
def test_rollouts_refuse_values_that_cannot_be_saved_or_trained_on(case):
    name, make, what = BAD_ROLLOUTS[case]
    with pytest.raises(ValueError, match=rf"`{name}`.*{what}|{what}.*`{name}`"):
        fc.verifiers.Rollouts(**make())


def test_discounted_targets_of_valid_rollouts_are_in_the_unit_interval():
    r = rollouts(episodes=6)
    t = r.discounted(0.9)
    assert np.all(np.isfinite(t)) and np.all((t >= 0) & (t <= 1))
    assert np.array_equal(t > 0, r.success)


# --- training on non-finite data -------------------------------------------------------


def _mlp(seed=0):
    return fc.MLPEnergy(fc.MLPEnergyConfig(obs_dim=OBS, action_dim=D, horizon=H, hidden=8),
                        key=jax.random.key(seed))


def _labelled(step, bad_steps=(), where="context"):
    rng = np.random.default_rng(step)
    c = rng.standard_normal((8, OBS)).astype(np.float32)
    a = rng.standard_normal((8, H, D)).astype(np.float32)
    y = (rng.random(8) < 0.5).astype(np.float32)
    if step in bad_steps:
        {"context": c, "actions": a, "target": y}[where].reshape(-1)[3] = np.nan
    return fc.verifiers.LabelledBatch(jnp.asarray(c), jnp.asarray(a), jnp.asarray(y))


def _demos(step, bad_steps=()):
    rng = np.random.default_rng(100 + step)
    c = rng.standard_normal((8, OBS)).astype(np.float32)
    a = rng.standard_normal((8, H, D)).astype(np.float32)
    if step in bad_steps:
        a[2, 1, 0] = np.inf
    return fc.train.Batch(c, a)


VCONFIG = fc.train.TrainConfig(num_steps=8, learning_rate=1e-3, warmup_steps=1, log_every=4,
                         checkpoint_every=4, grad_penalty=0.0)


def finite_model(model) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x)))
               for x in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))


def test_fit_skips_a_non_finite_step_keeps_the_model_finite_and_warns():
    with pytest.warns(RuntimeWarning, match=r"fit skipped 1 of 8 steps"):
        out = fc.train.fit(_mlp(), lambda s: _demos(s, bad_steps=(2,)), key=jax.random.key(0),
                     config=VCONFIG, progress=False)
    assert finite_model(out.model)
    assert [h["skipped_steps"] for h in out.history] == [1, 0]
    assert all(np.isfinite(h["loss"]) for h in out.history)


@pytest.mark.parametrize("where", ["context", "actions", "target"])
def test_fit_verifier_skips_a_non_finite_step_and_changes_nothing_at_it(where):
    # One NaN in step 5's batch: that step changes nothing and the rest train on.
    with pytest.warns(RuntimeWarning, match=r"fit_verifier skipped 1 of 8 steps"):
        out = fc.verifiers.fit_verifier(
            _mlp(),
            lambda s: _labelled(s, (5,), where),
            fc.verifiers.OutcomeLoss(),
            key=jax.random.key(0),
            config=VCONFIG,
            progress=False,
        )
    assert finite_model(out.model)
    assert [h["skipped_steps"] for h in out.history] == [0, 1]
    assert np.isfinite(out.history[1]["loss"])


def test_the_skip_count_survives_an_exact_resume(tmp_path):
    data = lambda s: _labelled(s, (1, 6))  # noqa: E731
    with pytest.warns(RuntimeWarning, match="skipped 2 of 8"):
        full = fc.verifiers.fit_verifier(
            _mlp(),
            data,
            fc.verifiers.OutcomeLoss(),
            key=jax.random.key(3),
            config=VCONFIG,
            progress=False,
        )

    def dying(step):
        if step == 5:
            raise KeyboardInterrupt
        return data(step)

    with pytest.raises(KeyboardInterrupt):
        fc.verifiers.fit_verifier(
            _mlp(),
            dying,
            fc.verifiers.OutcomeLoss(),
            key=jax.random.key(3),
            config=VCONFIG,
            checkpoint_dir=tmp_path / "ck",
            progress=False,
        )
    with pytest.warns(RuntimeWarning, match="skipped 2 of 8"):
        resumed = fc.verifiers.fit_verifier(
            _mlp(),
            data,
            fc.verifiers.OutcomeLoss(),
            key=jax.random.key(3),
            config=VCONFIG,
            checkpoint_dir=tmp_path / "ck",
            progress=False,
        )
    assert bool(eqx.tree_equal(full.model, resumed.model))  # bit for bit
    assert resumed.history == full.history


def test_shuffled_batches_refuse_non_finite_data_up_front():
    data = _demos(0)
    actions = np.asarray(data.actions).copy()
    actions[5, 0, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf values in `Batch.actions`.*\[5\]"):
        fc.train.ShuffledBatches(fc.train.Batch(data.context, actions), 4)
    context = np.asarray(data.context).copy()
    context[2, 0] = -np.inf
    with pytest.raises(ValueError, match=r"`Batch.context`.*\[2\]"):
        fc.train.ShuffledBatches(fc.train.Batch(jnp.asarray(context), data.actions), 4)
    fc.train.ShuffledBatches(data, 4)  # finite data is taken


# After a failed tensorstore read, orbax's background event loop is sometimes collected
# with a callback pending (see test_train_interface.py): let that one warning through.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_fit_verifier_names_itself_for_a_broken_checkpoint_and_can_fall_back(tmp_path, caplog):
    data = lambda s: _labelled(s)  # noqa: E731
    run = lambda **kw: fc.verifiers.fit_verifier(  # noqa: E731
        _mlp(),
        data,
        fc.verifiers.OutcomeLoss(),
        key=jax.random.key(1),
        config=VCONFIG,
        progress=False,
        checkpoint_dir=tmp_path / "ck",
        **kw,
    )
    first = run()
    for f in (tmp_path / "ck" / "8" / "state" / "d").iterdir():
        f.write_bytes(f.read_bytes()[:7])
    with pytest.raises(fc.train.CheckpointError, match=r"call fit_verifier\(\.\.\., on_corrupt="):
        run()
    with caplog.at_level(logging.WARNING, logger="flowcorrect"):
        again = run(on_corrupt="fallback")
    assert "fit_verifier: resuming from step 4" in caplog.text
    assert bool(eqx.tree_equal(first.model, again.model))
    with pytest.raises(ValueError, match="on_corrupt"):
        run(on_corrupt="ignore")


# --- model files as untrusted input ----------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    config = fc.MLPEnergyConfig(obs_dim=OBS, action_dim=D, horizon=H, hidden=8)
    model = eqx.nn.inference_mode(fc.MLPEnergy(config, key=jax.random.key(0)))
    return fc.save_model(model, tmp_path / "model")


def _reseal(path: pathlib.Path, edit=lambda meta: None):
    """Rewrites the config with `edit` applied and every checksum recomputed: what a
    hostile file looks like, since the checksums are not secret."""
    meta = json.loads((path / "config.json").read_text())
    edit(meta)
    weights = path / meta["weights"]["file"]
    if weights.is_file():
        meta["weights"]["sha256"] = serialise._sha256(weights)
    meta["checksum"] = serialise._config_digest(meta)
    (path / "config.json").write_text(json.dumps(meta))


@pytest.fixture
def no_build(monkeypatch):
    """Fails the test if load_model builds the architecture or reads array data."""
    def refuse(*args, **kwargs):
        raise AssertionError("load_model built the model or read data before refusing")
    monkeypatch.setattr(serialise.eqx, "filter_eval_shape", refuse)
    monkeypatch.setattr(serialise.np, "load", refuse)


@pytest.mark.parametrize("depth", [10**6, 40])
def test_a_huge_depth_is_refused_before_the_model_is_built(saved, no_build, depth):
    _reseal(saved, lambda m: m["config"].update(depth=depth))
    with pytest.raises(fc.ModelFileError, match=f"depth={depth}"):
        fc.load_model(saved)


def test_a_huge_width_is_refused_before_the_model_is_built(saved, no_build):
    _reseal(saved, lambda m: m["config"].update(hidden=10**7))
    with pytest.raises(fc.ModelFileError, match="hidden=10000000"):
        fc.load_model(saved)


def _bomb(path: pathlib.Path, how: str) -> None:
    """A weights file whose deflated member of zeros expands to 50 MB."""
    meta = json.loads((path / "config.json").read_text())
    with np.load(path / "weights.npz") as f:
        arrays = {k: f[k] for k in f.files}
    big = np.zeros(12_500_000, np.float32)
    if how == "extra member":
        arrays["payload"] = big
    else:  # a declared weight grown to 50 MB
        first = next(iter(arrays))
        arrays[first] = big
        meta["weights"]["leaves"][first] = [list(big.shape), "float32"]
        (path / "config.json").write_text(json.dumps(meta))
    with zipfile.ZipFile(path / "weights.npz", "w", zipfile.ZIP_DEFLATED) as zf:
        for k, v in arrays.items():
            with zf.open(k + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, v)
    _reseal(path)


@pytest.mark.parametrize("how", ["extra member", "grown weight"])
def test_a_zip_bomb_is_refused_before_decompressing(saved, how):
    _bomb(saved, how)
    assert (saved / "weights.npz").stat().st_size < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(fc.ModelFileError, match="unexpected|different models|max_parameters"):
            fc.load_model(saved)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, f"allocated {peak} bytes before refusing"


def test_a_model_over_max_parameters_is_refused_before_reading_data(saved, no_build):
    with pytest.raises(fc.ModelFileError, match="max_parameters"):
        fc.load_model(saved, max_parameters=10)


def test_the_weights_file_must_be_inside_the_model_folder(saved, tmp_path):
    other = fc.save_model(
        eqx.nn.inference_mode(fc.MLPEnergy(
            fc.MLPEnergyConfig(obs_dim=OBS, action_dim=D, horizon=H, hidden=8),
            key=jax.random.key(9))),
        tmp_path / "other")
    for name in (str(other / "weights.npz"), "../other/weights.npz"):
        _reseal(saved, lambda m, name=name: m["weights"].update(file=name))
        with pytest.raises(fc.ModelFileError, match="outside the model's folder"):
            fc.load_model(saved)
    # A symbolic link out of the folder is refused too, after resolving it.
    _reseal(saved, lambda m: m["weights"].update(file="linked.npz"))
    (saved / "linked.npz").symlink_to(other / "weights.npz")
    _reseal(saved)
    with pytest.raises(fc.ModelFileError, match="symbolic link"):
        fc.load_model(saved)


def test_no_code_runs_from_a_model_file(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    # A class name is looked up among flowcorrect's own, never imported.
    _reseal(saved, lambda m: m.update({"class": "os.system"}))
    with pytest.raises(fc.ModelFileError, match="'os.system', which is not one of"):
        fc.load_model(saved)
    _reseal(saved, lambda m: m.update({"class": "MLPEnergy"}))
    # An object array (stored with pickle) is refused from its header.
    with np.load(saved / "weights.npz") as f:
        arrays = {k: f[k] for k in f.files}
    first = next(iter(arrays))
    arrays[first] = np.array([os.system], dtype=object)
    with open(saved / "weights.npz", "wb") as f:
        np.savez(f, **arrays)
    _reseal(saved, lambda m: m["weights"]["leaves"].update({first: [[1], "object"]}))
    with pytest.raises(fc.ModelFileError, match="(?i)object"):
        fc.load_model(saved)


def test_a_legitimate_model_still_loads_unchanged(saved):
    obs = jax.random.normal(jax.random.key(1), (OBS,))
    chunk = jax.random.normal(jax.random.key(2), (H, D))
    config = fc.MLPEnergyConfig(obs_dim=OBS, action_dim=D, horizon=H, hidden=8)
    model = eqx.nn.inference_mode(fc.MLPEnergy(config, key=jax.random.key(0)))
    assert float(fc.load_model(saved)(obs, chunk)) == float(model(obs, chunk))


# --- the ensemble's numerics -----------------------------------------------------------


def _member_energies(chunk_dtype):
    # A float32 verifier whose energies differ past bfloat16's third digit: 1000 + 0.1 * i,
    # lowest at candidate 3.
    offsets = jnp.asarray([0.5, 0.3, 0.4, 0.1, 0.6, 0.2], jnp.float32)
    member = lambda c, a: 1000.0 + offsets[c]  # noqa: E731
    cands = jnp.zeros((len(offsets), H, D), chunk_dtype)
    return member, cands, jnp.arange(len(offsets))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_ensemble_ranks_low_precision_chunks_like_its_member(dtype):
    member, cands, idx = _member_energies(dtype)
    alone = jax.vmap(lambda c, a: fc.as_energy(member)(c, a))(idx, cands)
    both = jax.vmap(lambda c, a: fc.Ensemble([member, member], 0.5)(c, a))(idx, cands)
    assert both.dtype == jnp.float32
    assert int(jnp.argmin(alone)) == 3 == int(jnp.argmin(both))
    np.testing.assert_allclose(both, alone, rtol=1e-6)


def test_ensemble_keeps_a_large_float32_energy_finite_on_float16_chunks():
    big = lambda c, a: jnp.float32(1e6) + jnp.sum(a.astype(jnp.float32))  # noqa: E731
    chunk = jnp.full((H, D), 0.5, jnp.float16)
    value = fc.Ensemble([big, big], 1.0)(None, chunk)
    assert value.dtype == jnp.float32 and float(value) == pytest.approx(1e6 + 3.0, rel=1e-7)
    g = jax.grad(lambda a: fc.Ensemble([big], 1.0)(None, a).astype(jnp.float32))(chunk)
    assert g.dtype == jnp.float16 and bool(jnp.all(g == 1))


def test_best_of_n_picks_through_a_bfloat16_ensemble_what_the_member_picks():

    class Policy(fc.AbstractPolicy):
        chunk_shape: tuple[int, int] = eqx.field(static=True, default=(H, D))
        convention: fc.AbstractConvention = fc.OpenPI()

        def condition(self, observation):
            return observation

        def velocity(self, cond, x_t, t):
            return x_t - cond

        def energy_context(self, cond):
            return cond

    # A float32 verifier near 1000 whose differences between candidates (about 0.01)
    # are far below bfloat16's spacing there (4).
    def member(c, a):
        return 1000.0 + 0.01 * jnp.sum(a.astype(jnp.float32))

    obs = jnp.zeros((H, D), jnp.bfloat16)
    # bfloat16 noise makes bfloat16 candidates.
    noise = jax.random.normal(jax.random.key(0), (6, H, D)).astype(jnp.bfloat16)
    run = lambda e: eqx.filter_jit(fc.sample)(  # noqa: E731
        Policy(), obs, noise=noise, energy=e, placement=fc.BestOfN(6))
    chunk, info = run(fc.Ensemble([member, member], 1.0))
    _, alone = run(member)
    assert chunk.dtype == jnp.bfloat16
    scores = info.placement.candidate_energy
    assert scores.dtype == jnp.float32 and float(jnp.ptp(scores)) > 0
    best = int(alone.placement.selected)
    assert best != 0 and int(info.placement.selected) == best


# --- fuzz: rollout directories ---------------------------------------------------------

MISMATCH = {"n": dict(n=N + 1), "obs": dict(obs=OBS + 1), "horizon": dict(h=H + 1),
            "action_dim": dict(d=D + 1)}
CORRUPT = ("truncate", "flip", "empty", "delete")


@FUZZ
@given(data=st.data())
def test_fuzz_rollout_directories(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("roll") / "r"
    writer = fc.verifiers.RolloutWriter(root)
    kept: list[fc.verifiers.Rollouts] = []
    for i in range(data.draw(st.integers(1, 4), label="appends")):
        kind = "ok" if i == 0 else data.draw(st.sampled_from(["ok", "ok"] + sorted(MISMATCH)),
                                              label="part")
        part = rollouts(episodes=data.draw(st.integers(1, 3)), seed=i,
                        **MISMATCH.get(kind, {}))
        if kind != "ok" and kept:
            COUNTS["rollouts: mismatched part refused"] += 1
            with pytest.raises(ValueError, match="already written"):
                writer.append(part)
            continue
        writer.append(part)
        kept.append(part)
    assert same(fc.verifiers.load_rollouts(root), fc._verifiers.rollouts.concatenate(kept))
    COUNTS["rollouts: directories read back"] += 1
    # Then one file is damaged the way a foreign tool would.
    names = [f"part-{i:05d}.npz" for i in range(len(kept))] + ["meta.json"]
    target = root / data.draw(st.sampled_from(names), label="file")
    # meta.json is cut short, not edited: an edit that keeps it valid JSON (a part's
    # name changed) is not a corruption any file format could detect without a checksum.
    how = data.draw(st.sampled_from(CORRUPT if target.name != "meta.json"
                                    else ("truncate", "empty", "delete")), label="how")
    raw = bytearray(target.read_bytes())
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    if how == "delete":
        target.unlink()
    else:
        target.write_bytes(bytes(raw if how != "empty" else b""))
    COUNTS[f"rollouts: {how} {'meta' if target.name == 'meta.json' else 'part'}"] += 1
    try:
        loaded = fc.verifiers.load_rollouts(root)
    except FileNotFoundError:
        assert target.name == "meta.json" and how == "delete"
        COUNTS["rollouts: damage refused"] += 1
        return
    except ValueError as e:
        assert target.name in str(e) and "BadZip" not in type(e).__name__
        COUNTS["rollouts: damage refused"] += 1
    else:
        # A flipped bit inside a stored array's data is not detectable without checksums;
        # whatever loads is still valid rollouts of the same layout.
        assert loaded.num_queries == sum(p.num_queries for p in kept)
        COUNTS["rollouts: damage loaded (valid)"] += 1
        return
    if how == "delete" and target.name == "meta.json":
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rest = fc.verifiers.load_rollouts(root, skip_corrupt=True)
        except RolloutFileError:
            assert len(kept) == 1 and target.name != "meta.json"
            return
    assert any(target.name in str(w.message) for w in caught)
    intact = [p for i, p in enumerate(kept) if f"part-{i:05d}.npz" != target.name]
    if target.name == "meta.json":
        assert rest.num_queries == sum(p.num_queries for p in kept)
    else:
        assert same(rest, fc._verifiers.rollouts.concatenate(intact))
    COUNTS["rollouts: skip_corrupt recovered the rest"] += 1


@FUZZ
@given(data=st.data())
def test_fuzz_rollouts_refuse_non_finite_values(data):
    f = fields(rollouts(episodes=2))
    name = data.draw(st.sampled_from(["observation", "candidates"]), label="field")
    x = f[name].copy()
    for _ in range(data.draw(st.integers(1, 3))):
        x.flat[data.draw(st.integers(0, x.size - 1))] = data.draw(
            st.sampled_from([np.nan, np.inf, -np.inf]))
    f[name] = x
    COUNTS[f"rollouts: non-finite {name}"] += 1
    with pytest.raises(ValueError, match=rf"`{name}` must be finite"):
        fc.verifiers.Rollouts(**f)


# --- fuzz: training data with non-finite rows ------------------------------------------


@FUZZ
@given(data=st.data())
def test_fuzz_training_skips_exactly_the_non_finite_steps(data):
    bad = data.draw(st.sets(st.integers(0, VCONFIG.num_steps - 1), max_size=3), label="steps")
    where = data.draw(st.sampled_from(["context", "actions", "target"]), label="where")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fc.verifiers.fit_verifier(
            _mlp(),
            lambda s: _labelled(s, bad, where),
            fc.verifiers.OutcomeLoss(),
            key=jax.random.key(0),
            config=VCONFIG,
            progress=False,
        )
    assert finite_model(out.model)
    assert sum(h["skipped_steps"] for h in out.history) == len(bad)
    skipped = [w for w in caught if "skipped" in str(w.message)]
    assert len(skipped) == (1 if bad else 0)
    COUNTS["training: runs"] += 1
    COUNTS["training: skipped steps"] += len(bad)


# --- fuzz: crafted model files ---------------------------------------------------------

INT_FIELDS = ("obs_dim", "action_dim", "horizon", "hidden", "depth", "power_iterations")


@FUZZ
@given(data=st.data())
def test_fuzz_crafted_model_configs_are_refused_or_load_unchanged(tmp_path_factory, data):
    config = fc.MLPEnergyConfig(obs_dim=OBS, action_dim=D, horizon=H, hidden=8)
    model = eqx.nn.inference_mode(fc.MLPEnergy(config, key=jax.random.key(0)))
    path = fc.save_model(model, tmp_path_factory.mktemp("crafted") / "model")
    with np.load(path / "weights.npz") as f:
        arrays = {k: f[k] for k in f.files}
    parameters = sum(a.size for a in arrays.values())
    how = data.draw(st.sampled_from(["config int", "rename member", "extra member",
                                     "member dtype", "weights file"]), label="how")
    COUNTS[f"model file: {how}"] += 1
    if how == "config int":
        name = data.draw(st.sampled_from(INT_FIELDS), label="field")
        value = data.draw(st.one_of(st.integers(0, 64), st.integers(10**3, 10**12)))
        _reseal(path, lambda m: m["config"].update({name: value}))
    elif how in ("rename member", "extra member", "member dtype"):
        key = data.draw(st.sampled_from(sorted(arrays)), label="member")
        if how == "rename member":
            arrays["x" + key] = arrays.pop(key)
        elif how == "extra member":
            arrays[data.draw(st.sampled_from(["extra", "../../etc/passwd", "/abs"]))] = \
                np.zeros(data.draw(st.integers(1, 10**4)), np.float32)
        else:
            arrays[key] = arrays[key].astype(data.draw(st.sampled_from(
                [np.float16, np.float64, np.int32, np.bool_])))
        with zipfile.ZipFile(path / "weights.npz", "w", zipfile.ZIP_DEFLATED) as zf:
            for k, v in arrays.items():
                with zf.open(k + ".npy", "w") as f:
                    np.lib.format.write_array(f, v)
        _reseal(path)
    else:
        name = data.draw(st.sampled_from(["/etc/hosts", "../model/weights.npz",
                                          "sub/../../x.npz", "weights.npz"]))
        _reseal(path, lambda m: m["weights"].update(file=name))
    built = []
    real = serialise.eqx.filter_eval_shape

    def spy(cls, config, **kw):
        built.append(config)
        return real(cls, config, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(serialise.eqx, "filter_eval_shape", spy)
        try:
            loaded = fc.load_model(path)
        except fc.ModelFileError:
            COUNTS["model file: refused"] += 1
            loaded = None
    if loaded is not None:
        obs, chunk = jnp.ones(OBS), jnp.ones((H, D))
        assert float(loaded(obs, chunk)) == float(model(obs, chunk))
        COUNTS["model file: loaded unchanged"] += 1
    # Nothing bigger than the weights justify was ever built.
    for c in built:
        assert c.depth <= len(arrays) and c.hidden <= parameters

