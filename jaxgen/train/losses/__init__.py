"""Pure training losses for tokenizers (VQGAN-style): reconstruction, adversarial and entropy terms; the codebook
and commitment terms are computed by the quantizers themselves (`jaxgen.models.tokenizers.quantizers`).

Every function is a pure jnp function of arrays (no state, no randomness) that returns float32 scalars; weighting
and scheduling of the terms is the trainer's job.
"""

from jaxgen.train.losses.adversarial import (
    D_LOSSES,
    G_LOSSES,
    adaptive_weight,
    disc_factor,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
)
from jaxgen.train.losses.entropy import entropy_loss
from jaxgen.train.losses.reconstruction import l1_loss, l2_loss

__all__ = [
    "D_LOSSES",
    "G_LOSSES",
    "adaptive_weight",
    "disc_factor",
    "entropy_loss",
    "hinge_d_loss",
    "hinge_g_loss",
    "l1_loss",
    "l2_loss",
    "non_saturating_d_loss",
    "non_saturating_g_loss",
]
