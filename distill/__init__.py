"""mmkd's distillation side: datasets, teacher and student models, KD losses, trainer, evaluation, `mmkd-distill`.

Kept import-light on purpose: importing `distill` pulls in neither torch nor transformers, so the command line
starts fast and `mmkd-distill data` runs without them. Import the submodules you need.
"""

__version__ = "0.1.0"
