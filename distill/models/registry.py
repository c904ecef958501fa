"""The model registry: every family file registers its variants here."""
from distill.registry import Registry

MODELS = Registry("model")
