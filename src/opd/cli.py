"""The `opd` command line: a thin layer over config, trainer and demo.

User errors (OpdError) print one line, `error: ...`, to stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys

from opd.errors import OpdError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd", description="On-policy distillation of language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="distill a teacher into a student from a YAML config")
    train.add_argument("config", help="YAML config file")
    train.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="override config keys, e.g. --set optim.lr=1e-5 run.max_steps=50")
    train.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")

    demo = commands.add_parser("demo", help="distill a tiny model on a synthetic task; no network needed")
    demo.add_argument("--out", default="opd-demo", help="run directory to create (default: ./opd-demo)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            from opd.config import load_config

            config = load_config(args.config, args.overrides)  # before the heavy imports: typos fail fast
            from opd.trainer import train

            result = train(config, resume=args.resume)
            print(f"done: {result.steps_run} steps; final student in {result.output_dir / 'final'}")
        elif args.command == "demo":
            from opd.demo.run import run_demo

            run_demo(args.out)
    except OpdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
