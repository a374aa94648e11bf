"""Block-sparse attention: Pallas kernels (GPU Triton lowering here, TPU in kernel_tpu), masks, reference.

from pallas_kernels.block_sparse_attention import block_sparse_attention, BlockSizes, mask
out = block_sparse_attention(q, k, v, mask.causal(L))
"""

from pallas_kernels.block_sparse_attention import mask
from pallas_kernels.block_sparse_attention.mask import BlockLayout, Mask, block_layout, density
from pallas_kernels.block_sparse_attention.ops import BlockSizes, block_sparse_attention
from pallas_kernels.block_sparse_attention.reference import attention_reference

__all__ = [
    "BlockLayout",
    "BlockSizes",
    "Mask",
    "attention_reference",
    "block_layout",
    "block_sparse_attention",
    "density",
    "mask",
]
