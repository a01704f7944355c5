"""The exit-code contract of every job: 0 success, 2 user error (one line), 1 internal failure."""
from __future__ import annotations

import sys
from collections.abc import Callable

from pipelines.errors import UserError

EXIT_OK, EXIT_INTERNAL, EXIT_USER = 0, 1, 2


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Call `main(argv)` and exit with the project's exit codes."""
    try:
        code = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(EXIT_OK if code is None else code)
