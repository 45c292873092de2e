"""AdaLoRA (Zhang et al., ICLR 2023) and LoRA adapters for any PyTorch model.

Torch, numpy and safetensors only; ``adalora.hf`` (transformers) is imported on demand.
"""
__version__ = "0.1.0"

from . import schedule
from . import accounting
from .allocator import AllocationRecord, Allocator, BudgetRecord, RankAllocator
from .config import AdapterConfig, ScheduleConfig, ScoreConfig
from .elalora import ElaLoRAAllocator, ElaLoRAConfig
from .eva import EVAAllocator
from .importance import ImportanceScorer, triplet_scores
from .inject import (adapter_parameters, adapter_shapes, count_parameters, find_adapters, inject,
                     mark_only_adapters_trainable, merge, set_fuse, unmerge)
from .io import export_lora, load_adapters, read_adapters, save_adapters
from .layers import AdapterLayer, LoRALinear, SVDLinear
from .named import active_adapter, add_adapter, adapter_names, delete_adapter, set_adapter, use_adapter
from .peft_io import load_peft, save_peft
from .quant import NF4Linear, NF4Tensor, dequantize, quantize_model, quantize_nf4
from .regularizer import add_orthogonality_grads_, orthogonality_grad_, orthogonality_grads, orthogonality_penalty
from .sora import SoRAAllocator, SoRAConfig
from .truncate import TruncateAllocator

__all__ = [
    "AdapterConfig", "ScheduleConfig", "ScoreConfig",
    "AdapterLayer", "SVDLinear", "LoRALinear",
    "inject", "find_adapters", "adapter_parameters", "adapter_shapes", "count_parameters",
    "mark_only_adapters_trainable", "merge", "unmerge", "set_fuse",
    "orthogonality_penalty", "orthogonality_grad_", "orthogonality_grads", "add_orthogonality_grads_",
    "ImportanceScorer", "triplet_scores",
    "RankAllocator", "AllocationRecord", "schedule",
    "Allocator", "BudgetRecord", "accounting", "SoRAAllocator", "SoRAConfig", "ElaLoRAAllocator",
    "ElaLoRAConfig", "EVAAllocator", "TruncateAllocator",
    "save_adapters", "load_adapters", "read_adapters", "export_lora", "save_peft", "load_peft",
    "add_adapter", "set_adapter", "use_adapter", "delete_adapter", "adapter_names", "active_adapter",
    "NF4Linear", "NF4Tensor", "quantize_nf4", "dequantize", "quantize_model",
]
