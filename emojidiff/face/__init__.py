"""Face analysis: detection/alignment, identity encoders, expression analysers, by registry name.

Real-photo backends registered here:
- aligners: "dlib-chip", "dlib-ffhq", "arcface-112";
- identity encoders: "dlib", "insightface-arcface", "arcface-torch";
- expression analysers: "dlib-lms", "mediapipe-blendshapes" (needs the optional mediapipe extra,
  imported only when built).

World backends (small CNNs trained on the embedded world, packaged weights in weights/): the
training pair "world-id" (identity encoder) and "world-expr" (expression regressor), and the
evaluation pair "world-id-eval" and "world-expr-eval", trained apart to score the tables.
"""

from emojidiff.face import (  # noqa: F401  (imported so the backends register)
    arcface_torch,
    dlib_backend,
    insightface_backend,
    landmark_expression,
    mediapipe_backend,
    world_landmarks,
    world_models,
)
from emojidiff.face.base import (
    EXPRESSION_ANALYSERS,
    FACE_ALIGNERS,
    IDENTITY_ENCODERS,
    AlignedFace,
    ExpressionAnalyser,
    FaceAligner,
    FaceDetection,
    IdentityEncoder,
    build_expression_analyser,
    build_face_aligner,
    build_identity_encoder,
    stack_crops,
    warp_faces,
    warp_image,
)
from emojidiff.face.landmark_expression import LMS_NAMES, lms_descriptor

__all__ = [
    "EXPRESSION_ANALYSERS",
    "FACE_ALIGNERS",
    "IDENTITY_ENCODERS",
    "LMS_NAMES",
    "AlignedFace",
    "ExpressionAnalyser",
    "FaceAligner",
    "FaceDetection",
    "IdentityEncoder",
    "build_expression_analyser",
    "build_face_aligner",
    "build_identity_encoder",
    "lms_descriptor",
    "stack_crops",
    "warp_faces",
    "warp_image",
]
