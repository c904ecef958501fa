"""mmkd's gRPC inference server: model bundles on ONNX Runtime behind a dynamic batcher.

Imports onnxruntime, numpy, pillow, tokenizers, grpcio and `export.bundle` only — never torch or transformers
(a test proves it in a fresh interpreter). Heavy modules are imported by the submodules that need them.
"""

__version__ = "0.1.0"
