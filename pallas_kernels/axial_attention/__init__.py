"""Axial attention (rows or columns of a 2D grid) as Pallas flash-attention kernels, forward and backward."""

from .ops import BlockSizes, axial_attention
from .reference import axial_attention_reference, canonical_axis

__all__ = ["BlockSizes", "axial_attention", "axial_attention_reference", "canonical_axis"]
