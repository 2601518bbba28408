"""Placement configs: one declaration per setting, read alike by a command line (tyro)
and by a served policy's per-request options, checked against a server's bounds, and
built into the placement they name."""

import dataclasses
import math
import os
import pathlib
import re
import shlex

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

import flowcorrect as fc
from flowcorrect.configs import (
    PLACEMENT_CONFIGS,
    AbstractPlacementConfig,
    ConfigError,
    from_options,
    option,
)

EXAMPLES = int(os.environ.get("FLOWCORRECT_FUZZ_EXAMPLES", "25"))
ROOT = pathlib.Path(__file__).resolve().parents[1]
BOUNDS = {"max_steps": 20, "max_candidates": 64, "max_weight": 100.0, "max_alpha": 10.0,
          "horizon": 50, "num_steps": 10}
# Settings away from every default, valid under BOUNDS, for each kind.
SET = {
    "off": {},
    "post_hoc": {"steps": 5, "alpha": 0.25, "clip_frac": 0.5, "first_only": True},
    "denoised": {"steps": 2, "alpha": 0.3, "clip_frac": 0.1, "first_only": True,
                 "weight": 2.5, "last": 4},
    "guided": {"weight": 3.0, "last": 2, "cap": 0.5},
    "best_of_n": {"n": 16, "select": "near_mean", "k": 3, "feasible_first": True},
    "rtc": {"inference_delay": 3, "execution_horizon": 12,
            "prefix_attention_schedule": "linear", "max_guidance_weight": 2.0,
            "hard_prefix": True},
    "trt": {"inference_delay": 1, "execution_horizon": 7},
    "feasible": {"weight": 4.0, "last": 3, "cap": 50.0},
}


def test_every_kind_has_settings_away_from_its_defaults():
    assert set(SET) == set(PLACEMENT_CONFIGS)
    for kind, config in PLACEMENT_CONFIGS.items():
        fields = {f.name: f.default for f in dataclasses.fields(config)}
        assert set(SET[kind]) == set(fields), kind  # every field set here
        for name, value in SET[kind].items():
            assert value != fields[name], (kind, name)


@pytest.mark.parametrize("kind", sorted(PLACEMENT_CONFIGS))
def test_options_round_trip_and_check_is_idempotent(kind):
    config = from_options({"placement": kind, **SET[kind]}, BOUNDS)
    assert type(config) is PLACEMENT_CONFIGS[kind] and config.kind == kind
    assert config.options() == {"placement": kind, **SET[kind]}
    assert config.check(BOUNDS) == config
    assert from_options(config.options(), BOUNDS) == config
    # Constructing it directly is the same config.
    assert PLACEMENT_CONFIGS[kind](**SET[kind]) == config


def test_a_cli_and_a_request_read_the_same_declaration():
    tyro = pytest.importorskip("tyro")
    from flowcorrect.openpi import serve

    for kind, values in SET.items():
        flags = ["--port", "0", "policy:test-size", f"default:{kind.replace('_', '-')}"]
        for name, value in values.items():
            flag = f"--default.{name.replace('_', '-')}"
            if isinstance(value, bool):
                flags.append(flag if value else f"--default.no-{name.replace('_', '-')}")
            else:
                flags += [flag, str(value)]
        args = tyro.cli(serve.Args, args=flags)
        assert args.default == from_options({"placement": kind, **values}), kind
    assert tyro.cli(serve.Args, args=["policy:test-size"]).default is None
    with pytest.raises(SystemExit):  # an unknown setting of the chosen placement
        tyro.cli(serve.Args, args=["policy:test-size", "default:guided", "--default.n", "3"])


def test_documented_serve_commands_parse():
    tyro = pytest.importorskip("tyro")
    from flowcorrect.openpi import serve

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             ROOT / "src/flowcorrect/openpi/serve.py"]
    found = 0
    for page in pages:
        text = page.read_text().replace("\\\\\n", "\\\n")
        command = r"^[ \t]*(?:\$ )?python -m flowcorrect\.openpi\.serve((?:\\\n|[^\n])*)"
        for match in re.finditer(command, text, flags=re.M):
            line = match[1].replace("\\\n", " ")
            words = shlex.split(line.split("#")[0])
            if "--help" in words or not words:
                continue
            words = ["placeholder" if w == "..." else w for w in words]
            args = tyro.cli(serve.Args, args=words)
            found += 1
            assert isinstance(args.policy, serve.Checkpoint | serve.TestSize), (page, line)
    assert found >= 6


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: fc.configs.BestOfNConfig(n=0), r"'n' must be an int in \[1, inf\]"),
        (lambda: fc.configs.BestOfNConfig(n=2.0), r"'n' must be an int"),
        (lambda: fc.configs.PostHocConfig(clip_frac=0.0), r"'clip_frac' .* \(0.0, 1.0\]"),
        (lambda: fc.configs.GuidedConfig(weight=math.nan), r"'weight' must be a finite"),
        (lambda: fc.configs.RTCConfig(inference_delay=-1, execution_horizon=4),
         r"'inference_delay' must be an int in \[0, inf\]"),
        (lambda: fc.configs.RTCConfig(2, 4, prefix_attention_schedule="cubic"),
         r"'prefix_attention_schedule' must be one of \['ones'"),
        (lambda: fc.configs.PostHocConfig(first_only=1), r"'first_only' must be true or"),
        (lambda: fc.configs.BestOfNConfig(k=2), r"'k' belongs to select='near_mean'"),
        (lambda: fc.configs.PostHocConfig(steps=30).check(BOUNDS), r"'steps' .* \[0, 20\]"),
        (lambda: fc.configs.DenoisedConfig(last=11).check(BOUNDS), r"'last' .* \[1, 10\]"),
        (lambda: fc.configs.BestOfNConfig(n=4, select="near_mean", k=5).check(BOUNDS),
         r"'k' must be an int in \[1, 4\]"),
        (lambda: fc.configs.RTCConfig(45, 10).check(BOUNDS),
         r"'inference_delay' .* \[0, 40\] .* 50 - 10"),
        (lambda: from_options({"placement": "rtc", "inference_delay": 2}),
         r"'rtc' needs 'inference_delay' and 'execution_horizon'"),
        (lambda: from_options({"placement": "guided", "steps": 3}),
         r"Unknown correction options for placement 'guided': \['steps'\]"),
        (lambda: from_options({"placement": "sideways"}), r"'placement' must be one of"),
        (lambda: from_options(["best_of_n"]), r"must be a dict"),
        (lambda: fc.configs.BestOfNConfig(feasible_first=True).build(),
         r"'feasible_first' needs the server's constraint"),
    ],
)
def test_bad_settings_are_refused_naming_the_option_and_range(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


def test_built_placements_are_the_ones_named():
    assert fc.configs.OffConfig().build() is None
    post = fc.configs.PostHocConfig(steps=4).build(action_dims=3)
    assert isinstance(post, fc.PostHoc)
    denoised = fc.configs.DenoisedConfig(weight=2.0).build()
    assert isinstance(denoised.schedule, fc.EveryStep)  # no num_steps known: every step
    last = fc.configs.DenoisedConfig().check(BOUNDS)
    assert last.last == 10 and isinstance(last.build().schedule, fc.LastSteps)
    guided = fc.configs.GuidedConfig(weight=3.0, last=2, cap=0.5).build()
    assert isinstance(guided, fc.Guided)
    assert float(guided.weight.value) == 3.0 and int(guided.schedule.k) == 2
    near = fc.configs.BestOfNConfig(n=6, select="near_mean").check(BOUNDS)
    assert near.k == 4 and isinstance(near.build().select, fc.NearMean)
    box = fc.constraints.Box(-1.0, 1.0)
    first = fc.configs.BestOfNConfig(n=3, feasible_first=True).build(constraint=box)
    assert isinstance(first.select, fc.constraints.FeasibleFirst)
    assert not fc.configs.BestOfNConfig(select="medoid").needs_energy
    assert fc.configs.BestOfNConfig().needs_energy
    previous = np.arange(2 * 12 * 3, dtype=np.float32).reshape(2, 12, 3)
    rtc = fc.configs.RTCConfig(inference_delay=2, execution_horizon=5)
    assert rtc.build() is None  # an episode's first chunk continues nothing
    built = rtc.build(previous=previous)
    left = np.asarray(built.prev_chunk_left_over)
    np.testing.assert_array_equal(left[:, :7], previous[:, 5:])
    assert not left[:, 7:].any()
    trt = fc.configs.TRTConfig(inference_delay=2, execution_horizon=5).build(previous=previous)
    assert isinstance(trt, fc.rtc.PrefixConditioned) and int(trt.inference_delay) == 2
    np.testing.assert_array_equal(np.asarray(trt.prev_chunk_left_over), left)


LEAST = {"inference_delay": 0, "execution_horizon": 1}


def _ranges(kind):
    schema = PLACEMENT_CONFIGS[kind].schema(BOUNDS)
    return [(name, entry) for name, entry in schema.items()
            if entry["type"] in ("int", "float") and "high" in entry]


@pytest.mark.parametrize("kind", sorted(PLACEMENT_CONFIGS))
def test_the_schema_states_the_ranges_the_check_enforces(kind):
    # Only the required settings, at their least, so that no other field's range
    # (best-of-N's `k <= n`, RTC's `d <= horizon - s`) binds.
    base = {"placement": kind, **{k: v for k, v in LEAST.items() if k in SET[kind]}}
    for name, entry in _ranges(kind):
        low, high = entry["low"], entry["high"]
        step = 1 if entry["type"] == "int" else max(abs(high) * 1e-3, 1e-3)
        assert getattr(from_options({**base, name: high}, BOUNDS), name) == high
        with pytest.raises(ConfigError, match=repr(name)):
            from_options({**base, name: high + step}, BOUNDS)
        if entry.get("open_low"):
            with pytest.raises(ConfigError, match=repr(name)):
                from_options({**base, name: low}, BOUNDS)
        else:
            assert getattr(from_options({**base, name: low}, BOUNDS), name) == low
            with pytest.raises(ConfigError, match=repr(name)):
                from_options({**base, name: low - step}, BOUNDS)


@settings(max_examples=max(10, 4 * EXAMPLES), derandomize=True, database=None,
          deadline=None)
@given(kind=st.sampled_from(sorted(PLACEMENT_CONFIGS)), data=st.data())
def test_fuzz_any_value_is_refused_clearly_or_checked_in_range(kind, data):
    fields = dataclasses.fields(PLACEMENT_CONFIGS[kind])
    options = {"placement": kind, **SET[kind]}
    if fields:
        name = data.draw(st.sampled_from([f.name for f in fields]))
        options[name] = data.draw(st.one_of(
            st.integers(-(2**66), 2**66), st.floats(allow_nan=True, allow_infinity=True),
            st.floats(-1e-300, 1e-300), st.booleans(), st.none(), st.text(max_size=3),
            st.builds(np.float16, st.floats(-100, 100, width=16)),
            st.builds(np.int64, st.integers(-3, 70)),
        ))
    try:
        config = from_options(options, BOUNDS)
    except ConfigError as e:
        assert 0 < len(str(e)) < 600
        return
    # Accepted: in every stated range, and plain Python values, never NumPy's.
    schema = PLACEMENT_CONFIGS[kind].schema(BOUNDS)
    for name, value in config.settings().items():
        assert type(value) in (int, float, bool, str), (name, value)
        entry = schema[name]
        if "low" in entry:
            assert value > entry["low"] if entry.get("open_low") else value >= entry["low"]
        if "high" in entry:
            assert value <= entry["high"]
    assert config.check(BOUNDS) == config


# -- a config written the way a user would, outside the package ----------------------


@dataclasses.dataclass(frozen=True)
class NoisyBestOf(AbstractPlacementConfig):
    """Best-of-n at a lower noise temperature: a user's own config."""

    kind = "noisy_best_of"
    n: int = option(4, low=1, high="max_candidates", why="candidates")
    temperature: float = option(0.5, low=0.0, high=1.0, open_low=True)

    def build(self, *, action_dims=None, previous=None, constraint=None):
        return fc.BestOfN(self.n, select=fc.Medoid())


def test_a_users_config_gets_the_same_checks_schema_and_options():
    config = NoisyBestOf(n=6)
    assert config.options() == {"placement": "noisy_best_of", "n": 6, "temperature": 0.5}
    with pytest.raises(ConfigError, match=r"'n' must be an int in \[1, 4\] \(candidates\)"):
        config.check({"max_candidates": 4})
    with pytest.raises(ConfigError, match=r"'temperature' .* \(0.0, 1.0\]"):
        NoisyBestOf(temperature=0.0)
    assert NoisyBestOf.schema({"max_candidates": 4})["n"] == {
        "type": "int", "default": 4, "low": 1, "high": 4}
    assert isinstance(config.check({"max_candidates": 8}).build(), fc.BestOfN)
