"""Draws the documentation's figures into docs/img/ from real runs of the library.

The harness figure (harness_figure.py) is drawn from the harness's stored results.

Run from the repository root: python docs/scripts/make_figures.py [--out docs/img]
(needs matplotlib: pip install -e '.[plot]'; about half a minute on a CPU).
"""

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import flowcorrect as fc
from flowcorrect import plot

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness_figure  # noqa: E402
from custom_placement import LinearPolicy, Trace  # noqa: E402
from realtime_chunking import TwoModePolicy, plain_chunk, rtc_chunk  # noqa: E402

NUM_STEPS = 10


def placements_figure(path):
    """Where each placement acts: 1-d flows from noise (t = 1) to an action (t = 0)."""
    Figure = plot._matplotlib()
    n = 6
    # A 1 x 1 chunk: the policy's actions are N(0, 0.3^2); the energy (a - 1)^2 wants 1.
    policy = LinearPolicy(std=jnp.array(0.3), goal=jnp.ones((1, 1)), chunk_shape=(1, 1))
    energy = fc.SquaredDistance(weight=1.0)
    observation = jnp.zeros((n, 1, 1))
    key = jax.random.key(2)
    times = np.asarray(fc.OpenPI().times(NUM_STEPS))

    def trace(placement):
        _, info = fc.sample(policy, observation, key, batch_size=n, num_steps=NUM_STEPS,
                            placement=Trace(placement), energy=energy)  # fmt: skip
        return np.asarray(info.placement.placement.path[:, :, 0, 0])

    plain = trace(fc.Plain())
    recipe = fc.reference_recipe(num_steps=3, alpha=0.3, clip_frac=0.5)
    corrected, _ = fc.correct(energy, jnp.ones((n, 1, 1)), jnp.asarray(plain[:, -1, None, None]),
                              corrector=recipe)  # fmt: skip
    panels = {
        "Plain: the policy alone": (plain, None),
        "PostHoc: steps on the final chunk": (plain, np.asarray(corrected[:, 0, 0])),
        "Denoised: shifts at scheduled steps": (trace(fc.Denoised(recipe, fc.LastSteps(3))), None),
        "Guided: gradient added to the velocity": (trace(fc.Guided(weight=3.0, cap=None)), None),
        "BestOfN: lowest-energy candidate": (plain, None),
    }
    fig = Figure(figsize=(13, 3.2), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True)
    for ax, (title, (paths, after)) in zip(axes, panels.items()):
        ax.axhline(1.0, color="green", linestyle=":", linewidth=1)
        for i, row in enumerate(paths):
            ax.plot(times, row, color="tab:blue", alpha=0.6, linewidth=1)
            if after is not None:
                ax.annotate("", (-0.12, after[i]), (0.0, row[-1]),
                            arrowprops=dict(arrowstyle="->", color="tab:red"))  # fmt: skip
        if title.startswith("BestOfN"):
            best = np.argmin((paths[:, -1] - 1.0) ** 2)
            ax.plot(times, paths[best], color="tab:red", linewidth=2)
        if title.startswith("Denoised"):
            for t in times[-4:-1]:
                ax.axvline(t, color="tab:red", alpha=0.3)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(1.05, -0.15)
        ax.set_xlabel("flow time t (1 = noise, 0 = actions)", fontsize=8)
    axes[0].set_ylabel("action (1-d chunk)")
    axes[0].text(1.0, 1.05, "energy's minimum", color="green", fontsize=8)
    fig.savefig(path, dpi=110)


def alpha_sweep_figure(path):
    """One step of a - alpha * grad E for a smooth and a sharp quadratic energy."""
    key_a, key_t = jax.random.split(jax.random.key(0))
    target = jax.random.normal(key_t, (16, 4))
    actions = target + 0.3 * jax.random.normal(key_a, (16, 4))
    alphas = jnp.linspace(0.0, 0.06, 13)
    rows = []
    for weight in [1.0, 50.0]:
        energy = fc.SquaredDistance(weight=weight)
        g = jax.grad(energy, argnums=1)(target, actions)
        after = jax.vmap(lambda a: energy(target, actions - a * g))(alphas)
        rows.append(after / after[0])
    labels = ["smooth (weight 1)", "sharp (weight 50)"]
    fig = plot.alpha_sweep(alphas, jnp.stack(rows), labels=labels)
    ax = fig.axes[0]
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_ylabel("energy after one step / before")
    fig.savefig(path, dpi=110)


def step_energies_figure(path):
    """Energy of the denoised estimate at each flow step, per placement."""
    h, d = 8, 2
    mean = jnp.broadcast_to(jnp.linspace(0.0, 1.0, h)[:, None], (h, d))
    policy = LinearPolicy(std=jnp.array(0.1), goal=mean + 0.5)
    energy = fc.SquaredDistance(weight=1.0)
    observation = jnp.broadcast_to(mean, (8, h, d))
    series = {}
    for name, placement in {
        "plain": fc.Plain(),
        "denoised, last 3 steps": fc.Denoised(fc.reference_recipe(), fc.LastSteps(3)),
        "guided w=3": fc.Guided(weight=3.0),
    }.items():
        _, info = fc.sample(policy, observation, jax.random.key(1), batch_size=8,
                            placement=placement, energy=energy, step_energies=True)  # fmt: skip
        series[name] = info.step_energy
    fig = plot.step_energies(series)
    fig.savefig(path, dpi=110)


def rtc_switches_figure(path):
    """The toy two-mode policy of examples/realtime_chunking.py run asynchronously
    (execution horizon 4, delay 2): the lateral action executed at each control step,
    naive switching against real-time chunking."""
    Figure = plot._matplotlib()
    policy = TwoModePolicy(jnp.asarray(1.0), jnp.asarray(0.1))
    fig = Figure(figsize=(8, 4.6), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True, sharey=True)
    for ax, method in zip(axes, ("naive", "rtc")):
        queue = fc.rtc.ActionQueue(execution_horizon=4, inference_delay=2)
        key = jax.random.key(3)
        executed, switches = [], []
        for step in range(40):
            if queue.inference_due:
                request = queue.request()
                key, sub = jax.random.split(key)
                if method == "rtc" and request.prev_chunk_left_over is not None:
                    placement = fc.RealTimeChunking(
                        jnp.asarray(request.prev_chunk_left_over), request.inference_delay,
                        request.execution_horizon)  # fmt: skip
                    chunk = rtc_chunk(policy, sub, placement)
                else:
                    chunk = plain_chunk(policy, sub)
                queue.submit(np.asarray(chunk))
            action, switched = queue.pop()
            if switched and step > 0:
                switches.append(step)
            executed.append(action[1])
        plot.chunk_switches(np.asarray(executed), switches, ax=ax)
        ax.set_title({"naive": "naive switching: each chunk drawn afresh",
                      "rtc": "real-time chunking: each chunk guided onto the committed "
                             "actions"}[method], fontsize=10)  # fmt: skip
        ax.set_ylabel("lateral action")
    axes[-1].set_xlabel("control step")
    fig.savefig(path, dpi=110)


FIGURES = {
    "placements.png": placements_figure,
    "alpha_sweep.png": alpha_sweep_figure,
    "step_energies.png": step_energies_figure,
    "rtc_switches.png": rtc_switches_figure,
    harness_figure.NAME: harness_figure.draw,  # from the harness's results, not a run
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "img")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, draw in FIGURES.items():
        draw(args.out / name)
        print("wrote", args.out / name)


if __name__ == "__main__":
    main()
