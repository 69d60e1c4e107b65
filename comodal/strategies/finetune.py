"""``finetune``: plain sequential fine-tuning, the lower bound every strategy must beat.

It needs no callback: the trainer's own loop is fine-tuning.
"""

from __future__ import annotations

from comodal.strategies.base import Strategy


class Finetune(Strategy):
    name = "finetune"
    across_ranks = "replicated"
    kinds = ("pair", "classify", "sequence")
