"""PyTorch reference of the official UNITER model, for tests only.

See :mod:`torch_ref.uniter_ref` (modules with the official state_dict keys)
and :mod:`torch_ref.packing` (static layout <-> official packed batches).
"""

from .packing import (gather_index, lengths_from_static, pack_static_sequence,
                      packed_to_static, random_static_batch, static_to_packed,
                      static_valid_mask)
from .uniter_ref import (IMG_DIM, IMG_LABEL_DIM, AttentionPool, GELU,
                         RegionClassification, RegionFeatureRegression,
                         UniterConfig, UniterForImageTextRetrieval,
                         UniterForNlvr2Paired, UniterForNlvr2PairedAttn,
                         UniterForNlvr2Triplet, UniterForPretraining,
                         UniterForPretrainingForVCR,
                         UniterForReferringExpressionComprehension,
                         UniterForVisualCommonsenseReasoning,
                         UniterForVisualEntailment,
                         UniterForVisualQuestionAnswering, UniterModel,
                         UniterPreTrainedModel, base_config, gelu,
                         large_config, tiny_config)
