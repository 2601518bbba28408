"""flowcorrect.plot: each plot draws exactly the data it is given, and says what to fix."""

import importlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="flowcorrect.plot needs the `plot` extra")

from flowcorrect import plot  # noqa: E402


def line_data(line):
    x, y = line.get_data()
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


def test_alpha_sweep_plots_each_curve():
    alphas = np.array([0.0, 0.05, 0.1, 0.3, 1.0])
    energies = np.array([[2.0, 1.5, 1.2, 1.9, 7.0], [-3.0, -3.1, -2.5, 4.0, 40.0]])
    fig = plot.alpha_sweep(alphas, jnp.asarray(energies), labels=["a", "b"])
    ax = fig.axes[0]
    assert len(ax.lines) == 2
    for line, row in zip(ax.lines, energies):
        x, y = line_data(line)
        np.testing.assert_array_equal(x, alphas)
        np.testing.assert_allclose(y, row, rtol=1e-6)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]


def test_alpha_sweep_one_curve_and_shape_errors():
    fig = plot.alpha_sweep([0.0, 0.1, 0.2], [3.0, 1.0, 2.0])
    np.testing.assert_array_equal(line_data(fig.axes[0].lines[0])[1], [3.0, 1.0, 2.0])
    with pytest.raises(ValueError, match=r"shape \(3,\) or \(curves, 3\).*\(4,\)"):
        plot.alpha_sweep([0.0, 0.1, 0.2], [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="`alphas` must be one-dimensional"):
        plot.alpha_sweep([[0.0, 0.1]], [1.0, 2.0])
    with pytest.raises(ValueError, match="`labels` has 1 entries for 2 curves"):
        plot.alpha_sweep([0.0, 1.0], [[1.0, 2.0], [3.0, 4.0]], labels=["x"])


def test_step_energies_means_over_the_batch_with_times():
    rng = np.random.default_rng(0)
    guided = rng.normal(size=(5, 10)) * 10
    plain = rng.normal(size=(10,))
    times = np.linspace(1.0, 0.1, 10)
    fig = plot.step_energies({"guided": guided, "plain": plain}, times=times)
    ax = fig.axes[0]
    (x0, y0), (x1, y1) = line_data(ax.lines[0]), line_data(ax.lines[1])
    np.testing.assert_allclose(x1, times)
    np.testing.assert_allclose(x0, times)
    np.testing.assert_allclose(y0, guided.mean(axis=0))
    np.testing.assert_allclose(y1, plain)
    assert len(ax.collections) == 1  # the batch's range, only where there is a batch
    assert ax.get_xlabel() == "flow time t"


def test_step_energies_default_axis_and_errors():
    fig = plot.step_energies(np.arange(6.0)[None] * np.array([[1.0], [3.0]]))
    x, y = line_data(fig.axes[0].lines[0])
    np.testing.assert_array_equal(x, np.arange(6))
    np.testing.assert_allclose(y, 2.0 * np.arange(6.0))
    with pytest.raises(ValueError, match="every series needs 3 flow steps; 'b' has 4"):
        plot.step_energies({"a": np.ones(3), "b": np.ones(4)})
    with pytest.raises(ValueError, match="`times` has 2 entries for 3 flow steps"):
        plot.step_energies(np.ones(3), times=[1.0, 0.5])
    with pytest.raises(ValueError, match="empty mapping"):
        plot.step_energies({})


def test_success_rates_with_wilson_intervals_and_baseline():
    ks = [0, 1, 3, 5]
    counts = {"alpha 0.1": np.array([176, 170, 148, 120]), "alpha 0.03": [176, 176, 0, 300]}
    fig = plot.success(ks, counts, trials=300, baseline=176 / 300)
    ax = fig.axes[0]
    assert len(ax.containers) == 2
    for container, value in zip(ax.containers, counts.values()):
        x, y = line_data(container.lines[0])
        np.testing.assert_array_equal(x, ks)
        np.testing.assert_allclose(y, np.asarray(value) / 300)
    np.testing.assert_allclose(line_data(ax.lines[-1])[1], [176 / 300] * 2)
    # Wilson intervals: inside [0, 1] at 0% and 100%, and they contain the rate.
    for container in ax.containers:
        segments = container.lines[2][0].get_segments()
        for seg, rate in zip(segments, line_data(container.lines[0])[1]):
            low, high = sorted(seg[:, 1])
            assert 0.0 <= low <= rate <= high <= 1.0
            assert high - low > 0.0


def test_success_counts_without_trials_and_errors():
    fig = plot.success([0.01, 0.1, 0.3], [60, 55, 20], xlabel="alpha")
    np.testing.assert_array_equal(line_data(fig.axes[0].lines[0])[1], [60, 55, 20])
    assert fig.axes[0].get_xlabel() == "alpha"
    with pytest.raises(ValueError, match=r"counts between 0 and `trials`.*\[60.0, 301.0\]"):
        plot.success([1, 2], [60, 301], trials=300)


def test_chunk_switches_draws_executed_chunks_and_switches():
    rng = np.random.default_rng(1)
    executed = rng.normal(size=(12, 3))
    previous, new = rng.normal(size=(8, 3)), rng.normal(size=(8, 3))
    fig = plot.chunk_switches(executed, [4, 8], chunks=[(0, previous), (4, new)], dims=[0, 2])
    assert len(fig.axes) == 2
    for ax, d in zip(fig.axes, [0, 2]):
        x, y = line_data(ax.lines[0])
        np.testing.assert_array_equal(x, np.arange(12))
        np.testing.assert_allclose(y, executed[:, d])
        x, y = line_data(ax.lines[2])
        np.testing.assert_array_equal(x, 4 + np.arange(8))
        np.testing.assert_allclose(y, new[:, d])
        np.testing.assert_allclose(line_data(ax.lines[1])[1], previous[:, d])
        switches = [line_data(line)[0][0] for line in ax.lines[3:]]
        assert switches == [4.0, 8.0]


def test_chunk_switches_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"chunk 0 must be \(horizon, 2\).*\(5, 3\)"):
        plot.chunk_switches(np.zeros((6, 2)), [3], chunks=[(0, np.ones((5, 3)))])
    with pytest.raises(ValueError, match=r"`dims` must name action dimensions in \[0, 2\)"):
        plot.chunk_switches(np.zeros((6, 2)), [3], dims=[2])
    with pytest.raises(ValueError, match="`executed` must be"):
        plot.chunk_switches(np.zeros((2, 3, 4)), [])


def test_draws_on_a_given_axes():
    from matplotlib.figure import Figure

    fig = Figure()
    left, right = fig.subplots(1, 2)
    assert plot.alpha_sweep([0.0, 1.0], [1.0, 0.5], ax=right) is fig
    assert len(right.lines) == 1 and len(left.lines) == 0
    assert plot.chunk_switches(np.ones(5), [2], ax=left) is fig
    np.testing.assert_array_equal(line_data(left.lines[0])[1], np.ones(5))


def test_figures_render_headless(tmp_path):
    # Agg rendering through the figure's own canvas: no pyplot, no display.
    fig = plot.success([1, 3], {"x": [1, 2]}, baseline=1.5)
    fig.savefig(tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0


def test_missing_matplotlib_names_the_extra(monkeypatch):
    # `import flowcorrect.plot` works without matplotlib; drawing says what to install.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    module = importlib.reload(plot)
    with pytest.raises(ImportError, match=r"pip install 'flowcorrect\[plot\]'"):
        module.alpha_sweep([0.0], [1.0])
