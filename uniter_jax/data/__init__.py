"""Input pipeline: TFDS data sources -> text-image join -> task ops -> buckets.

Public API:
  UniterData, make_pretrain_iterator, DataIterator  (pipeline.py)
  Bucket, choose_buckets, assign_buckets, plan_epoch (buckets.py)
  OpContext, register_op, get_op                    (ops.py)
  RegionRule, ImageStore, TextSource, DataError     (sources.py)
  collate.collate, collate.BufferPool                (collate.py)
  RecordReader, fp16_to_fp32 (sources.py); FlatArrayRecord,
  parse_example (arrayrecord.py: uncompressed ArrayRecord reading)
See docs/data.md.
"""

from uniter_jax.data.buckets import assign_buckets
from uniter_jax.data.buckets import Bucket
from uniter_jax.data.buckets import choose_buckets
from uniter_jax.data.buckets import plan_epoch
from uniter_jax.data.ops import get_op
from uniter_jax.data.ops import OpContext
from uniter_jax.data.ops import register_op
from uniter_jax.data.pipeline import DataIterator
from uniter_jax.data.pipeline import make_pretrain_iterator
from uniter_jax.data.pipeline import UniterData
from uniter_jax.data.sources import DataError
from uniter_jax.data.sources import ImageStore
from uniter_jax.data.sources import RegionRule
from uniter_jax.data.sources import TextSource

__all__ = [
    "assign_buckets", "Bucket", "choose_buckets", "plan_epoch",
    "get_op", "OpContext", "register_op", "DataIterator",
    "make_pretrain_iterator", "UniterData", "DataError", "ImageStore",
    "RegionRule", "TextSource",
]
