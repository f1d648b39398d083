"""Builds the TFDS datasets (ArrayRecord) that uniter_jax.data reads.

Modules: `schema` (the on-disk schema and the num_bb rule; no TF, light),
`common` (builder base classes), `synthetic`, `uniter_db` (official LMDB
txt_db/img_db), `butd` (BUTD/LXMERT TSV, COCO captions, VQA v2), `tokenizer`
(WordPiece with a user vocab.txt), `builders` (all builders, for
`--imports data_prep.builders`), `tfds_build` (`tfds build` without TF).
CLI: `python -m data_prep <source> ...`; see docs/data_prep.md.
"""
