"""``celery-probe liveness|readiness``: kubelet exec probes for worker pods.

Reads only the files in ``$CELERY_PROBE_DIR``; never imports Celery or the
user's app and never opens a connection to the broker. Prints one line and
exits 0 (pass) or 1 (fail).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .probe_files import (
    LIVENESS_MAX_AGE_ENV,
    PROBE_DIR_ENV,
    ProbeConfigError,
    ProbeFiles,
    Verdict,
    check_liveness,
    check_readiness,
    liveness_max_age,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="celery-probe",
        description="File-based liveness/readiness probe for Celery workers started by celery-entrypoint.",
    )
    parser.add_argument("check", choices=("liveness", "readiness"))
    parser.add_argument("--dir", type=Path, help=f"probe directory (default: ${PROBE_DIR_ENV})")
    parser.add_argument(
        "--max-age",
        type=float,
        help=f"liveness: heartbeat max age in seconds (default: ${LIVENESS_MAX_AGE_ENV} or 60)",
    )
    return parser


def run(argv: Sequence[str] | None = None) -> Verdict:
    args = _parser().parse_args(argv)
    files = ProbeFiles(args.dir) if args.dir else ProbeFiles.from_env()
    if files is None:
        return Verdict(False, f"probe misconfigured: {PROBE_DIR_ENV} is not set and --dir not given")
    if args.check == "readiness":
        return check_readiness(files)
    try:
        max_age = args.max_age if args.max_age is not None else liveness_max_age(os.environ)
    except ProbeConfigError as err:
        return Verdict(False, f"probe misconfigured: {err}")
    if not max_age > 0:
        return Verdict(False, f"probe misconfigured: --max-age {max_age:g} is not positive")
    return check_liveness(files, max_age)


def main(argv: Sequence[str] | None = None) -> int:
    verdict = run(argv)
    print(verdict.reason, flush=True)
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
