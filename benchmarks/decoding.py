"""What beam search costs over greedy decoding on the CPU: utterances per second of
``SequenceDecoder.greedy`` and of ``beam_search`` at widths 5 and 10 (batched over utterances
and beams), at the CPU default size (d 128, 2 layers, 4 heads, FFN 512, vocabulary 1000).

One thread. The memory has the shape the conv audio encoder gives: 64-wide frames, 200 to 250
of them per utterance (2.0 to 2.5 s at 10 ms), pooled by 4; it is computed once, outside the
clock, so only decoding is timed. The decoder is untrained, so it rarely emits EOS: decoding
runs to ``--max-length`` (48) tokens, the worst case, and the report gives the decoded lengths.
After a short warm-up (4 tokens per runner), rounds interleave the runners and rotate their
order; reported are the median seconds per batch, utterances per second, the ratio to greedy's
median and the paired ratio (median over rounds of the within-round ratio). Nothing about time
is asserted.

    .venv/bin/python benchmarks/decoding.py          # about 2 min on 1 thread
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _options import (  # beside this script
    add_output_options,
    cpu_machine,
    parse_with_outputs,
    write_results,
)

from comodal.platform.decoder import PAD, SequenceDecoder

RESULTS = Path(__file__).resolve().parent / "results" / "decoding.json"


def decode_seconds(decoder: SequenceDecoder, memory: tuple[torch.Tensor, torch.Tensor],
                   width: int, max_length: int) -> tuple[float, torch.Tensor]:
    """One batch decoded at ``width`` (1 = greedy): seconds and the rows."""
    gc.collect()
    start = time.perf_counter()
    rows = decoder.decode(*memory, width, max_length, 0.6)
    return time.perf_counter() - start, rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--memory-dim", type=int, default=64, help="width of the encoder's frames")
    p.add_argument("--frames", type=int, nargs=2, default=[200, 250], metavar=("LOW", "HIGH"),
                   help="frames per utterance, drawn uniformly")
    p.add_argument("--frame-stride", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--widths", type=int, nargs="+", default=[1, 5, 10],
                   help="beam widths (1 = greedy, always measured)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    add_output_options(p, RESULTS)
    args = parse_with_outputs(p, argv, RESULTS, {
        "vocab": 20, "dim": 16, "layers": 1, "heads": 2, "ffn": 32, "memory_dim": 8,
        "frames": [8, 12], "batch": 4, "max_length": 6, "widths": [1, 3], "rounds": 1})
    torch.set_num_threads(1)
    widths = [1, *(w for w in args.widths if w != 1)]
    torch.manual_seed(args.seed)
    decoder = SequenceDecoder(args.memory_dim, args.vocab, dim=args.dim, layers=args.layers,
                              heads=args.heads, ffn=args.ffn, max_length=args.max_length,
                              frame_stride=args.frame_stride).eval()
    lengths = torch.randint(args.frames[0], args.frames[1] + 1, (args.batch,))
    frames = torch.randn(args.batch, args.frames[1], args.memory_dim)
    memory = decoder.memory(frames, torch.arange(args.frames[1]) < lengths.unsqueeze(1))
    for width in widths:  # warm-up, short
        decode_seconds(decoder, memory, width, min(4, args.max_length))
    times: dict[int, list[float]] = {width: [] for width in widths}
    decoded: dict[int, torch.Tensor] = {}
    for k in range(args.rounds):
        for width in widths[k % len(widths):] + widths[: k % len(widths)]:
            seconds, decoded[width] = decode_seconds(decoder, memory, width, args.max_length)
            times[width].append(seconds)
    base = statistics.median(times[1])
    rows = {}
    for width in widths:
        seconds = statistics.median(times[width])
        tokens = (decoded[width] != PAD).sum(1).float()
        rows["greedy" if width == 1 else f"beam{width}"] = {
            "width": width,
            "seconds_per_batch": seconds,
            "utterances_per_second": args.batch / seconds,
            "ratio": seconds / base,
            "paired": statistics.median(t / b for t, b in zip(times[width], times[1],
                                                              strict=True)),
            "mean_tokens": float(tokens.mean()),
            "cut_at_max_length": int((tokens == args.max_length).sum()),
        }
    print(f"vocab {args.vocab}, d {args.dim}, {args.layers} layers, {args.heads} heads, ffn "
          f"{args.ffn}; batch {args.batch}, {args.frames[0]}-{args.frames[1]} frames / "
          f"{args.frame_stride}, max_length {args.max_length}, {args.rounds} rounds, 1 thread")
    print(f"{'runner':<8}{'s/batch':>9}{'utt/s':>8}{'ratio':>7}{'paired':>8}{'tokens':>8}"
          f"{'cut':>5}")
    for name, r in rows.items():
        print(f"{name:<8}{r['seconds_per_batch']:>9.3f}{r['utterances_per_second']:>8.1f}"
              f"{r['ratio']:>7.2f}{r['paired']:>8.2f}{r['mean_tokens']:>8.1f}"
              f"{r['cut_at_max_length']:>5}")
    report = {"benchmark": "decoding", "config": vars(args) | {"out": str(args.out)},
              "machine": cpu_machine(), "runners": rows,
              "seconds": {str(w): t for w, t in times.items()}}
    write_results(args.out, report)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
