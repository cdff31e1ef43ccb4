"""modeling_dclip: DCLIP (Distill CLIP) for Hugging Face transformers.

Importing the package registers the DCLIP configurations, models and processor with transformers' Auto classes
(`AutoConfig`, `AutoModel`, `AutoProcessor`), and marks them so that saved checkpoints carry their code for
`trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModel, AutoProcessor

from .configuration_dclip import DCLIPConfig, DCLIPTeacherConfig
from .modeling_dclip import (
    DCLIPModel,
    DCLIPOutput,
    DCLIPPreTrainedModel,
    DCLIPTeacherModel,
    DCLIPTeacherOutput,
)
from .processing_dclip import DCLIPProcessor
from .towers import EMBEDDED_TEXT, EMBEDDED_VISION

__version__ = "0.1.0"

AutoConfig.register(DCLIPConfig.model_type, DCLIPConfig, exist_ok=True)
AutoConfig.register(DCLIPTeacherConfig.model_type, DCLIPTeacherConfig, exist_ok=True)
AutoModel.register(DCLIPConfig, DCLIPModel, exist_ok=True)
AutoModel.register(DCLIPTeacherConfig, DCLIPTeacherModel, exist_ok=True)
AutoProcessor.register(DCLIPConfig, DCLIPProcessor, exist_ok=True)
AutoProcessor.register(DCLIPTeacherConfig, DCLIPProcessor, exist_ok=True)

DCLIPConfig.register_for_auto_class()
DCLIPTeacherConfig.register_for_auto_class()
DCLIPModel.register_for_auto_class("AutoModel")
DCLIPTeacherModel.register_for_auto_class("AutoModel")
DCLIPProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "EMBEDDED_TEXT",
    "EMBEDDED_VISION",
    "DCLIPConfig",
    "DCLIPModel",
    "DCLIPOutput",
    "DCLIPPreTrainedModel",
    "DCLIPProcessor",
    "DCLIPTeacherConfig",
    "DCLIPTeacherModel",
    "DCLIPTeacherOutput",
]
