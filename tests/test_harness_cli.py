"""The harness's command-line programs: every command the README, the docs and the
examples show parses into the config it names, unknown flags are refused, each
program's `--help` works, and no module of the package builds its own argparse parser.

Commands are read from the fenced code blocks and inline code of README.md and every
page under docs/ (docs/api/ aside), and from examples/*.py, as a reader would type
them: line continuations joined, a `$ ` prompt dropped, `NAME="..."` variables of the
page (in order) and `for NAME in ...; do ... done` loops expanded. Nothing is run.
"""

import ast
import dataclasses
import functools
import importlib
import json
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

pytest.importorskip("tyro", reason="the harness's programs read their flags with tyro")

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "flowcorrect"
RESULTS = ROOT / "benchmarks" / "results" / "metaworld"

# Every program: its module under flowcorrect.
PROGRAMS = ("metaworld.experiment", "metaworld.demo", "metaworld.verifiers",
            "metaworld.realtime", "metaworld.constraints", "metaworld.openpi_pi0",
            "_train.measure")  # fmt: skip
COMMAND = re.compile(r"python3? -m flowcorrect\.(metaworld\.\w+|_train\.measure)\b")
# A fenced block, or else an inline code span (which may run over lines).
CODE = re.compile(r"```[^\n]*\n(?P<block>.*?)```|`(?P<inline>[^`]+)`", re.S)
VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
ASSIGN = re.compile(r"(?:export\s+)?([A-Za-z_]\w*)=(.*)")
LOOP = re.compile(r"for (\w+) in (.*); do")
SHELL_OPERATOR = re.compile(r"[;&|()<>]+")
PLACEHOLDER = "PLACEHOLDER"


def _expand(text: str, env: dict[str, str]) -> str:
    return VARIABLE.sub(lambda m: env.get(m[1] or m[2], m[0]), text)


def _command(line: str, env: dict[str, str]) -> tuple[str, list[str]] | None:
    """`(program, argv)` of the harness command on this shell line, if it has one."""
    line = _expand(line, env)
    match = COMMAND.search(line)
    if match is None:
        return None
    lexer = shlex.shlex(line[match.start():], posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    argv = []
    for word in words[3:]:  # after `python -m flowcorrect.<program>`
        if SHELL_OPERATOR.fullmatch(word):
            break
        # A variable the page never defines stands for some path.
        argv.append(VARIABLE.sub(PLACEHOLDER, word))
    return match[1], argv


def shell_commands(code: str, env: dict[str, str]) -> list[tuple[str, list[str]]]:
    """The harness commands of a block of shell lines; `env` holds the variables the
    block (and the page before it) defines, and is updated."""
    out: list[tuple[str, list[str]]] = []
    loop: tuple[str, list[str], list[str]] | None = None
    for line in re.sub(r"\\\n", " ", code).splitlines():
        line = line.strip().removeprefix("$ ")
        if loop is not None:
            if line == "done":
                name, values, body = loop
                for value in values:
                    for inner in body:
                        found = _command(inner, {**env, name: value})
                        out += [found] if found else []
                loop = None
            else:
                loop[2].append(line)
            continue
        if m := LOOP.fullmatch(line):
            loop = (m[1], shlex.split(_expand(m[2], env)), [])
        elif m := ASSIGN.fullmatch(line):
            words = shlex.split(_expand(m[2], env), comments=True)
            env[m[1]] = words[0] if words else ""
        elif found := _command(line, env):
            out.append(found)
    return out


def page_commands(text: str) -> list[tuple[str, list[str]]]:
    """The harness commands of a Markdown page, in order."""
    env: dict[str, str] = {}
    out = []
    for m in CODE.finditer(text):
        if m["block"] is not None:
            out += shell_commands(m["block"], env)
        else:  # inline code: one line, markdown joins its lines with spaces
            out += shell_commands(m["inline"].replace("\n", " "), dict(env))
    return out


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """`(source, program, argv)` for every harness command the docs show."""
    pages = [ROOT / "README.md"] + sorted(
        p for p in (ROOT / "docs").rglob("*.md") if "api" not in p.relative_to(ROOT).parts
    )
    out = []
    for path in pages:
        out += [(path.name, *c) for c in page_commands(path.read_text())]
    for path in sorted((ROOT / "examples").glob("*.py")):
        out += [(path.name, *c) for c in shell_commands(path.read_text(), {})]
    return out


COMMANDS = documented_commands()


def _module(program: str):
    return importlib.import_module(f"flowcorrect.{program}")


def _parse(program: str, argv: list[str]):
    return _parsed(program, tuple(argv))


# Each command parses once per process: tyro 0.9 (openpi's pin) re-derives half of what
# it caches when it runs under pytest, which costs about a second per verifiers command.
@functools.cache
def _parsed(program: str, argv: tuple[str, ...]):
    return _module(program).parse_cli(list(argv))


def test_the_extractor_reads_commands_as_a_shell_would():
    page = """
```bash
M="python -m flowcorrect.metaworld.realtime --cache /c"
$M --settings sync,rtc:2 \\
    --tag A   # a comment
R=/r/out
python -m flowcorrect.metaworld.realtime --merge $R-A.json $R-B.json && echo done
for T in "--task push-v3" "--task reach-v3"; do
  $M $T --quiet
done
```

```
$ python -m flowcorrect.metaworld.experiment --only "plain noise x0.5,best-of-8"
task pick-place-v3, 10 demos
```
Run `$M --keys
1` or `python -m flowcorrect._train.measure --memory`; `$UNSET --x` is no command.
"""
    assert page_commands(page) == [
        ("metaworld.realtime", ["--cache", "/c", "--settings", "sync,rtc:2", "--tag", "A"]),
        ("metaworld.realtime", ["--merge", "/r/out-A.json", "/r/out-B.json"]),
        ("metaworld.realtime", ["--cache", "/c", "--task", "push-v3", "--quiet"]),
        ("metaworld.realtime", ["--cache", "/c", "--task", "reach-v3", "--quiet"]),
        ("metaworld.experiment", ["--only", "plain noise x0.5,best-of-8"]),
        ("metaworld.realtime", ["--cache", "/c", "--keys", "1"]),
        ("_train.measure", ["--memory"]),
    ]
    assert shell_commands("python -m flowcorrect.metaworld.demo --out $NOWHERE/x", {}) == [
        ("metaworld.demo", ["--out", f"{PLACEHOLDER}/x"])
    ]


def test_the_docs_show_commands_of_every_documented_program():
    count = {p: sum(program == p for _, program, _ in COMMANDS) for p in PROGRAMS}
    # What the pages showed when this test was written: a page that loses its commands
    # (or an extractor that stops finding them) fails here.
    assert count["metaworld.experiment"] >= 6
    assert count["metaworld.verifiers"] >= 20
    assert count["metaworld.realtime"] >= 12
    assert count["metaworld.constraints"] >= 2
    assert count["metaworld.demo"] >= 3
    assert count["_train.measure"] >= 1
    assert {program for _, program, _ in COMMANDS} <= set(PROGRAMS)


def _flag_values(argv: list[str]) -> dict[str, list[str]]:
    """`{field: values}` of the flags in `argv`, a later flag replacing an earlier one,
    except a repeated flag's values, which add up (`--placement a --placement b`)."""
    out: dict[str, list[str]] = {}
    name = None
    for word in argv:
        if word.startswith("--"):
            name = word[2:].replace("-", "_")
            out[name] = out[name] if name == "placement" and name in out else []
        elif name is not None:
            out[name].append(word)
    return out


# Slow: about a second a command under tyro 0.9 (openpi's pin), which the quick pinned
# run skips; the other tests here still parse each program there.
@pytest.mark.slow
@pytest.mark.parametrize("source, program, argv", COMMANDS,
                         ids=[f"{s}:{' '.join(a)[:60]}" for s, _, a in COMMANDS])  # fmt: skip
def test_documented_command_parses_into_its_config(source, program, argv, capsys):
    if "--help" in argv:
        with pytest.raises(SystemExit) as e:
            _parse(program, argv)
        assert e.value.code == 0
        return
    config = _parse(program, argv)
    if program == "metaworld.verifiers":
        assert config.command == argv[0]
        argv = argv[1:]
    assert not argv or argv[0].startswith("--"), "a word that belongs to no flag"
    for name, values in _flag_values(argv).items():
        value = getattr(config, name)
        if isinstance(value, bool):
            assert value is True and not values, (name, values)
        elif isinstance(value, tuple):
            assert value == tuple(values), (name, value, values)
        else:
            assert len(values) == 1 and value == type(value)(values[0]), (name, value, values)


def _find(program: str, **fields):
    """The configs of the documented commands of `program` that set these fields to these
    values (only commands that spell each value out are parsed)."""
    configs = [_parse(p, argv) for _, p, argv in COMMANDS
               if p == program and "--help" not in argv
               and all(str(v) in argv for v in fields.values())]
    return [c for c in configs if all(getattr(c, k) == v for k, v in fields.items())]


def test_documented_commands_name_these_configs():
    from flowcorrect.metaworld import constraints, demo, experiment, realtime, verifiers

    assert demo.DEMO in _find("metaworld.demo")
    assert demo.DEMO.episodes == 30 and demo.DEMO.suite == "demo"
    assert constraints.Config(constraint="speed", episodes=100, keys=3) in _find(
        "metaworld.constraints", constraint="speed")
    (speed,) = _find("metaworld.experiment", suite="constraint", only="speed<=0.8 guided w=10")
    assert speed == experiment.ExperimentConfig(suite="constraint", episodes=100, keys=2,
                                                only="speed<=0.8 guided w=10")
    ensemble = verifiers.Verify(task="peg-insert-side-v3", demos=25, episodes=100, keys=3,
                                losses="outcome", evaluate="outcome", control=True,
                                guided="1", early="5", ensemble=3, cache="/work/mw-cache",
                                out="/work/mw-results/verify", quiet=True)
    assert ensemble in _find("metaworld.verifiers", ensemble=3)
    (merged,) = _find("metaworld.realtime",
                      merged_out="/work/mw-results/rtc/merged-peg-insert-side-v3.json")
    root = "/work/mw-results/rtc/realtime-peg-insert-side-v3-100demos-h8-e4"
    assert merged.merge == (f"{root}-F.json", f"{root}-H.json")
    # The loop over two tasks' flags gives one command per task.
    trt = _find("metaworld.realtime", tag="trt")
    assert {(c.task, c.demos, c.via_point) for c in trt} == {
        ("peg-insert-side-v3", 100, 0.0), ("pick-place-v3", 50, 0.15)}
    assert all(isinstance(c, realtime.RealtimeConfig) for c in trt)


@pytest.mark.parametrize("name, program, fields", [
    ("verify-peg-insert-side-v3-25demos.json", "metaworld.verifiers",
     dict(command="verify", task="peg-insert-side-v3", demos=25, ensemble=3)),
    ("consensus-peg-insert-side-v3-25demos.json", "metaworld.verifiers",
     dict(command="consensus", task="peg-insert-side-v3", demos=25)),
    ("realtime-peg-insert-side-v3-100demos-h8-e4-peg.json", "metaworld.realtime",
     dict(tag="peg")),
    ("realtime-pick-place-v3-50demos-via0.15-h8-e4-via.json", "metaworld.realtime",
     dict(tag="via")),
])  # fmt: skip
def test_results_record_the_documented_commands_arguments(name, program, fields):
    # These results were written by the commands the docs show; the same command now
    # records the same arguments (the fields a result lacks came later). The realtime
    # runs were made with --quiet, which the page leaves out: it changes no number.
    recorded = json.loads((RESULTS / name).read_text())["args"]
    if program == "metaworld.realtime":
        del recorded["quiet"]
    found = _find(program, **fields)
    assert found
    for config in found:
        args = config.to_json() if "command" in fields else dataclasses.asdict(config)
        assert {k: args[k] for k in recorded} == recorded


@pytest.mark.parametrize("program, argv", [
    ("metaworld.experiment", ["--no-such-flag"]),
    ("metaworld.experiment", ["--suite", "bogus"]),
    ("metaworld.experiment", ["--episodes", "many"]),
    ("metaworld.demo", ["--no-such-flag"]),
    ("metaworld.verifiers", ["verify", "--no-such-flag"]),
    ("metaworld.verifiers", ["frobnicate", "--task", "x"]),
    ("metaworld.verifiers", ["--task", "x"]),  # the command comes first
    ("metaworld.realtime", ["--trt-delays", "bogus"]),
    ("metaworld.realtime", ["--no-such-flag"]),
    ("metaworld.constraints", ["--constraint", "jerk"]),
    ("metaworld.openpi_pi0", ["--state", "everything"]),
    ("metaworld.openpi_pi0", ["--augment"]),  # the flag is --no-augment
    ("_train.measure", ["--no-such-flag"]),
])  # fmt: skip
def test_a_wrong_flag_is_refused(program, argv, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(program, argv)
    assert e.value.code == 2


def test_flags_keep_their_spelling_and_defaults():
    from flowcorrect.metaworld import experiment, openpi_pi0, realtime, verifiers

    config = _parse("metaworld.experiment", ["--demo-seed", "3", "--no-plots", "--quiet"])
    assert config == experiment.ExperimentConfig(demo_seed=3, no_plots=True, quiet=True)
    assert _parse("metaworld.experiment", []) == experiment.ExperimentConfig()
    assert experiment.ExperimentConfig().cache is None
    collect = _parse("metaworld.verifiers", ["collect", "--explore-noise", "2", "--round", "2"])
    assert collect == verifiers.Collect(explore_noise=2.0, round=2)
    assert collect.to_json()["command"] == "collect"
    assert collect.to_json()["losses"] == "outcome,bradley-terry,discounted"
    pi0 = _parse("metaworld.openpi_pi0", ["--placement", "plain", "--placement", "best_of_n:8",
                                          "--no-augment", "--lr", "1e-3", "--warmup", "5"])
    assert pi0.placement == ("plain", "best_of_n:8")
    task = pi0.task_config()
    assert not task.augment and task.peak_lr == 1e-3 and task.warmup_steps == 5
    assert openpi_pi0.Pi0RunConfig().task_config() == openpi_pi0.Pi0TaskConfig()
    assert _parse("metaworld.realtime", ["--merge", "a.json"]) == realtime.RealtimeConfig(
        merge=("a.json",))
    assert _parse("_train.measure", ["--memory"]).memory


@pytest.mark.parametrize("program, argv", [
    *((p, ["--help"]) for p in PROGRAMS),
    *(("metaworld.verifiers", [c, "--help"]) for c in ("consensus", "collect", "verify")),
])  # fmt: skip
def test_help_exits_zero(program, argv, capsys, monkeypatch):
    module = _module(program)
    # Should --help not exit, nothing runs.
    monkeypatch.setattr(module, "run", lambda config: pytest.fail("ran"), raising=False)
    monkeypatch.setattr(module, "RUN", {}, raising=False)
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    assert e.value.code in (0, None)
    out = " ".join(capsys.readouterr().out.split())
    if argv == ["--help"]:
        assert module.__doc__.splitlines()[0][:40] in out
    else:  # a subcommand's help begins with its config's docstring
        command = {c.command: c for c in (module.Consensus, module.Collect, module.Verify)}
        assert " ".join(command[argv[0]].__doc__.split())[:40] in out
    if program == "metaworld.verifiers" and argv == ["--help"]:
        assert all(c in out for c in ("consensus", "collect", "verify"))
    else:
        assert ("--memory" if program == "_train.measure" else "--demo-seed") in out


def test_help_of_a_subcommand_from_the_shell():
    out = subprocess.run([sys.executable, "-m", "flowcorrect.metaworld.verifiers", "collect",
                          "--help"], capture_output=True, text=True, check=True).stdout
    assert "--explore-noise" in out and "--demo-seed" in out and "--quiet" in out


def test_no_module_imports_argparse():
    importers = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "argparse" for n in names):
                importers.append(path.relative_to(SRC).as_posix())
    assert not importers, f"modules that import argparse: {importers}"
