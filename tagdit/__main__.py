"""`tagdit` and `python -m tagdit`: the command (flows/command.py), which runs from a clone.

A wheel carries the library alone (setup.py): there the command says so in one line and exits 2,
instead of a traceback about a missing `flows` module. This file is the command's door, not the
library: the one place under tagdit/ that reaches up to flows/.
"""

import sys

from tagdit import CLONE, CLONE_ONLY, __version__


def main() -> int:
    if CLONE is None:
        if sys.argv[1:] == ["--version"]:
            print(f"tagdit {__version__}")
            return 0
        print(f"tagdit: {CLONE_ONLY}", file=sys.stderr)
        return 2
    from flows.command import main as command

    return command()


if __name__ == "__main__":
    sys.exit(main())
