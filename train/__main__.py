"""``python -m train``: exit status 0 done, 1 failed, 2 bad options, 130 interrupted."""

from __future__ import annotations

import os
import sys

from .config import parse_args
from .errors import ConfigError, RunError
from .runner import run


def main(argv=None) -> int:
    cfg, given = parse_args(argv)  # bad options: argparse prints the usage and exits with status 2
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        metrics = run(cfg, given=given)
    except RunError as e:
        if is_main:
            print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:
        if is_main:
            print("\naborted; the last checkpoint (if any) is the last finished epoch's", file=sys.stderr)
        return 130
    return 130 if metrics["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
