"""Model families behind one interface (:class:`VLMBackbone`): importing a family's module registers it."""
from .base import VLMBackbone, processed_image_tokens, register_backbone, supported_model_classes
from .chameleon import ChameleonBackbone, ChameleonImages
from .qwen_vl import QwenVLBackbone

__all__ = ["VLMBackbone", "QwenVLBackbone", "ChameleonBackbone", "ChameleonImages", "register_backbone",
           "supported_model_classes", "processed_image_tokens"]
