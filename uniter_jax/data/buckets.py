"""Token-budget buckets: a few static (Lt, Li, batch size) shapes per dataset.

The official TokenBucketSampler treats `train_batch_size` as a token budget
that includes padding: a batch holds as many examples as fit in
`max_len * n <= budget`. Under XLA every distinct shape is a compile, so here
the lengths are quantised to a small fixed set of shapes chosen from the
dataset's own length distribution:

* An example is `(t, n)`: text tokens including [CLS]/[SEP], and regions.
  The layout is `[text pad.. (Lt) | regions pad.. (Li)]`, so an example fits a
  shape when `t <= Lt` and `n <= Li`, and costs `Lt + Li` slots.
* Shapes are picked greedily to minimise the total number of slots (hence the
  padding) over the length histogram; the first shape always covers the
  longest text and the most regions, so every example fits somewhere.
* Each shape's batch size is the largest multiple of `batch_multiple` with
  `B * (Lt + Li) <= token_budget`, so every batch holds about the same number
  of tokens and never more than the budget.

An epoch plan (which examples form which batch, and the batch order) is a pure
function of `(lengths, buckets, seed, epoch)`, so every host computes the same
plan and a resumed run can rebuild it from a batch counter.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

# Salt so that the plan RNG stream never coincides with per-example streams.
_PLAN_SALT = 0x5EED_B0C5


@dataclasses.dataclass(frozen=True)
class Bucket:
  """One static batch shape."""
  max_txt: int   # Lt: text slots, incl. [CLS] and [SEP]
  max_img: int   # Li: region slots
  batch_size: int  # B: rows per (global) batch

  @property
  def seq_len(self) -> int:
    return self.max_txt + self.max_img

  @property
  def tokens(self) -> int:
    return self.batch_size * self.seq_len


def _batch_size(seq_len: int, token_budget: int, batch_multiple: int) -> int:
  return (token_budget // seq_len) // batch_multiple * batch_multiple


def _round_up(x: np.ndarray, m: int) -> np.ndarray:
  return -(-np.asarray(x) // m) * m


def _candidates(values: np.ndarray, counts: np.ndarray, max_levels: int,
                multiple: int) -> np.ndarray:
  """Candidate bucket edges: weighted quantiles of `values`, rounded up."""
  order = np.argsort(values)
  values, counts = values[order], counts[order]
  cum = np.cumsum(counts) / counts.sum()
  qs = np.linspace(0, 1, max_levels + 1)[1:]
  picks = values[np.minimum(np.searchsorted(cum, qs - 1e-12), len(values) - 1)]
  picks = np.concatenate([picks, values if len(values) <= max_levels else []])
  return np.unique(_round_up(picks.astype(np.int64), multiple))


def choose_buckets(txt_lens: Sequence[int] | np.ndarray,
                   num_bbs: Sequence[int] | np.ndarray,
                   token_budget: int,
                   batch_multiple: int = 1,
                   max_buckets: int = 16,
                   target_padding: float = 0.0,
                   length_multiple: int = 1,
                   max_levels: int = 32,
                   min_batches: float = 1.0) -> list[Bucket]:
  """Chooses up to `max_buckets` shapes minimising padding for these lengths.

  Args:
    txt_lens: per-example text length, including [CLS] and [SEP].
    num_bbs: per-example number of regions (after the num_bb rule).
    token_budget: upper bound on `B * (Lt + Li)` for every batch (the
      official `train_batch_size` times the data-parallel device count).
    batch_multiple: every batch size is a multiple of this (e.g. the number of
      data-parallel devices).
    max_buckets: how many distinct shapes (XLA programs) at most.
    target_padding: stop adding shapes once the padded fraction of slots is
      at most this (0 uses all `max_buckets` shapes that still help); the
      estimate includes the remainders `plan_epoch` carries into wider
      shapes.
    length_multiple: Lt and Li are rounded up to a multiple of this.
    max_levels: candidate edges per axis (weighted quantiles).
    min_batches: a shape is only added if it takes at least this many full
      batches of examples (keeps small datasets from getting empty shapes).

  Returns:
    Buckets sorted by sequence length; the last one covers every example.

  Raises:
    ValueError: if even the covering shape leaves no room for
      `batch_multiple` examples within the budget, or inputs are empty.
  """
  t = np.asarray(txt_lens, np.int64)
  n = np.asarray(num_bbs, np.int64)
  if t.shape != n.shape or t.ndim != 1 or t.size == 0:
    raise ValueError(f"txt_lens and num_bbs must be equal-length non-empty 1-d "
                     f"arrays, got shapes {t.shape} and {n.shape}")
  if max_buckets < 1 or batch_multiple < 1 or length_multiple < 1:
    raise ValueError("max_buckets, batch_multiple and length_multiple must "
                     "be >= 1")
  # Histogram of distinct (t, n) pairs: cheap to score candidates on.
  pairs, counts = np.unique(np.stack([t, n], 1), axis=0, return_counts=True)
  pt, pn = pairs[:, 0], pairs[:, 1]
  root = (int(_round_up(pt.max(), length_multiple)),
          int(_round_up(pn.max(), length_multiple)))
  if _batch_size(sum(root), token_budget, batch_multiple) < batch_multiple:
    raise ValueError(
        f"token_budget={token_budget} cannot hold batch_multiple="
        f"{batch_multiple} examples of the longest shape Lt={root[0]}, "
        f"Li={root[1]} ({batch_multiple * sum(root)} tokens)")

  ut, ct = np.unique(pt, return_counts=True)
  un, cn = np.unique(pn, return_counts=True)
  cand_t = _candidates(ut, ct, max_levels, length_multiple)
  cand_n = _candidates(un, cn, max_levels, length_multiple)
  ct_grid, cn_grid = np.meshgrid(cand_t, cand_n, indexing="ij")
  cands = np.stack([ct_grid.ravel(), cn_grid.ravel()], 1)
  # Shapes whose batch would not fit one `batch_multiple` group are useless.
  ok = np.array([_batch_size(int(a + b), token_budget, batch_multiple)
                 >= batch_multiple for a, b in cands])
  cands = cands[ok]
  cand_bs = np.array([_batch_size(int(a + b), token_budget, batch_multiple)
                      for a, b in cands])
  # cost[c, p]: slots used by pair p in candidate c (inf if it does not fit).
  fits = (pt[None] <= cands[:, :1]) & (pn[None] <= cands[:, 1:])
  cost = np.where(fits, (cands[:, 0] + cands[:, 1])[:, None], np.inf)

  chosen = [root]
  best = np.full(len(pairs), float(sum(root)))
  real = float((pairs.sum(1) * counts).sum())
  while len(chosen) < max_buckets:
    slots = float((best * counts).sum()) + _expected_carry_slots(
        chosen, token_budget, batch_multiple)
    if 1.0 - real / slots <= target_padding:
      break
    totals = (np.minimum(cost, best[None]) * counts[None]).sum(1)
    # A shape must take at least `min_batches` full batches of examples away
    # from the current shapes, else it mostly feeds leftovers to bigger ones.
    moved = ((cost < best[None]) * counts[None]).sum(1)
    totals[moved < min_batches * cand_bs] = np.inf
    c = int(np.argmin(totals))
    if not np.isfinite(totals[c]):
      break
    if totals[c] >= (best * counts).sum() - 0.5:
      break  # no candidate lowers the padding any more
    chosen.append((int(cands[c, 0]), int(cands[c, 1])))
    best = np.minimum(best, cost[c])
  chosen = sorted(set(chosen), key=lambda s: (s[0] + s[1], s))
  return [Bucket(a, b, _batch_size(a + b, token_budget, batch_multiple))
          for a, b in chosen]


def _expected_carry_slots(shapes, token_budget: int,
                          batch_multiple: int) -> float:
  """Expected extra slots per epoch from `plan_epoch` carrying each shape's
  remainder (on average half a batch) into the next wider shape; the
  stopping test of `choose_buckets` counts them so that the padding of the
  actual batches, not only of the histogram, meets `target_padding`."""
  bs = sorted((Bucket(a, b, _batch_size(a + b, token_budget, batch_multiple))
               for a, b in shapes), key=lambda b: (b.seq_len, b.max_txt,
                                                   b.max_img))
  extra = 0.0
  for k, j in enumerate(_carry_targets(bs)):
    if j is not None:
      extra += (bs[k].batch_size - 1) / 2 * (bs[j].seq_len - bs[k].seq_len)
  return extra


def assign_buckets(txt_lens, num_bbs, buckets: Sequence[Bucket]) -> np.ndarray:
  """Index of the cheapest bucket that fits each example (-1: none fits)."""
  t = np.asarray(txt_lens, np.int64)[:, None]
  n = np.asarray(num_bbs, np.int64)[:, None]
  lt = np.array([b.max_txt for b in buckets])[None]
  li = np.array([b.max_img for b in buckets])[None]
  cost = np.where((t <= lt) & (n <= li), lt + li, np.iinfo(np.int64).max)
  out = np.argmin(cost, 1)
  out[cost[np.arange(len(out)), out] == np.iinfo(np.int64).max] = -1
  return out


def _carry_targets(buckets: Sequence[Bucket]) -> list[int | None]:
  """For each bucket, the next (larger) bucket that covers all its examples."""
  out = []
  for k, b in enumerate(buckets):
    nxt = [j for j in range(k + 1, len(buckets))
           if buckets[j].max_txt >= b.max_txt and buckets[j].max_img >= b.max_img]
    out.append(min(nxt, key=lambda j: (buckets[j].seq_len, j)) if nxt else None)
  return out


@dataclasses.dataclass(frozen=True)
class EpochPlan:
  """The batches of one epoch, in order."""
  bucket_ids: np.ndarray          # [num_batches] int
  batches: list[np.ndarray]       # example indices, len == bucket batch size
  dropped: np.ndarray             # example indices left out this epoch


def plan_epoch(assignment: np.ndarray, buckets: Sequence[Bucket], seed: int,
               epoch: int) -> EpochPlan:
  """Deterministic batches for one epoch.

  Examples of each bucket are shuffled and cut into full batches; the
  remainder (fewer than one batch) is carried into the next larger bucket
  that covers it, so only the last bucket's remainder (less than one batch of
  the widest shape) is dropped per epoch. Batches of all buckets are then
  shuffled together. The number of batches per epoch does not depend on the
  epoch, only on the bucket counts.

  Args:
    assignment: per-example bucket index from `assign_buckets` (examples with
      -1, e.g. filtered out, are ignored).
    buckets: the shapes, sorted by sequence length as `choose_buckets` gives.
    seed: data seed.
    epoch: epoch number.
  """
  rng = np.random.default_rng([_PLAN_SALT, seed, epoch])
  carry_to = _carry_targets(buckets)
  pools = [np.flatnonzero(assignment == k) for k in range(len(buckets))]
  batches, bucket_ids = [], []
  dropped = np.zeros([0], np.int64)
  for k, b in enumerate(buckets):
    pool = rng.permutation(pools[k])
    n_full = len(pool) // b.batch_size
    for i in range(n_full):
      batches.append(pool[i * b.batch_size:(i + 1) * b.batch_size])
      bucket_ids.append(k)
    rest = pool[n_full * b.batch_size:]
    if carry_to[k] is None:
      dropped = np.concatenate([dropped, rest])
    else:
      pools[carry_to[k]] = np.concatenate([pools[carry_to[k]], rest])
  order = rng.permutation(len(batches))
  return EpochPlan(bucket_ids=np.asarray(bucket_ids, np.int64)[order],
                   batches=[batches[i] for i in order],
                   dropped=np.sort(dropped))


def padding_stats(txt_lens, num_bbs, plan: EpochPlan,
                  buckets: Sequence[Bucket]) -> dict[str, float]:
  """Padding fraction (padded slots / all slots) and budget use of a plan."""
  t = np.asarray(txt_lens, np.int64)
  n = np.asarray(num_bbs, np.int64)
  slots = real = 0
  for k, idx in zip(plan.bucket_ids, plan.batches):
    slots += buckets[k].tokens
    real += int(t[idx].sum() + n[idx].sum())
  return {
      "padding_fraction": 1.0 - real / max(slots, 1),
      "num_batches": len(plan.batches),
      "examples": int(sum(len(b) for b in plan.batches)),
      "dropped": int(len(plan.dropped)),
  }
