"""The ``snipserve`` command: one entry point, one module per subcommand.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so ``snipserve serve`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from service.errors import SnipserveError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("service.cli.serve", "run the HTTP service"),
    "detect": ("service.cli.detect", "detect objects in images (in-process, or against --url)"),
    "stream": ("service.cli.stream", "stream a directory or video to a running service"),
    "synth": ("models.synth_cli", "generate the synthetic aerial dataset"),
    "data": ("models.data_cli", "import real labelled datasets (YOLO, DOTA, COCO, VOC) into the COCO layout"),
    "train": ("models.train_cli", "train a detector with SNIPER chip sampling"),
    "eval": ("models.eval_cli", "evaluate single|slices|pyramid inference with COCO metrics"),
    "export": ("exporters.cli", "export a trained model: onnx | tensorrt"),
    "bench": ("service.cli.bench", "benchmark engine, pipeline and HTTP throughput"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snipserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        # Arguments are added lazily only for the chosen subcommand (see main), keeping imports cheap.
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand. A usage, configuration or startup error (bad flag, bad ``SNIPSERVE_*`` value, missing
    or invalid model, unreadable file) is one line on stderr and exit status 2, never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in SUBCOMMANDS:
        name = argv[0]
        module = importlib.import_module(SUBCOMMANDS[name][0])
        sub = argparse.ArgumentParser(prog=f"snipserve {name}", description=SUBCOMMANDS[name][1])
        module.add_arguments(sub)
        args = sub.parse_args(argv[1:])
        try:
            return int(module.run(args) or 0)
        except (SnipserveError, ValueError, OSError) as exc:  # ValueError: pydantic's ValidationError too
            print(f"snipserve {name}: error: {error_line(exc)}", file=sys.stderr)
            return 2
    parser.parse_args(argv)  # prints usage / errors
    return 2


def error_line(exc: BaseException) -> str:
    """One line saying what is wrong: settings errors name their ``SNIPSERVE_*`` variable."""
    if isinstance(exc, ValidationError):
        settings = exc.title == "Settings"
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"])
            where = f"SNIPSERVE_{loc.upper()}" if settings and loc else loc or exc.title
            message = str(err["msg"]).removeprefix("Value error, ")
            parts.append(f"{where}: {message}")
        text = "; ".join(parts)
    elif isinstance(exc, SnipserveError):
        text = exc.message
    elif isinstance(exc, OSError):
        text = f"{exc.strerror or exc}: {exc.filename}" if exc.filename is not None else (exc.strerror or str(exc))
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    raise SystemExit(main())
