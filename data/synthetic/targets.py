"""SFT targets and the text corpus the tokenizer is trained on."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..schema import Sample, read_samples
from .generate import SPLITS
from .templates import NO_TARGET_ANSWER

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
DEFAULT_REF_TOKEN = "<SEG>"


def sft_target(sample: Sample, ref_token: str = DEFAULT_REF_TOKEN) -> str:
    """`<think>{reasoning}</think> <SEG>`, or `... No such object.` for a false premise."""
    if sample.reasoning is None:
        raise ValueError(f"sample {sample.sample_id} has no reasoning to build an SFT target from")
    answer = NO_TARGET_ANSWER if sample.no_target else ref_token
    return f"{THINK_OPEN}{sample.reasoning}{THINK_CLOSE} {answer}"


def corpus(source: Iterable[Sample] | str | Path, ref_token: str = DEFAULT_REF_TOKEN) -> list[str]:
    """Questions, reasoning strings and SFT targets of samples, or of the set's split files in a folder.

    Only the files `make-data` writes (``SPLITS``, read in sorted order) count: another Parquet file
    put beside them (an experiment's own split) must not change the tokenizer or `make-tiny`'s stamp.
    """
    if isinstance(source, (str, Path)):
        files = [f for f in (Path(source) / f"{split}.parquet" for split in sorted(SPLITS)) if f.is_file()]
        if not files:
            raise FileNotFoundError(f"no split files ({', '.join(f'{s}.parquet' for s in SPLITS)}) in {source}")
        source = [s for f in files for s in read_samples(f)]
    texts = []
    for s in source:
        texts.append(s.question)
        if s.reasoning is not None:  # converted real datasets may have none
            texts += [s.reasoning, sft_target(s, ref_token)]
    return texts
