"""Load test: openpi's test-size Pi0 served through openpi's own websocket server.

Several `openpi-client` clients at once, each running episodes that mix placements
(off, post-hoc K = 3, guided last 2, best-of-4, real-time chunking) and, now and then, a
bad request (a count past the server's limits, a wrong-shaped state, a NaN state, an
unknown option) that must be refused while the server keeps serving. Reported:
latency p50 / p99 per placement and as ratios to `off` measured in the same run;
resident memory of the server process after warm-up and at the end; the number of
XLA compiles after warm-up (must be 0); every error on a valid request (must be none).

    python -m benchmarks.openpi_serving --requests 1000 --clients 4 \\
        --out benchmarks/results/cpu_openpi_serving.json

Needs openpi, openpi-client and websockets (docs/openpi.md). Traffic goes to 127.0.0.1
only, in a bounded number of requests.
"""

import argparse
import asyncio
import collections
import json
import pathlib
import platform
import resource
import socket
import sys
import threading
import time

import jax
import numpy as np

PLACEMENTS = {
    "off": {"placement": "off"},
    "post_hoc_k3": {"placement": "post_hoc", "steps": 3},
    "guided_last2": {"placement": "guided", "last": 2, "weight": 1.0},
    "best_of_4": {"placement": "best_of_n", "n": 4},
    "rtc": {"placement": "rtc", "inference_delay": 3, "execution_horizon": 10},
}
BAD = [
    ({"placement": "post_hoc", "steps": 10**9}, None),
    ({"placement": "best_of_n", "n": 10**6}, None),
    ({"placement": "guided", "weight": float("nan")}, None),
    ({"placement": "post_hoc", "alpah": 0.1}, None),
    ({"placement": "off"}, "state_shape"),
    ({"placement": "off"}, "state_nan"),
]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build():
    from openpi.models import pi0_config
    from openpi.policies import policy as _policy

    import flowcorrect as fc
    from flowcorrect.openpi import CorrectedPolicy, tiny_siglip

    config = pi0_config.Pi0Config(paligemma_variant="dummy", action_expert_variant="dummy")
    with tiny_siglip():
        model = config.create(jax.random.key(0))
    energy = fc.EnergyModel(
        fc.EnergyModelConfig(context_dim=64, action_dim=7, hidden=32, num_heads=2),
        key=jax.random.key(5),
    )
    import equinox as eqx

    policy = CorrectedPolicy.from_policy(
        _policy.Policy(model), eqx.nn.inference_mode(energy), action_dims=7
    )
    spec, _ = config.inputs_spec(batch_size=1)
    rng = np.random.default_rng(0)
    length = spec.tokenized_prompt.shape[1]
    obs = {
        "image": {k: rng.uniform(-1, 1, s.shape[1:]).astype(np.float32)
                  for k, s in spec.images.items()},
        "image_mask": {k: np.asarray(True) for k in spec.images},
        "state": rng.normal(size=spec.state.shape[1:]).astype(np.float32),
        "tokenized_prompt": rng.integers(1, 1000, (length,)).astype(np.int32),
        "tokenized_prompt_mask": np.arange(length) < 9,
    }
    return policy, obs


def _bad(obs: dict, options: dict, mutation: str | None) -> dict:
    obs = dict(obs)
    if mutation == "state_shape":
        obs["state"] = np.ones(5, np.float32)
    elif mutation == "state_nan":
        obs["state"] = np.full_like(obs["state"], np.nan)
    return {**obs, "flowcorrect": options}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="valid requests in all")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--bad-every", type=int, default=25,
                        help="each client sends a bad request after every this many")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)

    from openpi.serving.websocket_policy_server import WebsocketPolicyServer
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event)
        if event == "/jax/core/compile/backend_compile_duration" else None
    )
    policy, obs = _build()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = WebsocketPolicyServer(policy, host="127.0.0.1", port=port, metadata=policy.metadata)
    loop = asyncio.new_event_loop()

    def serve():
        asyncio.set_event_loop(loop)
        with jax.numpy_rank_promotion("allow"):
            try:
                loop.run_until_complete(server.run())
            except asyncio.CancelledError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def episode_request(name: str, kind: str, step: int) -> dict:
        return {**obs, "flowcorrect": {**PLACEMENTS[kind], "episode": name,
                                       "reset": step == 0}}

    # Warm-up: every placement once (RTC twice: its first request of an episode is plain),
    # and every kind of bad request once, before anything is measured.
    warm = WebsocketClientPolicy("127.0.0.1", port)
    for kind in PLACEMENTS:
        for step in range(2):
            warm.infer(episode_request("warm", kind, step))
    for options, mutation in BAD:
        warm = WebsocketClientPolicy("127.0.0.1", port)
        try:
            warm.infer(_bad(obs, options, mutation))
        except RuntimeError:
            pass
    warm._ws.close()
    compiles_after_warmup = len(compiles)
    rss_start = _rss_mb()

    latencies: dict[str, list[float]] = collections.defaultdict(list)
    counts = collections.Counter()
    rss_samples: list[float] = []  # every 100 served requests: flat, or growing?
    errors: list[str] = []
    per_client = args.requests // args.clients
    kinds = list(PLACEMENTS)

    def client(index: int):
        rng = np.random.default_rng(index)
        conn = WebsocketClientPolicy("127.0.0.1", port)
        step, episode = 0, 0
        for i in range(per_client):
            kind = kinds[rng.integers(len(kinds))]
            if step >= 8:  # episodes of 8 requests, then a new id
                conn.infer({"flowcorrect": {"episode": f"c{index}-{episode}", "done": True}})
                step, episode = 0, episode + 1
            request = episode_request(f"c{index}-{episode}", kind, step)
            start = time.perf_counter()
            try:
                out = conn.infer(request)
            except Exception as e:  # noqa: BLE001  (counted: must not happen)
                errors.append(f"{kind}: {type(e).__name__}: {str(e)[-300:]}")
                conn = WebsocketClientPolicy("127.0.0.1", port)
                continue
            latencies[kind].append(time.perf_counter() - start)
            if not np.isfinite(out["actions"]).all():
                errors.append(f"{kind}: non-finite actions")
            counts["served"] += 1
            if counts["served"] % 100 == 0:
                rss_samples.append(round(_rss_mb(), 1))
            step += 1
            if (i + 1) % args.bad_every == 0:
                options, mutation = BAD[rng.integers(len(BAD))]
                try:
                    conn.infer(_bad(obs, options, mutation))
                    errors.append(f"bad request served: {options} {mutation}")
                except RuntimeError:
                    counts["refused"] += 1
                conn = WebsocketClientPolicy("127.0.0.1", port)  # openpi closes on error

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    rss_end = _rss_mb()
    loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(loop)])
    thread.join(30)

    def quantile(values, q):
        return float(np.quantile(np.asarray(values), q)) * 1000

    base50, base99 = quantile(latencies["off"], 0.5), quantile(latencies["off"], 0.99)
    rows = {
        kind: {
            "requests": len(v),
            "p50_ms": quantile(v, 0.5),
            "p99_ms": quantile(v, 0.99),
            "p50_ratio_to_off": quantile(v, 0.5) / base50,
            "p99_ratio_to_off": quantile(v, 0.99) / base99,
        }
        for kind, v in latencies.items()
    }
    record = {
        "benchmark": "openpi_serving",
        "command": "python -m benchmarks.openpi_serving " + " ".join(sys.argv[1:] if argv is None
                                                                     else argv),
        "machine": {"processor": platform.processor() or platform.machine(),
                    "cpus": len(__import__("os").sched_getaffinity(0)),
                    "jax": jax.__version__, "device": str(jax.devices()[0])},
        "clients": args.clients,
        "served": counts["served"],
        "refused_bad_requests": counts["refused"],
        "errors_on_valid_requests": errors,
        "compiles_after_warmup": len(compiles) - compiles_after_warmup,
        "rss_mb_start": rss_start,
        "rss_mb_end": rss_end,
        "rss_mb_every_100_requests": rss_samples,
        "load_average_1min_at_end": __import__("os").getloadavg()[0],
        "wall_s": wall,
        "rows": rows,
    }
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return record


if __name__ == "__main__":
    with jax.numpy_rank_promotion("allow"):
        main()
