"""``python -m ssl_kit.fit --config configs/X.yaml [--model.lr 0.1 ...]``: pretrain with LightningCLI.

This is LightningCLI's ``fit`` subcommand, so ``--ckpt_path last`` resumes and ``--print_config``
prints the resolved configuration.
"""

import sys

from ssl_kit.cli import SSLCLI


def main(args: list[str] | None = None) -> SSLCLI:
    """``args`` replaces ``sys.argv[1:]`` when given (tests)."""
    return SSLCLI(args=["fit", *(sys.argv[1:] if args is None else args)])


if __name__ == "__main__":
    main()
