"""``attnbench masks list`` and ``attnbench masks show NAME [key=value ...]``.

``main(argv)`` takes the arguments after ``masks`` and returns the exit code: 0 on success, 2 on bad input
(unknown mask, bad parameter, bad option), with the reason on stderr.
"""
from __future__ import annotations

import argparse
import ast
import sys
from typing import Any

from .base import MaskParamError
from .describe import causal_kind, default_params
from .picture import DEFAULT_SEQ, save_mask_png
from .registry import MASKS, list_masks, make_mask


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnbench masks", description="List masks and draw them.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every registered mask with its parameters and defaults")
    show = commands.add_parser("show", help="write a PNG of one mask")
    show.add_argument("name", help="registered mask name (see `attnbench masks list`)")
    show.add_argument("params", nargs="*", metavar="key=value", help="mask parameters, e.g. left=128 right=0")
    show.add_argument("--seq", type=int, default=DEFAULT_SEQ, help=f"query length (default {DEFAULT_SEQ})")
    show.add_argument("--seq-kv", type=int, default=None, help="key length (default: --seq)")
    show.add_argument("--out", default=None, help="PNG path (default: NAME.png in the current directory)")
    return parser


def parse_params(name: str, items: list[str]) -> dict[str, Any]:
    """``key=value`` strings to a dict; values are Python literals where they parse, strings otherwise."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise MaskParamError(name, item, "expected key=value")
        try:
            params[key.strip()] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            params[key.strip()] = text
    return params


def _list() -> None:
    for name in list_masks():
        cls = MASKS[name]
        params = ", ".join(f"{key}={value!r}" for key, value in default_params(cls).items()) or "no parameters"
        print(f"{name:<24} {causal_kind(cls):<10} {cls.description}")
        print(f"{'':<24} {params}")


def _show(args: argparse.Namespace) -> None:
    spec = make_mask({"name": args.name, **parse_params(args.name, args.params)})
    bound = spec.bind(args.seq, args.seq_kv)
    print(save_mask_png(bound, args.out or f"{args.name}.png"))


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse reports bad options itself and exits with 2 (0 for --help)
        return int(exit_.code or 0)
    try:
        if args.command == "list":
            _list()
        else:
            _show(args)
    except MaskParamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
