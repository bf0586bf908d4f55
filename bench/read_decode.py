"""READ head: a batch decoded in one call against the same samples decoded one at a time, side by side.

The READ head picks its SAM points per image, but the prompt encoder and mask decoder then run
once for every sample with the same number of points (``ReadHead.decode_batch``). This times a
training step's share of the head (forward and backward, the LM's states as leaves) both ways on
the tiny config's SAM and LM width, interleaved, and prints the median of each and their ratio.
Run: ``python bench/read_decode.py [--batch 16] [--repeats 20]``; needs nothing built.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# Run as a script, sys.path[0] is bench/; the packages live one level up.
_ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(_ROOT)

import torch  # noqa: E402

from config import load_config  # noqa: E402
from models.image_grid import TokenGrid  # noqa: E402
from models.read_head import ReadHead  # noqa: E402
from models.sam import TinySamSpec, build_tiny_sam  # noqa: E402


def head_and_batch(batch: int):
    """A READ head at the tiny config's sizes and ``batch`` random samples of its shapes."""
    config = load_config("configs/tiny.yaml", [])
    t = config.model.tiny
    torch.manual_seed(0)
    sam = build_tiny_sam(TinySamSpec(**t.sam.model_dump()))
    head = ReadHead(sam, t.lm.hidden_size)
    cells = t.vision.image_size // t.vision.patch_size
    grid = TokenGrid(cells, cells, padded_square=True)
    side = t.sam.image_size // t.sam.patch_size
    samples = [(torch.randn(1, t.lm.hidden_size, requires_grad=True), torch.randn(cells * cells, t.lm.hidden_size),
                torch.randn(t.sam.prompt_dim, side, side), grid) for _ in range(batch)]
    return head, samples


def step(head: ReadHead, samples, batched: bool) -> float:
    """Seconds for the head's forward and backward over the samples."""
    start = time.perf_counter()
    if batched:
        refs, images, embeddings, grids = zip(*samples)
        outs = head.decode_batch(list(refs), list(images), list(grids), list(embeddings))
    else:
        outs = [head(ref, image, embedding, grid) for ref, image, embedding, grid in samples]
    sum(o.mask_logits.square().mean() for o in outs).backward()
    head.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="samples per step (SFT's batch: 16)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    head, samples = head_and_batch(args.batch)
    times: dict[str, list[float]] = {"one at a time": [], "batched": []}
    for i in range(args.repeats + 1):
        for label, batched in (("one at a time", False), ("batched", True)):
            seconds = step(head, samples, batched)
            if i:  # the first round warms up
                times[label].append(seconds)
    medians = {label: statistics.median(t) for label, t in times.items()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    print(f"READ head forward + backward, {args.batch} samples, median of {args.repeats}:")
    for label, seconds in medians.items():
        print(f"  {label:14s} {seconds * 1000:8.1f} ms")
    print(f"  one at a time / batched: {medians['one at a time'] / medians['batched']:.1f}x")
    return medians


if __name__ == "__main__":
    main()
