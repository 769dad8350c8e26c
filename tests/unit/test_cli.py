"""The command line's conventions: --version, --json on every level with errors as JSON,
exit codes, arguments checked before anything runs, defaults equal to the flows', help
for every argument, and the temporary Prefect server."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from driftloop.cli import build_parser, main
from driftloop.cli.common import EXIT_USAGE, FlowBinding, signature_of
from tests.support.data import GOOD_ROWS, write_csv, write_spec

REPO = Path(__file__).resolve().parents[2]


def parsers(parser: argparse.ArgumentParser | None = None,
            path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser: the top level, each group and each command, with its words."""
    parser = parser or build_parser()
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from parsers(child, (*path, name))


def commands() -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    return [(path, p) for path, p in parsers() if p.get_default("handler") is not None]


def one_json(text: str) -> dict:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return json.loads(lines[0])


# --- version, --json, exit codes ----------------------------------------------------------


def test_version_comes_from_the_package_metadata(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"driftloop {version('driftloop')}"


def test_every_level_accepts_json_and_verbose() -> None:
    for path, parser in parsers():
        options = {o for a in parser._actions for o in a.option_strings}
        assert {"--json", "--verbose"} <= options, path


@pytest.mark.parametrize("argv", [
    ["--json", "models", "list"], ["models", "--json", "list"], ["models", "list", "--json"],
    ["--json", "datasets", "list"], ["datasets", "list", "--json"],
])
def test_json_before_or_after_the_subcommand(argv: list[str], home: Path, capsys) -> None:
    assert main(argv) == 0
    payload = one_json(capsys.readouterr().out)
    assert payload in ({"models": []}, {"datasets": []})


def test_without_json_the_output_is_text(home: Path, capsys) -> None:
    assert main(["models", "list"]) == 0
    assert capsys.readouterr().out.startswith("no models registered yet")


@pytest.mark.parametrize(("argv", "expected"), [
    (["score", "--model", "m", "--input", "x.csv", "--batch-size", "0"], "argument --batch-size: must be 1 or more, got 0"),
    (["train", "--spec", "s.yaml", "x.csv", "--trials", "-3"], "argument --trials: must be 1 or more, got -3"),
    (["retrain", "--model", "m", "--trials", "0"], "argument --trials: must be 1 or more, got 0"),
    (["score", "--model", "m", "--input", "x.csv", "--workers", "0"], "argument --workers: must be 1 or more, got 0"),
    (["gc", "--keep-days", "0"], "argument --keep-days: must be more than 0, got 0"),
    (["gc", "--keep-days", "-1"], "argument --keep-days: must be more than 0, got -1"),
    (["retrain", "--model", "m", "--cooldown", "-5"], "argument --cooldown: must be 0 or more, got -5"),
    (["train", "--spec", "s.yaml", "x.csv", "--algorithms", "catboost"], "argument --algorithms: unknown catboost"),
    (["monitor", "--model", "m", "--start", "yesterday"], "argument --start: expected an ISO 8601 time"),
    (["models", "show", "loans:two"], "version must be an integer"),
    (["models", "promote", "loans", "0", "--reason", "r"], "argument version: must be 1 or more, got 0"),
    (["nosuch"], "invalid choice: 'nosuch'"),
    ([], "the following arguments are required: COMMAND"),
    (["models"], "the following arguments are required: COMMAND"),
])
def test_a_usage_error_is_one_json_object_and_exit_2(argv: list[str], expected: str, capsys) -> None:
    assert main([*argv, "--json"]) == EXIT_USAGE
    out, err = capsys.readouterr()
    payload = one_json(out)
    assert payload["kind"] == "usage" and expected in payload["error"], payload
    assert len(err.strip().splitlines()) == 1 and expected in err  # stderr: the same, one line
    # Without --json: argparse's usage line, then the error; nothing on stdout.
    assert main(argv) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: ") and expected in err


def test_a_failure_is_one_json_object_and_exit_1(home: Path, capsys) -> None:
    assert main(["models", "show", "absent", "--json"]) == 1
    out, err = capsys.readouterr()
    payload = one_json(out)
    assert payload["kind"] == "model_not_found" and "absent" in payload["error"]
    assert err.startswith("driftloop: error: ") and payload["error"] in err


def test_exit_codes_are_in_every_help(capsys) -> None:
    for path, parser in parsers():
        text = " ".join(parser.format_help().split())  # as read, whatever the terminal's width
        assert "exit codes: 0 done; 1 failed" in text and "2 usage" in text, path
        assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in text, path


# --- help ------------------------------------------------------------------------------------


def test_every_argument_and_command_has_help() -> None:
    for path, parser in parsers():
        assert parser.description and "``" not in parser.description and ":class:" not in parser.description, path
        for action in parser._actions:
            assert action.help and action.help.strip(), f"driftloop {' '.join(path)}: {action.dest} has no help"
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help and choice.help.strip(), f"driftloop {' '.join(path)} {choice.dest}"


# --- defaults equal the flows' ------------------------------------------------------------------


def bindings() -> list[tuple[str, argparse.ArgumentParser, FlowBinding]]:
    from driftloop.cli.demo import LOOP_DEMO

    found = [(" ".join(path), p, p.get_default("binding")) for path, p in commands() if p.get_default("binding")]
    demo = next(p for path, p in commands() if path == ("demo",))
    return [*found, ("demo --loop", demo, LOOP_DEMO)]


def test_the_commands_that_run_flows_have_bindings() -> None:
    bound = {name for name, _, _ in bindings()}
    assert {"ingest", "labels", "train", "retrain", "score", "monitor", "infra apply", "demo", "demo --loop"} <= bound


def test_every_option_default_equals_the_flow_parameter_default() -> None:
    """Read both sides: the parser's default (through the option's type, as argparse
    applies it) and the flow function's signature. retrain --cooldown was 0 against the
    flow's 600."""
    checked = 0
    for name, parser, binding in bindings():
        params = signature_of(binding.load()).parameters
        actions = {a.dest: a for a in parser._actions}
        for dest, param in binding.params.items():
            assert dest in actions, f"{name}: the binding names --{dest}, which the parser lacks"
            assert param in params, f"{name}: {binding.target} has no parameter {param}"
            action, flow_default = actions[dest], params[param].default
            if action.required or (not action.option_strings and action.nargs is None):
                continue  # the user always gives it
            assert flow_default is not params[param].empty, f"{name} {dest}: optional here, required by the flow"
            cli_default = action.default
            if isinstance(cli_default, str) and action.type is not None:
                cli_default = action.type(cli_default)
            if dest in binding.negated:
                cli_default = not cli_default
            if dest in binding.omit_none:
                assert cli_default is None, f"{name} {dest}: unset must leave the function's default"
                continue
            assert cli_default == flow_default, (
                f"driftloop {name} {action.option_strings or dest}: default {cli_default!r}, but "
                f"{binding.target} {param} defaults to {flow_default!r}")
            checked += 1
    assert checked >= 20


def test_retrain_cooldown_defaults_to_the_flow_s_600() -> None:
    args = build_parser().parse_args(["retrain", "--model", "m"])
    assert args.cooldown == 600


def test_the_algorithm_choices_are_the_tuner_s() -> None:
    from driftloop.cli.training import ALGORITHMS
    from driftloop.tasks.search_space import ALGORITHMS as TUNED

    assert ALGORITHMS == TUNED


# --- checked before anything runs ---------------------------------------------------------------

# Runs each command line in one fresh interpreter, with PREFECT_API_URL pointing at a port
# where nothing listens: a command that reached Prefect would fail there (exit 1) instead.
# Prefect must not even be imported by the checks; the last line (valid arguments) is the
# control showing that the probe sees a command that does reach Prefect.
_PROBE = """
import contextlib, io, json, sys
from driftloop.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    results.append({"argv": argv, "code": code, "out": out.getvalue(),
                    "prefect_imported": "prefect" in sys.modules})
print(json.dumps(results))
"""


def test_arguments_are_checked_before_prefect_is_touched(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    typo = write_spec(tmp_path, {"colour": 1}, name="typo.yaml")
    data = write_csv(tmp_path, GOOD_ROWS[:1])
    bad = {
        "spec typo": (["ingest", "--spec", str(typo), str(data)], "spec", "key 'colour': unknown key"),
        "spec missing": (["train", "--spec", str(tmp_path / "nope.yaml"), str(data)], "spec", "nope.yaml does not exist"),
        "source missing": (["ingest", "--spec", str(spec), str(tmp_path / "absent.csv")], "source",
                           "absent.csv does not exist"),
        "labels missing": (["labels", "--spec", str(spec), str(tmp_path / "labels.csv")], "source", "labels.csv"),
        "input missing": (["score", "--model", "loans", "--input", str(tmp_path / "in.parquet")], "source", "in.parquet"),
        "monitor labels missing": (["monitor", "--model", "loans", "--labels", str(tmp_path / "l.csv")], "source", "l.csv"),
        "batch size": (["score", "--model", "loans", "--input", str(data), "--batch-size", "0"], "usage", "--batch-size"),
        "trials": (["train", "--spec", str(spec), str(data), "--trials", "-1"], "usage", "--trials"),
        "workers": (["score", "--model", "loans", "--input", str(data), "--workers", "0"], "usage", "--workers"),
        "keep days": (["gc", "--keep-days", "0"], "usage", "--keep-days"),
        "source and dataset": (["train", "--spec", str(spec), str(data), "--dataset", "ds_1"], "usage", "not both"),
        "dask without workers": (["train", "--spec", str(spec), str(data), "--dask-address", "tcp://h:8786"], "usage",
                                 "--tuning-workers 2 or more"),
        "sql and source": (["ingest", "--spec", str(spec), str(data), "--sql-url", "sqlite://", "--table", "t"], "usage",
                           "not both"),
        "table without sql": (["ingest", "--spec", str(spec), "--table", "t"], "usage", "need --sql-url"),
        "unset url env": (["ingest", "--spec", str(spec), "--sql-url-env", "DRIFTLOOP_TEST_UNSET", "--table", "t"],
                          "usage", "DRIFTLOOP_TEST_UNSET"),
        "credentials": (["score", "--model", "loans", "--input", "s3://AKIAX:secretkey@bucket/x.csv"],
                        "credentials_in_uri", "holds credentials"),
        "time range": (["monitor", "--model", "loans", "--start", "2024-02-01", "--end", "2024-01-01"], "usage",
                       "is not before --end"),
        "demo flags": (["demo", "--keep-running"], "usage", "go with --loop"),
    }
    control = ["ingest", "--spec", str(spec), str(data)]
    argvs = [[*argv, "--json"] for argv, _, _ in bad.values()] + [[*control, "--json"]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_API_URL": "http://127.0.0.1:9/api", "PREFECT_HOME": str(tmp_path / "prefect"),
                "PREFECT_CLIENT_MAX_RETRIES": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "DRIFTLOOP_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)})
    env.pop("DRIFTLOOP_TEST_UNSET", None)
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=300, check=False, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for (name, (_, kind, expected)), result in zip(bad.items(), results, strict=False):
        payload = one_json(result["out"])
        assert result["code"] == EXIT_USAGE, (name, result)
        assert payload["kind"] == kind and expected in payload["error"], (name, payload)
        assert not result["prefect_imported"], f"{name}: Prefect was imported before the arguments were refused"
        assert "secretkey" not in result["out"]
    reached = results[-1]
    assert reached["code"] == 1 and reached["prefect_imported"], reached  # the control got as far as Prefect


# --- the temporary Prefect server -------------------------------------------------------------------

_TIMEOUT = """
from driftloop.cli.common import configure_environment
configure_environment(verbose=False)
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
print(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
"""


@pytest.mark.parametrize(("given", "expected"), [(None, 600), ("45", 45)])
def test_the_temporary_server_gets_600_s_unless_the_user_set_a_timeout(given: str | None, expected: int,
                                                                      tmp_path: Path) -> None:
    """What Prefect's SubprocessASGIServer.start reads when the CLI starts it (Prefect's own
    default is 20 s; a fresh home's migrations took 45 s on a loaded 2-core machine)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(tmp_path), "PYTHONPATH": str(REPO)})
    if given is not None:
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = given
    done = subprocess.run([sys.executable, "-c", _TIMEOUT], capture_output=True, text=True, timeout=300,
                          check=False, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.strip().splitlines()[-1]) == expected


@pytest.mark.prefect
def test_ingest_on_a_fresh_prefect_home_starts_its_temporary_server(tmp_path: Path) -> None:
    """No PREFECT_API_URL and an empty PREFECT_HOME: the command starts a temporary server
    (migrating its new database first), runs the flow on it and exits 0."""
    spec = write_spec(tmp_path)
    data = write_csv(tmp_path, GOOD_ROWS[:1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect"), "DRIFTLOOP_HOME": str(tmp_path / "home")})
    driftloop = Path(sys.executable).with_name("driftloop")
    done = subprocess.run([str(driftloop), "ingest", "--spec", str(spec), str(data), "--json"], capture_output=True,
                          text=True, timeout=900, check=False, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert one_json(done.stdout)["rows_valid"] == 1
    assert (tmp_path / "prefect" / "prefect.db").exists()  # its database, in the fresh home


@pytest.mark.prefect
def test_a_temporary_server_that_does_not_come_up_is_one_error_saying_what_to_do(tmp_path: Path) -> None:
    """1 s is too short for any start (the server process alone imports for longer): the
    command fails with exit 1 and names the setting to raise and the alternative."""
    spec = write_spec(tmp_path)
    data = write_csv(tmp_path, GOOD_ROWS[:1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect"), "DRIFTLOOP_HOME": str(tmp_path / "home"),
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"})
    driftloop = Path(sys.executable).with_name("driftloop")
    done = subprocess.run([str(driftloop), "ingest", "--spec", str(spec), str(data), "--json"], capture_output=True,
                          text=True, timeout=300, check=False, env=env)
    assert done.returncode == 1, done.stderr[-3000:]
    error = one_json(done.stdout)
    assert error["kind"] == "prefect_server_not_started", error
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (now 1)" in error["error"]
    assert "PREFECT_API_URL" in error["error"]
    assert not (tmp_path / "home" / "registry.db").exists()  # nothing ran
