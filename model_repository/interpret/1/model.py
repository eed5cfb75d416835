from engine.triton_models import InterpretModel as TritonPythonModel  # noqa: F401
