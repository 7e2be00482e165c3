"""Neural-network layers and their functional form."""

from . import functional as functional
from ._layers import InstanceNorm1d as InstanceNorm1d
from ._layers import InstanceNorm2d as InstanceNorm2d
from ._layers import InstanceNorm3d as InstanceNorm3d
from ._module import Module as Module
from ._module import Parameter as Parameter
