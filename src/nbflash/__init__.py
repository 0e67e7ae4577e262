"""nbflash: exact FlashAttention for CuPy and Numba."""

from . import device  # first: chooses GPU or simulator before numba.cuda loads
from . import reference
from .api import attention, forward_spec
from .api_varlen import attention_varlen, attention_varlen_backward, forward_spec_varlen
from .api_backward import attention_backward, attention_vjp, backward_spec
from .api_kvcache import attention_with_kvcache, kvcache_spec
from .plans import AttentionGraph, AttentionPlan, plan
from .spec import BackwardSpec, DecodeSpec, ForwardSpec

__version__ = "0.1.0"
SIMULATOR = device.SIMULATOR

__all__ = [
    "attention", "forward_spec", "plan", "AttentionPlan", "reference", "ForwardSpec", "SIMULATOR", "__version__",
    "attention_backward", "attention_vjp", "backward_spec", "BackwardSpec",
    "attention_with_kvcache", "kvcache_spec", "DecodeSpec",
]
__all__ += ["attention_varlen", "attention_varlen_backward", "forward_spec_varlen"]
__all__ += ["AttentionGraph"]
