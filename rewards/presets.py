"""Named reward presets.

The SegCompass paper (supplementary B.3) and its released code disagree on the format
downgrade rule and on how a multi-object match is averaged. Both are kept as named presets
so a run's config says which reward it trained on; ``"paper"`` is the default. A preset is
plain data; ``format.py`` and ``masks.py`` own the behaviour behind each variant name.
"""

from __future__ import annotations

from dataclasses import dataclass

from rewards.validate import reward_weights

# Behaviours a preset can pick; adding one means implementing it in format.py / masks.py.
FORMAT_VARIANTS = ("paper", "segcompass-code")
DIVISORS = ("matched", "max")  # mean over min(K', G) matched pairs | matched sum / max(K', G)

DEFAULT_PRESET = "paper"


@dataclass(frozen=True)
class RewardPreset:
    """One reward definition: format rule, multi-object averaging, (format, mask) weights."""

    name: str
    format_variant: str
    divisor: str
    weights: tuple[float, float] = (0.3, 0.7)
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"preset name must be a non-empty str, got {self.name!r}")
        if self.format_variant not in FORMAT_VARIANTS:
            raise ValueError(
                f"format_variant must be one of {FORMAT_VARIANTS}, got {self.format_variant!r}"
            )
        if self.divisor not in DIVISORS:
            raise ValueError(f"divisor must be one of {DIVISORS}, got {self.divisor!r}")
        object.__setattr__(self, "weights", reward_weights(self.weights))


_REGISTRY: dict[str, RewardPreset] = {}


def register_preset(preset: RewardPreset) -> RewardPreset:
    """Add ``preset`` to the registry; a name can be registered once."""
    if not isinstance(preset, RewardPreset):
        raise ValueError(f"preset must be a RewardPreset, got {type(preset).__name__}")
    if preset.name in _REGISTRY:
        raise ValueError(f"reward preset {preset.name!r} is already registered")
    _REGISTRY[preset.name] = preset
    return preset


def get_preset(name: str) -> RewardPreset:
    """The preset called ``name``; an unknown name raises ValueError listing the known ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown reward preset {name!r}; known presets: {known}") from None


def preset_names() -> tuple[str, ...]:
    """Registered preset names, sorted."""
    return tuple(sorted(_REGISTRY))


register_preset(
    RewardPreset(
        name="paper",
        format_variant="paper",
        divisor="matched",
        description="SegCompass supplementary B.3: text after the token downgrades the "
        "format; multi-object score is the mean IoU over the Hungarian-matched pairs.",
    )
)
register_preset(
    RewardPreset(
        name="segcompass-code",
        format_variant="segcompass-code",
        divisor="max",
        description="Released SegCompass code (rseg_cot.py, scots.py): more than 10 words "
        "between </think> and the token downgrade the format, text after it is not "
        "checked; the matched IoU sum is divided by max(K', G).",
    )
)
