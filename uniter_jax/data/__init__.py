"""Input pipeline: TFDS data sources -> text-image join -> task ops -> buckets.

Public API:
  UniterData, make_pretrain_iterator, DataIterator, Loading,
  auto_num_workers, WorkerError                     (pipeline.py)
  Bucket, choose_buckets, assign_buckets, plan_epoch (buckets.py)
  OpContext                                         (ops.py)
  RegionRule, ImageStore, TextSource                (sources.py)
  Field, BatchContractError, check_batch, BASE_FIELDS,
  PRETRAIN_FIELDS                                   (contract.py)
  DataError, and the on-disk schema                 (schema.py)
  collate.collate, collate.BufferPool                (collate.py)
  RecordReader, fp16_to_fp32                        (sources.py)
See docs/data.md.
"""

from uniter_jax.data.buckets import assign_buckets
from uniter_jax.data.buckets import Bucket
from uniter_jax.data.buckets import choose_buckets
from uniter_jax.data.buckets import plan_epoch
from uniter_jax.data.contract import BASE_FIELDS
from uniter_jax.data.contract import BatchContractError
from uniter_jax.data.contract import check_batch
from uniter_jax.data.contract import Field
from uniter_jax.data.contract import PRETRAIN_FIELDS
from uniter_jax.data.ops import OpContext
from uniter_jax.data.pipeline import auto_num_workers
from uniter_jax.data.pipeline import DataIterator
from uniter_jax.data.pipeline import Loading
from uniter_jax.data.pipeline import make_pretrain_iterator
from uniter_jax.data.pipeline import UniterData
from uniter_jax.data.pipeline import WorkerError
from uniter_jax.data.schema import DataError
from uniter_jax.data.sources import ImageStore
from uniter_jax.data.sources import RegionRule
from uniter_jax.data.sources import TextSource

__all__ = [
    "assign_buckets", "Bucket", "choose_buckets", "plan_epoch",
    "BASE_FIELDS", "BatchContractError", "check_batch", "Field",
    "PRETRAIN_FIELDS", "OpContext", "auto_num_workers", "DataIterator",
    "Loading", "make_pretrain_iterator", "UniterData", "WorkerError", "DataError", "ImageStore",
    "RegionRule", "TextSource",
]
