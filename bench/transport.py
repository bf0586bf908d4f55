"""Benchmark: a 256-response trajectory batch moved between two Ray actors.

The batch is a reference-stage batch (``data.reference_rows.make_reference_batch``: K = 1..4 masks of
256×256 float32 per response, 32 groups of 8) plus token ids, rollout logprobs (~512 tokens
each) and the weights version. A producer actor puts it in the object store, a consumer
actor gets it by ObjectRef, in three forms:

- arrow: a ``pa.RecordBatch`` (its buffers go to the object store as they are and are
  mapped, not copied, by the reader);
- dict: the same columns as a Python dict of lists (masks as one numpy array per row,
  token ids and logprobs as Python lists), serialised by Ray;
- dict-bytes: that dict pickled by the producer itself, as a framework that serialises its
  own batch objects does (measured 20-40x slower than Arrow on this stack).

Timed inside the actors, median of REPEATS rounds with the forms interleaved: *put*
(producer: serialise into the object store), *get* (consumer: deserialise), *read*
(consumer: masks, token ids and logprobs as flat numpy arrays, summed, as a learner does
before building tensors). The put is a copy of the bytes into shared memory for every form,
and its time swings with page faults on fresh object-store pages; the consumer side is where
the forms differ. Prints the times and the ratios over Arrow. Run: ``python bench/transport.py``.
"""

from __future__ import annotations

import os
import pickle
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from cluster.local import connect, disconnect  # noqa: E402
from data.reference_rows import make_reference_batch  # noqa: E402
from data.schema import encode_mask  # noqa: E402

RESPONSES, GROUP, SIZE, TOKENS = 256, 8, 256, 512
REPEATS = 5
FORMATS = ("arrow", "dict", "dict-bytes")


def make_batch(seed: int = 0) -> pa.RecordBatch:
    """The benchmark's trajectory batch: scored columns + token ids, logprobs, version."""
    rng = np.random.default_rng(seed)
    slots = [1 + i % 4 for i in range(RESPONSES)]
    gt = np.zeros((SIZE, SIZE), bool)
    gt[64:160, 32:200] = True
    gt_rle = encode_mask(gt)
    scored = make_reference_batch(
        sample_ids=[f"s{i // GROUP}" for i in range(RESPONSES)],
        group_ids=[i // GROUP for i in range(RESPONSES)],
        response_indices=[i % GROUP for i in range(RESPONSES)],
        group_sizes=GROUP,
        texts=["<think>the red cup left of the plate</think><SEG>"] * RESPONSES,
        mask_probs=[rng.random((k, SIZE, SIZE), dtype=np.float32) for k in slots],
        confidences=[rng.random(k, dtype=np.float32) for k in slots],
        gt_masks=[[gt_rle]] * RESPONSES,
    )
    lengths = rng.integers(TOKENS - 64, TOKENS + 64, RESPONSES)
    offsets = pa.array(np.concatenate(([0], np.cumsum(lengths))).astype(np.int32))
    token_ids = rng.integers(0, 32_000, int(lengths.sum()), dtype=np.int32)
    logprobs = -rng.random(int(lengths.sum()), dtype=np.float32) * 5
    extra = {
        "response_ids": pa.ListArray.from_arrays(offsets, pa.array(token_ids)),
        "rollout_logprobs": pa.ListArray.from_arrays(offsets, pa.array(logprobs)),
        "weights_version": pa.array(np.full(RESPONSES, 3, np.int32)),
    }
    return pa.RecordBatch.from_arrays(
        scored.columns + list(extra.values()), names=scored.schema.names + list(extra)
    )


def as_dict(batch: pa.RecordBatch) -> dict[str, list]:
    """The batch as Python lists; masks as one [K, H, W] numpy array per row."""
    out = {name: batch.column(name).to_pylist() for name in batch.schema.names
           if name != "mask_probs"}
    flat = batch.column("mask_probs")
    values, at = flat.values.to_numpy(), flat.offsets.to_numpy()
    out["mask_probs"] = [
        values[at[i]:at[i + 1]].reshape(k, h, w).copy()
        for i, (k, h, w) in enumerate(zip(out["num_slots"], out["mask_height"], out["mask_width"]))
    ]
    out["confidences"] = [np.asarray(c, np.float32) for c in out["confidences"]]
    return out


def checksum(data) -> float:
    """Read what a learner reads (masks, token ids, logprobs) into numpy and sum it."""
    if isinstance(data, bytes):
        data = pickle.loads(data)
    if isinstance(data, pa.RecordBatch):
        columns = [data.column(n).values.to_numpy()
                   for n in ("mask_probs", "response_ids", "rollout_logprobs")]
    else:
        columns = [np.concatenate([m.reshape(-1) for m in data["mask_probs"]]),
                   np.concatenate([np.asarray(t, np.int32) for t in data["response_ids"]]),
                   np.concatenate([np.asarray(p, np.float32)
                                   for p in data["rollout_logprobs"]])]
    return float(sum(column.sum(dtype=np.float64) for column in columns))


@ray.remote(num_cpus=1)
class Producer:
    """Holds the batch as Arrow and as a dict; ``put`` stores one form, timing it."""

    def __init__(self):
        self.batch = make_batch()
        self.data = as_dict(self.batch)

    def sizes_mb(self) -> dict[str, float]:
        pickled = len(pickle.dumps(self.data, protocol=pickle.HIGHEST_PROTOCOL))
        return {"arrow": self.batch.nbytes / 2**20, "dict": pickled / 2**20,
                "dict-bytes": pickled / 2**20}

    def put(self, form: str) -> tuple[list[ray.ObjectRef], float]:
        """([ref], seconds): the list keeps Ray from resolving the ref on the way back."""
        start = time.perf_counter()
        if form == "dict-bytes":
            ref = ray.put(pickle.dumps(self.data, protocol=pickle.HIGHEST_PROTOCOL))
        else:
            ref = ray.put(self.batch if form == "arrow" else self.data)
        return [ref], time.perf_counter() - start


@ray.remote(num_cpus=1)
class Consumer:
    def receive(self, refs: list[ray.ObjectRef]) -> tuple[float, float, float]:
        """(get seconds, read seconds, checksum) for the batch behind ``refs[0]``."""
        start = time.perf_counter()
        data = ray.get(refs[0])
        if isinstance(data, bytes):
            data = pickle.loads(data)
        got = time.perf_counter()
        total = checksum(data)
        return got - start, time.perf_counter() - got, total


def measure(producer, consumer) -> tuple[dict[str, dict[str, float]], set[float]]:
    """Median put/get/read seconds per form, and the checksums the consumer saw."""
    samples = {form: {"put": [], "get": [], "read": []} for form in FORMATS}
    sums = set()
    for _ in range(REPEATS):
        for form in FORMATS:
            refs, put_s = ray.get(producer.put.remote(form))
            get_s, read_s, total = ray.get(consumer.receive.remote(refs))
            del refs  # free the object before the next form is put
            for phase, seconds in (("put", put_s), ("get", get_s), ("read", read_s)):
                samples[form][phase].append(seconds)
            sums.add(total)
    medians = {form: {phase: statistics.median(times) for phase, times in phases.items()}
               for form, phases in samples.items()}
    return medians, sums


def main() -> None:
    connect(num_cpus=2)
    try:
        producer, consumer = Producer.remote(), Consumer.remote()
        sizes = ray.get(producer.sizes_mb.remote())
        times, sums = measure(producer, consumer)
    finally:
        disconnect()
    assert len(sums) == 1, f"the forms disagree on the data: {sums}"

    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"cpu_count={os.cpu_count()}, python {platform.python_version()}, "
          f"ray {ray.__version__}, pyarrow {pa.__version__}, numpy {np.__version__}")
    print(f"batch: {RESPONSES} responses ({RESPONSES // GROUP} groups of {GROUP}), K=1..4 "
          f"masks {SIZE}x{SIZE} float32, ~{TOKENS} token ids + logprobs each; "
          + ", ".join(f"{form} {mb:.1f} MB" for form, mb in sizes.items()))
    print(f"median of {REPEATS}, milliseconds:")
    arrow = times["arrow"]
    for form in FORMATS:
        t = times[form]
        consumer_s, total_s = t["get"] + t["read"], sum(t.values())
        line = (f"  {form:10s} put {t['put'] * 1e3:7.1f}  get {t['get'] * 1e3:7.1f}  "
                f"read {t['read'] * 1e3:7.1f}  total {total_s * 1e3:7.1f}")
        if form != "arrow":
            line += (f"   vs arrow: get {t['get'] / arrow['get']:.0f}x, consumer (get+read) "
                     f"{consumer_s / (arrow['get'] + arrow['read']):.1f}x, "
                     f"total {total_s / sum(arrow.values()):.1f}x")
        print(line)


if __name__ == "__main__":
    main()
