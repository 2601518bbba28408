"""Smoke tests: the examples run end to end and print the tables they promise."""

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    # Examples are scripts, not a package: load them by path, without running __main__.
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(text):
    return [line.split("  ")[0].strip() for line in text.splitlines() if line.strip()]


@pytest.mark.slow
def test_quickstart_prints_every_placement(capsys):
    load("quickstart").main(["--batch", "4"])
    rows = table_rows(capsys.readouterr().out)
    for name in ["none", "post-hoc (reference recipe)", "denoised, last 3 steps",
                 "guided, last 3 steps", "best of 8", "best of 8, then post-hoc"]:  # fmt: skip
        assert name in rows


@pytest.mark.slow
def test_train_and_correct_prints_table_and_report(capsys):
    load("train_and_correct").main(["--quick"])
    out = capsys.readouterr().out
    rows = table_rows(out)
    for name in ["reference recipe", "monotone (backtrack) x3", "best of 8 by energy"]:
        assert name in rows
    # The monotone corrector only keeps steps that lower the energy.
    line = next(line for line in out.splitlines() if line.startswith("monotone"))
    energy_before, energy_after = line.split("->")[0].split()[-1], line.split("->")[1].split()[0]
    assert float(energy_after) <= float(energy_before)
    assert "EvalReport(" in out and "top1_accuracy" in out


@pytest.mark.slow  # ~10 s: check_corrector compiles a batch, jit and no-jit runs
def test_custom_energy_corrector_checks_and_corrects(capsys):
    load("custom_energy_corrector").main(["--batch", "8"])
    out = capsys.readouterr().out
    assert "check_energy and check_corrector passed" in out
    for name in ["reference recipe (K=3)", "heavy ball x10", "heavy ball x10, clipped, monotone"]:
        line = next(line for line in out.splitlines() if line.startswith(name + "  "))
        numbers = [float(w) for w in line[len(name) :].replace("->", " ").split()]
        energy_before, energy_after, miss_before, miss_after = numbers
        assert energy_after < energy_before and miss_after < miss_before


def test_custom_heavy_ball_rejects_a_bad_beta():
    with pytest.raises(ValueError, match=r"beta=.*\[0, 1\), got 1.5"):
        load("custom_energy_corrector").HeavyBall(beta=1.5)


@pytest.mark.slow  # ~8 s: three placements compile
def test_custom_placement_traces_each_placement():
    import jax
    import jax.numpy as jnp

    import flowcorrect as fc

    example = load("custom_placement")
    example.main(["--batch", "2"])  # asserts Trace(Plain()) equals the plain sampler
    h, d = example.HORIZON, example.ACTION_DIM
    # The shapes of main's run (new values, same shapes: nothing recompiles).
    mean = jnp.linspace(1.0, -1.0, h * d).reshape(h, d)
    policy = example.LinearPolicy(std=jnp.array(0.2), goal=mean + 1.0)
    paths = example.traces(policy, jnp.broadcast_to(mean, (2, h, d)), jax.random.key(3),
                           fc.SquaredDistance(weight=1.0), batch_size=2)  # fmt: skip
    plain = paths["plain"].path
    assert plain.shape == (2, 11, h, d)
    # The denoised placement acts only at its 3 scheduled steps: the path before them
    # is the plain one, after them it has moved towards the goal.
    denoised = paths["denoised, last 3 steps"].path
    assert bool(jnp.all(denoised[:, :8] == plain[:, :8]))
    assert float((denoised[:, -1] - plain[:, -1]).mean()) > 0.05
    assert float((paths["guided, every step"].path[:, -1] - plain[:, -1]).mean()) > 0.0


def test_libero_client_axis_angle_and_pairing():
    """The LIBERO client (not run end to end here: LIBERO's assets cannot be fetched)
    converts orientations correctly; its table pairs episodes by the library's stats."""
    import math

    import numpy as np

    client = load("openpi_libero_client")
    half = math.radians(120.0) / 2
    axis = np.array([1.0, -2.0, 2.0]) / 3.0
    quat = np.concatenate([math.sin(half) * axis, [math.cos(half)]])
    np.testing.assert_allclose(client.axis_angle(quat), math.radians(120.0) * axis, atol=1e-12)
    np.testing.assert_array_equal(client.axis_angle(np.array([0.0, 0.0, 0.0, 1.0])), np.zeros(3))
    # A quaternion a hair past unit length is clipped, not turned into NaN.
    assert np.all(np.isfinite(client.axis_angle(np.array([0.0, 0.0, 0.0, 1.0 + 1e-9]))))
    assert set(client.MAX_STEPS) == {"libero_spatial", "libero_object", "libero_goal",
                                     "libero_10", "libero_90"}  # fmt: skip


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high:UserWarning")  # metaworld's
def test_metaworld_your_setting_runs(tmp_path, capsys):
    pytest.importorskip("metaworld", reason="needs the metaworld extra")
    result = load("metaworld_your_setting").main(
        ["--episodes", "2", "--demos", "2", "--policy-steps", "20", "--cache", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert "medoid vs plain" in out and "exact McNemar p" in out
    assert 0 <= result["plain"] <= 2 and 0 <= result["medoid of 8"] <= 2
    assert result["wins"] <= 2 and result["losses"] <= 2
