"""A finished sequence-to-sequence run's final model decoded again at several beam widths: per
width the pooled intent accuracy, WER and CER over every task's test rows, and the utterances
decoded per second (one thread).

    .venv/bin/python examples/beam_widths.py runs/slu_seq2seq-compare/joint/seed0 --widths 1 5 10

The run directory's ``config.yaml`` and its last checkpoint (model and tokenizer) are read; the
test rows are decoded by the trainer's own evaluation, so width 1 under the run's other
settings repeats the run's final row.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

from comodal.config import load_config
from comodal.platform import checkpoint
from comodal.platform.run import build_trainer
from comodal.scenarios.registry import build_scenario


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a finished run directory (target: sequence)")
    p.add_argument("--widths", type=int, nargs="+", default=[1, 5, 10])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    config = load_config(args.run / "config.yaml", ["progress=false"])
    trainer = build_trainer(config)
    _, last = checkpoint.saved(args.run / "checkpoints")[-1]
    state = checkpoint.read(last)
    trainer.setup(build_scenario(config), state["tokenizer"])
    checkpoint.restore(trainer, state)
    sizes = trainer.test_sizes
    out: dict[int, dict[str, Any]] = {}
    print(f"{args.run}: {sum(sizes)} test utterances, {last.name}")
    print(f"{'width':>5}{'intent acc':>12}{'WER':>8}{'CER':>8}{'utt/s':>8}")
    for width in args.widths:
        trainer.decoding = dataclasses.replace(trainer.decoding, beam_width=width)
        start = time.perf_counter()
        rows = trainer.evaluate()
        seconds = time.perf_counter() - start
        pooled = {m: sum(r[m] * n for r, n in zip(rows, sizes, strict=True)) / sum(sizes)
                  for m in ("accuracy", "wer", "cer")}
        out[width] = {**pooled, "utterances_per_second": sum(sizes) / seconds}
        print(f"{width:>5}{pooled['accuracy']:>12.4f}{pooled['wer']:>8.4f}{pooled['cer']:>8.4f}"
              f"{sum(sizes) / seconds:>8.1f}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
