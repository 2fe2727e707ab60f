"""TSCM networks: building blocks, backbones (one registry) and the teacher / student / baseline nets."""

from tscm_ros.describe.models.backbones import BACKBONES, Backbone, build_backbone
from tscm_ros.describe.models.blocks import GeM, InterTransformer, NetVLADLoupe, l2_normalize
from tscm_ros.describe.models.nets import (
    GeMNet,
    OutputProjection,
    StudentNet,
    TeacherNet,
    build_model,
    freeze,
    prepare_for_inference,
)

__all__ = [
    "BACKBONES",
    "Backbone",
    "GeM",
    "GeMNet",
    "InterTransformer",
    "NetVLADLoupe",
    "OutputProjection",
    "StudentNet",
    "TeacherNet",
    "build_backbone",
    "build_model",
    "freeze",
    "l2_normalize",
    "prepare_for_inference",
]
