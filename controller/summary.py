"""What the controller says about a run: the status (the status line, /status) and summary.json
(what each budget spent and forecast, how the run stopped and what it left unspent).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainwarden.controller.snapshot import Snapshot

if TYPE_CHECKING:
    from trainwarden.controller.loop import Controller


def status_of(ctl: Controller) -> dict[str, Any]:
    """The status line's and /status's picture of the run (the caller holds the controller's lock)."""
    snap = ctl.state.snapshot(ctl.budget, frozenset(), ctl._observed)
    binding = snap.binding_budget
    return {
        "run_id": ctl.run_id,
        "connected": ctl.state.shape is not None,
        # Whether this controller has heard from the job since it started: on a reused run
        # directory (or after a restart) the state read back is an earlier job's until it has.
        "job_heard": ctl.last_seen is not None,
        "finished": ctl.state.finished,
        "step": snap.step,
        "loss": snap.loss,
        "tokens": snap.tokens,
        "tokens_per_second": snap.tokens_per_second,
        "step_time_s": snap.step_time_s,
        "memory_peak_bytes": snap.memory_peak_bytes,
        "memory_cap_bytes": snap.memory_cap_bytes,
        "config": dict(snap.config),
        "budget": None
        if binding is None
        else {
            "name": binding.name,
            "fraction": binding.fraction,
            "remaining_s": binding.remaining_s,
            "forecast_end_time": snap.forecast_end_time(binding),
        },
        "eval_loss": snap.eval_loss,
        "elapsed_s": snap.elapsed_s,
        "nonfinite_losses": snap.nonfinite_losses,
        "last_decision": ctl.last_decision,
        "stop": None
        if ctl.stop_decision is None
        else {k: ctl.stop_decision.get(k) for k in ("step", "outcome", "detail")},
        "notices": list(ctl.notices),
        "actions": {f"{k}:{o}": n for (k, o), n in ctl.actions_total.items()},
    }


def summary_of(ctl: Controller, now: float) -> dict[str, Any]:
    """summary.json: the status, and what the run spent, how it stopped and what it saw."""
    summary = status_of(ctl)
    summary["wall_time_s"] = now - ctl.started_at
    summary["job_lost"] = ctl.job_lost
    snap = ctl.state.snapshot(ctl.budget, frozenset(), ctl._observed)
    summary["budgets"] = budget_report(snap)
    summary["forecast"] = {
        "seconds_per_step": snap.seconds_per_step,
        "since_step": snap.throughput_since_step,
        "throughput_changes_at_steps": list(ctl.state.forecast.changes),
    }
    summary["stop"] = stop_report(snap, ctl.stop_decision)
    summary["nonfinite_losses"] = ctl.state.nonfinite_losses
    summary["exit_code"] = ctl.exit_code
    summary["peak_by_micro_batch"] = dict(ctl.state.peak_by_micro_batch)
    summary["telemetry_stale_ranks"] = list(ctl.stale_ranks)
    summary["telemetry_gaps"] = list(ctl.telemetry_gaps)
    summary["config"] = dict(ctl.state.ran_config)
    if ctl.state.shape is None:
        # Not "step -1": nothing ran. The configuration is none the job ran either.
        summary["step"] = None
        summary["config"] = {}
        summary["job"] = (
            "no job connected: the command never attached trainwarden (add it to the script, "
            "or use `trainwarden run --attach`)"
        )
    elif ctl.state.step < 0:
        summary["step"] = 0
        summary["job"] = "the job connected but finished no training step"
    return summary


def budget_report(snap: Snapshot) -> list[dict[str, Any]]:
    """Each budget's spend, forecast end and whether it binds: what summary.json lists."""
    binding = snap.binding_budget
    return [
        {
            "name": b.name,
            "unit": b.unit,
            "spent": b.spent,
            "limit": b.limit,
            "fraction": b.fraction,
            "rate_per_s": b.rate_per_s,
            "remaining_s": b.remaining_s,
            "forecast_end_time": snap.forecast_end_time(b),
            "binding": binding is not None and b.name == binding.name,
        }
        for b in snap.budgets
    ]


def stop_report(snap: Snapshot, decision: dict[str, Any] | None) -> dict[str, Any] | None:
    """Why the run stopped, and how much of the binding budget it left unspent (negative: how
    far it overran). None when no stop applied (the job ended on its own)."""
    if decision is None:
        return None
    params = decision.get("params") or {}
    cause = params.get("cause", "budget")
    out: dict[str, Any] = {
        "step": decision.get("step"),
        "cause": cause,
        "reason": decision.get("reason"),
        # `ignored`: the job trained on after the stop (controller.stop: cooperative); `applied`:
        # it stopped, by itself or ended by trainwarden (the detail says which).
        "outcome": decision.get("outcome", "applied"),
        "detail": decision.get("detail", ""),
    }
    binding = snap.binding_budget
    if binding is not None:
        left = binding.limit - binding.spent
        out["saved"] = {
            "budget": binding.name,
            "unit": binding.unit,
            "amount": left,
            "fraction": left / binding.limit if binding.limit > 0 else 0.0,
            "seconds": None if not binding.rate_per_s else left / binding.rate_per_s,
        }
    return out
