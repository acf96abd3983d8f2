"""What the DeepSpeed handle does after an out-of-memory error inside a step: the ladder it steps
down (`next_rung`) and the recovery (`OomRecovery`): the step's start remembered, the engine
rebuilt one rung down at that start, the step rewound and `StepRetry` raised.

The OOM ladder (`next_rung`), one rung per OOM, leanest last:

1. micro-batch halved (the largest divisor of the per-rank batch at most half the current
   one), gradient accumulation doubled, the global batch kept. Offered only where trainwarden
   cuts the micro-batches (its own loader, `micro_batch_knob=True`, or `train_batch`), since a
   user's loader keeps yielding micro-batches of the old size. Activation memory is the usual
   cause of a step's OOM, and this frees it at the smallest cost in speed.
2. activation checkpointing on, where the model can switch it: activations of all but one
   block at a time, for about one more forward pass of compute.
3. ZeRO stage up, with several ranks only (partitioning over one rank saves nothing): to
   stage 2 from 0 or 1 (stage 2 communicates as much as stage 1 and holds less), then to 3.
4. optimizer offload to the CPU (at stage 2 at least: it needs ZeRO).
5. parameter offload (stage 3).

Precision is never on it: it changes the numerics, a decision for the memory policy, not for
an error handler. Below the last rung the OOM is raised as it was.

What it costs: per optimizer step, a copy of the torch RNG state (~5 KB) and a read of the
optimizer's step counts (about 12 us together, measured here); an OOM costs one engine rebuild
(as a switch) and a copy of one step's input batch at most (only when the micro-batch size
changed). When an OOM is not retried, and why: see the package docstring.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from trainwarden.adapters.deepspeed import state as ds_state
from trainwarden.adapters.deepspeed.config import Setting, micro_batch_choices, with_micro_batch
from trainwarden.adapters.deepspeed.errors import OomRetry, StepRetry
from trainwarden.adapters.deepspeed.switch import changes_between
from trainwarden.controller.protocol import MAX_EVENT_REASON_CHARS, AdapterEvent

if TYPE_CHECKING:
    from trainwarden.adapters.deepspeed.handle import DeepSpeedHandle

log = logging.getLogger("trainwarden")


def default_oom_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "out of device memory": torch.cuda.OutOfMemoryError (since torch
    2.5 an alias of torch.OutOfMemoryError, which the other device backends raise too)."""
    return (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


@dataclass(frozen=True)
class Rung:
    """One step down the OOM ladder: the setting to rebuild with, the checkpointing flag (None:
    the model cannot switch it), and why, in words."""

    setting: Setting
    activation_checkpointing: bool | None
    why: str


def next_rung(
    setting: Setting,
    activation_checkpointing: bool | None,
    *,
    world_size: int,
    can_recut: bool,
) -> Rung | None:
    """The next leaner configuration after an OOM at `setting`, or None at the bottom."""
    s, ckpt = setting, activation_checkpointing
    if can_recut and s.micro_batch_size > 1:
        choices = micro_batch_choices(s.train_batch_size, world_size)
        smaller = [c for c in choices if c <= s.micro_batch_size // 2]
        if smaller:
            target = with_micro_batch(s, max(smaller), world_size)
            return Rung(
                target,
                ckpt,
                f"micro-batch {s.micro_batch_size} -> {target.micro_batch_size} "
                f"(accumulation {s.gradient_accumulation_steps} -> {target.gradient_accumulation_steps})",
            )
    if ckpt is False:
        return Rung(s, True, "activation checkpointing on")
    if world_size > 1 and s.zero_stage < 3:
        stage = 2 if s.zero_stage < 2 else 3
        return Rung(replace(s, zero_stage=stage), ckpt, f"ZeRO stage {s.zero_stage} -> {stage}")
    if not s.offload_optimizer:
        stage = max(s.zero_stage, 2)
        why = "optimizer offload to the CPU"
        if stage != s.zero_stage:
            why += f" (ZeRO stage {s.zero_stage} -> {stage})"
        return Rung(replace(s, zero_stage=stage, offload_optimizer=True), ckpt, why)
    if not s.offload_param:
        why = "parameter offload to the CPU"
        if s.zero_stage != 3:
            why += f" (ZeRO stage {s.zero_stage} -> 3)"
        return Rung(replace(s, zero_stage=3, offload_param=True), ckpt, why)
    return None


# ---- the recovery ---------------------------------------------------------------------------------


@dataclass
class StepStart:
    """What a step began with, to begin it again after an OOM: the engine's counters and the torch
    RNG states (the rest of the state is not touched before the optimizer's update)."""

    counters: dict[str, int]
    rng: dict[str, Any]


def detach_traceback(exc: BaseException) -> BaseException:
    """Let the frames of a failed forward or backward go (their activations with them) before
    anything is rebuilt: the traceback is kept as text in a note, the frames are cleared."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if e.__traceback__ is not None:
            traceback.clear_frames(e.__traceback__)
            e.__traceback__ = None
        e = e.__cause__ or e.__context__
    if hasattr(exc, "add_note"):
        exc.add_note("trainwarden: where it was raised (frames released for the retry):\n" + text)
    return exc


#: Attribute set on an OOM the handle judged impossible to retry, so that no outer call retries it.
_NOT_RETRIED = "trainwarden_not_retried"


def _mark_not_retried(exc: BaseException, reason: str) -> None:
    try:
        setattr(exc, _NOT_RETRIED, reason)
    except AttributeError:  # an exception type with __slots__: nothing outer will retry it anyway
        pass


class ProgressReader:
    """Reads the step counts of the optimizer that really steps: each param group's own
    (DeepSpeed's Adams keep it there) and that of the tensors it steps (torch's keep it per
    tensor; for a per-parameter optimizer only the first and last of each group, which torch steps
    first and last), 0 before the first step. `read()` is None where reading one would cost a
    device synchronisation. About 10 us a read; what to read is found once per engine.

    Read from the flat partitions, not from the inner optimizer's param groups: ZeRO-3 puts a
    partition in its group only for the time of the update (and leaves it there when the update
    raises), so the groups alone would say the step had moved when it had not."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.inner: Any = None
        self.tensors: list[torch.Tensor] = []
        try:
            kind = ds_state.engine_kind(engine)
            self.inner = ds_state.inner_optimizer(engine)
            if kind == "plain":
                groups = self.inner.param_groups
                self.tensors = [t for g in groups for t in (g["params"][:1] + g["params"][-1:])]
            elif kind == "unfused16":
                groups = engine.optimizer.fp32_groups
                self.tensors = [t for group in groups for t in (group[:1] + group[-1:])]
            else:
                self.tensors = ds_state.flat_partitions(engine)
        except Exception:
            self.inner = None

    def read(self) -> tuple[int, ...] | None:
        inner = self.inner
        if inner is None:
            return None
        values = [g.get("step") for g in inner.param_groups]
        values += [(inner.state.get(t) or {}).get("step") for t in self.tensors]
        out: list[int] = []
        for v in values:
            if torch.is_tensor(v):
                if v.device.type != "cpu":
                    return None
                v = v.item()
            out.append(0 if v is None else int(v))
        return tuple(out)


class OomRecovery:
    """The OOM retry of one handle: what each optimizer step began with, and the step down.

    The handle's `oom_errors` are the exceptions that mean out of memory and `oom_retry` turns
    the retry off; every OOM survived is appended to its `oom_retries`."""

    def __init__(self, handle: DeepSpeedHandle) -> None:
        self.handle = handle
        self.step_start: StepStart | None = None
        self._reader: ProgressReader | None = None

    def mark_step_start(self) -> None:
        """Remember what this optimizer step begins with (for a retry after an OOM)."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        engine = self.handle.engine
        self.step_start = StepStart({k: int(getattr(engine, k, 0)) for k in ds_state.COUNTERS}, rng)
        loader = self.handle._loader
        if loader is not None:
            loader.mark_step()

    def progress(self) -> tuple[int, ...] | None:
        """The current engine's optimizer step counts (see ProgressReader)."""
        engine = self.handle.engine
        reader = self._reader
        if reader is None or reader.engine is not engine:
            reader = self._reader = ProgressReader(engine)
        return reader.read()

    def forget_engine(self) -> None:
        """The engine is being destroyed: drop the reader, which holds its partitions."""
        self._reader = None

    def retries(self, exc: BaseException) -> bool:
        """Whether an exception of one of the OOM types is to be retried here: not a StepRetry,
        retry on, and not one already judged impossible to retry (raised through a nested call)."""
        return (
            self.handle.oom_retry
            and not isinstance(exc, StepRetry)
            and getattr(exc, _NOT_RETRIED, None) is None
        )

    def recover(self, err: BaseException, where: str, progress: tuple[int, ...] | None = ()) -> StepRetry:
        """After an OOM in `where`: rebuild one rung down at the step's start and return the
        StepRetry to raise; raise `err` itself when the step cannot be retried exactly.

        `progress`: the optimizer's step counts read before an optimizer step (`()`: the OOM was
        not inside one; None: they could not be read)."""
        h = self.handle
        switch = h.switch
        checkpointing = h.knobs.checkpointing
        engine = switch.engine
        start = self.step_start
        assert start is not None
        step = start.counters["global_steps"] + 1
        micro = max(0, int(engine.micro_steps) - start.counters["micro_steps"])
        first_line = (str(err).splitlines() or [""])[0]
        what = f"{type(err).__name__} in {where} at step {step} (micro-step {micro + 1})"
        reason: str | None = None
        if progress != ():
            now = self.progress()
            if progress is None or now is None:
                reason = (
                    "the optimizer keeps its step counts on the device, so whether it had begun "
                    "updating the weights is unknown"
                )
            elif now != progress:
                reason = "the optimizer had already begun updating the weights; the step cannot be undone"
        if reason is None and switch.builder.cannot_rebuild:
            reason = switch.builder.cannot_rebuild
        if reason is not None:
            log.error("trainwarden: %s: %s; not retried: %s", what, first_line, reason)
            _mark_not_retried(err, reason)
            raise err
        old, old_ckpt = switch.setting, checkpointing.get()
        in_train_batch = h.whole_steps.running
        can_recut = h.knobs.micro_batch or in_train_batch
        t0 = time.perf_counter()
        before = switch.meter.start()
        switch.phases = {}

        def at_step_start(state: ds_state.HostState) -> None:
            state.counters.update(start.counters)
            state.rng = dict(start.rng)

        current, ckpt = old, old_ckpt
        failures: list[str] = []
        moved = 0
        while True:
            rung = next_rung(current, ckpt, world_size=engine.dp_world_size, can_recut=can_recut)
            if rung is None:
                log.error(
                    "trainwarden: %s: %s; no leaner configuration to retry it in (%s)%s",
                    what,
                    first_line,
                    old.describe(),
                    "; " + "; ".join(failures) if failures else "",
                )
                _mark_not_retried(err, "no leaner configuration")
                raise err
            try:
                moved, error = switch.rebuild(old, rung.setting, fix=at_step_start)
            except ds_state.StateError as exc:  # raised by the capture, before anything changed
                log.error("trainwarden: %s: %s; not retried: %s", what, first_line, exc)
                _mark_not_retried(err, str(exc))
                raise err from None
            if error is None:
                break
            failures.append(f"{rung.why} failed: {error}")
            current, ckpt = rung.setting, rung.activation_checkpointing
            engine = switch.engine
        switch.setting = rung.setting
        if rung.activation_checkpointing is not None and rung.activation_checkpointing != old_ckpt:
            checkpointing.set(rung.activation_checkpointing)
        h.drop_step()
        if in_train_batch:
            replayed = True
        elif h._loader is not None:
            h._loader.rewind_step()
            replayed = True
        else:
            replayed = False
        if h.agent is not None:
            h.agent.probe.release()
        result = switch.result(
            changes_between(old, rung.setting, old_ckpt, checkpointing.get()),
            (),
            rebuilt=True,
            error=None,
            step=step - 1,
            t0=t0,
            before=before,
            moved=moved,
        )
        retry = OomRetry(step, where, micro + 1, first_line, rung.why, result, replayed)
        h.oom_retries.append(retry)
        message = (
            f"{what}: {first_line}; moved one rung down ({rung.why}) in {result.duration_s:.2f} s and "
            + (
                "rewound the step: its samples are given again"
                if replayed
                else f"rewound the step; the {micro + 1} micro-batch(es) your loader gave for it are lost"
            )
        )
        log.warning("trainwarden: %s", message)
        if h.agent is not None:
            # The controller did not ask for this move: tell it, for the decision log and its
            # picture of the job (rank 0 sends; every rank moved alike).
            h.agent.report_event(
                AdapterEvent(
                    kind="oom_retry",
                    step=step - 1,
                    changes=result.changes,
                    config=h.config(),
                    reason=message[:MAX_EVENT_REASON_CHARS],
                    duration_s=result.duration_s,
                )
            )
        return StepRetry(message, retry)


__all__ = [
    "OomRecovery",
    "ProgressReader",
    "Rung",
    "StepStart",
    "default_oom_errors",
    "detach_traceback",
    "next_rung",
]
