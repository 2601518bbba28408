"""Serve an openpi policy with correction: openpi's `scripts/serve_policy.py`, plus the
correction settings, on openpi's own websocket server.

    python -m flowcorrect.openpi.serve --verifier verifier/ --action-dims 7 \\
        policy:checkpoint --policy.config pi05_libero \\
        --policy.dir checkpoints/pi05_libero/exp/30000 \\
        default:best-of-n --default.n 8

    # record episodes for a verifier (clients name episodes and report outcomes):
    python -m flowcorrect.openpi.serve --record-dir recording/ --action-dims 7 \\
        policy:checkpoint --policy.config ... --policy.dir ...

    # try it without a checkpoint: openpi's test-size Pi0 with random weights
    python -m flowcorrect.openpi.serve --port 8000 policy:test-size

The arguments are a tyro dataclass, as openpi's scripts are: the server's own flags
first, then the policy (`policy:checkpoint` or `policy:test-size`) and its flags, then
optionally the default placement (`default:post-hoc`, `default:guided`,
`default:best-of-n`, `default:rtc`, ...) and its flags, the fields of its config in
[`flowcorrect.configs`][]. `--limits.*` are the fields of
[`flowcorrect.openpi.ServerLimits`][]. It prints where it listens and what it
serves, and stops cleanly on Ctrl-C.
"""

import dataclasses
import json
import logging
import pathlib
import socket
import time
import typing
from typing import Any

import tyro

from .._configs import PLACEMENT_CONFIGS, ConfigError
from ._requests import ServerLimits

logger = logging.getLogger("flowcorrect.openpi")


# One subcommand per placement, named as a request names it (`default:best-of-n`), with
# the config's fields as its flags; none chosen is no correction.
DefaultPlacement = (
    typing.Union[  # noqa: UP007 (a union built from a list)
        tuple(
            typing.Annotated[config, tyro.conf.subcommand(kind.replace("_", "-"))]
            for kind, config in PLACEMENT_CONFIGS.items()
        )
    ]
    | None
)


@dataclasses.dataclass
class Checkpoint:
    """A trained openpi checkpoint, as for openpi's `serve_policy.py`."""

    # Training config name (e.g. "pi05_libero").
    config: str
    # Checkpoint directory (e.g. "checkpoints/pi05_libero/exp/30000").
    dir: str


@dataclasses.dataclass
class TestSize:
    """openpi's test-size Pi0 (dummy Gemma variants, SigLIP mu/14) with random weights:
    no checkpoint, for trying the server and its clients."""

    # Pi0.5 instead of Pi0.
    pi05: bool = False
    # The random weights' seed.
    seed: int = 0


@dataclasses.dataclass
class Args:
    """Serve an openpi policy with flowcorrect."""

    # How to load the policy.
    policy: Checkpoint | TestSize
    # Port to serve on (0 picks a free one and prints it).
    port: int = 8000
    # Address to listen on.
    host: str = "0.0.0.0"
    # Used where a request has no "prompt" (openpi's option of the same name).
    default_prompt: str | None = None
    # The server's default correction: a placement and its settings, the same configs
    # (and checks) as a request's options. Requests may override it per call.
    default: DefaultPlacement = None
    # An energy saved with fc.save_model (over the prefix tokens).
    energy: str | None = None
    # A verifier saved with fc.save_model (over the pooled prefix features).
    verifier: str | None = None
    # The energy or verifier reads, and the recipes change, only these first action dims.
    action_dims: int | None = None
    # Record requests of named episodes here, written when their outcome is reported.
    record_dir: str | None = None
    # Extra plain candidates recorded per request.
    record_candidates: int = 7
    # Limits every chunk must satisfy, fixed at the server, as JSON: a dict of kinds
    # ("box", "ball", "outside_ball", "half_space", "max_step_change", "max_jerk"),
    # e.g. '{"box": {"low": -1.0, "high": 1.0, "dims": 7}}'.
    constraint: str | None = None
    # "robot": the constraint is in the units after the output transforms' Unnormalize;
    # "model": in the model's normalised action space.
    constraint_units: str = "robot"
    # Flow steps (default: the checkpoint's, else 10).
    num_steps: int | None = None
    # What one request may ask of the server.
    limits: ServerLimits = dataclasses.field(default_factory=ServerLimits)


def build_policy(args: Args) -> Any:
    """The [`flowcorrect.openpi.CorrectedPolicy`][] that `args` describe."""
    from ._serving import CorrectedPolicy

    constraint = None
    if args.constraint is not None:
        from ._requests import constraint_from_spec

        constraint = constraint_from_spec(_json(
            "--constraint", args.constraint, '{"box": {"low": -1.0, "high": 1.0, "dims": 7}}'
        ))
    if isinstance(args.policy, TestSize):
        policy = _test_size_policy(args.policy)
    else:
        from openpi.policies import policy_config
        from openpi.training import config as _config

        policy = policy_config.create_trained_policy(
            _config.get_config(args.policy.config), args.policy.dir,
            default_prompt=args.default_prompt,
        )
    energy = None
    if args.energy is not None:
        from .._model.serialise import load_model

        energy = load_model(pathlib.Path(args.energy).absolute())
    return CorrectedPolicy.from_policy(
        policy,
        energy,
        default_options=args.default,
        action_dims=args.action_dims,
        num_steps=args.num_steps,
        limits=args.limits,
        verifier=args.verifier,
        record_dir=args.record_dir,
        record_candidates=args.record_candidates,
        constraint=constraint,
        constraint_units=args.constraint_units,
    )


def _json(flag: str, text: str | None, example: str) -> Any:
    """`text` parsed as JSON (`None` stays `None`), refused naming `flag` and an example."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} must be JSON such as '{example}'; got {text!r} ({e}).") from e


def _test_size_policy(spec: TestSize) -> Any:
    import jax
    from openpi.models import pi0_config
    from openpi.policies import policy as _policy

    from ._testing import tiny_siglip

    config = pi0_config.Pi0Config(
        paligemma_variant="dummy", action_expert_variant="dummy", pi05=spec.pi05
    )
    with tiny_siglip():
        model = config.create(jax.random.key(spec.seed))
    return _policy.Policy(model, metadata={"model": "openpi test-size Pi0 (random weights)"})


def describe(policy: Any, args: Args, port: int) -> str:
    """What the server serves, in a few lines."""
    meta = policy.metadata["flowcorrect"]
    model = (
        f"{args.policy.config} from {args.policy.dir}"
        if isinstance(args.policy, Checkpoint)
        else f"openpi test-size {'Pi0.5' if args.policy.pi05 else 'Pi0'} (random weights)"
    )
    limits = ", ".join(f"{k}={v}" for k, v in meta["limits"].items())
    lines = [
        f"flowcorrect: serving on ws://{args.host}:{port}",
        f"  model: {model}; {meta['num_steps']} flow steps, horizon {meta['action_horizon']}",
        f"  default: {meta['default']}; placements: {', '.join(meta['placements'])}",
        f"  energy: {args.energy or '-'}; verifier: {meta['verifier'] or '-'}; "
        f"action_dims: {meta['action_dims']}",
        f"  recording: {meta['recording']['directory'] if meta['recording'] else 'off'}",
        f"  constraint: {_constraint_line(meta['constraint'])}",
        f"  limits: {limits}",
    ]
    return "\n".join(lines)


def _constraint_line(info: Any) -> str:
    if not info:
        return "-"
    return f"{info['constraint']} ({info['units']} units, fixed by the server)"


def main(args: Args) -> None:
    import asyncio

    import jax
    from openpi.serving import websocket_policy_server

    policy = build_policy(args)
    start = time.monotonic()
    compiled = policy.warm_up()
    print(f"flowcorrect: compiled {', '.join(compiled)} in {time.monotonic() - start:.0f} s",
          flush=True)
    port = args.port
    if port == 0:
        with socket.socket() as s:
            s.bind((args.host, 0))
            port = s.getsockname()[1]
    server = websocket_policy_server.WebsocketPolicyServer(
        policy=policy, host=args.host, port=port, metadata=policy.metadata
    )
    print(describe(policy, args, port), flush=True)
    # openpi's Gemma relies on implicit rank promotion (its RMSNorm).
    with jax.numpy_rank_promotion("allow"):
        try:
            asyncio.run(server.run())
        except KeyboardInterrupt:
            pass
    status = policy.metadata["flowcorrect"]["recording"]
    if status:
        print(f"flowcorrect: recorded {status['episodes_written']} episodes "
              f"({status['queries_written']} requests) to {status['directory']}", flush=True)
    print("flowcorrect: server stopped", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, force=True)
    try:
        main(tyro.cli(Args, description=__doc__))
    except ConfigError as e:
        raise SystemExit(f"flowcorrect: {e}") from None
