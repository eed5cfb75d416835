"""Names of the tensors that flow through the served ensemble (a contract; no torch needed to read it)."""

SEGMENTATION_INPUTS = ("image",)
SEGMENTATION_OUTPUTS = ("mask", "attention", "segmented_image")
FEATURE_INPUTS = ("segmented_image",)
FEATURE_OUTPUTS = ("features",)
HEAD_INPUTS = ("features",)
HEAD_OUTPUTS = ("probabilities", "feature_attention")
OOD_INPUTS = ("features",)
#: The out-of-distribution step (present when the repository was fitted with ``hybridcn ood``).
OOD_OUTPUTS = ("ood_score",)
#: What the ``hybridcn_nas`` ensemble returns per field (plus ``ood_score`` when it has the ``ood`` step).
ENSEMBLE_OUTPUTS = ("probabilities", "feature_attention", "mask", "attention")
