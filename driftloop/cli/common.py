"""What every command shares: the parser class, the common options, argument checks,
JSON output and errors, the environment set before Prefect is imported, and the
temporary Prefect server.

Nothing here imports Prefect at module level: the environment must be set first.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from driftloop.errors import DriftloopError

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# The temporary Prefect server migrates a fresh database before it answers: ~15 s on an
# idle 2-core machine, 45 s measured at load 7, and Prefect's own default is 20 s.
# Ten minutes unless the user set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.
EPHEMERAL_STARTUP_TIMEOUT_S = 600

# Every --help ends with this; each line wraps as its own paragraph.
EPILOG = "\n".join([
    ("exit codes: 0 done; 1 failed (one line on stderr saying what to do); 2 usage: the command line or a file it "
    "names is wrong, found before anything ran; 130 interrupted."),
    'With --json the result, or the error as {"error": ..., "kind": ...}, is one JSON object on stdout.',
    ("Prefect: runs go to PREFECT_API_URL when set; else the command starts a temporary local server and waits up "
    f"to {EPHEMERAL_STARTUP_TIMEOUT_S} s for it (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS overrides)."),
])


class HelpFormatter(argparse.HelpFormatter):
    """Wraps each line of a description or epilog on its own: paragraphs stay apart."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent) or ""
                         for line in text.splitlines())


Handler = Callable[[argparse.Namespace], dict[str, Any]]
Human = Callable[[dict[str, Any]], str]
Check = Callable[[argparse.Namespace], None]


class UsageError(DriftloopError):
    """The command line (or a file it names) is wrong; found before anything ran: exit 2.
    ``kind`` says what was wrong ("usage", "spec", "source", ...)."""

    def __init__(self, message: str, kind: str = "usage", *, prog: str = "driftloop", usage: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.prog = prog  # the (sub)command at fault: "driftloop score"
        self.usage = usage  # its usage line, printed above the error without --json

    @classmethod
    def from_error(cls, exc: DriftloopError) -> UsageError:
        return cls(str(exc), error_kind(exc))


class PrefectServerNotStarted(DriftloopError):
    """The temporary Prefect server the command needs did not come up."""


def error_kind(exc: BaseException) -> str:
    """A stable name for a JSON error's ``kind``: the error class in snake case
    (SpecError -> spec, CredentialsInUri -> credentials_in_uri)."""
    if isinstance(exc, UsageError):
        return exc.kind
    name = type(exc).__name__
    if name == "DriftloopError":
        return "failed"
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
    return snake.removesuffix("_error") or snake


class CliParser(argparse.ArgumentParser):
    """argparse, except that a usage error is raised (main prints it, as JSON with
    --json) instead of printed here and exited."""

    def error(self, message: str) -> Any:  # argparse's signature: never returns
        raise UsageError(message, prog=self.prog, usage=self.format_usage())


def common_options() -> CliParser:
    """--json and --verbose, accepted by the top level, every group and every command.
    SUPPRESS: a level where the flag is absent does not reset it (argparse copies a
    subcommand's defaults over the namespace its parent filled)."""
    common = CliParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the result, or the error, as one JSON object on stdout")
    common.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                        help="show Prefect's logs, and the traceback of an unexpected error")
    return common


@dataclass(frozen=True)
class FlowBinding:
    """Which parameter of a flow (or function) each option feeds. The handler passes the
    options through it, and tests/unit/test_cli.py compares every option's default with
    the parameter's, so the two cannot drift apart."""

    target: str  # "driftloop.flows.train:train"
    params: dict[str, str]  # option dest -> parameter name
    negated: frozenset[str] = field(default_factory=frozenset)  # --no-promote feeds promote=not value
    omit_none: frozenset[str] = field(default_factory=frozenset)  # None: leave the function's default

    def load(self) -> Callable[..., Any]:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)

    def kwargs(self, args: argparse.Namespace) -> dict[str, Any]:
        out = {}
        for dest, param in self.params.items():
            value = getattr(args, dest)
            if dest in self.omit_none and value is None:
                continue
            out[param] = (not value) if dest in self.negated else value
        return out

    def call(self, args: argparse.Namespace, **extra: Any) -> Any:
        return self.load()(**self.kwargs(args), **extra)


def signature_of(target: Callable[..., Any]) -> inspect.Signature:
    """A Prefect flow's parameters are its function's."""
    return inspect.signature(getattr(target, "fn", target))


def add_command(sub: argparse._SubParsersAction, name: str, *, help: str, handler: Handler, human: Human,
                description: str | None = None, check: Check | None = None, binding: FlowBinding | None = None,
                needs_prefect: Callable[[argparse.Namespace], bool] | bool = False) -> CliParser:
    """One command: its parser with the common options, the exit codes in its --help, and
    what main calls: ``check`` (before anything runs), then ``handler``; ``human`` formats
    the result without --json."""
    parser = sub.add_parser(name, help=help, description=description or help, epilog=EPILOG,
                            parents=[common_options()], formatter_class=HelpFormatter)
    parser.set_defaults(handler=handler, human=human, check=check, binding=binding, needs_prefect=needs_prefect)
    return parser


def add_group(sub: argparse._SubParsersAction, name: str, *, help: str) -> argparse._SubParsersAction:
    parser = sub.add_parser(name, help=help, description=help, epilog=EPILOG, parents=[common_options()],
                            formatter_class=HelpFormatter)
    return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND",
                                 help=f"see: driftloop {name} COMMAND --help")


# --- argument types: argparse reports their errors as "argument --x: ..." (exit 2) -------


def int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def iso_time(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO 8601 time (2024-05-01 or 2024-05-01T12:00), "
                                         f"got {text!r}") from None


def model_ref(text: str) -> str:
    from driftloop.registry.store import parse_model_ref

    try:
        name, _, _ = parse_model_ref(text)
    except DriftloopError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not name:
        raise argparse.ArgumentTypeError(f"expected NAME, NAME@alias or NAME:VERSION, got {text!r}")
    return text


# --- checks before anything runs ----------------------------------------------------------

# Options that take a path or URI: one with credentials in it is refused before anything runs.
URI_OPTIONS = {"source": "SOURCE", "input": "--input", "output": "--output", "labels": "--labels",
               "dask_address": "--dask-address"}
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # s3://, demo:, sql-block: (not a C: drive)


def refuse_credentials(args: argparse.Namespace) -> None:
    from driftloop.redact import refuse_credentials as refuse

    for attr, option in URI_OPTIONS.items():
        value = getattr(args, attr, None)
        if isinstance(value, str):
            try:
                refuse(value, option)
            except DriftloopError as exc:
                raise UsageError.from_error(exc) from None


def check_spec(path: str) -> None:
    """Parse the spec now: a typo costs no server start."""
    from driftloop.spec import load_spec

    try:
        load_spec(path)
    except DriftloopError as exc:
        raise UsageError.from_error(exc) from None


def check_input(value: str | None, option: str) -> None:
    """A local path (file, directory or glob) must name data files now. URIs (s3://,
    demo:, sql-block:) are left to the flow: checking them means a network call."""
    if value is None or (_SCHEME.match(value) and not value.startswith("file://")):
        return
    from driftloop.inputs import list_input_files

    try:
        list_input_files(value)
    except DriftloopError as exc:
        raise UsageError(f"{option}: {exc}", error_kind(exc)) from None


# --- output -----------------------------------------------------------------------------


def emit(payload: dict[str, Any], as_json: bool, human: Human) -> None:
    if as_json:
        from driftloop.metrics import json_safe

        # An undefined metric (NaN) prints as null: a bare NaN is not JSON.
        sys.stdout.write(json.dumps(json_safe(payload), default=str, allow_nan=False) + "\n")
    else:
        sys.stdout.write(human(payload) + "\n")


def report_error(message: str, kind: str, as_json: bool, *, prefix: str | None = "error",
                 prog: str = "driftloop") -> None:
    """One line on stderr always (what to do); with --json also one object on stdout."""
    print(f"{prog}: {prefix}: {message}" if prefix else f"{prog}: {message}", file=sys.stderr)
    if as_json:
        where = "" if prog == "driftloop" else f"{prog}: "
        sys.stdout.write(json.dumps({"error": where + message, "kind": kind}) + "\n")


def metrics_line(metrics: dict[str, Any]) -> str:
    from driftloop.metrics import format_metric

    return ", ".join(format_metric(k, v) for k, v in metrics.items())


def registry() -> Any:
    from driftloop.registry import open_registry
    from driftloop.settings import get_settings

    return open_registry(get_settings().registry_database_url())


# --- environment and the Prefect server ---------------------------------------------------


def configure_environment(*, verbose: bool) -> None:
    """Set before Prefect or NannyML is imported: both read these once."""
    os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_TIMEOUT_S))
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "driftloop")
    if "PREFECT_API_URL" not in os.environ:
        # The temporary server is ours alone: no telemetry from it.
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS", "driftloop.logs.CliConsoleHandler")
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")


def ensure_prefect_api(*, announce: bool) -> None:
    """Start the temporary Prefect server now, when there is no PREFECT_API_URL: a slow
    start gets the whole timeout and a failure says what to do. Prefect's client reuses
    this server (one per process) and stops it at exit."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    )

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    if announce and sys.stderr.isatty():
        print(f"driftloop: starting a temporary Prefect server (up to {timeout} s; set PREFECT_API_URL to use "
              "a running one)", file=sys.stderr)
    try:
        SubprocessASGIServer().start(timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - Prefect raises RuntimeError or httpx errors
        detail = str(exc).split(" stdout:")[0]
        raise PrefectServerNotStarted(
            f"the temporary Prefect server did not start ({detail}); on a busy machine raise "
            f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (now {timeout}), or start one with `prefect server "
            "start` and set PREFECT_API_URL to its /api address"
        ) from None


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("driftloop")
    except PackageNotFoundError:  # a clone on sys.path, not installed
        from driftloop import __version__

        return __version__
