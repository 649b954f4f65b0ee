"""fastdense: dense-reward preference alignment for text-to-image diffusion models.

The math contract lives in DESIGN.md §1; heavy modules (diffusers, deepspeed)
are imported lazily by the modules that need them, never here.
"""

__version__ = "0.1.0"
