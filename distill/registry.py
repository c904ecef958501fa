"""One small registry for models, losses and datasets.

Why: every named thing (``student_tiny``, ``teacher_film_small``, ``kd``) is created from a string that comes
from a config file or a command line, so an unknown name must fail at once with the list of known names
instead of deep inside training.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, TypeVar

from distill.errors import UnknownNameError

F = TypeVar("F", bound=Callable[..., Any])


class Registry:
    """Maps names to factories.

    Example::

        MODELS = Registry("model")

        @MODELS.register("student_tiny")
        def student_tiny(**kw): ...

        MODELS.create("student_tiny", num_labels=10)
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: Dict[str, Callable[..., Any]] = {}

    def register(self, name: Optional[str] = None) -> Callable[[F], F]:
        """Decorator: register ``fn`` under ``name`` (default: the function's own name)."""

        def wrap(fn: F) -> F:
            key = name or fn.__name__
            if key in self._factories:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._factories[key] = fn
            return fn

        return wrap

    def get(self, name: str) -> Callable[..., Any]:
        """The factory registered as ``name``; unknown names raise with the known ones listed."""
        try:
            return self._factories[name]
        except KeyError:
            known = ", ".join(sorted(self._factories)) or "(none)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}") from None

    def create(self, name: str, **kwargs: Any) -> Any:
        """Build the thing registered as ``name`` with ``kwargs``."""
        return self.get(name)(**kwargs)

    def names(self) -> List[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories
