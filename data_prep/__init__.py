"""Builds the TFDS datasets (ArrayRecord) that uniter_jax.data reads.

Modules: `common` (builder base classes), `synthetic` (the embedded corpus),
`synthetic_tasks` (its VQA, SNLI-VE and NLVR2 versions), `uniter_db`
(official LMDB txt_db/img_db), `butd` (BUTD/LXMERT TSV, COCO captions,
VQA v2), `annotations` (SNLI-VE, NLVR2 and Karpathy-split captions from
their public files), `tokenizer` (WordPiece with a user vocab.txt), `builders` (all
builders, for `--imports data_prep.builders`), `tfds_build` (`tfds build`
without TF).
The on-disk schema (and the num_bb rule, and `DataError`, raised for bad
records) is the library's `uniter_jax.data.schema`, shared with the reader.
CLI: `python -m data_prep <source> ...`; see docs/data_prep.md.
"""
