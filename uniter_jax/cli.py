"""One-line usage errors for the project's command lines.

`python -m uniter_jax.convert` and `python -m data_prep` print a mistake of
the person running them as `error: <what> (<where>): <fix>` and exit with
status 2, as argparse does, but without argparse's usage dump.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class UsageExit(SystemExit):
  """Exit status 2 after a one-line usage error, as argparse's own.

  `str()` is the message, for callers that run a `main` in-process.
  """

  def __init__(self, message: str):
    super().__init__(2)
    self.message = message

  def __str__(self) -> str:
    return self.message


def usage_error(what: str, where: str, fix: str) -> NoReturn:
  """Prints `error: <what> (<where>): <fix>` and raises `UsageExit`."""
  line = f"{what} ({where}): {fix}"
  print(f"error: {line}", file=sys.stderr, flush=True)
  raise UsageExit(line)


class OneLineParser(argparse.ArgumentParser):
  """argparse with its usage errors in the one-line form (no usage dump)."""

  def error(self, message: str) -> NoReturn:
    usage_error(message, self.prog, f"see {self.prog} --help")
