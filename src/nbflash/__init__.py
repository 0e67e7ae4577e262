"""nbflash: exact FlashAttention for CuPy and Numba."""

from . import device  # first: chooses GPU or simulator before numba.cuda loads
from . import reference
from .api import attention, forward_spec
from .api_varlen import attention_varlen, forward_spec_varlen
from .spec import ForwardSpec

__version__ = "0.1.0"
SIMULATOR = device.SIMULATOR

__all__ = ["attention", "forward_spec", "reference", "ForwardSpec", "SIMULATOR", "__version__"]
__all__ += ["attention_varlen", "forward_spec_varlen"]
