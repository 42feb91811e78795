"""``attnbench masks list``, ``attnbench masks show NAME [key=value ...]`` and
``attnbench masks time [ENTRY ...] --seq N --device D [--out FILE]``.

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
    timer = commands.add_parser("time", help="time each mask's visible-pair count, block layout and BlockMask")
    timer.add_argument("entries", nargs="*", metavar="ENTRY",
                       help="mask entries such as 'sliding_window(left=4096)' (default: every registered mask)")
    timer.add_argument("--seq", type=int, default=128 * 1024, help="query length (default 131072)")
    timer.add_argument("--seq-kv", type=int, default=None, help="key length (default: --seq)")
    timer.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    timer.add_argument("--repeats", type=int, default=5, help="timed builds after one warm-up (default 5)")
    timer.add_argument("--out", default=None, help="write the rows to a .json or .csv file")
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


def _time(args: argparse.Namespace) -> int:
    from . import buildtime

    for field, value in (("--seq", args.seq), ("--seq-kv", args.seq_kv), ("--repeats", args.repeats)):
        if value is not None and value < 1:
            print(f"error: {field} must be a positive integer, got {value}", file=sys.stderr)
            return 2
    try:
        device = torch_device(args.device)
    except ValueError as exc:
        print(f"error: --device: {exc}", file=sys.stderr)
        return 2
    for entry in args.entries:
        make_mask(entry)  # bad entries are refused before any work
    rows = buildtime.time_masks(args.entries, args.seq, args.seq_kv, device, args.repeats)
    print(buildtime.format_table(rows))
    if args.out:
        print(buildtime.write(rows, args.out, device))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def torch_device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise ValueError(f"{text!r} is not a device ({exc})") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"{text} asked for, but {count} CUDA GPU(s) are visible")
    elif device.type != "cpu":
        raise ValueError(f"{text!r}: only cpu and cuda[:N] are supported")
    return str(device)


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse reports bad options itself and exits with 2 (0 for --help)
        return int(exit_.code or 0)
    try:
        if args.command == "list":
            _list()
        elif args.command == "time":
            return _time(args)
        else:
            _show(args)
    except MaskParamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
