"""Hot loops of fastdense, each with a pure-torch reference beside it.

Shipped as ``fastdense.kernels``. Nothing here touches CUDA at import time.
"""
