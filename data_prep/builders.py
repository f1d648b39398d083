"""All data_prep TFDS builders, for `tfds build --imports data_prep.builders`.

| tfds name                 | source                                  |
|---------------------------|-----------------------------------------|
| uniter_synthetic_images   | synthetic corpus, image store           |
| uniter_synthetic_text     | synthetic corpus, captions (train, val) |
| uniter_img_db             | official img_db LMDB (manual_dir)       |
| uniter_txt_db             | official txt_db LMDB (manual_dir)       |
| uniter_butd_images        | BUTD / LXMERT TSV features (manual_dir) |
| uniter_coco_captions      | COCO captions JSON + vocab.txt          |
| uniter_vqa                | VQA v2 questions/annotations + vocab    |
"""
from data_prep.butd import UniterButdImages
from data_prep.butd import UniterCocoCaptions
from data_prep.butd import UniterVqa
from data_prep.synthetic import UniterSyntheticImages
from data_prep.synthetic import UniterSyntheticText
from data_prep.uniter_db import UniterImgDb
from data_prep.uniter_db import UniterTxtDb

__all__ = ["UniterButdImages", "UniterCocoCaptions", "UniterVqa",
           "UniterSyntheticImages", "UniterSyntheticText", "UniterImgDb",
           "UniterTxtDb"]
