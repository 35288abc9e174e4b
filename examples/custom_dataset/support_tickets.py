"""A dpeft plug-in dataset loader: support tickets routed to a team, from a JSON Lines file or generated.

``data.dataset: support_tickets`` calls :func:`load`; ``data.options`` are parsed into
:class:`TicketOptions` (unknown keys, wrong types and out-of-range values are config errors
naming ``data.options.<key>``). The loader returns every example as a ``dpeft.TextDataset``
(texts, integer labels, label names); dpeft holds out the test set and splits the rest among the
clients (``data.partition``), as for its built-in corpora.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import dpeft

TEAMS = ["billing", "login", "shipping"]
PHRASES = {
    "billing": ["I was charged twice", "my invoice is wrong", "refund has not arrived", "the card payment failed"],
    "login": ["I cannot sign in", "password reset link expired", "two-factor code never comes", "account is locked"],
    "shipping": ["parcel is late", "tracking shows no movement", "the box arrived damaged", "wrong address on the label"],
}
OPENERS = ["Hello,", "Hi team,", "Urgent:", "Please help,", ""]
CLOSERS = ["Thanks.", "What should I do?", "This is the second time.", "", "Order 1234."]


@dataclass(kw_only=True)
class TicketOptions:
    """``data.options`` of support_tickets."""

    file: str = dpeft.option("", "JSON Lines file with 'text' and 'team' per line ('' = generate tickets)")
    examples: int = dpeft.option(600, "tickets to generate when no file is given", low=10)
    seed: int = dpeft.option(0, "seed of the generated tickets")


def generate(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        team = TEAMS[i % len(TEAMS)]
        out.append((" ".join(filter(None, [rng.choice(OPENERS), rng.choice(PHRASES[team]), rng.choice(CLOSERS)])), team))
    return out


def read(path: str) -> list[tuple[str, str]]:
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if row.get("team") not in TEAMS:
                raise dpeft.DataError(f"{path}, line {n}: team must be one of {', '.join(TEAMS)}, got {row.get('team')!r}")
            rows.append((str(row["text"]), row["team"]))
    return rows


@dpeft.register_dataset("support_tickets", options=TicketOptions)
def load(cfg: dpeft.DataConfig, opts: TicketOptions) -> dpeft.TextDataset:
    pairs = read(opts.file) if opts.file else generate(opts.examples, opts.seed)
    return dpeft.TextDataset([text for text, _ in pairs], [TEAMS.index(team) for _, team in pairs], TEAMS)
