"""Rollouts whose observation is a pytree: camera images as uint8, a float state and int
prompt tokens, stored leaf by leaf, with the guarantees of array observations (atomic
parts, resume, a part of another layout refused, non-finite and unsaveable values
refused), and trained on and reported through a user's own energy over the pytree.

The property test follows `test_fuzz.py`: `FLOWCORRECT_FUZZ_EXAMPLES` examples (CI
default below), seeded (`derandomize=True`, no example database); it compiles nothing.
"""

import dataclasses
import json
import os
import pathlib
import re
import zipfile
from typing import ClassVar

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import flowcorrect as fc
from flowcorrect._verifiers.rollouts import concatenate

EXAMPLES = int(os.environ.get("FLOWCORRECT_FUZZ_EXAMPLES", "12"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None)

N, H, D = 4, 3, 2
IMAGE, STATE, TOKENS = (12, 12, 3), 4, 5


def observation(q: int, seed: int = 0, image=IMAGE) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": {
            "base_0_rgb": rng.integers(0, 256, (q, *image), dtype=np.uint8),
            "wrist_0_rgb": rng.integers(0, 256, (q, *image), dtype=np.uint8),
        },
        "state": rng.standard_normal((q, STATE)).astype(np.float32),
        "tokens": rng.integers(0, 1000, (q, TOKENS)).astype(np.int32),
    }


def rollouts(episodes=3, per_episode=2, seed=0, obs=None) -> fc.verifiers.Rollouts:
    rng = np.random.default_rng(seed + 100)
    q = episodes * per_episode
    success = rng.random(episodes) < 0.5
    success[:2] = True, False  # both outcomes
    episode = np.repeat(np.arange(episodes), per_episode)
    return fc.verifiers.Rollouts(
        observation=observation(q, seed) if obs is None else obs,
        candidates=rng.standard_normal((q, N, H, D)).astype(np.float32),
        executed=rng.integers(0, N, q).astype(np.int64),
        episode=episode.astype(np.int64),
        step=np.tile(np.arange(per_episode), episodes).astype(np.int64),
        success=success[episode],
        steps_to_success=np.where(success[episode], 3, -1).astype(np.int64),
        episode_seed=np.arange(episodes, dtype=np.int64) + 10 * seed,
    )


def same_tree(a, b) -> bool:
    """Same structure (container types included), dtypes and bits."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y, equal_nan=True)
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def same(a: fc.verifiers.Rollouts, b: fc.verifiers.Rollouts) -> bool:
    return same_tree(a.observation, b.observation) and all(
        np.array_equal(getattr(a, f), getattr(b, f))
        for f in a.__dataclass_fields__ if f != "observation")


def files(directory: pathlib.Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# --- on disk -----------------------------------------------------------------------------


def test_a_dict_observation_round_trips_bit_exact_leaf_by_leaf(tmp_path):
    parts = [rollouts(seed=0), rollouts(episodes=2, seed=1)]
    writer = fc.verifiers.RolloutWriter(tmp_path / "r", {"task": "x"})
    for p in parts:
        writer.append(p)
    loaded = fc.verifiers.load_rollouts(tmp_path / "r")
    assert same(loaded, concatenate(parts))
    image = loaded.observation["image"]["base_0_rgb"]
    assert image.dtype == np.uint8 and image.shape == (10, *IMAGE)
    assert loaded.observation["state"].dtype == np.float32
    assert loaded.observation["tokens"].dtype == np.int32
    # Each leaf is a member named by its path; nothing is pickled.
    names = zipfile.ZipFile(tmp_path / "r" / "part-00000.npz").namelist()
    assert {"observation/image/base_0_rgb.npy", "observation/image/wrist_0_rgb.npy",
            "observation/state.npy", "observation/tokens.npy"} <= set(names)
    assert "observation.npy" not in names
    with np.load(tmp_path / "r" / "part-00001.npz", allow_pickle=False) as f:
        assert np.array_equal(f["observation/tokens"], parts[1].observation["tokens"])
    # meta.json records each leaf's path, row shape and kind of dtype.
    layout = json.loads((tmp_path / "r" / "meta.json").read_text())["layout"]
    assert layout["observation/image/base_0_rgb"] == [list(IMAGE), "u"]
    assert layout["observation/state"] == [[STATE], "f"]
    assert layout["observation/tokens"] == [[TOKENS], "i"]
    assert "observation" not in layout


def test_lists_and_tuples_keep_their_type_and_order(tmp_path):
    q = 6
    rng = np.random.default_rng(3)
    obs = {"cams": [rng.integers(0, 256, (q, 2, 2, 3), dtype=np.uint8) for _ in range(3)],
           "pair": (np.zeros((q, 1), bool), rng.standard_normal((q, 2)).astype(np.float16))}
    roll = rollouts(obs=obs)
    fc.verifiers.RolloutWriter(tmp_path / "r").append(roll)
    loaded = fc.verifiers.load_rollouts(tmp_path / "r")
    assert type(loaded.observation["cams"]) is list and type(loaded.observation["pair"]) is tuple
    assert same(loaded, roll)


def test_from_episodes_keeps_integer_leaves_and_casts_float_leaves_to_float32():
    t, e = 4, 3
    rng = np.random.default_rng(0)
    obs = {"image": rng.integers(0, 256, (t, e, *IMAGE), dtype=np.uint8),
           "state": rng.standard_normal((t, e, STATE)),  # float64
           "tokens": rng.integers(0, 9, (t, e, TOKENS))}
    cand = rng.standard_normal((t, e, N, H, D))
    length = np.array([16, 6, 9])
    roll = fc.verifiers.Rollouts.from_episodes(obs, cand, np.zeros((t, e), int), np.arange(t) * 4,
                                     length, np.array([False, True, True]), [7, 8, 9])
    assert roll.num_queries == 4 + 2 + 3
    assert roll.observation["image"].dtype == np.uint8
    assert roll.observation["tokens"].dtype == obs["tokens"].dtype
    assert roll.observation["state"].dtype == np.float32
    # Episode-major rows: episode 1's second query is time 1, environment 1.
    row = np.flatnonzero(roll.episode == 1)[1]
    assert np.array_equal(roll.observation["image"][row], obs["image"][1, 1])
    assert np.array_equal(roll.observation["state"][row], obs["state"][1, 1].astype(np.float32))
    with pytest.raises(ValueError, match=r"`observation/state` must be \(T, E, \.\.\.\)"):
        fc.verifiers.Rollouts.from_episodes({**obs, "state": obs["state"][:, :2]}, cand,
                                  np.zeros((t, e), int), np.arange(t), length,
                                  np.array([False, True, True]), [7, 8, 9])


class Killed(BaseException):
    """Stands for SIGKILL: nothing after the point it is raised at runs."""


def test_a_writer_killed_between_the_part_and_meta_json_resumes(tmp_path, monkeypatch):
    first, lost, again = rollouts(seed=0), rollouts(seed=1), rollouts(seed=2)
    fc.verifiers.RolloutWriter(tmp_path / "r", {"task": "x"}).append(first)
    write_text = pathlib.Path.write_text

    def dies_before_meta(self, *args, **kwargs):
        if self.name == "meta.json.tmp":
            raise Killed
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", dies_before_meta)
    with pytest.raises(Killed):
        fc.verifiers.RolloutWriter(tmp_path / "r", {"task": "x"}).append(lost)
    monkeypatch.undo()
    # The part was renamed into place, but meta.json never listed it.
    assert (tmp_path / "r" / "part-00001.npz").exists()
    assert same(fc.verifiers.load_rollouts(tmp_path / "r"), first)
    resumed = fc.verifiers.RolloutWriter(tmp_path / "r", {"task": "x"})
    assert resumed.num_episodes == first.num_episodes
    resumed.append(again)
    assert same(fc.verifiers.load_rollouts(tmp_path / "r"), concatenate([first, again]))


def _other_image(r):
    return observation(r.num_queries, 1, image=(8, 8, 3))


def _missing_leaf(r):
    obs = observation(r.num_queries, 1)
    del obs["image"]["wrist_0_rgb"]
    return obs


def _float_tokens(r):
    obs = observation(r.num_queries, 1)
    obs["tokens"] = obs["tokens"].astype(np.float32)
    return obs


def _extra_leaf(r):
    return {**observation(r.num_queries, 1), "depth": np.zeros((r.num_queries, 2), np.float32)}


MISMATCHED = {
    "another image size": (_other_image, r"`observation/image/base_0_rgb` rows have shape "
                                         r"\(8, 8, 3\).*already written have \(12, 12, 3\)"),
    "a missing leaf": (_missing_leaf, r"`observation/image/wrist_0_rgb` is missing"),
    "another dtype kind": (_float_tokens, r"`observation/tokens` rows .*dtype kind 'f'.*"
                                          r"already written .*dtype kind 'i'"),
    "an extra leaf": (_extra_leaf, r"`observation/depth` is not in the parts already written"),
    "an array for a pytree": (lambda r: r.observation["state"],
                              r"`observation/image/base_0_rgb` is missing"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHED))
def test_a_part_of_another_layout_is_refused_naming_the_leaf(tmp_path, case):
    make, message = MISMATCHED[case]
    first = rollouts()
    writer = fc.verifiers.RolloutWriter(tmp_path / "r", {"task": "x"})
    writer.append(first)
    before = files(tmp_path / "r")
    other = rollouts(seed=1)
    other = dataclasses.replace(other, observation=make(other))
    with pytest.raises(ValueError, match=message):
        writer.append(other)
    # A resumed writer reads the layout from meta.json and refuses the same way.
    with pytest.raises(ValueError, match=message):
        fc.verifiers.RolloutWriter(tmp_path / "r", {"task": "x"}).append(other)
    assert files(tmp_path / "r") == before  # nothing written
    assert same(fc.verifiers.load_rollouts(tmp_path / "r"), first)
    with pytest.raises(ValueError, match=message.split(".*")[0]):
        concatenate([first, other])


def test_an_array_directory_refuses_a_pytree_part_and_still_loads(tmp_path):
    array = dataclasses.replace(rollouts(), observation=np.ones((6, STATE), np.float32))
    writer = fc.verifiers.RolloutWriter(tmp_path / "r")
    writer.append(array)
    assert json.loads((tmp_path / "r" / "meta.json").read_text())["layout"]["observation"] == [
        [STATE], "f"]
    with pytest.raises(ValueError, match=r"`observation` is missing.*leaves \['observation/"):
        writer.append(rollouts(seed=1))
    assert same(fc.verifiers.load_rollouts(tmp_path / "r"), array)


def test_a_damaged_pytree_part_is_named_and_skip_corrupt_loads_the_rest(tmp_path):
    parts = [rollouts(seed=s) for s in range(3)]
    writer = fc.verifiers.RolloutWriter(tmp_path / "r")
    for p in parts:
        writer.append(p)
    broken = tmp_path / "r" / "part-00001.npz"
    broken.write_bytes(broken.read_bytes()[:-200])
    with pytest.raises(fc._verifiers.rollouts.RolloutFileError,
                       match="part-00001.npz.*skip_corrupt=True"):
        fc.verifiers.load_rollouts(tmp_path / "r")
    with pytest.warns(RuntimeWarning, match="part-00001.npz"):
        rest = fc.verifiers.load_rollouts(tmp_path / "r", skip_corrupt=True)
    assert same(rest, concatenate([parts[0], parts[2]]))
    # Without meta.json the parts rebuild the pytree from their member names alone.
    (tmp_path / "r" / "meta.json").write_text("{")
    with pytest.warns(RuntimeWarning, match="meta.json"):
        rest = fc.verifiers.load_rollouts(tmp_path / "r", skip_corrupt=True)
    assert same(rest, concatenate([parts[0], parts[2]]))


def _nested_nan(q):
    obs = observation(q)
    obs["arm"] = {"joints": np.zeros((q, 3), np.float32)}
    obs["arm"]["joints"][1, 2] = np.nan
    return obs, r"`observation/arm/joints` must be finite; got 1 NaN or inf entries, the first " \
                r"at index \(1, 2\)"


BAD_OBSERVATIONS = {
    "NaN state": lambda q: ({**observation(q), "state": np.full((q, STATE), np.nan, np.float32)},
                            r"`observation/state` must be finite"),
    "inf in a nested leaf": _nested_nan,
    "object leaf": lambda q: ({**observation(q), "text": np.array([None] * q, object)},
                              r"`observation/text` must be a numeric NumPy array.*dtype object"),
    "string leaf": lambda q: ({**observation(q), "text": np.array(["pick"] * q)},
                              r"`observation/text` must be a numeric NumPy array.*dtype <U4"),
    "a list of floats": lambda q: ({**observation(q), "state": [0.5] * q},
                                   r"`observation/state/\[0\]` must be a NumPy array.*got float"),
    "rows of another count": lambda q: ({**observation(q), "tokens": np.zeros((q + 1, 2), int)},
                                        r"`observation/tokens` must be a NumPy array with one "
                                        r"row per query \(6, from `observation/image/base_0"),
    "a key with a slash": lambda q: ({"a/b": np.zeros((q, 1))}, r"`observation` has the key "
                                                                r"'a/b'.*without '/'"),
    "an empty dict": lambda q: ({"state": np.zeros((q, 1)), "image": {}},
                                r"`observation/image` is an empty dict"),
    "a scalar leaf": lambda q: ({"state": np.zeros((q, 1)), "t": np.float32(0)},
                                r"`observation/t` must be a NumPy array with one row per query"),
}


@pytest.mark.parametrize("case", sorted(BAD_OBSERVATIONS))
def test_observations_that_cannot_be_saved_or_trained_on_are_refused_naming_the_leaf(case):
    obs, message = BAD_OBSERVATIONS[case](6)
    with pytest.raises(ValueError, match=message):
        rollouts(obs=obs)


# --- in memory -----------------------------------------------------------------------------


def test_episodes_split_concatenate_and_executed_actions_on_pytrees():
    roll = rollouts(episodes=6, per_episode=3)
    obs = roll.observation
    sub = roll.episodes([1, 4])
    rows = np.flatnonzero(np.isin(roll.episode, [1, 4]))
    assert same_tree(sub.observation, jax.tree.map(lambda x: x[rows], obs))
    assert list(sub.episode) == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(sub.executed_actions, roll.executed_actions[rows])
    assert np.array_equal(sub.discounted(0.9), roll.discounted(0.9)[rows])
    train, held = roll.split(0.5, seed=3)
    assert train.num_queries + held.num_queries == roll.num_queries
    for part in (train, held):
        assert part.observation["image"]["base_0_rgb"].dtype == np.uint8
        # Every row's observation is the row of the query it came from.
        for i in range(part.num_queries):
            source = np.flatnonzero((roll.episode_seed[roll.episode] ==
                                     part.episode_seed[part.episode[i]])
                                    & (roll.step == part.step[i]))
            assert len(source) == 1
            assert same_tree(jax.tree.map(lambda x: x[i], part.observation),
                             jax.tree.map(lambda x: x[source[0]], obs))
    joined = concatenate([train, held])
    assert joined.num_episodes == 6 and joined.observation["tokens"].dtype == np.int32
    assert same_tree(joined.observation, jax.tree.map(lambda a, b: np.concatenate([a, b]),
                                                      train.observation, held.observation))


# --- training and the report, with a user's energy over the pytree -------------------------


@dataclasses.dataclass(frozen=True)
class ImageStateConfig(fc.LearnedEnergyConfig):
    state_dim: int = STATE
    horizon: int = H
    action_dim: int = D
    channels: int = 4
    hidden: int = 16


class ImageStateEnergy(fc.AbstractLearnedEnergy):
    """A user's verifier: a small CNN over the uint8 image plus the state, bilinear in
    the action chunk. Reads `context["image"]` and `context["state"]` of one query and
    ignores the rest of the observation."""

    config_class: ClassVar[type] = ImageStateConfig
    config: ImageStateConfig = eqx.field(static=True)
    conv: eqx.nn.Conv2d
    context_head: eqx.nn.Linear
    action_head: eqx.nn.Linear

    def __init__(self, config, *, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.config = config
        self.conv = eqx.nn.Conv2d(3, config.channels, 3, stride=2, key=k1)
        self.context_head = eqx.nn.Linear(config.channels + config.state_dim, config.hidden,
                                          key=k2)
        self.action_head = eqx.nn.Linear(config.horizon * config.action_dim, config.hidden,
                                         key=k3)

    def encode(self, context):
        image = jnp.moveaxis(context["image"].astype(jnp.float32) / 255.0, -1, 0)
        features = jax.nn.relu(self.conv(image)).mean((1, 2))
        return jnp.tanh(self.context_head(jnp.concatenate([features, context["state"]])))

    def embed_actions(self, actions, *, key=None):
        return self.action_head(actions.reshape(-1))

    def score_embedded(self, encoded, embedded):
        return -jnp.dot(encoded, embedded).astype(jnp.float32)


def _task(episodes: int, seed: int) -> fc.verifiers.Rollouts:
    """One query per episode; success when the executed chunk's first action has the
    sign of the state's first entry."""
    rng = np.random.default_rng(seed)
    obs = {"image": rng.integers(0, 256, (episodes, *IMAGE), dtype=np.uint8),
           "state": rng.standard_normal((episodes, STATE)).astype(np.float32),
           "tokens": rng.integers(0, 9, (episodes, TOKENS)).astype(np.int32)}
    cand = rng.standard_normal((episodes, N, H, D)).astype(np.float32)
    executed = rng.integers(0, N, episodes)
    success = cand[np.arange(episodes), executed, 0, 0] * np.sign(obs["state"][:, 0]) > 0
    return fc.verifiers.Rollouts(obs, cand, executed.astype(np.int64), np.arange(episodes),
                       np.zeros(episodes, np.int64), success, np.where(success, 4, -1),
                       np.arange(episodes))


def test_fit_verifier_and_verifier_report_with_a_users_energy_over_the_pytree():
    train, held = _task(240, 0), _task(60, 1)
    model = ImageStateEnergy(ImageStateConfig(), key=jax.random.key(0))
    data = fc.verifiers.outcome_batches(train, 32)
    batch = data(0)
    assert batch.context["image"].dtype == jnp.uint8 and batch.context["image"].shape == (
        32, *IMAGE)
    config = fc.train.TrainConfig(num_steps=40, learning_rate=1e-2, warmup_steps=2, log_every=10,
                            grad_penalty=0.0)
    result = fc.verifiers.fit_verifier(
        model,
        data,
        fc.verifiers.OutcomeLoss(),
        key=jax.random.key(1),
        config=config,
        progress=False,
    )
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    report = fc.verifiers.verifier_report(result.model, held)
    assert report.num_queries == 60 and np.isfinite(report.success_auc)
    assert report.success_auc > 0.6
    # Each candidate is scored at its own query's observation.
    e = fc.verifiers.candidate_energies(result.model, held, block=16)
    for i in (0, 17, 59):
        context = jax.tree.map(lambda x: jnp.asarray(x[i]), held.observation)
        direct = [float(result.model(context, jnp.asarray(c))) for c in held.candidates[i]]
        np.testing.assert_allclose(e[i], direct, rtol=1e-5, atol=1e-6)


def test_pairs_of_similar_states_compare_by_the_leaf_they_are_told():
    roll = _task(80, 2)
    # Few distinct states, so succeeding and failing queries share them.
    state = roll.observation["state"][np.arange(80) % 5]
    roll = dataclasses.replace(roll, observation={**roll.observation, "state": state})
    with pytest.raises(ValueError, match=r"pytree with the leaves \['observation/image'.*"
                                         r"compare_by='state'"):
        fc.verifiers.similar_state_pairs(roll)
    with pytest.raises(ValueError, match=r"compare_by"):
        fc.verifiers.pair_batches(roll, 4)
    with pytest.raises(ValueError, match=r"compare_by='depth' names no leaf.*observation/state"):
        fc.verifiers.similar_state_pairs(roll, compare_by="depth")
    win, lose = fc.verifiers.similar_state_pairs(roll, compare_by="state", max_distance=1e-6)
    assert len(win) > 10 and np.all(roll.success[win]) and not np.any(roll.success[lose])
    assert np.array_equal(state[win], state[lose])
    same_pairs = fc.verifiers.similar_state_pairs(
        roll, compare_by="observation/state", max_distance=1e-6
    )
    by_function = fc.verifiers.similar_state_pairs(roll, compare_by=lambda o: o["state"],
                                         max_distance=1e-6)
    for pairs in (same_pairs, by_function):
        assert np.array_equal(pairs[0], win) and np.array_equal(pairs[1], lose)
    batch = fc.verifiers.pair_batches(roll, 8, compare_by="state", max_distance=1e-6)(0)
    assert batch.context_win["image"].dtype == jnp.uint8
    np.testing.assert_array_equal(batch.context_win["state"], batch.context_lose["state"])
    model = ImageStateEnergy(ImageStateConfig(), key=jax.random.key(0))
    config = fc.train.TrainConfig(num_steps=3, learning_rate=1e-3, warmup_steps=1, log_every=3,
                            grad_penalty=0.0)
    result = fc.verifiers.fit_verifier(model, fc.verifiers.pair_batches(roll, 8, compare_by="state",
                                                    max_distance=1e-6),
                             fc.verifiers.BradleyTerryLoss(), key=jax.random.key(0), config=config,
                             progress=False)
    assert np.isfinite(result.history[-1]["loss"])


# --- property: random pytree layouts ---------------------------------------------------------

DTYPES = ("uint8", "int32", "int64", "float16", "float32", "float64", "bool")
ROWS = ((), (2,), (3, 2), (2, 2, 3))


@st.composite
def layouts(draw, depth=0):
    """A pytree of `(dtype, row shape)` leaves: dicts, lists and tuples, a few leaves."""
    leaf = st.tuples(st.sampled_from(DTYPES), st.sampled_from(ROWS))
    if depth >= 2 or draw(st.booleans()):
        kind = "dict" if depth == 0 else draw(st.sampled_from(["dict", "list", "tuple", "leaf"]))
    else:
        kind = draw(st.sampled_from(["dict", "list", "tuple"]))
    if kind == "leaf" or depth >= 2:
        return draw(leaf)
    size = draw(st.integers(1, 3))
    children = [draw(layouts(depth=depth + 1)) for _ in range(size)]
    if kind == "dict":
        keys = draw(st.lists(st.text("ab_Z0", min_size=1, max_size=3), min_size=size,
                             max_size=size, unique=True))
        return dict(zip(keys, children))
    return children if kind == "list" else tuple(children)


def build(layout, q: int, rng: np.random.Generator):
    def leaf(spec):
        dtype, row = spec
        kind = np.dtype(dtype).kind
        if kind == "b":
            return rng.random((q, *row)) < 0.5
        if kind in "iu":
            return rng.integers(0, 100, (q, *row)).astype(dtype)
        return (rng.standard_normal((q, *row)) * 50).astype(dtype)

    return jax.tree.map(leaf, layout, is_leaf=lambda x: type(x) is tuple and len(x) == 2
                        and isinstance(x[0], str))


@FUZZ
@given(layout=layouts(), data=st.data())
def test_fuzz_pytree_layouts_round_trip_and_refuse_another_layout(tmp_path_factory, layout,
                                                                  data):
    root = tmp_path_factory.mktemp("pytree") / "r"
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    writer = fc.verifiers.RolloutWriter(root)
    parts = []
    for i in range(data.draw(st.integers(1, 3), label="parts")):
        episodes = data.draw(st.integers(2, 3), label="episodes")
        part = rollouts(episodes=episodes, seed=i, obs=build(layout, 2 * episodes, rng))
        writer.append(part)
        parts.append(part)
    loaded = fc.verifiers.load_rollouts(root)
    assert same(loaded, concatenate(parts))
    # A leaf of another row shape, or another kind of dtype, is refused by its path.
    paths = [p for p, _ in fc._verifiers.rollouts.observation_leaves(parts[0].observation)]
    which = data.draw(st.integers(0, len(paths) - 1), label="leaf")
    how = data.draw(st.sampled_from(["shape", "kind"]), label="how")

    def edit(i, x):
        if i != which:
            return x
        if how == "shape":
            return np.concatenate([x, x], axis=-1) if x.ndim > 1 else x[:, None]
        return x.astype(np.int16) if x.dtype.kind in "fb" else x.astype(np.float32)

    flat, tree = jax.tree.flatten(parts[0].observation)
    other = dataclasses.replace(
        parts[0], observation=jax.tree.unflatten(tree, [edit(i, x) for i, x in enumerate(flat)]))
    before = files(root)
    with pytest.raises(ValueError, match=rf"`{re.escape(paths[which])}` rows have"):
        writer.append(other)
    assert files(root) == before
    assert same(fc.verifiers.load_rollouts(root), loaded)
