"""lowrank_optax: memory-efficient low-rank training as composable optax transforms.

The library answers three questions per parameter leaf, each in its own
module: which leaves / matrix / rank (:mod:`lowrank_optax.policy`), which
basis and when (:mod:`lowrank_optax.projectors`), and what runs in the
subspace and what happens to the rest (:mod:`lowrank_optax.subspace`,
:mod:`lowrank_optax.residual`, :mod:`lowrank_optax.fisher`). Recipes in
:mod:`lowrank_optax.recipes` are complete optimizers like ``optax.adamw``.
"""

from lowrank_optax.apollo import apollo
from lowrank_optax.apollo import apollo_mini
from lowrank_optax.apollo import apollo_scaling
from lowrank_optax.fira import channel_ratio
from lowrank_optax.fira import fira
from lowrank_optax.fira import fira_residual
from lowrank_optax.fira import limit_norm_growth
from lowrank_optax.fira import NormGrowthState
from lowrank_optax.fira import scale_by_hf_bias_correction
from lowrank_optax.block import active_block_schedule
from lowrank_optax.block import active_blocks
from lowrank_optax.block import ActiveBlocksState
from lowrank_optax.dct_adamw import dct_adamw
from lowrank_optax.dct_adamw import DCTAdamWConfig
from lowrank_optax.fisher import NaturalFisherState
from lowrank_optax.fisher import scale_by_natural_fisher
from lowrank_optax.fisher import woodbury_fisher_solve
from lowrank_optax.mfac import MFACState, mfac_solve, scale_by_mfac
from lowrank_optax.osd import online_subspace_descent
from lowrank_optax.natural_galore import natural_galore
from lowrank_optax.q_galore import q_galore
from lowrank_optax.frugal import frugal
from lowrank_optax.frugal import frugal_project
from lowrank_optax.memory import LeafMemory
from lowrank_optax.memory import memory_report
from lowrank_optax.memory import MemoryReport
from lowrank_optax.policy import DEFAULT_EXCLUDE
from lowrank_optax.policy import LeafPlan
from lowrank_optax.policy import MatrixView
from lowrank_optax.policy import plan_leaves
from lowrank_optax.policy import PolicyWarning
from lowrank_optax import projectors
from lowrank_optax.compat import contrib_galore
from lowrank_optax.projectors import BasisState
from lowrank_optax.projectors import dct_matrix
from lowrank_optax.projectors import dct_select
from lowrank_optax.projectors import IndexState
from lowrank_optax.projectors import Projector
from lowrank_optax.projectors import TwoSidedBasisState
from lowrank_optax.projectors import TwoSidedIndexState
from lowrank_optax.quantization import apply_updates_int8
from lowrank_optax.quantization import BlockwiseQuantized
from lowrank_optax.quantization import create_dynamic_map
from lowrank_optax.quantization import dequantize_blockwise
from lowrank_optax.quantization import dequantize_int4
from lowrank_optax.quantization import dequantize_int8
from lowrank_optax.quantization import QuantizedArray
from lowrank_optax.quantization import quantize_blockwise
from lowrank_optax.quantization import quantize_int4
from lowrank_optax.quantization import quantize_int8
from lowrank_optax.quantization import scale_by_adam_8bit
from lowrank_optax.quantization import ScaleByAdam8bitState
from lowrank_optax.quantization import stochastic_round_int8
from lowrank_optax.quantization import stochastic_round_to_bf16
from lowrank_optax.recipes import galore
from lowrank_optax.recipes import skip_nonfinite_steps
from lowrank_optax.reset import is_moment_state
from lowrank_optax.reset import quick_recovery_schedule
from lowrank_optax.reset import refactorize
from lowrank_optax.reset import reset_every
from lowrank_optax.reset import reset_moment_states
from lowrank_optax.reset import ResetEveryState
from lowrank_optax.residual import Closer
from lowrank_optax.residual import CloseContext
from lowrank_optax.residual import sgd_residual
from lowrank_optax.residual import sign_residual
from lowrank_optax.subspace import back_project
from lowrank_optax.sharding import state_shardings
from lowrank_optax.subspace import chain
from lowrank_optax.subspace import galore_project
from lowrank_optax.subspace import ProjectionConfig
from lowrank_optax.subspace import ProjectionElement
from lowrank_optax.subspace import reset_moments
from lowrank_optax.subspace import subspace
from lowrank_optax.subspace import SubspaceOnlyTransformation
from lowrank_optax.subspace import SubspaceState
from lowrank_optax.subspace import subspace_state
from lowrank_optax.transforms import decay_updated_weights
from lowrank_optax.transforms import scale_by_adam_hf
from lowrank_optax.transforms import zero_nonfinite_updates
from lowrank_optax.transforms import ZeroNonfiniteState

__all__ = [
    "active_block_schedule",
    "active_blocks",
    "ActiveBlocksState",
    "apollo",
    "apollo_mini",
    "apollo_scaling",
    "apply_updates_int8",
    "back_project",
    "BasisState",
    "BlockwiseQuantized",
    "chain",
    "channel_ratio",
    "CloseContext",
    "Closer",
    "contrib_galore",
    "create_dynamic_map",
    "dct_adamw",
    "dct_matrix",
    "dct_select",
    "DCTAdamWConfig",
    "decay_updated_weights",
    "DEFAULT_EXCLUDE",
    "dequantize_blockwise",
    "dequantize_int4",
    "dequantize_int8",
    "fira",
    "fira_residual",
    "frugal",
    "frugal_project",
    "galore",
    "galore_project",
    "IndexState",
    "is_moment_state",
    "LeafMemory",
    "LeafPlan",
    "limit_norm_growth",
    "MatrixView",
    "memory_report",
    "MemoryReport",
    "mfac_solve",
    "MFACState",
    "natural_galore",
    "NaturalFisherState",
    "NormGrowthState",
    "online_subspace_descent",
    "plan_leaves",
    "PolicyWarning",
    "ProjectionConfig",
    "ProjectionElement",
    "Projector",
    "q_galore",
    "quantize_blockwise",
    "quantize_int4",
    "quantize_int8",
    "QuantizedArray",
    "quick_recovery_schedule",
    "refactorize",
    "reset_every",
    "reset_moment_states",
    "reset_moments",
    "ResetEveryState",
    "scale_by_adam_8bit",
    "scale_by_adam_hf",
    "scale_by_hf_bias_correction",
    "scale_by_mfac",
    "scale_by_natural_fisher",
    "ScaleByAdam8bitState",
    "sgd_residual",
    "sign_residual",
    "skip_nonfinite_steps",
    "state_shardings",
    "stochastic_round_int8",
    "stochastic_round_to_bf16",
    "subspace",
    "subspace_state",
    "SubspaceOnlyTransformation",
    "SubspaceState",
    "TwoSidedBasisState",
    "TwoSidedIndexState",
    "woodbury_fisher_solve",
    "zero_nonfinite_updates",
    "ZeroNonfiniteState",
]

__version__ = "0.1.0"
