"""Networks of HybridCN-NAS: Attention U-Net, ConvNeXt + NASNet-A features, MHSA head; the served stages."""

from models import attention_unet, hybrid_features, mhsa_head  # noqa: F401  (register the builders)
from models._registry import create_model, list_models, register_model
from models.stages import FeatureStage, HeadStage, SegmentationStage, segmentation_stage

__all__ = ["FeatureStage", "HeadStage", "SegmentationStage", "create_model", "list_models", "register_model",
           "segmentation_stage"]
