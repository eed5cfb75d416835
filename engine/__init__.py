"""The served model, used the same way by the gateway, batch runs, the CLI and evaluation.

- :mod:`engine.model`: the model in a repository, from its typed manifest;
- :mod:`engine.field`: prepare a field on the CPU, interpret the ensemble's answer into a ``FieldResult``;
- :mod:`engine.client`: Triton gRPC clients (async for the gateway, futures for batch runs);
- :mod:`engine.triton_server`: the embedded ``tritonserver`` and readiness waits;
- :mod:`engine.overlays`: images of a field and its maps for people;
- :mod:`engine.evaluate`: scores of the served model on a labelled folder.

It sits above ``export`` (it reads what export writes) and below ``batch`` and ``gateway``.
"""
