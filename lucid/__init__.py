"""lucid: instance normalization for JAX."""

from . import nn as nn

__version__ = "0.1.0"
