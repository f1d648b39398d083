"""Tasks: the training objectives, one registry (`TASKS`).

`base` holds the protocol (`Task`, `register_task`, `make_task`);
`pretrain` the five pretraining objectives (mlm, mrfr, mrc, mrckl, itm);
`masking` their per-example ops and `losses` their array-level losses. The
word-region alignment solvers live in `uniter_jax.ot`. Downstream tasks
(VQA, SNLI-VE, NLVR2, retrieval, referring expressions, VCR) arrive as
modules beside `pretrain`.
"""
from uniter_jax.tasks import pretrain  # registers the pretraining tasks
from uniter_jax.tasks import itr  # image-text retrieval
from uniter_jax.tasks import nlvr2  # NLVR2 (paired, triplet, paired-attn)
from uniter_jax.tasks import vqa  # VQA and SNLI-VE
from uniter_jax.tasks.base import get_task_class
from uniter_jax.tasks.base import make_task
from uniter_jax.tasks.base import make_tasks
from uniter_jax.tasks.base import register_task
from uniter_jax.tasks.base import Task
from uniter_jax.tasks.base import TASKS

__all__ = ["TASKS", "Task", "get_task_class", "make_task", "make_tasks",
           "itr", "nlvr2", "pretrain", "register_task", "vqa"]
