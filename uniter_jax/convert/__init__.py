"""Conversion between official UNITER PyTorch checkpoints and Flax.

CLI: `python -m uniter_jax.convert {to-flax,to-torch,bert-to-uniter} ...`
(see `python -m uniter_jax.convert --help`). Starting a model from another
head's checkpoint (state_dict, converted dir or training workdir):
`load_init_params` (see `uniter_jax.convert.init`).
"""

from uniter_jax.convert.core import (
    ConversionError, bert_to_uniter, check_state_dict, expected_torch_shapes,
    export_dir, flax_to_torch, infer_model_config, infer_task,
    load_checkpoint, load_flax, place_params, read_export_vocab,
    read_state_dict, save_flax, scan_params, torch_to_flax, unscan_params,
    write_state_dict)
from uniter_jax.convert.init import (
    InitSource, load_init_params, read_init_source)

__all__ = [
    "ConversionError", "InitSource", "bert_to_uniter", "check_state_dict",
    "expected_torch_shapes", "export_dir", "flax_to_torch",
    "infer_model_config", "infer_task", "load_checkpoint", "load_flax",
    "load_init_params", "place_params", "read_export_vocab", "read_init_source",
    "read_state_dict",
    "save_flax", "scan_params", "torch_to_flax", "unscan_params",
    "write_state_dict",
]
