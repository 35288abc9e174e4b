"""`dpeft config show|validate [--config FILE] [key=value ...]`: the resolved run config, or its errors.

``show`` prints the config every command would run with (defaults filled in, shorthands and
earlier spellings resolved) as YAML; ``validate`` checks it the same way (the registered
strategies', sync policies', codecs' and adapter methods' options included) and says ``ok``.
Both exit 2 with one line naming the key when the config is wrong, as every command does.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dpeft.config import RunConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``config`` subcommand."""
    p = sub.add_parser("config", help="print the resolved run config (show) or check it (validate)")
    p.add_argument("action", choices=["show", "validate"], help="show: print the resolved config as YAML; validate: check it")
    p.add_argument("file", nargs="?", default=None, help="YAML run config (same as --config)")
    p.add_argument("--config", dest="config_file", default=None, help="YAML run config")
    p.add_argument(
        "--plugin",
        action="append",
        default=None,
        metavar="MODULE",
        help="import this plug-in module first (repeatable; = plugins: [MODULE])",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. rounds=10 strategy=fedadam")
    p.set_defaults(extension=__name__)


def run(args: argparse.Namespace) -> int:
    """Load the config as a run would; print it (show) or ``ok`` (validate)."""
    from dpeft.config import dump_config
    from dpeft.errors import ConfigError
    from dpeft.validate import load_config

    file, overrides = args.file, list(args.overrides)
    if file is not None and "=" in file:  # no file given: the first word is an override
        file, overrides = None, [file, *overrides]
    if file is not None and args.config_file is not None:
        raise ConfigError("--config", "give the config file once (as FILE or --config)")
    cfg = load_config(file or args.config_file, overrides, plugins=args.plugin or ())
    print(annotated(cfg, dump_config(cfg)) if args.action == "show" else "ok", end="" if args.action == "show" else "\n")
    return 0


def annotated(cfg: RunConfig, text: str) -> str:
    """The YAML of ``show`` with a comment on values that null resolves per implementation
    (``strategy.server_lr: null  # fedadam's default: 0.03``)."""
    from dpeft.strategies import strategy_server_lr

    if cfg.strategy.server_lr is not None:
        return text
    note = f"  # null = {cfg.strategy.name}'s default: {strategy_server_lr(cfg.strategy):g}"
    lines = text.split("\n")
    start = lines.index("strategy:")
    for i in range(start + 1, len(lines)):
        if lines[i] == "  server_lr: null":
            lines[i] += note
            break
    return "\n".join(lines)
