"""The engine switch: the engine a DeepSpeed handle drives now, and the move to another setting at a
step boundary with the training state exact, rolled back on failure, agreed by every rank.

A switch that needs a new engine captures the whole training state into one host-side fp32 copy
(adapters/deepspeed/state.py; in one CPU process, the old engine's own tensors, with no copy),
destroys the old engine and releases its memory, builds the new
one over the same module (adapters/deepspeed/build.py) and writes the state into it; if that
fails on any rank, every rank rebuilds the previous setting from the same copy (a rank on
another configuration would wait forever in a collective). A micro-batch change needs no new
engine (the accumulation steps follow, the global batch is kept); activation checkpointing
changes on the module (adapters/deepspeed/knobs.py). Costs: see the package docstring.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from trainwarden.adapters.core.agreement import agree
from trainwarden.adapters.deepspeed import state as ds_state
from trainwarden.adapters.deepspeed.build import Builder, destroy, lean_initialize
from trainwarden.adapters.deepspeed.config import ConfigError, Setting, resolve, setting_of
from trainwarden.adapters.deepspeed.errors import ReconfigureError, ReconfigureResult, SwitchFailed
from trainwarden.adapters.deepspeed.knobs import available_precisions
from trainwarden.adapters.deepspeed.memory import MemoryMeter, huge_pages_hint, release_memory
from trainwarden.adapters.deepspeed.module import clean_module, module_params
from trainwarden.controller.protocol import KNOB_ACTIVATION_CHECKPOINTING

if TYPE_CHECKING:
    from trainwarden.adapters.deepspeed.handle import DeepSpeedHandle

log = logging.getLogger("trainwarden")

#: Whether this process has looked at what transparent huge pages would buy its switches (its
#: first CPU switch does, and says it where they would buy something).
_huge_pages_checked = False

#: The Setting fields a switch reports as knobs, in the order reported.
_SETTING_KNOBS = ("zero_stage", "precision", "offload_optimizer", "offload_param", "micro_batch_size")


def changes_between(
    old: Setting, new: Setting, old_ckpt: bool | None, new_ckpt: bool | None
) -> tuple[tuple[str, Any, Any], ...]:
    """(knob, old, new) for every knob that differs between two configurations."""
    changes = [
        (k, getattr(old, k), getattr(new, k)) for k in _SETTING_KNOBS if getattr(old, k) != getattr(new, k)
    ]
    if old_ckpt != new_ckpt:
        changes.append((KNOB_ACTIVATION_CHECKPOINTING, old_ckpt, new_ckpt))
    return tuple(changes)


class EngineSwitch:
    """The current engine and its setting, and the switch between engines, for one handle.

    Holds the handle for what a switch touches beyond the engine: whether a backward is pending,
    the module's checkpointing, the agent's memory probe, and the step start an OOM retry goes
    back to."""

    def __init__(self, handle: DeepSpeedHandle, builder: Builder, engine: Any) -> None:
        self.handle = handle
        self.builder = builder
        #: The current DeepSpeed engine (None only inside a switch, between destroy and build).
        self.engine: Any = engine
        self.module: torch.nn.Module = engine.module
        self.params = module_params(engine.module)
        self.precisions = available_precisions()
        base = setting_of(builder.config, engine.dp_world_size)
        self.setting: Setting = replace(
            base,
            micro_batch_size=engine.train_micro_batch_size_per_gpu(),
            gradient_accumulation_steps=engine.gradient_accumulation_steps(),
            train_batch_size=engine.train_batch_size(),
        )
        device = engine.device if isinstance(engine.device, torch.device) else torch.device(engine.device)
        self.meter = MemoryMeter(device)
        #: Seconds per part of the rebuild under way (see ReconfigureResult.phases).
        self.phases: dict[str, float] = {}

    # ---- by hand or from a knob ---------------------------------------------------------------
    def reconfigure(
        self,
        zero_stage: int | None = None,
        precision: str | None = None,
        offload_optimizer: bool | None = None,
        offload_param: bool | None = None,
        micro_batch_size: int | None = None,
        activation_checkpointing: bool | None = None,
    ) -> ReconfigureResult:
        """`DeepSpeedHandle.reconfigure` (see there)."""
        h = self.handle
        if not h.at_step_boundary():
            raise ConfigError(
                "reconfigure runs only at a step boundary: after engine.step() completed an optimizer "
                f"step (micro-step {self.engine.micro_steps}, gradient accumulation "
                f"{self.engine.gradient_accumulation_steps()}, backward pending: {h._pending_backward})"
            )
        old = self.setting
        target, implied = resolve(
            old,
            zero_stage=zero_stage,
            precision=precision,
            offload_optimizer=offload_optimizer,
            offload_param=offload_param,
            micro_batch_size=micro_batch_size,
            world_size=self.engine.dp_world_size,
            precisions=self.precisions,
        )
        checkpointing = h.knobs.checkpointing
        old_ckpt = checkpointing.get()
        new_ckpt = old_ckpt
        if activation_checkpointing is not None:
            if old_ckpt is None:
                raise ConfigError(
                    "this model cannot switch activation checkpointing: it has neither "
                    "set_activation_checkpointing(bool) nor gradient_checkpointing_enable/disable"
                )
            if not isinstance(activation_checkpointing, bool):
                raise ConfigError(
                    f"activation_checkpointing must be true or false, got {activation_checkpointing!r}"
                )
            new_ckpt = activation_checkpointing
        changes = changes_between(old, target, old_ckpt, new_ckpt)
        meter = self.meter
        t0 = time.perf_counter()
        before = meter.start()
        step = int(self.engine.global_steps)
        if not changes:
            return ReconfigureResult(
                (), (), False, False, None, step, 0.0, meter.kind, before, before, before, 0
            )
        rebuild = any(k not in ("micro_batch_size", KNOB_ACTIVATION_CHECKPOINTING) for k, _, _ in changes)
        if rebuild and self.builder.cannot_rebuild:
            raise ConfigError(self.builder.cannot_rebuild)
        moved = 0
        error: str | None = None
        self.phases = {}
        if rebuild:
            moved, error = self.rebuild(old, target)
        elif target != old:
            self.set_batch(target)
        self.setting = old if error else target
        if error is None and new_ckpt != old_ckpt:
            assert new_ckpt is not None
            checkpointing.set(new_ckpt)
        if h.agent is not None:
            h.agent.probe.release()
        result = self.result(
            changes,
            tuple(implied),
            rebuilt=rebuild,
            error=error,
            step=step,
            t0=t0,
            before=before,
            moved=moved,
        )
        h.last_reconfigure = result
        if error is not None:
            log.warning("trainwarden: %s", result.describe())
            raise ReconfigureError(
                f"switch to {target.describe()} failed and was rolled back: {error}", result
            )
        log.info("trainwarden: %s", result.describe())
        global _huge_pages_checked
        if rebuild and meter.kind == "rss" and not _huge_pages_checked:
            # Once a process: the environment torch read and the kernel's mode do not change.
            _huge_pages_checked = True
            hint = huge_pages_hint(result.duration_s, moved)
            if hint is not None:
                log.info("trainwarden: %s", hint)
        h.oom.mark_step_start()
        return result

    def result(
        self,
        changes: tuple[tuple[str, Any, Any], ...],
        implied: tuple[str, ...],
        *,
        rebuilt: bool,
        error: str | None,
        step: int,
        t0: float,
        before: int,
        moved: int,
    ) -> ReconfigureResult:
        """What a switch begun at `t0` (perf_counter) with `before` bytes in use did, measured now."""
        meter = self.meter
        return ReconfigureResult(
            changes=changes,
            implied=implied,
            rebuilt=rebuilt,
            rolled_back=error is not None,
            error=error,
            step=step,
            duration_s=time.perf_counter() - t0,
            memory_kind=meter.kind,
            memory_before_bytes=before,
            memory_after_bytes=meter.now(),
            memory_peak_bytes=meter.peak(),
            bytes_moved=moved,
            phases=tuple(self.phases.items()),
        )

    # ---- without a new engine -----------------------------------------------------------------
    def set_batch(self, target: Setting) -> None:
        """Micro-batch and accumulation on the live engine, the global batch kept; no rebuild."""
        engine = self.engine
        engine.set_train_micro_batch_size(target.micro_batch_size)
        engine.set_train_batch_size(target.train_batch_size)
        if hasattr(engine.optimizer, "gradient_accumulation_steps"):
            engine.optimizer.gradient_accumulation_steps = target.gradient_accumulation_steps
        self._align_micro_steps(target.gradient_accumulation_steps)

    def _align_micro_steps(self, gas: int) -> None:
        # The engine finds its boundary from micro_steps modulo the accumulation steps.
        engine = self.engine
        engine.micro_steps = -(-engine.micro_steps // gas) * gas

    # ---- with a new engine --------------------------------------------------------------------
    def rebuild(
        self,
        old: Setting,
        target: Setting,
        fix: Callable[[ds_state.HostState], None] | None = None,
    ) -> tuple[int, str | None]:
        """Capture, destroy, build `target`, restore; on failure rebuild `old`. (bytes moved, error).

        `fix` amends the captured state before either build (an OOM retry puts the counters and
        RNG of the step's start back). With several ranks, they agree before going on: if the
        switch failed on any rank, every rank rolls back. Raises SwitchFailed when the rollback
        fails too."""
        with self._phase("capture"):
            # StateError here: nothing changed yet. `own`: the engine is destroyed next, unwritten.
            state = ds_state.capture(self.engine, self.params, own=True)
        if fix is not None:
            fix(state)
        self._destroy_current()
        error: str | None = None
        try:
            self._install(self._build(target, state), target)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        with self._phase("agree"):
            error = agree(error, self.meter.device)
        if error is None:
            return state.nbytes, None
        log.warning(
            "trainwarden: switching to %s failed (%s); rebuilding %s",
            target.describe(),
            error,
            old.describe(),
        )
        self._destroy_current()
        try:
            self._install(self._build(old, state), old)
        except Exception as exc2:
            raise SwitchFailed(
                f"switching to {target.describe()} failed ({error}) and rebuilding {old.describe()} "
                f"failed too ({type(exc2).__name__}: {exc2}); there is no engine to train with"
            ) from exc2
        return state.nbytes, error

    def _build(self, setting: Setting, state: ds_state.HostState) -> Any:
        """A new engine for `setting` over the same module, holding exactly `state`."""
        mode = self.module.training
        with self._phase("clean"):
            clean_module(self.module, self.builder.snapshot, state.values)
        with self._phase("initialize"), lean_initialize(state_follows=state.step is not None):
            engine = self.builder.build(setting)
        try:
            same_scheduler = self.builder.scheduler_object is not None
            with self._phase("restore"):
                ds_state.restore(engine, self.params, state, same_scheduler=same_scheduler)
            engine.train(mode)
        except BaseException:
            destroy(engine)
            raise
        return engine

    def _install(self, engine: Any, setting: Setting) -> None:
        self.engine = engine
        loader = self.handle._loader
        if loader is not None:
            engine.training_dataloader = loader
        if engine.gradient_accumulation_steps() != setting.gradient_accumulation_steps:
            raise ConfigError("the new engine's gradient accumulation does not match its config")
        self._align_micro_steps(setting.gradient_accumulation_steps)

    def _destroy_current(self) -> None:
        with self._phase("destroy"):
            engine, self.engine = self.engine, None
            self.handle.oom.forget_engine()  # its progress reader holds the engine's partitions
            if engine is not None:
                destroy(engine)
            del engine
            release_memory(self.meter.device)

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        """Add the time of the block to `phases[name]` (a rollback adds to the same parts)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t


__all__ = ["EngineSwitch", "changes_between"]
