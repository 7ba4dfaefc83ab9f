"""torch -> ONNX export, model bundles, the registry and its storage. Imports no bentoml."""
