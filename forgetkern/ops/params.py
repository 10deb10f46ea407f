"""Frozen option bundles passed to the autograd Functions, validated once."""
from __future__ import annotations

import math
from dataclasses import dataclass

DIRECTIONS = ("forward", "reverse")
REDUCTIONS = ("mean", "sum", "none")

# Per-row statistics that a TMKL forward saves for its backward, as columns of an (N, 4) tensor
# in the accumulation dtype (float32, or float64 for float64 inputs). Every backend uses this layout.
STAT_LSE_Z = 0  # LSE_{v != y}(z_v / T)   (over all v when mask_target=False)
STAT_LSE_B = 1  # LSE_{v != y}(b_v / T)
STAT_LSE_CE = 2  # LSE_v(z_v), the cross-entropy normalizer (temperature never applies)
STAT_KL = 3  # the row's KL (unscaled: no T^2, no kl_weight)
NUM_STATS = 4


@dataclass(frozen=True)
class TMKLParams:
    """Non-tensor options of one TMKL call (see ``forgetkern.tmkl_loss`` for their meaning).

    The per-token loss is ``ce_weight * CE + kl_weight * temperature**2 * KL``.
    """

    kl_weight: float = 1.0
    ce_weight: float = 1.0
    temperature: float = 1.0
    direction: str = "forward"
    mask_target: bool = True
    ignore_index: int = -100
    inplace_backward: bool = False
    backend: str = "reference"

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        for name in ("kl_weight", "ce_weight", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
            object.__setattr__(self, name, float(value))
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")

    @property
    def forward_kl(self) -> bool:
        return self.direction == "forward"

    @property
    def kl_scale(self) -> float:
        """Weight of the raw KL in the token loss: ``kl_weight * T**2``."""
        return self.kl_weight * self.temperature**2

    @property
    def separate_ce(self) -> bool:
        """CE needs its own log-sum-exp (temperature != 1); otherwise it reuses the KL statistics."""
        return self.temperature != 1.0
