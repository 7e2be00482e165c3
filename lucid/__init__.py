"""lucid: instance normalization for JAX.

The pure functional API lives in :mod:`lucid.nn.functional`; on top of it,
:class:`Tensor` (an eager array with a small autograd tape), the PyTorch-shaped
modules of :mod:`lucid.nn`, and safe checkpoint files (:func:`save`/:func:`load`).
"""

from . import nn as nn
from ._io import load as load
from ._io import save as save
from ._tensor import Tensor as Tensor
from ._tensor import no_grad as no_grad

__version__ = "0.1.0"
