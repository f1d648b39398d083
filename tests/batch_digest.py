"""A hash of a sequence of batches, for pinning batches across code changes."""

import hashlib

import numpy as np


def digest(batches) -> str:
  """One SHA-1 over every batch's keys (in order), dtypes, shapes and bytes."""
  h = hashlib.sha1()
  for batch in batches:
    for k, v in batch.items():
      v = np.ascontiguousarray(v)
      h.update(f"{k}|{v.dtype.str}|{v.shape}|".encode())
      h.update(v.tobytes())
  return h.hexdigest()
