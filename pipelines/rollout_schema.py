"""The stages before scoring: prompt batches (driver -> rollout) and rollout batches.

These extend the trajectory columns of `pipelines.trajectory` (keys, scored,
rewarded). Bulk per-image data never travels here: actors read the cached
vision features and SAM embedding from the feature store by `image_hash`.

| column           | type                       | stage   | meaning                                          |
|------------------|----------------------------|---------|--------------------------------------------------|
| sample_id        | string                     | prompt  | dataset sample                                   |
| image_hash       | string                     | prompt  | feature-store key of the image                   |
| prompt_ids       | list<int32>                | prompt  | chat prompt with one image token                 |
| gt_masks         | list<struct<counts, size>> | prompt  | GT masks as RLE in SAM's low-res frame           |
| no_target        | bool                       | prompt  | false premise                                    |
| group_id         | string                     | rollout | one id per (prompt, admission)                   |
| response_index   | int32                      | rollout | 0 .. G - 1                                       |
| group_size       | int32                      | rollout | G                                                |
| response_ids     | list<int32>                | rollout | sampled tokens (EOS included when it was hit)    |
| rollout_logprobs | list<float32>              | rollout | behaviour log-probabilities, one per token       |
| weights_version  | int32                      | rollout | learner version of the weights that sampled it   |
| text             | string                     | rollout | decoded response (special tokens skipped)        |
| ref_logprobs     | list<float32>              | scored  | frozen reference policy's log-probabilities     |
"""
from __future__ import annotations

import pyarrow as pa

from pipelines.data.schema import RLE_TYPE

PROMPT_FIELDS = [
    pa.field("sample_id", pa.string()),
    pa.field("image_hash", pa.string()),
    pa.field("prompt_ids", pa.list_(pa.int32())),
    pa.field("gt_masks", pa.list_(RLE_TYPE)),
    pa.field("no_target", pa.bool_()),
]
ROLLOUT_FIELDS = [
    pa.field("group_id", pa.string()),
    pa.field("response_index", pa.int32()),
    pa.field("group_size", pa.int32()),
    pa.field("response_ids", pa.list_(pa.int32())),
    pa.field("rollout_logprobs", pa.list_(pa.float32())),
    pa.field("weights_version", pa.int32()),
    pa.field("text", pa.string()),
]
REF_LOGPROBS_FIELD = pa.field("ref_logprobs", pa.list_(pa.float32()))

PROMPT_SCHEMA = pa.schema(PROMPT_FIELDS)
ROLLOUT_SCHEMA = pa.schema(PROMPT_FIELDS + ROLLOUT_FIELDS)


def make_prompt_batch(rows: list[dict]) -> pa.RecordBatch:
    """Rows with the PROMPT_FIELDS keys -> a validated prompt batch."""
    return pa.RecordBatch.from_pylist(rows, schema=PROMPT_SCHEMA)
