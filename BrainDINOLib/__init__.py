"""BrainDINO engine: brain-MRI volumes in, frozen self-supervised ViT features out, and the maps and heads
built on them. Pure Python (torch, timm, SimpleITK); imports nothing from Slicer or Qt."""
from .architecture import Architecture
from .cache import FeatureCache
from .checkpoints import Checkpoint, ModelCard, read_checkpoint
from .embedding import embed_volume
from .encoder import Encoder, Tokens, load_encoder, select_device
from .errors import BrainDINOError, CancelledError
from .features import VolumeFeatures
from .slices import PreprocessConfig, SliceGeometry, SliceStack
from .volume import Geometry, Volume, read_volume, write_volume

__version__ = "0.1.0"

__all__ = [
    "Architecture", "BrainDINOError", "CancelledError", "Checkpoint", "Encoder", "FeatureCache", "Geometry",
    "ModelCard", "PreprocessConfig", "SliceGeometry", "SliceStack", "Tokens", "Volume", "VolumeFeatures",
    "embed_volume", "load_encoder", "read_checkpoint", "read_volume", "select_device", "write_volume",
]
