"""The optimizer and scheduler `initialize` returns: proxies that stay valid across switches.

Each forwards every attribute to the current engine's object, whatever engine that is now (a
switch builds a new one); one function call of overhead per access.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class _Proxy:
    """Forwards every attribute to what `_tw_target()` returns now."""

    def __init__(self, target: Callable[[], Any]) -> None:
        object.__setattr__(self, "_tw_target", target)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tw_target(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._tw_target(), name, value)

    def __repr__(self) -> str:
        return f"<trainwarden {type(self).__name__} for {self._tw_target()!r}>"


class OptimizerProxy(_Proxy):
    """The current engine's optimizer (DeepSpeed's wrapper), whatever engine that is now."""

    def step(self, *args: Any, **kwargs: Any) -> Any:
        return self._tw_target().step(*args, **kwargs)

    def zero_grad(self, *args: Any, **kwargs: Any) -> Any:
        return self._tw_target().zero_grad(*args, **kwargs)

    def state_dict(self) -> Any:
        return self._tw_target().state_dict()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._tw_target().param_groups


class SchedulerProxy(_Proxy):
    """The current engine's LR scheduler."""

    def step(self, *args: Any, **kwargs: Any) -> Any:
        return self._tw_target().step(*args, **kwargs)

    def get_last_lr(self) -> Any:
        return self._tw_target().get_last_lr()

    def state_dict(self) -> Any:
        return self._tw_target().state_dict()

    def load_state_dict(self, state: Any) -> Any:
        return self._tw_target().load_state_dict(state)


__all__ = ["OptimizerProxy", "SchedulerProxy"]
