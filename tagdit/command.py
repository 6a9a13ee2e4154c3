"""`tagdit`: the short form of the `python -m flows.…` command lines, with the same options.

    tagdit run --config demo                       # the whole pipeline (flows.full_pipeline)
    tagdit stage train-dit --config demo --dit-steps 4000
    tagdit sample --config demo --prompt "blue hair, smile" --out out.png
    tagdit serve --model exported/          tagdit export --config demo --to exported/

`tagdit COMMAND --help` shows the command's options.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {  # command -> flows module with a main(argv)
    "run": "full_pipeline",
    "sample": "sample",
    "serve": "serve",
    "export": "export",
}
STAGES = {  # `tagdit stage NAME` -> flows module
    "demo-world": "demo_world",
    "prepare-data": "prepare_data",
    "train-vae": "train_vae",
    "encode": "encode",
    "train-dit": "train_dit",
    "evaluate": "evaluate",
}


def usage() -> str:
    return (__doc__ or "") + f"\ncommands: {', '.join(COMMANDS)}, stage {{{','.join(STAGES)}}}\n"


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status: 0 done, 1 failed (one line on stderr), 2 refused options."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = args[0], args[1:]
    if command == "stage":
        if not rest or rest[0] not in STAGES:
            print(f"tagdit stage: choose one of {', '.join(STAGES)}", file=sys.stderr)
            raise SystemExit(2)
        command = f"stage {rest[0]}"
        module, rest = STAGES[rest[0]], rest[1:]
    elif command in COMMANDS:
        module = COMMANDS[command]
    else:
        print(f"tagdit: unknown command {command!r}\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    sys.argv[0] = f"tagdit {command}"
    try:
        importlib.import_module(f"flows.{module}").main(rest)
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
