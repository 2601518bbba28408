"""`fc.train.fit` under `jax.distributed`: two CPU processes on this machine against one.

Two runs start at once, each a fresh Python process group
(`python tests/test_distributed.py worker ...`): two processes that call
`jax.distributed.initialize` with a local coordinator and have one CPU device each,
and one process with two CPU devices, so that both layouts train on a two-device
mesh. Every process feeds its own rows of each global batch. Each run trains from
scratch with a checkpoint every 3 steps, then resumes from the *other* layout's
step-3 checkpoint (a copy without its newest checkpoint, as a run killed after step 3
would leave it): 2 processes -> 1 and 1 -> 2.
"""

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve()
NUM_STEPS, CHECKPOINT_EVERY, GLOBAL_BATCH = 6, 3, 8
TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(num_processes: int, root: pathlib.Path) -> list:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={3 - num_processes}"
    env["JAX_PLATFORMS"] = "cpu"
    port = _free_port()
    procs = []
    for i in range(num_processes):
        log = root / f"worker{num_processes}_{i}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(
                [sys.executable, str(HERE), "worker", str(num_processes), str(i), str(port),
                 str(root)],  # fmt: skip
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        procs.append((proc, log))
    return procs


def _wait(procs: list) -> None:
    """Waits for every worker; the first to fail (or the timeout) stops them all."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p, _ in procs):
            failed = [(p, log) for p, log in procs if p.poll() not in (None, 0)]
            assert not failed, "a worker failed:\n" + failed[0][1].read_text()[-4000:]
            assert time.monotonic() < deadline, "the workers timed out:\n" + "\n".join(
                log.read_text()[-2000:] for _, log in procs
            )
            time.sleep(0.2)
        for p, log in procs:
            assert p.returncode == 0, "a worker failed:\n" + log.read_text()[-4000:]
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()


def _params(path: pathlib.Path) -> list[np.ndarray]:
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files)]


def test_two_processes_train_save_and_resume_as_one(tmp_path):
    # Imported here: a worker must not import flowcorrect before jax.distributed starts.
    from flowcorrect._train.checkpoint import Checkpointer

    _wait(_launch(1, tmp_path) + _launch(2, tmp_path))

    # The two processes wrote one checkpoint per save, into one folder.
    two = tmp_path / "run2"
    assert sorted(int(p.name) for p in two.iterdir() if p.name.isdigit()) == [
        CHECKPOINT_EVERY, NUM_STEPS,
    ]  # fmt: skip
    checkpointer = Checkpointer(two, keep=3)
    meta = checkpointer.read_meta(NUM_STEPS)
    checkpointer.close()
    assert meta["step"] == NUM_STEPS and [h["step"] for h in meta["history"]] == [1, 2, 3, 4,
                                                                                  5, 6]
    reference = _params(tmp_path / "run1_p0.npz")
    initial = _params(tmp_path / "initial.npz")
    # The runs trained: the reference moved away from the initial parameters.
    assert max(np.abs(a - b).max() for a, b in zip(reference, initial, strict=True)) > 1e-3
    # Two processes, each process's copy; then the resumed runs in both layouts.
    for name in ("run2_p0", "run2_p1", "resumed1_p0", "resumed2_p0", "resumed2_p1"):
        got = _params(tmp_path / f"{name}.npz")
        for a, b in zip(got, reference, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def _worker(num_processes: int, process_id: int, port: int, root: pathlib.Path) -> None:
    import jax

    if num_processes > 1:
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except AttributeError:  # a jax whose CPU collectives need no switch
            pass
        jax.distributed.initialize(
            coordinator_address=f"localhost:{port}",
            num_processes=num_processes,
            process_id=process_id,
        )
    import equinox as eqx
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    import flowcorrect as fc

    assert jax.process_count() == num_processes and len(jax.devices()) == 2
    local = GLOBAL_BATCH // num_processes
    rows = slice(process_id * local, (process_id + 1) * local)

    def data(step: int) -> fc.train.Batch:
        # The global batch of `step`, the same in every layout; this process's rows.
        rng = np.random.default_rng(step)
        obs = rng.standard_normal((GLOBAL_BATCH, 5)).astype(np.float32)
        actions = rng.standard_normal((GLOBAL_BATCH, 3, 2)).astype(np.float32)
        return fc.train.Batch(jnp.asarray(obs[rows]), jnp.asarray(actions[rows]))

    config = fc.MLPEnergyConfig(obs_dim=5, action_dim=2, horizon=3, hidden=16, depth=1)
    model = fc.MLPEnergy(config, key=jax.random.key(0))
    train = fc.train.TrainConfig(
        num_steps=NUM_STEPS, learning_rate=1e-2, warmup_steps=1, log_every=1,
        checkpoint_every=CHECKPOINT_EVERY,
    )  # fmt: skip

    def resumed_data(step: int) -> fc.train.Batch:
        # A resumed run starts after its checkpoint: it never asks for batches 0..2.
        assert step >= CHECKPOINT_EVERY, f"the resumed run asked for batch {step}"
        return data(step)

    def fit(checkpoint_dir: pathlib.Path, out: str, batches) -> None:
        result = fc.train.fit(
            model, batches, key=jax.random.key(1), config=train,
            negatives=[fc.train.NoiseNegatives(2, 0.3)], checkpoint_dir=checkpoint_dir,
            mesh=fc.train.data_parallel_mesh(), progress=False,
        )  # fmt: skip
        save(root / f"{out}_p{process_id}.npz", result.model)

    def save(path: pathlib.Path, m) -> None:
        leaves = jax.tree.leaves(eqx.filter(m, eqx.is_inexact_array))
        np.savez(path, **{f"p{i:03d}": np.asarray(x) for i, x in enumerate(leaves)})

    def barrier(name: str) -> None:
        if num_processes > 1:
            multihost_utils.sync_global_devices(name)

    mine, other = num_processes, 3 - num_processes
    fit(root / f"run{mine}", f"run{mine}", data)
    barrier("trained")
    if process_id == 0:
        (root / f"run{mine}.done").touch()
        if num_processes == 1:
            save(root / "initial.npz", model)
        while not (root / f"run{other}.done").exists():
            time.sleep(0.2)
        # The other layout's checkpoints as a run killed after step 3 leaves them.
        killed = root / f"killed{other}"
        shutil.copytree(root / f"run{other}", killed)
        shutil.rmtree(killed / str(NUM_STEPS))
    barrier("copied")
    fit(root / f"killed{other}", f"resumed{mine}", resumed_data)
    if num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        n, i, port = (int(x) for x in sys.argv[2:5])
        _worker(n, i, port, pathlib.Path(sys.argv[5]))
