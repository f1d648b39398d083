"""WordPiece tokenisation with a user `vocab.txt`, as the official `prepro.py`.

The official code splits the text on whitespace and runs the BERT tokenizer
(basic tokenisation + WordPiece, lower-casing only for uncased vocabularies)
on each word. The `tokenizers` library's `BertWordPieceTokenizer` does the
same basic tokenisation and WordPiece; per-word calls are unnecessary because
its pre-tokenizer already splits on whitespace first.
"""
from __future__ import annotations

from typing import Any

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def read_vocab(path: str) -> list[str]:
  """Tokens of a `vocab.txt` (line number = id)."""
  with open(path, encoding="utf-8") as f:
    return [line.rstrip("\n") for line in f]


def vocab_meta(vocab: list[str], dataset: str = "vocab") -> dict[str, Any]:
  """Special ids, `v_range` and `vocab_size` of a vocabulary.

  `v_range` follows `prepro.py`: [id of "!", len(vocab)) (for bert-base-cased
  [999, 28996)); a vocabulary without "!" uses [first non-special id, len).
  """
  index = {t: i for i, t in enumerate(vocab)}
  missing = [t for t in SPECIAL_TOKENS if t not in index]
  if missing:
    raise ValueError(f"{dataset}: vocab lacks special tokens {missing}")
  if "!" in index:
    lo = index["!"]
  else:
    lo = 1 + max(i for i, t in enumerate(vocab)
                 if t.startswith("[") and t.endswith("]"))
  return {"PAD": index["[PAD]"], "UNK": index["[UNK]"],
          "CLS": index["[CLS]"], "SEP": index["[SEP]"],
          "MASK": index["[MASK]"], "v_range": [lo, len(vocab)],
          "vocab_size": len(vocab)}


class WordPiece:
  """`text -> ids` without [CLS]/[SEP], as the official txt_db stores them."""

  def __init__(self, vocab_path: str, lowercase: bool = False):
    from tokenizers import BertWordPieceTokenizer  # pylint: disable=g-import-not-at-top
    # strip_accents=None follows `lowercase`, as the BERT BasicTokenizer.
    self._tok = BertWordPieceTokenizer(
        vocab_path, lowercase=lowercase, clean_text=True,
        handle_chinese_chars=True, strip_accents=None)
    self.vocab = read_vocab(vocab_path)
    self.meta = vocab_meta(self.vocab, vocab_path)

  def __call__(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids
