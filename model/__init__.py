"""The LiveAct DiT and its configuration, ops seam and checkpoint I/O."""
from .config import LiveActConfig, PRESETS, VideoGeometry, get_preset
from .dit import ChunkLayout, LiveActDiT
from .ops import LayerKV, ReferenceOps
from .rope import Rope3D

__all__ = ["LiveActConfig", "PRESETS", "VideoGeometry", "get_preset", "ChunkLayout", "LiveActDiT",
           "LayerKV", "ReferenceOps", "Rope3D"]
