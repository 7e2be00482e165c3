"""Neural-network layers and their functional form."""

from . import functional as functional
