"""Export: torch -> ONNX model bundles. Import submodules explicitly; this package stays torch-free on import."""
