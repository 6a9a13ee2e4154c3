"""`tagdit`: the short form of the `python -m flows.…` command lines, with the same options.

    tagdit run --config demo                       # the whole pipeline (flows.full_pipeline)
    tagdit stage train-dit --config demo --dit-steps 4000
    tagdit sample --config demo --prompt "blue hair, smile" --out out.png
    tagdit serve --model exported/          tagdit export --config demo --to exported/
    tagdit train-agent --config demo --set launch.nnodes=2 --set launch.rdzv_endpoint=node0:29400
                                                   # another node's ranks for a flow's training run

`tagdit COMMAND --help` shows the command's options.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable
from typing import Any

COMMANDS = ("run", "sample", "serve", "export", "train-agent")
STAGES = ("demo-world", "prepare-data", "train-vae", "encode", "train-dit", "evaluate")  # `tagdit stage NAME`


def entry(command: str) -> Callable[[list[str]], Any]:
    """The `main(argv)` of the flow module behind a command (imported only when it runs: each pulls in Prefect)."""
    if command == "run":
        from flows.full_pipeline import main
    elif command == "sample":
        from flows.sample import main
    elif command == "serve":
        from flows.serve import main
    elif command == "export":
        from flows.export import main
    elif command == "train-agent":
        from flows.train_agent import main
    elif command == "demo-world":
        from flows.demo_world import main
    elif command == "prepare-data":
        from flows.prepare_data import main
    elif command == "train-vae":
        from flows.train_vae import main
    elif command == "encode":
        from flows.encode import main
    elif command == "train-dit":
        from flows.train_dit import main
    elif command == "evaluate":
        from flows.evaluate import main
    else:
        raise KeyError(command)
    return main


def usage() -> str:
    return (__doc__ or "") + f"\ncommands: {', '.join(COMMANDS)}, stage {{{','.join(STAGES)}}}\n"


def known(word: str, choices: tuple[str, ...], where: str) -> str:
    """`word` when it is one of `choices`; the other stage spelling (train_dit) with a hint; else exit 2 with a guess."""
    if word in choices:
        return word
    if (dashed := word.replace("_", "-")) in choices:
        print(f"{where}: {word!r} is spelled {dashed!r}", file=sys.stderr)
        return dashed
    close = difflib.get_close_matches(word, choices, n=1)
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    print(f"{where}: unknown {word!r}{guess}; choose one of {', '.join(choices)}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status: 0 done, 1 failed (one line on stderr), 2 refused options."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    if args[0] == "--version":
        from importlib.metadata import version

        print(f"tagdit {version('tagdit')}")
        return 0
    command, rest = args[0], args[1:]
    if command == "stage":
        if not rest or rest[0] in ("-h", "--help"):
            print(f"usage: tagdit stage {{{','.join(STAGES)}}} [--help | OPTIONS]")
            return 0 if rest else 2
        name, rest = known(rest[0], STAGES, "tagdit stage"), rest[1:]
        command = f"stage {name}"
    else:
        name = command = known(command, COMMANDS + ("stage",), "tagdit")
    sys.argv[0] = f"tagdit {command}"
    try:
        entry(name)(rest)
    except KeyboardInterrupt:
        print(f"tagdit {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the flow's own log holds the traceback; a script needs one line and a status
        if os.environ.get("TAGDIT_TRACEBACK"):
            raise
        print(f"tagdit {command}: failed: {type(e).__name__}: {e} (TAGDIT_TRACEBACK=1 shows where)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
