"""Names of the tensors that flow through the served ensemble (a contract; no torch needed to read it)."""

SEGMENTATION_INPUTS = ("image",)
SEGMENTATION_OUTPUTS = ("mask", "attention", "segmented_image")
FEATURE_INPUTS = ("segmented_image",)
FEATURE_OUTPUTS = ("features",)
HEAD_INPUTS = ("features",)
HEAD_OUTPUTS = ("probabilities", "feature_attention")
#: What the ``hybridcn_nas`` ensemble returns per field.
ENSEMBLE_OUTPUTS = ("probabilities", "feature_attention", "mask", "attention")
