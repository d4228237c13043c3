"""``python -m ssl_kit.fit --config configs/X.yaml [--model.lr 0.1 ...]``: pretrain with LightningCLI.

This is LightningCLI's ``fit`` subcommand, so ``--ckpt_path last`` resumes and ``--print_config``
prints the resolved configuration.
"""

import sys
import traceback
from pathlib import Path

from ssl_kit.cli import SSLCLI


def main(args: list[str] | None = None) -> SSLCLI:
    """``args`` replaces ``sys.argv[1:]`` when given (tests)."""
    try:
        return SSLCLI(args=["fit", *(sys.argv[1:] if args is None else args)])
    except ValueError as error:
        cause = user_error(error)
        if cause is None:
            raise
        sys.exit(f"ssl_kit: error: {cause}")


def user_error(error: BaseException) -> BaseException | None:
    """The sentence behind a failed model or data construction: jsonargparse wraps what the
    class raised (a missing folder, a bad value) in a long "does not validate" error; when the
    innermost cause is a ValueError or FileNotFoundError raised by ssl_kit, that is what to say."""
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    frames = traceback.extract_tb(cause.__traceback__)
    ours = bool(frames) and "ssl_kit" in Path(frames[-1].filename).parts
    return cause if cause is not error and ours and isinstance(cause, (ValueError, FileNotFoundError)) else None


if __name__ == "__main__":
    main()
