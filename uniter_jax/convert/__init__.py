"""Conversion between official UNITER PyTorch checkpoints and Flax.

CLI: `python -m uniter_jax.convert {to-flax,to-torch,bert-to-uniter} ...`
(see `python -m uniter_jax.convert --help`).
"""

from uniter_jax.convert.core import (
    ConversionError, bert_to_uniter, check_state_dict, expected_torch_shapes,
    flax_to_torch, load_checkpoint, load_flax, read_state_dict, save_flax,
    scan_params, torch_to_flax, unscan_params, write_state_dict)

__all__ = [
    "ConversionError", "bert_to_uniter", "check_state_dict",
    "expected_torch_shapes", "flax_to_torch", "load_checkpoint", "load_flax",
    "read_state_dict", "save_flax", "scan_params", "torch_to_flax",
    "unscan_params", "write_state_dict",
]
