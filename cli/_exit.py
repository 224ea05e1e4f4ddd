"""What lqae-eval and lqae-fewshot share: their exit statuses, and how a run's problems become them."""

from __future__ import annotations

import sys

import click

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageProblem(Exception):
    """A problem with the command line or its inputs (exit status 2)."""


def exit_with(prog: str, run) -> None:
    """Call ``run()`` and exit with its status; a usage problem or Ctrl-C is one line on stderr, no traceback."""
    try:
        code = run()
    except UsageProblem as exc:
        click.echo(f"{prog}: error: {exc}", err=True)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        click.echo(f"{prog}: interrupted by Ctrl-C", err=True)
        code = EXIT_INTERRUPTED
    sys.exit(code)
