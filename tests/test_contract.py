"""The batch contract as code: field tables, check_batch, collate by table."""

import numpy as np
import pytest

import uniter_jax.data as data
from uniter_jax.data import buckets as bk
from uniter_jax.data import collate as collate_lib
from uniter_jax.data import contract
from uniter_jax.data import schema
from uniter_jax.data import sources

Field = contract.Field
ALL = contract.BASE_FIELDS + contract.PRETRAIN_FIELDS


def _row(n_txt, n_img, rid="r", **extra):
  out = {"input_ids": np.arange(2, 2 + n_txt, dtype=np.int32),
         "img_feat": np.full((n_img, 2048), 0.5, np.float32),
         "img_pos_feat": np.full((n_img, 7), 0.25, np.float32),
         "_id": rid, "img_key": f"img_{rid}"}
  out.update(extra)
  return out


def _batch(b=4, lt=6, li=5):
  return collate_lib.collate(
      [_row(3 + r % 3, 2 + r % 4, str(r)) for r in range(b)],
      bk.Bucket(lt, li, b))


# ---------------------------------------------------------------------------
# The tables.
# ---------------------------------------------------------------------------
def test_default_table_matches_the_collate_of_before():
  """Names, dtypes, paddings and kinds of the fields collate knew before
  the tables (`_TEXT`, `_IMG`, `targets`), plus the exact-eval fields."""
  table = contract.field_table(ALL)
  before_text = {"input_ids": (np.int32, 0), "txt_type_ids": (np.int32, 0),
                 "txt_labels": (np.int32, -1)}
  before_img = {"img_feat": (np.float32, 0.0),
                "img_pos_feat": (np.float32, 0.0),
                "img_type_ids": (np.int32, 1),
                "img_soft_labels": (np.float32, 0.0),
                "img_masks": (np.bool_, False),
                "feat_targets": (np.float32, 0.0),
                "label_targets": (np.float32, 0.0)}
  for kind, before in (("text", before_text), ("image", before_img)):
    for name, (dtype, pad) in before.items():
      f = table[name]
      assert f.kind == kind and f.default_dtype == np.dtype(dtype), name
      assert f.pad == pad, name
  assert table["targets"].kind == "row"
  assert table["targets"].dtype == np.dtype(np.int32)
  # Since: MRC's masked-region soft labels, one [P, C] array per row.
  assert table["mrm_label_targets"].kind == "row"
  assert collate_lib.KNOWN_FIELDS == (
      set(before_text) | set(before_img)
      | {"targets", "example_mask", "example_index", "mrm_label_targets"})
  required = {n for n, f in table.items() if not f.optional}
  assert required == {"input_ids", "img_feat", "img_pos_feat", "position_ids",
                      "attn_masks", "txt_lens", "num_bbs"}
  assert table["img_feat"].dtypes == (np.dtype(np.float32),
                                      np.dtype(np.float16))
  assert data.Field is Field and data.BASE_FIELDS is contract.BASE_FIELDS


def test_field_declarations_are_checked():
  with pytest.raises(ValueError, match="'x'.*kind 'rows'"):
    Field("x", np.int32, "rows")
  with pytest.raises(ValueError, match="'x'.*tail entry 'L'"):
    Field("x", np.int32, "row", ("L",))
  with pytest.raises(ValueError, match="'targets' is declared twice"):
    contract.field_table(ALL + (Field("targets", np.float32, "row",
                                      (3129,)),))


def test_one_data_error_type():
  assert sources.DataError is schema.DataError is data.DataError
  err = data.DataError("ds[train]", "rec_7", "bad thing")
  assert str(err) == "ds[train]: record 'rec_7': bad thing"
  assert (err.dataset, err.record_id, err.problem) == ("ds[train]", "rec_7",
                                                       "bad thing")
  assert isinstance(err, ValueError)
  assert not hasattr(schema, "DataPrepError")


# ---------------------------------------------------------------------------
# check_batch.
# ---------------------------------------------------------------------------
def test_check_batch_accepts_collated_batches():
  batch = _batch()
  contract.check_batch(batch, contract.BASE_FIELDS, where="t")
  contract.check_batch(batch, ALL, where="t")
  batch["img_feat"] = batch["img_feat"].astype(np.float16)
  contract.check_batch(batch, ALL, where="t")
  batch["mlm_positions"] = np.zeros((4, 3), np.int32)
  batch["mlm_valid"] = np.zeros((4, 3), bool)
  contract.check_batch(batch, ALL, where="t")


@pytest.mark.parametrize("change,match", [
    (lambda b: b.pop("attn_masks"),
     r"ds: batch lacks the required fields \['attn_masks'\]"),
    (lambda b: b.update(oops=np.zeros(4)),
     r"ds: batch holds undeclared fields \['oops'\]"),
    (lambda b: b.update(input_ids=b["input_ids"].astype(np.int64)),
     r"ds: field 'input_ids' has dtype int64, expected int32"),
    (lambda b: b.update(img_feat=b["img_feat"].astype(np.float64)),
     r"'img_feat' has dtype float64, expected float32 or float16"),
    (lambda b: b.update(img_pos_feat=b["img_pos_feat"][..., :6]),
     r"'img_pos_feat' \(image\) has shape \[4, 5, 6\], expected \[4, 5, 7\]"),
    (lambda b: b.update(txt_lens=b["txt_lens"][:3]),
     r"'txt_lens' \(batch\) has shape \[3\], expected \[4\]"),
    (lambda b: b.update(attn_masks=b["attn_masks"][:, 1:]),
     r"'attn_masks' \(batch\) has shape \[4, 10\], expected \[4, 11\] "
     r"\(B=4, Lt=6, Li=5\)"),
    (lambda b: b.update(position_ids=b["position_ids"][:, :5]),
     r"'position_ids'.*expected \[4, 6\]"),
    (lambda b: b.update(txt_labels=np.zeros((4, 5), np.int32)),
     r"'txt_labels' \(text\) has shape \[4, 5\], expected \[4, 6\]"),
    (lambda b: b.update(img_masks=np.zeros((4, 6), bool)),
     r"'img_masks' \(image\).*expected \[4, 5\]"),
    (lambda b: b.update(targets=np.zeros((4, 1), np.int32)),
     r"'targets' \(row\) has shape \[4, 1\], expected \[4\]"),
    (lambda b: b.update(mlm_valid=np.zeros((4,), bool)),
     r"'mlm_valid' \(batch\) has shape \[4\], expected \[4, \*\]"),
    (lambda b: b.update(example_mask=np.ones(4, np.int32)),
     r"'example_mask' has dtype int32, expected bool"),
])
def test_check_batch_names_the_field_and_the_expectation(change, match):
  batch = _batch()
  change(batch)
  with pytest.raises(contract.BatchContractError, match=match):
    contract.check_batch(batch, ALL, where="ds")


def test_check_batch_example_fields_and_task_fields():
  fields = contract.BASE_FIELDS + (
      Field("targets", np.int32, "example"),
      Field("vqa_targets", np.float32, "row", (3129,), optional=True),
      Field("obj_masks", np.bool_, "image", (None,), optional=True))
  batch = _batch()
  batch["targets"] = np.zeros(2, np.int32)
  batch["obj_masks"] = np.zeros((4, 5, 9), bool)
  contract.check_batch(batch, fields, where="t", rows_per_example=2)
  with pytest.raises(contract.BatchContractError,
                     match=r"'targets' \(example\) has shape \[2\], expected "
                     r"\[4\]"):
    contract.check_batch(batch, fields, where="t")
  with pytest.raises(contract.BatchContractError, match="rows_per_example=3"):
    contract.check_batch(batch, fields, where="t", rows_per_example=3)
  batch["vqa_targets"] = np.zeros((4, 3000), np.float32)
  with pytest.raises(contract.BatchContractError,
                     match=r"'vqa_targets' \(row\).*expected \[4, 3129\]"):
    contract.check_batch(batch, fields, where="t", rows_per_example=2)
  del batch["targets"]
  with pytest.raises(contract.BatchContractError, match=r"lacks.*targets"):
    contract.check_batch(batch, fields, where="t", rows_per_example=2)


# ---------------------------------------------------------------------------
# collate by table.
# ---------------------------------------------------------------------------
def test_collate_task_fields():
  fields = contract.BASE_FIELDS + (
      Field("vqa_targets", np.float32, "row", (3129,)),
      Field("obj_masks", np.bool_, "image", (None,), pad=False,
            optional=True),
      Field("pair_label", np.int32, "example"),
      Field("txt_labels", np.int32, "text", pad=-7, optional=True))
  rows = []
  for r in range(4):
    soft = np.zeros(3129, np.float64)
    soft[r] = 0.9
    rows.append(_row(3 + r, 2 + r, str(r), vqa_targets=soft,
                     obj_masks=np.ones((2 + r, 3), bool),
                     pair_label=np.int64(r // 2 * 10),
                     txt_labels=np.full(3 + r, 5, np.int32)))
  out = collate_lib.collate(rows, bk.Bucket(8, 6, 4), fields=fields,
                            rows_per_example=2)
  assert out["vqa_targets"].dtype == np.float32
  assert out["vqa_targets"].shape == (4, 3129)
  assert out["vqa_targets"][2, 2] == np.float32(0.9)
  assert out["obj_masks"].shape == (4, 6, 3)
  assert out["obj_masks"][0, :2].all() and not out["obj_masks"][0, 2:].any()
  assert out["pair_label"].dtype == np.int32
  assert out["pair_label"].tolist() == [0, 10]     # first row of each pair
  assert out["txt_labels"][0].tolist() == [5, 5, 5, -7, -7, -7, -7, -7]
  contract.check_batch(out, fields, where="t", rows_per_example=2)
  # Fields outside the given table are unknown, even default ones.
  rows[0]["img_masks"] = np.zeros(2, bool)
  with pytest.raises(ValueError, match=r"'0'.*unknown fields \['img_masks'\]"):
    collate_lib.collate(rows, bk.Bucket(8, 6, 4), fields=fields,
                        rows_per_example=2)
  del rows[0]["img_masks"]
  rows[1]["vqa_targets"] = np.zeros(3000, np.float32)
  with pytest.raises(ValueError, match=r"'1' vqa_targets shape \(3000,\)"):
    collate_lib.collate(rows, bk.Bucket(8, 6, 4), fields=fields,
                        rows_per_example=2)
  for r in rows:
    r["vqa_targets"] = np.zeros(3000, np.float32)
  with pytest.raises(ValueError, match=r"vqa_targets has trailing dims "
                     r"\(3000,\); the batch contract declares \(3129,\)"):
    collate_lib.collate(rows, bk.Bucket(8, 6, 4), fields=fields,
                        rows_per_example=2)
  with pytest.raises(ValueError, match="rows_per_example=3"):
    collate_lib.collate(rows, bk.Bucket(8, 6, 4), fields=fields,
                        rows_per_example=3)


def test_collate_refuses_rows_carrying_batch_fields_and_bad_casts():
  rows = [_row(3, 2, "a", attn_masks=np.ones(5, np.int32))]
  with pytest.raises(ValueError, match=r"'a'.*unknown fields \['attn_masks'\]"):
    collate_lib.collate(rows, bk.Bucket(6, 4, 1))
  rows = [_row(3, 2, "a", targets=np.float32(0.5))]
  with pytest.raises(ValueError, match="targets has dtype float32; the batch "
                     "contract declares int32"):
    collate_lib.collate(rows, bk.Bucket(6, 4, 1))
  rows = [_row(3, 2, "a", img_soft_labels=np.zeros((2, 1600), np.float32))]
  with pytest.raises(ValueError, match="img_soft_labels has trailing dims "
                     r"\(1600,\); the batch contract declares \(1601,\)"):
    collate_lib.collate(rows, bk.Bucket(6, 4, 1))
  with pytest.raises(ValueError, match="img_feat_dtype must be float32 or "
                     "float16, got float64"):
    collate_lib.collate([_row(3, 2)], bk.Bucket(6, 4, 1),
                        img_feat_dtype=np.float64)
