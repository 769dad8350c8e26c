"""The ``driftloop`` command line: one module per command group (``data``, ``training``,
``score``, ``monitor``, ``backtest``, ``models``, ``rollout``, ``infra``, ``housekeeping``, ``demo``), the shared
parser, checks, JSON output and errors in ``common``.

A run: parse (usage errors exit 2), set the environment Prefect reads at import, check
the arguments and the files they name (exit 2; nothing has run), start the temporary
Prefect server if the command needs one and PREFECT_API_URL is unset, run, print.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pydantic import ValidationError

from driftloop.cli import (
    backtest,
    data,
    demo,
    edge,
    housekeeping,
    infra,
    models,
    monitor,
    rollout,
    score,
    training,
)
from driftloop.cli.common import (
    EPILOG,
    EXIT_DONE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CliParser,
    HelpFormatter,
    UsageError,
    common_options,
    configure_environment,
    emit,
    ensure_prefect_api,
    error_kind,
    package_version,
    refuse_credentials,
    report_error,
)
from driftloop.errors import DriftloopError
from driftloop.spec import format_validation_error

__all__ = ["build_parser", "main"]

DESCRIPTION = ("driftloop: the life of a tabular model on Prefect 3. Ingest and validate data, train and "
               "register a model, score in batches, monitor drift, retrain.")
GROUPS = (data, training, score, monitor, backtest, models, rollout, edge, infra, housekeeping, demo)


def build_parser() -> CliParser:
    parser = CliParser(prog="driftloop", description=DESCRIPTION, epilog=EPILOG, parents=[common_options()],
                       formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"driftloop {package_version()}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="see: driftloop COMMAND --help")
    for group in GROUPS:
        group.register(sub)
    return parser


def _json_requested(argv: Sequence[str]) -> bool:
    """--json anywhere before ``--``: known even when parsing fails."""
    for arg in argv:
        if arg == "--":
            return False
        if arg == "--json":
            return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = _json_requested(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        if not as_json:
            sys.stderr.write(exc.usage)
        report_error(str(exc), exc.kind, as_json, prog=exc.prog)
        return EXIT_USAGE
    as_json = getattr(args, "json", False)
    verbose = getattr(args, "verbose", False)
    configure_environment(verbose=verbose)
    try:
        refuse_credentials(args)
        if args.check is not None:
            args.check(args)
        needs_prefect = args.needs_prefect(args) if callable(args.needs_prefect) else args.needs_prefect
        if needs_prefect:
            ensure_prefect_api(announce=not as_json)
        payload = args.handler(args)
    except UsageError as exc:
        report_error(str(exc), exc.kind, as_json)
        return EXIT_USAGE
    except DriftloopError as exc:
        report_error(str(exc), error_kind(exc), as_json)
        return EXIT_FAILED
    except ValidationError as exc:
        report_error(format_validation_error(exc), "validation", as_json)
        return EXIT_FAILED
    except KeyboardInterrupt:
        report_error("interrupted", "interrupted", as_json, prefix=None)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug, not a user error: one line unless asked for more
        if verbose:
            raise
        report_error(f"{type(exc).__name__}: {exc} (rerun with --verbose for the traceback)", "unexpected",
                     as_json, prefix="unexpected error")
        return EXIT_FAILED
    emit(payload, as_json, args.human)
    return EXIT_DONE


if __name__ == "__main__":
    raise SystemExit(main())
