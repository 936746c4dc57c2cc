"""The one way every command (``python -m melanoma_tf.<stage>``) runs: logging, errors, the last line.

A command parses its arguments, then hands :func:`run_main` a function that does the work
and returns the line to print last (``run: <folder>``, ``report: <file>``, ...). Any
:class:`~melanoma_tf.errors.MelanomaTfError` (and a missing file) becomes one line
``error: <message>`` on stderr and exit status 2; a failed child command exits 1.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Callable

from melanoma_tf.errors import MelanomaTfError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def run_main(work: Callable[[], str]) -> int:
    """Runs ``work`` with the project's logging; returns the process exit status.

    Args:
      work: does the command's job and returns its last line (printed on stdout).

    Returns:
      0 on success, 2 for a user error (printed as ``error: ...``), 1 if a child command failed.
    """
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        last_line = work()
    except (MelanomaTfError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as err:
        print(f"error: a step failed: {' '.join(str(a) for a in err.cmd)}", file=sys.stderr)
        return 1
    print(last_line, flush=True)
    return 0
