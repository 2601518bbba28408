"""Constraints on action chunks and the placements that use them.

Laws, for every concrete constraint (parametrised over instances, so a new constraint
added to `CONSTRAINTS` is covered), in every dtype, at magnitudes from 1e-3 to 1e3: the
projection is feasible to the constraint's tolerance, idempotent, and no farther from
the input than any feasible point the test finds (projections of perturbed and of
random inputs, and crude feasible points built here); the violation is 0 on feasible
points and > 0 where the projection had to move; its gradients are finite; one compile
per constraint and dtype. Then the placements on closed-form flows.
"""

import os

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import flowcorrect as fc

from .helpers import enable_x64

LAW = settings(
    max_examples=int(os.environ.get("FLOWCORRECT_LAW_EXAMPLES", "4")),
    derandomize=True, database=None, deadline=None,
)  # fmt: skip
H, D = 5, 3  # one shape: one compile per constraint and dtype
DTYPES = ("float32", "float16", "bfloat16", "float64")


def _inside_ball(s):
    return fc.constraints.OutsideBall(jnp.array([0.2, -0.1]) * s, 0.8 * s, dims=(0, 2))


def _box_step(s):
    return fc.constraints.AllOf(
        fc.constraints.Box(-1.0 * s, 1.0 * s), fc.constraints.MaxStepChange(0.3 * s)
    )


def _nonpositive_violation(a):
    return jnp.sum(jnp.maximum(a[:, 1].astype(jnp.float32), 0))


def _nonpositive_project(a):
    return a.at[:, 1].set(jnp.minimum(a[:, 1], 0))


PAST = jnp.array([[0.1, -0.2, 0.3], [0.2, -0.1, 0.3], [0.3, 0.0, 0.2]])


def _continuing(s):
    """Box and step limits on a chunk whose first 2 rows were executed already."""
    return fc.constraints.Continuing(_box_step(s), PAST * s, 2)


def _continued_inside(s):
    return jnp.concatenate([PAST[1:], jnp.broadcast_to(PAST[-1], (H - 2, D))]) * s


# name -> (constraint at scale s, a point feasible with margin at scale s, convex?)
CONSTRAINTS = {
    "box-dims": (lambda s: fc.constraints.Box(jnp.array([-0.5, 0.0]) * s, jnp.array([1.0, 0.5]) * s,
                                  dims=(0, 2)), lambda s: jnp.full((H, D), 0.25 * s), True),
    "step-previous": (
        lambda s: fc.constraints.MaxStepChange(jnp.array([0.2, 0.4]) * s, dims=(0, 1),
                                   previous=jnp.array([1.0, -1.0, 0.5]) * s),
        lambda s: jnp.broadcast_to(jnp.array([1.0, -1.0, 0.0]) * s, (H, D)), True,
    ),
    "jerk": (lambda s: fc.constraints.MaxJerk(0.2 * s), lambda s: jnp.zeros((H, D)), True),
    "acceleration-previous": (
        lambda s: fc.constraints.MaxJerk(0.3 * s, order=2, dims=2, previous=jnp.ones((2, D)) * s),
        lambda s: jnp.ones((H, D)) * s, True,
    ),
    "halfspace": (lambda s: fc.constraints.HalfSpace(jnp.array([1.0, -2.0]), 0.5 * s, dims=(1, 2)),
                  lambda s: jnp.zeros((H, D)), True),
    "ball": (lambda s: fc.constraints.Ball(jnp.array([0.5, 0.0, -0.5]) * s, 1.0 * s),
             lambda s: jnp.broadcast_to(jnp.array([0.5, 0.0, -0.5]) * s, (H, D)), True),
    "outside-ball": (_inside_ball, lambda s: jnp.full((H, D), 2.0 * s), False),
    "fn": (lambda s: fc.constraints.FnConstraint(_nonpositive_violation, _nonpositive_project),
           lambda s: -jnp.ones((H, D)) * s, True),
    "all-of": (_box_step, lambda s: jnp.zeros((H, D)), True),
    "continuing": (_continuing, _continued_inside, True),
    "robot-box": (lambda s: fc.constraints.InRobotSpace.from_quantiles(
        fc.constraints.Box(jnp.array([0.0, -1.0, 2.0]) * s, jnp.array([1.0, 1.0, 3.0]) * s),
        jnp.array([-1.0, -2.0, 1.0]) * s, jnp.array([2.0, 2.0, 4.0]) * s),
        lambda s: jnp.zeros((H, D)), True),
    "robot-uniform-halfspace": (lambda s: fc.constraints.InRobotSpace(
        fc.constraints.HalfSpace(jnp.array([1.0, 1.0, 1.0]), 0.2 * s), 2.0, 0.1 * s),
        lambda s: -jnp.ones((H, D)) * s, True),
}


def _crude(name, c, x):
    """A feasible point built without the library's projection, or None."""
    if name == "box-dims":
        inner = jnp.clip(x[:, ::2], c.low[None].astype(x.dtype), c.high[None].astype(x.dtype))
        return x.at[:, ::2].set(inner * 0.5)
    if name == "step-previous":  # held at the previous action: no change at all
        return x.at[:, :2].set(jnp.broadcast_to(c.previous[None, :2], (H, 2)).astype(x.dtype))
    if name == "halfspace":
        return x.at[:, 1:].set(0.0)
    return None


def _project_all(c, chunks):
    return jax.vmap(c.project)(chunks)


def _measure(c, points):
    acc = jnp.float64 if points.dtype == jnp.float64 else jnp.float32
    grads = jax.vmap(jax.grad(lambda a: c.violation(a).astype(acc)))(points)
    return dict(
        v=jax.vmap(c.violation)(points), tol=jax.vmap(c.tolerance)(points),
        feasible=jax.vmap(c.is_feasible)(points), grads_finite=jnp.all(jnp.isfinite(grads)),
    )


_COMPILED = {}


def _compiled(name, dtype):
    """Two functions per constraint and dtype, each compiled once for all examples (the
    projection runs twice through the first: on the inputs, then on its outputs)."""
    if (name, dtype) not in _COMPILED:
        _COMPILED[(name, dtype)] = tuple(
            eqx.filter_jit(eqx.debug.assert_max_traces(f, max_traces=1))
            for f in (_project_all, _measure)
        )
    return _COMPILED[(name, dtype)]


def _laws(name, dtype, c, x, others, inside, crude):
    """Everything the laws read: the projection of `x`, of `others` (perturbed and
    random inputs) and of the projection itself, violations, tolerances, gradients."""
    project, measure = _compiled(name, dtype)
    p_all = project(c, jnp.concatenate([x[None], others]))
    p = p_all[0]
    pp = project(c, jnp.broadcast_to(p, p_all.shape))[0]
    acc = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    mid = (0.5 * (inside.astype(acc) + p.astype(acc))).astype(x.dtype)
    m = measure(c, jnp.concatenate([jnp.stack([x, p, inside, mid, crude]), p_all[1:]]))
    return dict(
        p=p, pp=pp, v=m["v"][:5], tol_p=m["tol"][1], feasible=m["feasible"][1],
        candidates=p_all[1:], cand_v=m["v"][5:], cand_tol=m["tol"][5:],
        grads_finite=m["grads_finite"],
    )


def _f32(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float64 if a.dtype == jnp.float64 else jnp.float32))



def _ceiling(dtype):
    """A ceiling on the library's own tolerance, relative to the chunk's magnitude (the
    worst rounding of a whole chunk, 10 half-ulps per entry in norm, plus 1e-4), so
    that a tolerance cannot grow to hide a wrong projection."""
    return 10 * np.sqrt(H * D) * float(jnp.finfo(dtype).eps) + 1e-4


def _check(name, dtype, exponent, seed):
    make, inside_at, convex = CONSTRAINTS[name]
    s = float(10.0**exponent)
    c = make(s)
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(dtype)
    x = jnp.asarray(rng.normal(size=(H, D)) * 2 * s, dt)
    sizes = np.array([0.01, 0.3, 1.0])[:, None, None]
    noise = jnp.asarray(rng.normal(size=(3, H, D)) * sizes * s, dt)
    random = jnp.asarray(rng.normal(size=(2, H, D)) * 2 * s, dt)
    inside = jnp.asarray(inside_at(s), dt)
    crude = _crude(name, c, x)
    has_crude = crude is not None
    crude = inside if crude is None else crude.astype(dt)
    others = jnp.concatenate([noise + x[None], random])
    out = jax.tree.map(np.asarray, _laws(name, dtype, c, x, others, inside, crude))
    v_x, _, v_in, v_mid, v_crude = (float(v) for v in out["v"])
    if isinstance(c, fc.constraints.InRobotSpace):  # tolerances and violations are in robot units
        scale = float(np.max(np.abs(c.offset)) + np.max(np.abs(c.scale)) * np.max(np.abs(_f32(x))))
    else:
        scale = max(float(np.max(np.abs(_f32(x)))), s)
    p, xf = _f32(out["p"]), _f32(x)
    tol = float(out["tol_p"])
    assert out["p"].dtype == dt and np.all(np.isfinite(p))
    # Feasible to tolerance, and the tolerance is a small one.
    assert float(out["v"][1]) <= tol, (name, dtype, float(out["v"][1]), tol)
    assert bool(out["feasible"])
    assert tol <= _ceiling(dtype) * scale, (name, dtype, tol, scale)
    # Idempotent.
    assert np.linalg.norm(_f32(out["pp"]) - p) <= 4 * tol + 1e-30, (name, dtype)
    # No farther from the input than any feasible point found.
    d = np.linalg.norm(p - xf)
    points = list(_f32(out["candidates"]))
    tols = list(np.asarray(out["cand_tol"], np.float64))
    assert np.all(np.asarray(out["cand_v"]) <= np.asarray(out["cand_tol"]))
    if has_crude:
        assert v_crude == 0.0, (name, dtype, v_crude)
        points.append(_f32(crude))
        tols.append(0.0)
    for z, t in zip(points, tols, strict=True):
        assert d <= np.linalg.norm(z - xf) + 8 * (tol + t) + 1e-30, (name, dtype, d)
    # Violation: 0 on a feasible point, > 0 where the projection had to move.
    assert v_in == 0.0, (name, dtype, v_in)
    if d > 16 * tol:
        assert v_x > 0
    if convex:  # halfway to a point inside, still feasible
        assert v_mid <= 4 * tol, (name, dtype, v_mid)
    assert bool(out["grads_finite"])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(CONSTRAINTS))
@LAW
@given(exponent=st.floats(-3, 3), seed=st.integers(0, 2**31 - 1))
def test_projection_laws(name, dtype, exponent, seed):
    _check(name, dtype, exponent, seed)


@pytest.mark.parametrize("name", sorted(CONSTRAINTS))
def test_projection_laws_float64(name):
    with enable_x64(True):
        for i, exponent in enumerate((-3.0, 0.0, 3.0)):
            _check(name, "float64", exponent, i)


def test_every_concrete_constraint_is_covered():
    import flowcorrect._constraints as pkg

    exported = [getattr(fc.constraints, n) for n in fc.constraints.__all__]
    concrete = {
        t
        for t in exported
        if isinstance(t, type)
        and issubclass(t, fc.constraints.AbstractConstraint)
        and t is not fc.constraints.AbstractConstraint
    }
    covered = {type(make(1.0)) for make, _, _ in CONSTRAINTS.values()}
    covered |= {
        type(m)
        for make, _, _ in CONSTRAINTS.values()
        if isinstance(make(1.0), fc.constraints.AllOf)
        for m in make(1.0).constraints
    }
    covered |= {type(make(1.0).constraint) for make, _, _ in CONSTRAINTS.values()
                if isinstance(make(1.0), fc.constraints.InRobotSpace)}
    assert len(concrete) >= 9 and concrete <= covered, concrete - covered
    assert pkg.__doc__


# ---------------------------------------------------------------- exact values


def test_outside_ball_at_the_centre_moves_along_the_first_dimension():
    c = fc.constraints.OutsideBall(jnp.array([1.0, 2.0]), 0.5, dims=(1, 2))
    chunk = jnp.zeros((H, D)).at[:, 1].set(1.0).at[:, 2].set(2.0)
    out = eqx.filter_jit(lambda c, a: c.project(a))(c, chunk)
    np.testing.assert_allclose(out[:, 1], 1.5)
    np.testing.assert_allclose(out[:, 2], 2.0)
    np.testing.assert_array_equal(out[:, 0], chunk[:, 0])
    grad = eqx.filter_jit(lambda c, a: jax.grad(c.violation)(a))(c, chunk)
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_step_change_matches_a_quadratic_programme():
    scipy = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(0)
    y = rng.normal(size=(8, 2)) * 2
    prev = np.array([0.5, -0.5])
    c = fc.constraints.MaxStepChange(0.25, previous=jnp.asarray(prev, jnp.float32))
    out = np.asarray(c.project(jnp.asarray(y, jnp.float32)))
    for d in range(2):
        z = np.concatenate([[prev[d]], y[:, d]])
        cons = [{"type": "ineq", "fun": lambda x, z=z: 0.25 - np.abs(np.diff(np.r_[z[0], x]))}]
        ref = scipy.minimize(lambda x, d=d: np.sum((x - y[:, d]) ** 2), y[:, d], method="SLSQP",
                             constraints=cons, options={"ftol": 1e-12, "maxiter": 500}).x
        np.testing.assert_allclose(out[:, d], ref, atol=1e-3)


def test_all_of_reports_its_cycles_and_convergence():
    c = _box_step(1.0)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(H, D)) * 3, jnp.float32)
    solve = eqx.filter_jit(lambda c, x: (*c.solve(x), c.is_feasible(x)))
    out, steps, converged, _ = solve(c, x)
    assert bool(converged) and 1 <= int(steps) < 200
    # A feasible chunk stops after one cycle, unchanged.
    again, steps, converged, feasible = solve(c, out)
    assert bool(feasible)
    assert int(steps) == 1 and bool(converged)
    np.testing.assert_allclose(again, out, atol=1e-6)


def test_in_robot_space_maps_both_ways():
    q01, q99 = jnp.array([0.0, -2.0, 10.0]), jnp.array([1.0, 2.0, 20.0])
    c = fc.constraints.InRobotSpace.from_quantiles(
        fc.constraints.Box(q01, jnp.array([0.5, 2.0, 20.0])), q01, q99
    )
    a = jnp.ones((H, D))  # robot: q99 everywhere, above 0.5 in dimension 0
    out = c.project(a)
    np.testing.assert_allclose(out[:, 0], 0.0, atol=1e-6)  # robot 0.5 is normalised 0
    np.testing.assert_allclose(out[:, 1:], 1.0, atol=1e-6)
    np.testing.assert_allclose(c.violation(a), 0.5 * np.sqrt(H), rtol=1e-5)


def test_after_continues_every_limit_that_reads_the_past():
    fcc = fc.constraints
    rng = np.random.default_rng(4)
    scale, offset = jnp.array([[0.5, 2.0, 1.5]]), jnp.array([[0.1, -0.3, 1.0]])
    # A motion the limits allow (steps of about 0.1), given in the policy's units.
    robot_past = jnp.asarray(np.cumsum(rng.normal(size=(4, D)) * 0.1, axis=0), jnp.float32)
    past = (robot_past - offset) / scale
    chunk = jnp.asarray(rng.normal(size=(H, D)) * 2, jnp.float32)
    limits = fcc.AllOf(fcc.Box(-3.0, 3.0), fcc.MaxStepChange(0.4), fcc.MaxJerk(0.5, order=2))
    # The same limits written by hand with the robot's past actions.
    by_hand = fcc.InRobotSpace(fcc.AllOf(
        fcc.Box(-3.0, 3.0), fcc.MaxStepChange(0.4, previous=robot_past[-1]),
        fcc.MaxJerk(0.5, order=2, previous=robot_past[-2:])), scale, offset)
    continued = fcc.InRobotSpace(limits, scale, offset).after(past)
    out = continued.project(chunk)
    np.testing.assert_allclose(out, by_hand.project(chunk), rtol=1e-6, atol=1e-6)
    # What the robot executes, past then chunk, meets the limits across the join; without
    # `after` the join is free, and this chunk crosses it.
    executed = offset + scale * jnp.concatenate([past[-2:], out])
    assert float(jnp.max(jnp.abs(jnp.diff(executed, axis=0)))) <= 0.4 + 1e-5
    assert float(jnp.max(jnp.abs(jnp.diff(executed, n=2, axis=0)))) <= 0.5 + 1e-5
    free = fcc.InRobotSpace(limits, scale, offset).project(chunk)
    assert float(jnp.max(jnp.abs(scale * (free[:1] - past[-1:])))) > 0.5
    # Limits of one chunk alone read no past.
    box = fcc.Box(-1.0, 1.0)
    assert box.after(past) is box


def test_continuing_holds_the_committed_rows_and_the_join():
    fcc = fc.constraints
    rng = np.random.default_rng(5)
    past = jnp.asarray(np.cumsum(rng.normal(size=(6, D)) * 0.1, axis=0), jnp.float32)
    chunk = jnp.asarray(rng.normal(size=(H, D)), jnp.float32)
    c = fcc.Continuing(fcc.MaxStepChange(0.1), past, 2)
    out = c.project(chunk)
    np.testing.assert_array_equal(out[:2], past[-2:])
    # From the last executed action on, every step is within the limit.
    executed = jnp.concatenate([past[-1:], out[2:]])
    assert float(jnp.max(jnp.abs(jnp.diff(executed, axis=0)))) <= 0.1 + 1e-6
    assert bool(c.is_feasible(out)) and not bool(c.is_feasible(chunk))
    # Exact: the committed rows are fixed, the rest is MaxStepChange's own projection.
    rest = fcc.MaxStepChange(0.1, previous=past[-1]).project(chunk[2:])
    np.testing.assert_allclose(out[2:], rest, atol=1e-7)
    np.testing.assert_allclose(c.violation(out.at[0, 1].add(0.5)), 0.5, rtol=1e-5)
    with pytest.raises(ValueError, match="no rows"):
        fcc.Continuing(fcc.Box(0, 1), jnp.zeros((H, D)), H).project(chunk)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: fc.constraints.Box(1.0, -1.0), "low <= high"),
        (lambda: fc.constraints.Box(0.0, 1.0, dims=(2, 1)), "increasing"),
        (lambda: fc.constraints.MaxStepChange(-0.1), ">= 0"),
        (lambda: fc.constraints.MaxStepChange(0.1, previous=jnp.zeros((2, 3))), "previous=past"),
        (lambda: fc.constraints.MaxJerk(0.1, order=4), "order"),
        (lambda: fc.constraints.HalfSpace(jnp.zeros(2), 0.0), "zero"),
        (lambda: fc.constraints.Ball(jnp.zeros(2), -1.0), "radius"),
        (lambda: fc.constraints.InRobotSpace(fc.constraints.Box(0, 1), jnp.array([1.0, 0.0])),
         "zero"),
        (lambda: fc.constraints.AllOf(), "at least one"),
        (lambda: fc.constraints.AllOf(lambda a: 0.0), "FnConstraint"),
        (lambda: fc.Project(fc.constraints.Box(0, 1), inner=3), "placement"),
        (lambda: fc.constraints.FeasibleFirst(jnp.zeros(3)), "constraint"),
        (lambda: fc.constraints.MaxStepChange(0.1).after(jnp.zeros(3)), r"a\[None\]"),
        (lambda: fc.constraints.Continuing(fc.constraints.Box(0, 1), jnp.zeros((2, 3)), 3),
         "has 2 rows"),
        (lambda: fc.constraints.Continuing(fc.constraints.Box(0, 1), jnp.zeros((2, 3)), -1),
         "int >= 0"),
    ],
)
def test_bad_arguments_name_the_fix(build, match):
    with pytest.raises((TypeError, ValueError), match=match):
        build()


def test_shape_mistakes_are_plain_errors():
    with pytest.raises(ValueError, match="dims.*< 3"):
        fc.constraints.Box(0.0, 1.0, dims=(0, 5)).project(jnp.zeros((H, D)))
    with pytest.raises(ValueError, match="normal"):
        fc.constraints.HalfSpace(jnp.ones(2), 0.0).project(jnp.zeros((H, D)))
    with pytest.raises(ValueError, match="previous"):
        fc.constraints.MaxStepChange(0.1, previous=jnp.zeros(4)).violation(jnp.zeros((H, D)))


# ---------------------------------------------------------------- placements


def _flow_policy(target, spread):
    """A closed-form flow (openpi's convention) whose sample from noise n is exactly
    `target + spread * n`: on the straight path the velocity is `n - a`."""

    def velocity(observation, x, t):
        n = (x - (1 - t) * target) / (t + (1 - t) * spread)
        return n - (target + spread * n)

    return fc.VelocityPolicy(velocity, chunk_shape=(H, D))


TARGET = jnp.linspace(-2.0, 2.0, H * D).reshape(H, D)  # outside [-1, 1] at both ends
BOX = fc.constraints.Box(-1.0, 1.0)


def test_project_is_feasible_and_reports_the_distance():
    policy = _flow_policy(TARGET, 0.1)
    noise = jax.random.normal(jax.random.key(0), (4, H, D))
    plain, _ = fc.sample(policy, None, noise=noise)
    out, info = fc.sample(policy, None, noise=noise, placement=fc.Project(BOX))
    p = info.placement
    assert bool(jnp.all(p.feasible)) and not bool(jnp.any(info.fell_back))
    assert bool(jnp.all(p.violation_after <= jax.vmap(BOX.tolerance)(out)))
    assert bool(jnp.all(p.violation_before > 0))
    np.testing.assert_allclose(out, jnp.clip(plain, -1, 1), atol=1e-6)
    np.testing.assert_allclose(p.distance, jnp.linalg.norm((out - plain).reshape(4, -1), axis=1),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p.violation_before, p.distance, rtol=1e-5)  # box: the distance


def test_feasible_first_prefers_a_feasible_candidate_over_lower_energy():
    rule = fc.constraints.FeasibleFirst(BOX)
    candidates = jnp.stack([jnp.full((H, D), 3.0), jnp.full((H, D), 0.5), jnp.full((H, D), 0.9)])
    energy = jnp.array([-10.0, 1.0, 0.0])
    ok = jnp.array([True, True, True])
    chosen = rule.select(candidates, energy, ok, jax.random.key(0))
    assert int(chosen.index) == 2  # the lowest energy among the feasible ones
    assert np.isinf(chosen.score[0])
    # None feasible: the least violating is chosen, whatever the energy.
    far = candidates + 5.0
    assert int(rule.select(far, energy, ok, jax.random.key(0)).index) == 1
    # A not-ok candidate is never chosen even if feasible.
    assert int(rule.select(candidates, energy, jnp.array([True, True, False]), None).index) == 1
    assert fc.constraints.FeasibleFirst(BOX, fc.Medoid()).needs_energy is False


def test_feasible_first_in_best_of_n():
    policy = _flow_policy(jnp.zeros((H, D)), 1.0)  # candidates are the noises themselves
    noise = jnp.stack([jnp.full((H, D), 1.5), jnp.full((H, D), 0.9), jnp.full((H, D), -0.2)])
    energy = fc.bind(fc.SquaredDistance(), jnp.full((H, D), 2.0))  # prefers the infeasible 1.5
    out, info = fc.sample(policy, None, noise=noise, energy=energy,
                          placement=fc.BestOfN(3, select=fc.constraints.FeasibleFirst(BOX)))
    assert int(info.placement.selected) == 1
    np.testing.assert_allclose(out, 0.9, rtol=1e-5)


def test_guidance_by_violation_lowers_it_and_projection_after_changes_less():
    policy = _flow_policy(TARGET, 0.3)
    noise = jax.random.normal(jax.random.key(1), (16, H, D))
    plain, _ = fc.sample(policy, None, noise=noise)
    _, both = fc.sample(policy, None, noise=noise, energy=fc.constraints.ViolationEnergy(BOX),
                        placement=fc.Project(BOX, fc.Guided(weight=2.0, cap=None)))
    # For a box the violation is the distance that projection alone would move a chunk.
    before = jax.vmap(BOX.violation)(plain)
    guided = both.placement.violation_before
    assert float(jnp.mean(guided)) < 0.8 * float(jnp.mean(before))
    assert bool(jnp.all(both.placement.feasible))
    np.testing.assert_allclose(both.placement.distance, guided, rtol=1e-5)


def test_user_constraint_through_fn_constraint():
    # The first action dimension is never negative, in the user's own functions.
    user = fc.constraints.FnConstraint(lambda a: jnp.sum(jnp.maximum(-a[:, 0], 0)),
                           lambda a: a.at[:, 0].set(jnp.maximum(a[:, 0], 0)))
    policy = _flow_policy(TARGET, 0.1)
    out, info = fc.sample(policy, None, jax.random.key(2), batch_size=3,
                          placement=fc.Project(user))
    assert bool(jnp.all(out[:, :, 0] >= 0)) and bool(jnp.all(info.placement.feasible))
    assert bool(jnp.all(info.placement.violation_before > 0))


def test_nothing_non_finite_leaves_project():
    # A projection that returns NaN: the chunk before it is kept, flagged.
    broken = fc.constraints.FnConstraint(
        lambda a: jnp.sum(jnp.maximum(a, 0)), lambda a: a * jnp.nan
    )
    policy = _flow_policy(TARGET, 0.1)
    out, info = fc.sample(policy, None, jax.random.key(3), batch_size=2,
                          placement=fc.Project(broken))
    assert bool(jnp.all(jnp.isfinite(out))) and bool(jnp.all(info.placement.kept))
    assert not bool(jnp.any(info.placement.feasible))

    # An inner placement whose chunk is not finite: the plain chunk is projected instead.
    class Broken(fc.AbstractPlacement):
        needs_energy = False

        def noise_shape(self, chunk_shape):
            return tuple(chunk_shape)

        def sample(self, flow, noise, keys):
            return noise * jnp.nan, None

    out, info = fc.sample(policy, None, jax.random.key(4), batch_size=2,
                          placement=fc.Project(BOX, Broken()))
    assert bool(jnp.all(info.placement.fell_back)) and bool(jnp.all(info.placement.feasible))
    assert not bool(jnp.any(info.fell_back))
    assert bool(jnp.all(jnp.abs(out) <= 1.0))
