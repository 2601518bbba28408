"""The fuzz suite: adversarial inputs through the public API, every promise checked at once.

Each example draws a composition of correctors (up to three levels of wrappers over the
registered correctors), a dtype (float16, bfloat16, float32, float64), a batch of chunks
at extreme magnitudes and, per sample, an adversarial energy (NaN and inf regions, a
`where` trap and a `sqrt` trap with NaN or infinite gradients, gradients up to 1e30,
dimensions the energy ignores, sums that overflow in the actions' dtype). It runs
`fc.correct` once on the whole batch and checks every promise that applies:

- finite actions in give finite actions out, same shape and dtype;
- a non-finite energy at the input falls back: flagged, input returned bit for bit;
- entries frozen by a `Mask` (through any wrappers that keep them) stay bit-identical;
- the movement bound of an outermost `ClipStep` (and of repeats and chains of them);
- the energy never rises when `Backtrack` is outermost (or all of a chain / repeat).

Seeded (`derandomize=True`), so CI runs the same examples every time. The number of
examples is `FLOWCORRECT_FUZZ_EXAMPLES` (CI default below; a nightly run sets e.g. 2000).
Shapes are fixed and hyperparameters are arrays, so a composition seen twice reuses its
compiled function. The counts of what ran are printed at the end of the session.

Sections: shared machinery (settings, dtypes, chunks, energies, counters, checks), then
one section per family under test. The sampler / placement fuzzing plugs in as a new
section that reuses `adversarial_energy`, `draw_chunks`, `check_finite_out` and `COUNTS`.
"""

import collections
import functools
import os

import equinox as eqx
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import flowcorrect as fc
from flowcorrect._correctors.base import nested_correctors

from .helpers import enable_x64

# --- shared machinery -----------------------------------------------------------------

EXAMPLES = int(os.environ.get("FLOWCORRECT_FUZZ_EXAMPLES", "12"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None)

SHAPE = (4, 3)  # (horizon, action_dim): one shape, so compiled functions are reused
BATCH = 6

DTYPES = ("float16", "bfloat16", "float32", "float64")
# log10 of the magnitudes drawn per dtype: from small to near the dtype's largest value.
MAGNITUDES = {
    "float16": (-2.0, 4.7),
    "bfloat16": (-20.0, 38.0),
    "float32": (-20.0, 38.0),
    "float64": (-100.0, 307.0),
}

COUNTS: collections.Counter = collections.Counter()
COMPOSITIONS: set[str] = set()


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    yield
    if not COUNTS:
        return
    lines = [
        f"fuzz ({EXAMPLES} examples per test, FLOWCORRECT_FUZZ_EXAMPLES): "
        + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items())),
        f"fuzz: {len(COMPOSITIONS)} distinct corrector compositions",
    ]
    # Printed past pytest's capture, so the counts show in every CI log.
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + "\n".join(lines))


def _dtype(name: str):
    return jnp.dtype(name)


def _acc(dtype) -> jnp.dtype:
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def draw_chunks(draw, dtype_name: str, shape=(BATCH, *SHAPE)) -> np.ndarray:
    """A batch of finite chunks, each sample at its own magnitude (zeros included)."""
    base = draw(hnp.arrays(np.float64, shape, elements=st.floats(-1, 1)))
    lo, hi = MAGNITUDES[dtype_name]
    exps = draw(hnp.arrays(np.float64, shape[:1], elements=st.floats(lo, hi)))
    x = base * 10.0 ** exps.reshape(-1, *([1] * (len(shape) - 1)))
    info = jnp.finfo(_dtype(dtype_name))
    # No subnormals (XLA flushes them to zero in arithmetic) and nothing past the max.
    x = np.where(np.abs(x) < float(info.tiny), 0.0, x)
    x = np.clip(x, -float(info.max), float(info.max))
    out = np.asarray(jnp.asarray(x, jnp.float64 if dtype_name == "float64" else jnp.float32)
                     .astype(_dtype(dtype_name)))
    return np.where(np.isfinite(out), out, 0).astype(out.dtype)


def adversarial_energy(context, actions):
    """One energy whose per-sample context switches its traps on and off.

    Every trap is gated with the double-`where` pattern, so a trap that is off for a
    sample leaves that sample's gradient finite, and one that is on really bites.
    """
    acc = _acc(actions.dtype)
    x = actions.astype(acc)
    used = context["used"][None, :]
    # Dimensions the energy ignores: a NaN there would not show in the energy.
    d = jnp.where(used, x - context["target"].astype(acc), 0)
    e = 0.5 * context["scale"].astype(acc) * jnp.sum(d * d)  # gradients up to ~1e30 |d|
    e = e + jnp.sum(jnp.where(used, jnp.sin(context["freq"].astype(acc) * x), 0))
    # `where` trap: sqrt of the positive part of a[0, 0]; NaN gradient below zero.
    w_on = context["where_trap"]
    w_in = jnp.where(w_on, x[0, 0], 1.0)
    e = e + jnp.where(w_on, jnp.where(w_in > 0, jnp.sqrt(jnp.abs(w_in)), 0.0), 0.0)
    # `sqrt` trap: sqrt|a[0, 1]|, an infinite gradient at zero (zeros are common here).
    s_on = context["sqrt_trap"]
    s_in = jnp.where(s_on, x[0, 1], 1.0)
    e = e + jnp.where(s_on, jnp.sqrt(jnp.abs(s_in)), 0.0)
    # NaN above a threshold on a[0, 0]; inf below one on a[-1, -1] (off: +-inf).
    e = e + jnp.where(x[0, 0] > context["nan_above"].astype(acc), jnp.nan, 0.0)
    e = e + jnp.where(x[-1, -1] < context["inf_below"].astype(acc), jnp.inf, 0.0)
    # A sum of squares in the actions' own dtype: overflows in float16 from |a| ~ 256.
    n_on = context["native"]
    n_in = jnp.where(n_on, actions, jnp.zeros_like(actions))
    e = e + jnp.where(n_on, jnp.sum(n_in * n_in).astype(acc), 0.0)
    return e


def draw_contexts(draw, actions: np.ndarray, dtype_name: str) -> dict:
    """Per-sample energy parameters; the target sits near the sample's own scale."""
    batch, dim = actions.shape[0], actions.shape[2]
    acc = np.float64 if dtype_name == "float64" else np.float32
    def flags():
        return draw(hnp.arrays(bool, (batch,), elements=st.booleans()))

    a = actions.astype(np.float64)
    noise = draw(hnp.arrays(np.float64, actions.shape, elements=st.floats(-1, 1)))
    size = np.max(np.abs(a), axis=(1, 2), keepdims=True) + 1.0
    target = np.clip(a + 0.5 * size * noise, -1e30, 1e30)
    used = draw(hnp.arrays(bool, (batch, dim), elements=st.booleans()))
    scale = 10.0 ** draw(hnp.arrays(np.float64, (batch,), elements=st.floats(-3, 30)))
    nan_on, inf_on = flags(), flags()
    # Thresholds near the sample's values, so steps can walk into the region.
    nan_above = np.where(nan_on, a[:, 0, 0] + 0.05 * size[:, 0, 0], np.inf)
    inf_below = np.where(inf_on, a[:, -1, -1] - 0.05 * size[:, 0, 0], -np.inf)
    ctx = {
        "target": target.astype(acc),
        "used": used,
        "scale": scale.astype(acc),
        "freq": draw(hnp.arrays(np.float64, (batch,), elements=st.floats(0, 5))).astype(acc),
        "where_trap": flags(),
        "sqrt_trap": flags(),
        "nan_above": nan_above.astype(acc),
        "inf_below": inf_below.astype(acc),
        "native": flags(),
    }
    return {k: jnp.asarray(v) for k, v in ctx.items()}


@functools.partial(jax.jit)
def _energies(context, actions):
    return jax.vmap(adversarial_energy)(context, actions)


def _bits(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).view(f"u{np.asarray(x).dtype.itemsize}")


def check_finite_out(out, actions) -> None:
    assert out.shape == actions.shape and out.dtype == actions.dtype
    assert np.all(np.isfinite(np.asarray(out, np.float64))), "finite in gave non-finite out"


# --- correctors ------------------------------------------------------------------------


@functools.cache
def _optimizer(name: str, lr: float) -> optax.GradientTransformation:
    # One object per setting: a new optax object is new static data and recompiles.
    return {"sgd": optax.sgd, "adam": optax.adam}[name](lr)


alphas = st.sampled_from([0.0, 1e-3, 0.1, 1.0, 10.0])
horizon_specs = st.one_of(
    st.sampled_from([None, 1, 3]),
    hnp.arrays(bool, (SHAPE[0],)).filter(lambda m: m.any()).map(jnp.asarray),
)
dim_specs = st.one_of(
    st.sampled_from([None, 2]),
    hnp.arrays(bool, (SHAPE[1],)).filter(lambda m: m.any()).map(jnp.asarray),
)

# The registered correctors: leaves propose steps, wrappers hold other correctors.
LEAVES = {
    fc.GradientStep: st.builds(fc.GradientStep, alphas),
    fc.LangevinStep: st.builds(fc.LangevinStep, alphas, st.sampled_from([0.0, 0.05, 3.0])),
    fc.OptaxStep: st.builds(
        lambda name, lr: fc.OptaxStep(_optimizer(name, lr)),
        st.sampled_from(["sgd", "adam"]),
        st.sampled_from([0.1, 2.0]),
    ),
    fc.ProjectBounds: st.builds(
        lambda lo, hi: fc.ProjectBounds(-lo, hi),
        st.sampled_from([0.0, 1.0, 1e4, np.inf]),
        st.sampled_from([0.5, 1e4, np.inf]),
    ),
}


def _mask(inner, horizon, dims):
    if horizon is None and dims is None:
        horizon = 1
    return fc.Mask(inner, horizon=horizon, action_dims=dims)


WRAPPERS = {
    fc.ClipStep: lambda sub: st.builds(
        fc.ClipStep,
        sub,
        st.sampled_from([1e-3, 0.2, 0.9]),
        st.sampled_from(["current", "initial"]),
    ),
    fc.Mask: lambda sub: st.builds(_mask, sub, horizon_specs, dim_specs),
    fc.Backtrack: lambda sub: st.builds(fc.Backtrack, sub, st.sampled_from([0, 3])),
    fc.Repeat: lambda sub: st.builds(fc.Repeat, sub, st.sampled_from([0, 1, 3])),
    fc.Chain: lambda sub: st.builds(lambda a, b: fc.Chain(a, b), sub, sub),
}
RECIPES = st.builds(
    lambda k, alpha, first, dims: fc.reference_recipe(
        k, alpha, 0.2, first_only=first, action_dims=dims
    ),
    st.sampled_from([1, 3]),
    alphas,
    st.booleans(),
    st.sampled_from([None, 2]),
)


def compositions(depth: int) -> st.SearchStrategy[fc.AbstractCorrector]:
    """Every composition of the registered correctors with at most `depth` wrapper levels."""
    leaves = st.one_of(*LEAVES.values(), RECIPES)
    if depth == 0:
        return leaves
    sub = compositions(depth - 1)
    return st.one_of(leaves, *(wrap(sub) for wrap in WRAPPERS.values()))


def test_every_corrector_is_fuzzed():
    exported = {
        v
        for v in vars(fc).values()
        if isinstance(v, type)
        and issubclass(v, fc.AbstractCorrector)
        and not getattr(v, "__abstractmethods__", None)
    }
    assert exported - set(LEAVES) - set(WRAPPERS) == set(), "add them to LEAVES or WRAPPERS"


def _depth(c) -> int:
    children = nested_correctors(c)
    return 0 if not children else 1 + max(_depth(x) for x in children)


def movement_bound(c) -> float | None:
    """B with `||out - a|| <= B ||a||` for one correction, or None if unbounded."""
    if isinstance(c, fc.ClipStep):
        return float(c.clip_frac)
    if isinstance(c, fc.Backtrack | fc.Mask):  # both only shrink or drop a step
        return movement_bound(c.inner)
    if isinstance(c, fc.Repeat):
        if c.num_steps == 0:
            return 0.0
        b = movement_bound(c.inner)
        return None if b is None else (1 + b) ** c.num_steps - 1
    if isinstance(c, fc.Chain):
        bounds = [movement_bound(x) for x in c.correctors]
        return None if None in bounds else float(np.prod([1 + b for b in bounds]) - 1)
    return None


def _steps(c) -> int:
    """How many elementary steps (an upper bound), for the rounding tolerance."""
    if isinstance(c, fc.Repeat):
        return c.num_steps * _steps(c.inner)
    if isinstance(c, fc.Chain):
        return sum(_steps(x) for x in c.correctors)
    children = nested_correctors(c)
    return max([1, *(_steps(x) for x in children)])


def frozen_entries(c) -> np.ndarray:
    """Entries of a `SHAPE` chunk that `c` must leave bit-identical."""
    if isinstance(c, fc.Mask):
        h = np.ones(SHAPE[0], bool) if c.horizon is None else (
            np.asarray(c.horizon) if c.horizon.dtype == bool
            else np.arange(SHAPE[0]) < int(c.horizon)
        )
        d = np.ones(SHAPE[1], bool) if c.action_dims is None else (
            np.asarray(c.action_dims) if c.action_dims.dtype == bool
            else np.arange(SHAPE[1]) < int(c.action_dims)
        )
        return frozen_entries(c.inner) | ~(h[:, None] & d[None, :])
    if isinstance(c, fc.Repeat) and c.num_steps == 0:
        return np.ones(SHAPE, bool)
    if isinstance(c, fc.ClipStep | fc.Backtrack | fc.Repeat):
        return frozen_entries(c.inner)
    if isinstance(c, fc.Chain):
        return np.logical_and.reduce([frozen_entries(x) for x in c.correctors])
    return np.zeros(SHAPE, bool)


def monotone(c) -> bool:
    if isinstance(c, fc.Backtrack):
        return True
    if isinstance(c, fc.Repeat):
        return c.num_steps == 0 or monotone(c.inner)
    if isinstance(c, fc.Chain):
        return all(monotone(x) for x in c.correctors)
    return False


def _run_corrector_case(corrector, dtype_name, actions_np, context, seed):
    actions = jnp.asarray(actions_np)
    out, info = fc.correct(
        adversarial_energy, context, actions, corrector=corrector, key=jax.random.key(seed)
    )
    out, a = np.asarray(out), np.asarray(actions)
    e_in = np.asarray(_energies(context, actions), np.float64)
    before = np.asarray(info.energy_before, np.float64)
    after = np.asarray(info.energy_after, np.float64)
    fell_back = np.asarray(info.fell_back)
    accepted = np.asarray(info.num_accepted)
    COUNTS["examples"] += 1
    COUNTS["samples"] += len(a)
    COUNTS[f"dtype {dtype_name}"] += 1
    COUNTS[f"depth {_depth(corrector)}"] += 1
    COUNTS["fell back (samples)"] += int(fell_back.sum())
    COMPOSITIONS.add(str(jax.tree.structure(corrector)))

    check_finite_out(out, a)
    # Fallback: a non-finite energy at the input is flagged and the input returned.
    bad_in = ~np.isfinite(e_in)
    assert np.array_equal(bad_in, ~np.isfinite(before))
    assert np.all(fell_back[bad_in]), "non-finite energy at the input was not flagged"
    for i in np.flatnonzero(fell_back):
        assert np.array_equal(_bits(out[i]), _bits(a[i])), f"fallback sample {i} changed"
        assert accepted[i] == 0
    assert np.all(np.isfinite(after[~fell_back]))
    COUNTS["checked fallback (samples)"] += int(bad_in.sum())

    frozen = frozen_entries(corrector)
    if frozen.any():
        COUNTS["checked masks"] += 1
        assert np.array_equal(_bits(out[:, frozen]), _bits(a[:, frozen])), "masked entry moved"

    bound = movement_bound(corrector)
    if bound is not None:
        COUNTS["checked clip bound"] += 1
        a64, o64 = a.astype(np.float64), out.astype(np.float64)
        # float64 of the dtype's values; norms scaled so they cannot overflow here either.
        for i in range(len(a)):
            m = max(np.max(np.abs(a64[i])), np.max(np.abs(o64[i])), 1e-300)
            norm = np.linalg.norm(a64[i] / m)
            moved = np.linalg.norm((o64[i] - a64[i]) / m)
            eps = float(jnp.finfo(_dtype(dtype_name)).eps)
            tol = 4 * eps * (1 + bound) * (1 + _steps(corrector)) * norm
            assert moved <= bound * norm * (1 + 1e-6) + tol, (
                f"sample {i}: moved {moved * m:.6g} > {bound:.4g} * ||a|| = {bound * norm * m:.6g}"
            )

    if monotone(corrector):
        COUNTS["checked monotone"] += 1
        ok = ~fell_back
        assert np.all(after[ok] <= before[ok] + 1e-5 * np.abs(before[ok]) + 1e-30), (
            f"energy rose under Backtrack: {before[ok]} -> {after[ok]}"
        )


# Slow by design: one compile per new composition; ~25-60 s in all at the CI default.
@pytest.mark.slow
@pytest.mark.parametrize("max_depth", [1, 3])
@FUZZ
@given(data=st.data())
def test_fuzz_correctors(max_depth, data):
    corrector = data.draw(compositions(max_depth), label="corrector")
    dtype_name = data.draw(st.sampled_from(DTYPES), label="dtype")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    if dtype_name == "float64":
        with enable_x64(True):
            # Rebuilt inside x64 mode so that its hyperparameters are float64 too.
            corrector = jax.tree.map(
                lambda x: jnp.asarray(x, jnp.float64)
                if eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.floating) else x,
                corrector,
            )
            actions = draw_chunks(data.draw, dtype_name)
            context = draw_contexts(data.draw, actions, dtype_name)
            _run_corrector_case(corrector, dtype_name, actions, context, seed)
    else:
        actions = draw_chunks(data.draw, dtype_name)
        context = draw_contexts(data.draw, actions, dtype_name)
        _run_corrector_case(corrector, dtype_name, actions, context, seed)


# --- sampler and placements ---------------------------------------------------------------


class FragilePolicy(fc.AbstractPolicy):
    """A nonlinear per-sample policy that returns NaN once a sample leaves a box whose
    size the observation sets (a policy off its data), and reads an adversarial energy
    context from the same observation."""

    w: jax.Array
    chunk_shape: tuple[int, int] = eqx.field(static=True, default=SHAPE)
    convention: fc.AbstractConvention = fc.OpenPI()

    def condition(self, observation):
        return observation

    def velocity(self, cond, x_t, t):
        acc = _acc(x_t.dtype)
        x = x_t.astype(acc)
        v = jnp.tanh(x @ self.w.astype(acc) + cond["bias"].astype(acc)[None, :]) * 3.0 + x
        v = jnp.where(jnp.max(jnp.abs(x)) > cond["limit"].astype(acc), jnp.nan, v)
        return v.astype(x_t.dtype)

    def energy_context(self, cond):
        return cond["energy"]


weights = st.sampled_from([0.0, 0.5, 5.0, 1e3])
schedules = st.sampled_from([fc.EveryStep(), fc.LastSteps(2), fc.EveryNth(2)])
interleaved = st.one_of(
    st.just(fc.Plain()),
    st.builds(fc.Denoised, compositions(1), schedules, weights),
    st.builds(fc.Guided, schedules, weights, st.sampled_from([None, 0.5, 1.0])),
)
whole = st.one_of(
    st.builds(fc.PostHoc, compositions(1), interleaved),
    st.builds(fc.BestOfN, st.sampled_from([2, 3]), interleaved),
)
placements = st.one_of(
    interleaved, whole, st.builds(fc.PostHoc, compositions(1), whole)
)


@pytest.mark.slow
@pytest.mark.parametrize("convention", [fc.OpenPI(), fc.Reverse()], ids=["openpi", "reverse"])
@FUZZ
@given(data=st.data())
def test_fuzz_placements(convention, data):
    placement = data.draw(placements, label="placement")
    dtype_name = data.draw(st.sampled_from(DTYPES[:3]), label="dtype")
    dtype = _dtype(dtype_name)
    noise_shape = placement.noise_shape(SHAPE)
    scale = data.draw(st.sampled_from([1e-3, 1.0, 30.0]), label="noise scale")
    noise = jnp.asarray(
        data.draw(hnp.arrays(np.float32, (BATCH, *noise_shape), elements=st.floats(-3, 3)))
        * scale
    ).astype(dtype)
    actions = draw_chunks(data.draw, "float16")  # targets at moderate magnitudes
    limits = 10.0 ** data.draw(hnp.arrays(np.float64, (BATCH,), elements=st.floats(0, 3)))
    observation = {
        "bias": jnp.asarray(data.draw(hnp.arrays(np.float32, (BATCH, SHAPE[1]),
                                                 elements=st.floats(-2, 2)))),
        "limit": jnp.asarray(limits, jnp.float32),
        "energy": draw_contexts(data.draw, actions.astype(np.float32), "float32"),
    }
    w = jax.random.normal(jax.random.key(data.draw(st.integers(0, 99))), (SHAPE[1], SHAPE[1]))
    policy = eqx.tree_at(lambda p: p.convention, FragilePolicy(w), convention)

    plain, _ = fc.sample(policy, observation, noise=noise.reshape(BATCH, -1, *SHAPE)[:, 0])
    out, info = fc.sample(
        policy, observation, noise=noise, energy=adversarial_energy, placement=placement
    )
    COUNTS["placement examples"] += 1
    COUNTS[f"placement {type(placement).__name__}"] += 1
    COMPOSITIONS.add(str(jax.tree.structure(placement)))
    assert out.shape == (BATCH, *SHAPE) and out.dtype == dtype
    out, plain, fell_back = np.asarray(out), np.asarray(plain), np.asarray(info.fell_back)
    plain_ok = np.all(np.isfinite(plain.astype(np.float64)), axis=(1, 2))
    out_ok = np.all(np.isfinite(out.astype(np.float64)), axis=(1, 2))
    # Wherever the policy's own chunk is finite, what reaches the robot is finite.
    assert np.all(out_ok[plain_ok]), "a placement turned a finite plain chunk into NaN/inf"
    # A sample that fell back is the plain chunk from the same noise, bit for bit.
    for i in np.flatnonzero(fell_back):
        assert np.array_equal(_bits(out[i]), _bits(plain[i])), f"fallback sample {i}"
    COUNTS["placement fell back (samples)"] += int(fell_back.sum())
    # Where the policy itself gives NaN, the flag says so.
    assert np.all(fell_back[~out_ok])
    if isinstance(placement, fc.BestOfN):
        energies = np.asarray(info.placement.candidate_energy, np.float64)
        chosen = np.asarray(info.placement.selected)
        for i in np.flatnonzero(~fell_back):
            if np.isfinite(energies[i]).any():
                assert np.isfinite(energies[i, chosen[i]])
                assert energies[i, chosen[i]] == np.min(energies[i])


# --- saved model files ------------------------------------------------------------------


@functools.cache
def _saved_model(root: str):
    config = fc.MLPEnergyConfig(obs_dim=5, action_dim=SHAPE[1], horizon=SHAPE[0], hidden=16)
    model = eqx.nn.inference_mode(fc.MLPEnergy(config, key=jax.random.key(0)))
    path = fc.save_model(model, os.path.join(root, "model"))
    obs = jax.random.normal(jax.random.key(1), (5,))
    chunk = jax.random.normal(jax.random.key(2), SHAPE)
    return path, float(model(obs, chunk)), obs, chunk


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_fuzz_corrupted_model_files(tmp_path_factory, data):
    import shutil

    path, expected, obs, chunk = _saved_model(str(tmp_path_factory.getbasetemp()))
    work = tmp_path_factory.mktemp("corrupt") / "model"
    shutil.copytree(path, work)
    name = data.draw(st.sampled_from(sorted(p.name for p in work.iterdir())), label="file")
    target = work / name
    raw = bytearray(target.read_bytes())
    how = data.draw(st.sampled_from(["truncate", "flip", "delete", "append", "empty"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)))]
    elif how == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "append":
        raw += b"\x00garbage"
    elif how == "empty":
        raw = bytearray()
    if how == "delete":
        target.unlink()
    else:
        target.write_bytes(bytes(raw))
    COUNTS[f"model file {how}"] += 1
    # Every corruption is refused with the library's own error; nothing loads silently
    # with other weights or another configuration.
    try:
        loaded = fc.load_model(work)
    except fc.ModelFileError:
        COUNTS["model file refused"] += 1
        return
    assert float(loaded(obs, chunk)) == expected, f"{how} {name} loaded different energies"
    COUNTS["model file loaded unchanged"] += 1
