"""A fixed set of public calls whose outputs are kept in `tests/golden/*.npz`.

`tests/test_golden.py` recomputes them and compares, so a refactor that should keep
behaviour can show that it did. Record (only when a change of output is intended and
explained):

    python -m tests.golden.calls --write             # core.npz
    /work/venv-openpi/bin/python -m tests.golden.calls --write --openpi   # openpi.npz

and `--compare` prints, per entry, whether it is bit-identical and the largest
difference.
"""

import argparse
import pathlib
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import flowcorrect as fc

HERE = pathlib.Path(__file__).parent
H, D, OBS, WIDTH, BATCH = 8, 3, 16, 16, 3


class _Field(eqx.Module):
    """A nonlinear velocity that reads its observation."""

    w: jax.Array
    u: jax.Array
    b: jax.Array

    def __call__(self, observation, x, t):
        return jnp.tanh(x @ self.w + (t * self.b + observation)[None, :]) @ self.u


def _policy(convention):
    k = jax.random.split(jax.random.key(0), 3)
    field = _Field(0.5 * jax.random.normal(k[0], (D, WIDTH)),
                   0.5 * jax.random.normal(k[1], (WIDTH, D)),
                   jax.random.normal(k[2], (WIDTH,)))
    return fc.VelocityPolicy(field, (H, D), convention)


def _energy():
    config = fc.MLPEnergyConfig(obs_dim=OBS, action_dim=D, horizon=H, hidden=16)
    return fc.MLPEnergy(config, key=jax.random.key(1))


def _placements(leftover):
    recipe = fc.reference_recipe(num_steps=3, alpha=0.1, clip_frac=0.2)
    box = fc.constraints.Box(-0.6, 0.6)
    return {
        "plain": fc.Plain(),
        "post_hoc": fc.PostHoc(recipe),
        "post_hoc_after_guided": fc.PostHoc(recipe, fc.Guided(fc.LastSteps(3), 0.5)),
        "denoised": fc.Denoised(recipe, schedule=fc.LastSteps(3)),
        "denoised_every_2nd": fc.Denoised(recipe, schedule=fc.EveryNth(2)),
        "guided": fc.Guided(weight=1.0, cap=1.0),
        "best_of_4": fc.BestOfN(4),
        "best_of_4_medoid": fc.BestOfN(4, select=fc.Medoid()),
        "best_of_4_post_hoc": fc.BestOfN(4, fc.PostHoc(recipe)),
        "early_best_of_4": fc.BestOfN(4, rank_at=5),
        "rtc": fc.RealTimeChunking(leftover, 2, 3),
        "project_box": fc.Project(box),
        "project_guided": fc.Project(box, fc.Guided(weight=2.0, cap=None)),
        "feasible_first": fc.BestOfN(4, select=fc.constraints.FeasibleFirst(box)),
    }


def core_calls() -> dict[str, np.ndarray]:
    out = {}
    energy = _energy()
    obs = jax.random.normal(jax.random.key(2), (BATCH, OBS))
    leftover = jax.random.normal(jax.random.key(3), (BATCH, H, D))
    for cname, convention in (("openpi", fc.OpenPI()), ("reverse", fc.Reverse())):
        policy = _policy(convention)
        for name, placement in _placements(leftover).items():
            many = isinstance(placement, fc.BestOfN)
            shape = (BATCH, 4, H, D) if many else (BATCH, H, D)
            noise = jax.random.normal(jax.random.key(4), shape)
            needs = not isinstance(placement, (fc.Plain, fc.RealTimeChunking, fc.Project))
            needs = needs or name == "project_guided"
            actions, info = fc.sample(policy, obs, jax.random.key(5), noise=noise,
                                      num_steps=10, placement=placement,
                                      energy=energy if needs else None)
            out[f"sample/{cname}/{name}"] = np.asarray(actions)
            if info.final_energy is not None:
                out[f"sample/{cname}/{name}/final_energy"] = np.asarray(info.final_energy)
    actions = jax.random.normal(jax.random.key(6), (BATCH, H, D))
    for name, corrector in {
        "recipe": fc.reference_recipe(),
        "langevin": fc.LangevinStep(0.05, 0.1),
        "masked_chain": fc.Mask(fc.Chain([fc.GradientStep(0.1), fc.ClipStep(
            fc.GradientStep(0.2), 0.1)]), horizon=4, action_dims=jnp.array([True, False, True])),
    }.items():
        corrected, _ = fc.correct(energy, obs, actions, corrector=corrector,
                                  key=jax.random.key(7))
        out[f"correct/{name}"] = np.asarray(corrected)

    config = fc.train.TrainConfig(num_steps=6, learning_rate=1e-3, warmup_steps=1, log_every=3)

    def demos(step):
        rng = np.random.default_rng(step)
        return fc.train.Batch(jnp.asarray(rng.standard_normal((8, OBS)), jnp.float32),
                        jnp.asarray(rng.standard_normal((8, H, D)), jnp.float32))

    def labelled(step):
        rng = np.random.default_rng(50 + step)
        return fc.verifiers.LabelledBatch(jnp.asarray(rng.standard_normal((8, OBS)), jnp.float32),
                                jnp.asarray(rng.standard_normal((8, H, D)), jnp.float32),
                                jnp.asarray(rng.random(8) < 0.5, jnp.float32))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = fc.train.fit(_energy(), demos, key=jax.random.key(8), config=config,
                        negatives=[fc.train.NoiseNegatives(2, 0.3)], progress=False)
        verifier = fc.verifiers.fit_verifier(_energy(), labelled, fc.verifiers.OutcomeLoss(),
                                   key=jax.random.key(9), config=config, progress=False)
    for name, result in (("fit", fitted), ("fit_verifier", verifier)):
        leaves = jax.tree.leaves(eqx.filter(result.model, eqx.is_inexact_array))
        for i, leaf in enumerate(leaves):
            out[f"{name}/param{i}"] = np.asarray(leaf)
        out[f"{name}/loss"] = np.asarray([h["loss"] for h in result.history])
    return out


def openpi_calls() -> dict[str, np.ndarray]:
    from flowcorrect.openpi import Pi0Policy, sample_actions_with_energy_correction
    from tests.test_openpi import _energy as pi0_energy, _make_model, _observation

    out = {}
    with jax.numpy_rank_promotion("allow"):
        for pi05, dtype in ((False, "float32"), (True, "bfloat16")):
            config, model = _make_model(pi05, dtype)
            observation = _observation(config, jax.random.key(1))
            policy = Pi0Policy(model)
            noise = jax.random.normal(jax.random.key(2), (2, *policy.chunk_shape))
            many = jax.random.normal(jax.random.key(4), (2, 3, *policy.chunk_shape))
            energy = fc.OnActionDims(pi0_energy(), 7)
            tag = "pi05" if pi05 else "pi0"
            for name, (placement, start) in {
                "plain": (fc.Plain(), noise),
                "denoised": (fc.Denoised(fc.reference_recipe(), schedule=fc.LastSteps(3)),
                             noise),
                "guided": (fc.Guided(schedule=fc.LastSteps(3), weight=1.0), noise),
                "best_of_3": (fc.BestOfN(3), many),
            }.items():
                actions, _ = fc.sample(policy, observation, None, noise=start, num_steps=10,
                                       placement=placement,
                                       energy=None if isinstance(placement, fc.Plain) else energy)
                out[f"{tag}/{name}"] = np.asarray(actions)
            actions = sample_actions_with_energy_correction(
                policy, pi0_energy(), jax.random.key(3), observation, 10,
                energy_correction_steps=3, energy_alpha=0.1, energy_clip_frac=0.2,
                action_dims=7, noise=noise)
            out[f"{tag}/reference_api"] = np.asarray(actions)
    return out


def compare(got: dict, want: dict) -> list[str]:
    lines = []
    for name in sorted(set(got) | set(want)):
        if name not in got or name not in want:
            lines.append(f"{name}: only in {'new' if name in got else 'golden'}")
            continue
        a, b = got[name], want[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            lines.append(f"{name}: {a.shape} {a.dtype} vs golden {b.shape} {b.dtype}")
        elif a.tobytes() == b.tobytes():
            lines.append(f"{name}: bit-identical")
        else:
            lines.append(f"{name}: max abs difference {np.max(np.abs(a - b)):.3g}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--openpi", action="store_true", help="the openpi adapter's calls")
    parser.add_argument("--write", action="store_true", help="overwrite the golden file")
    parser.add_argument("--compare", action="store_true", help="report per entry")
    args = parser.parse_args(argv)
    path = HERE / ("openpi.npz" if args.openpi else "core.npz")
    got = openpi_calls() if args.openpi else core_calls()
    if args.write:
        np.savez(path, **got)
        print(f"wrote {len(got)} entries to {path}")
    if args.compare:
        with np.load(path) as f:
            want = dict(f)
        print("\n".join(compare(got, want)))


if __name__ == "__main__":
    main()
