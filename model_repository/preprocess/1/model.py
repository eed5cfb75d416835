from engine.triton_models import PreprocessModel as TritonPythonModel  # noqa: F401
