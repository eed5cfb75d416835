from export.triton_models import OnnxRuntimeModel as TritonPythonModel  # noqa: F401
