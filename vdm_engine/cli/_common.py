"""What every console script shares: one-line errors and exit codes."""

from __future__ import annotations

import sys
from typing import Callable

__all__ = ["run_cli", "quiet_transformers", "UsageError", "EXIT_USAGE", "EXIT_FAILURE"]

EXIT_USAGE = 2
EXIT_FAILURE = 1


class UsageError(Exception):
    """Bad usage or bad input: reported in one line, exit code 2."""


def run_cli(prog: str, body: Callable[[], int | None]) -> int:
    """Run ``body``; turn expected errors into one line on stderr and an exit code (never a traceback).

    ``UsageError``, ``ValueError``, missing weights or gates, missing files -> 2;
    other runtime failures -> 1; Ctrl-C -> 130.
    """
    from vdm_engine.backbone import WeightsUnavailableError
    from vdm_engine.explainer import GatesNotFoundError

    try:
        return int(body() or 0)
    except (UsageError, ValueError, WeightsUnavailableError, GatesNotFoundError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"{prog}: failed: {e}", file=sys.stderr)
        return EXIT_FAILURE


def quiet_transformers() -> None:
    """No weight-loading progress bars from transformers on our stderr."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - cosmetic only
        pass
