"""Named model configs: `tiny` (tests), `small` (paper default), `base_plus`, `large`.

Field values are the constructor arguments of the sam2 modules and of the DINOv2 ViT,
taken from the official FSSAM sam2 configs (SAM 2 at 512 px) and DINOv2 ViT-B/14 at 560 px.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from fssam.errors import ConfigError


@dataclass(frozen=True)
class HieraConfig:
    embed_dim: int = 96
    num_heads: int = 1
    stages: tuple[int, ...] = (1, 2, 11, 2)
    global_att_blocks: tuple[int, ...] = (7, 10, 13)
    window_pos_embed_bkg_spatial_size: tuple[int, int] = (7, 7)
    window_spec: tuple[int, ...] = (8, 4, 14, 7)
    backbone_channel_list: tuple[int, ...] = (768, 384, 192, 96)


@dataclass(frozen=True)
class DinoConfig:
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = 14
    image_size: int = 560  # the official code resizes the 512 input to 560 -> 40x40 grid
    mlp_ratio: float = 4.0
    checkpoint_image_size: int = 518  # DINOv2 hub checkpoints carry a 37x37 pos_embed


@dataclass(frozen=True)
class FSSAMConfig:
    name: str
    image_size: int = 512
    hidden_dim: int = 256  # SAM 2 d_model
    memory_dim: int = 64  # memory encoder out_dim
    memory_attention_layers: int = 4
    memory_attention_ffn: int = 2048
    memory_attention_heads: int = 1
    num_maskmem: int = 7
    hiera: HieraConfig = field(default_factory=HieraConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    num_refine: int = 3
    refine_version: str = "v1"  # official default; "v2" min-max normalises the refine weight
    scma_mode: str = "official"  # "official": the released 5-shot code (default); "paper": every shot calibrates

    @property
    def feature_size(self) -> int:
        """Side of the stride-16 SAM 2 feature grid (32 at 512 px)."""
        return self.image_size // 16

    @property
    def dino_grid(self) -> int:
        return self.dino.image_size // self.dino.patch_size

    def to_dict(self) -> dict:
        return asdict(self)


_SAM2_SMALL = HieraConfig()
_SAM2_BASE_PLUS = HieraConfig(
    embed_dim=112,
    num_heads=2,
    stages=(2, 3, 16, 3),
    global_att_blocks=(12, 16, 20),
    window_pos_embed_bkg_spatial_size=(14, 14),
    backbone_channel_list=(896, 448, 224, 112),
)
_SAM2_LARGE = HieraConfig(
    embed_dim=144,
    num_heads=2,
    stages=(2, 6, 36, 4),
    global_att_blocks=(23, 33, 43),
    window_pos_embed_bkg_spatial_size=(7, 7),
    window_spec=(8, 4, 16, 8),
    backbone_channel_list=(1152, 576, 288, 144),
)

CONFIGS: dict[str, FSSAMConfig] = {
    # Seconds on a CPU: every module has the real structure, only the widths are tiny.
    "tiny": FSSAMConfig(
        name="tiny",
        image_size=64,
        hidden_dim=32,
        memory_dim=8,
        memory_attention_layers=2,
        memory_attention_ffn=64,
        num_maskmem=7,
        hiera=HieraConfig(
            embed_dim=8,
            num_heads=1,
            stages=(1, 1, 2, 1),
            global_att_blocks=(3,),
            window_pos_embed_bkg_spatial_size=(2, 2),
            window_spec=(4, 4, 2, 2),
            backbone_channel_list=(64, 32, 16, 8),
        ),
        dino=DinoConfig(
            embed_dim=24, depth=2, num_heads=2, patch_size=14, image_size=70, checkpoint_image_size=56
        ),
        num_refine=2,
    ),
    "small": FSSAMConfig(name="small", hiera=_SAM2_SMALL),
    "base_plus": FSSAMConfig(name="base_plus", hiera=_SAM2_BASE_PLUS),
    "large": FSSAMConfig(name="large", hiera=_SAM2_LARGE),
}

REFINE_VERSIONS = ("v1", "v2")
SCMA_MODES = ("paper", "official")


def get_config(config: str | FSSAMConfig, **overrides) -> FSSAMConfig:
    """A named config (or a given one) with `overrides` applied and checked."""
    if isinstance(config, FSSAMConfig):
        base = config
    elif config in CONFIGS:
        base = CONFIGS[config]
    else:
        raise ConfigError(f"unknown config {config!r}: expected one of {', '.join(CONFIGS)}")
    overrides = {key: value for key, value in overrides.items() if value is not None}
    unknown = set(overrides) - set(FSSAMConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown config option(s) {sorted(unknown)}")
    cfg = replace(base, **overrides)
    if cfg.refine_version not in REFINE_VERSIONS:
        raise ConfigError(f"refine_version {cfg.refine_version!r}: expected one of {REFINE_VERSIONS}")
    if cfg.scma_mode not in SCMA_MODES:
        raise ConfigError(f"scma_mode {cfg.scma_mode!r}: expected one of {SCMA_MODES}")
    if cfg.num_refine < 0:
        raise ConfigError(f"num_refine must be >= 0, got {cfg.num_refine}")
    if cfg.image_size % 32:
        raise ConfigError(f"image_size must be a multiple of 32, got {cfg.image_size}")
    if cfg.hidden_dim % cfg.memory_dim:
        raise ConfigError("hidden_dim must be a multiple of memory_dim (object pointers are split)")
    return cfg
