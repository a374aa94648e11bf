"""`TokenizerLossConfig`: the `tokenizer_loss` config section, on its own so that config defaults
(`jaxgen.train.sections`) read it without importing the tokenizer objective (`jaxgen.train.tokenizer_task`), which
re-exports it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from jaxgen.train.losses.adversarial import D_LOSSES, G_LOSSES
from jaxgen.train.losses.reconstruction import l1_loss, l2_loss

REC_LOSSES = {"l1": l1_loss, "l2": l2_loss}


@dataclasses.dataclass(frozen=True)
class TokenizerLossConfig:
    """The `tokenizer_loss` config section."""

    rec_loss: str = "l1"  # "l1" | "l2"
    rec_weight: float = 1.0
    codebook_weight: float = 1.0  # x the quantizer's codebook + commitment loss
    perceptual_weight: float = 0.0  # LPIPS (VGG16); > 0 needs the weight file (docs/lpips.md)
    lpips_weights: str = ""  # "" = $JAXGEN_LPIPS_WEIGHTS or ~/.cache/jaxgen/lpips_vgg16.npz
    entropy_weight: float = 0.0  # per-sample minus batch entropy of softmax(code logits / temperature)
    entropy_temperature: float = 0.01
    disc_weight: float = 0.0  # 0 = no discriminator
    disc_start: int = 0  # the step from which the adversarial terms count (the discriminator trains from then on)
    disc_loss: str = "hinge"  # "hinge" | "non_saturating"
    gen_loss: str = "hinge"  # "hinge" | "non_saturating"
    adaptive_disc_weight: bool = True  # VQGAN's gradient-norm ratio at the decoder's last layer
    disc_ndf: int = 64
    disc_layers: int = 3
    disc_norm: str = "batch"  # "batch" | "group" | "none"
    disc_lr_ratio: float = 1.0  # discriminator lr = train lr x this (no weight decay)
    usage_window: int = 100  # steps over which codebook_usage counts a code as used

    def __post_init__(self):
        for name, value, allowed in (
            ("rec_loss", self.rec_loss, REC_LOSSES),
            ("disc_loss", self.disc_loss, D_LOSSES),
            ("gen_loss", self.gen_loss, G_LOSSES),
            ("disc_norm", self.disc_norm, ("batch", "group", "none")),
        ):
            if value not in allowed:
                raise ValueError(f"tokenizer_loss.{name}={value!r}: use one of {sorted(allowed)}")
        if self.usage_window < 1:
            raise ValueError(f"tokenizer_loss.usage_window={self.usage_window}: must be >= 1 step")

    @property
    def use_gan(self) -> bool:
        return self.disc_weight > 0

    @classmethod
    def from_section(cls, section: Mapping | None) -> TokenizerLossConfig:
        d = {} if section is None else (section.to_dict() if hasattr(section, "to_dict") else dict(section))
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"tokenizer_loss: unknown fields {unknown}")
        return cls(**d)
