"""All data_prep TFDS builders, for `tfds build --imports data_prep.builders`.

| tfds name                 | source                                  |
|---------------------------|-----------------------------------------|
| uniter_synthetic_images   | synthetic corpus, image store           |
| uniter_synthetic_text     | synthetic corpus, captions (train, val) |
| uniter_synthetic_vqa      | synthetic VQA (train, val, test)        |
| uniter_synthetic_ve       | synthetic visual entailment             |
| uniter_synthetic_nlvr2    | synthetic NLVR2 (image pairs)           |
| uniter_img_db             | official img_db LMDB (manual_dir)       |
| uniter_txt_db             | official txt_db LMDB (manual_dir)       |
| uniter_butd_images        | BUTD / LXMERT TSV features (manual_dir) |
| uniter_coco_captions      | COCO captions JSON + vocab.txt          |
| uniter_vqa                | VQA v2 questions/annotations + vocab    |
| uniter_snli_ve            | SNLI-VE jsonl + vocab                   |
| uniter_nlvr2              | NLVR2 JSON lines + vocab                |
| uniter_karpathy_captions  | Karpathy-split Flickr30K / COCO + vocab |
"""
from data_prep.annotations import UniterKarpathyCaptions
from data_prep.annotations import UniterNlvr2
from data_prep.annotations import UniterSnliVe
from data_prep.butd import UniterButdImages
from data_prep.butd import UniterCocoCaptions
from data_prep.butd import UniterVqa
from data_prep.synthetic import UniterSyntheticImages
from data_prep.synthetic import UniterSyntheticText
from data_prep.synthetic_tasks import UniterSyntheticNlvr2
from data_prep.synthetic_tasks import UniterSyntheticVe
from data_prep.synthetic_tasks import UniterSyntheticVqa
from data_prep.uniter_db import UniterImgDb
from data_prep.uniter_db import UniterTxtDb

__all__ = ["UniterButdImages", "UniterCocoCaptions", "UniterVqa",
           "UniterSyntheticImages", "UniterSyntheticText",
           "UniterSyntheticVqa", "UniterSyntheticVe", "UniterSyntheticNlvr2",
           "UniterImgDb", "UniterTxtDb", "UniterSnliVe", "UniterNlvr2",
           "UniterKarpathyCaptions"]
