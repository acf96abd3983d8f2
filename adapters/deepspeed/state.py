"""Training state of a DeepSpeed engine, carried in host memory from one engine to the next.

DeepSpeed changes ZeRO stage, precision or offload only through a checkpoint on disk, an
offline conversion and a restart, and for many pairs (stage 1/2 <-> 3, fp32 -> bf16) not at
all. Here the state moves in memory instead: `capture` reads, from the live engine, the full
fp32 master weights, the optimizer's per-element state (Adam's exp_avg and exp_avg_sq, and any
other state shaped like the parameter) and its step count, the param groups' hyperparameters
(the LR the scheduler set), the LR scheduler's state, the fp16 loss scaler, the engine's step
and sample counters and the RNG states, into one host-side fp32 copy (`HostState`). `restore`
writes it into a freshly built engine of any stage, precision and offload, exactly: the same
bits come back.

It reads and writes through DeepSpeed's own `safe_get_full_*` / `safe_set_full_*` where those
cover the engine (ZeRO 1-3 and the BF16 optimizer), and through the wrappers' own tensors where
they do not (stage 0: the plain optimizer, and FP16_Optimizer / FP16_UnfusedOptimizer for bf16
and fp16). ZeRO creates optimizer state lazily, at its first step; a fresh engine's state is
created here the way DeepSpeed's own universal-checkpoint loader does it (state tensors set
directly on the flat fp32 partitions, then linked), never by a step, which would change it.

The user's module between two engines (`clean_module`, `module_params`, `ModuleSnapshot`) is
adapters/deepspeed/module.py's; they are importable from here too.

Cost: the host copy holds 4 bytes per parameter for the weights plus 4 per parameter per
optimizer state tensor (12 bytes a parameter for Adam), on every rank (full tensors: the
`safe_get_full_*` calls gather them). Reading and writing are memory copies plus, with several
ranks, one all-reduce or all-gather per parameter and state tensor. A switch in one process whose
state is already in host memory reads nothing: it keeps the engine's own tensors (`capture(own=True)`,
`_keeps_own`), and writing is the only copy (none where the new engine can adopt the tensors: stage
0 in fp32 steps the carried masters and moments themselves).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from trainwarden.adapters.deepspeed.module import ModuleSnapshot, clean_module, module_params

#: Engine counters carried across a switch.
COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")
#: Dynamic loss scaler fields carried between two fp16 engines.
LOSS_SCALE_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


class StateError(RuntimeError):
    """The engine's state cannot be carried exactly; the message says why."""


# ---- which optimizer the engine runs, and where its state lives ---------------------------------


def _classes() -> dict[str, type]:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return {
        "z3": DeepSpeedZeroOptimizer_Stage3,
        "zero": DeepSpeedZeroOptimizer,
        "bf16": BF16_Optimizer,
        "fused16": FP16_Optimizer,
        "unfused16": FP16_UnfusedOptimizer,
    }


def engine_kind(engine: Any) -> str:
    """How the engine holds its fp32 masters: 'z3' / 'hp' (DeepSpeed's safe_* API covers them),
    'fused16' / 'unfused16' (stage 0 with bf16/fp16), 'plain' (stage 0 fp32: the module's own
    parameters are the masters)."""
    opt = engine.optimizer
    c = _classes()
    if opt is None:
        raise StateError("the engine has no optimizer: there is no training state to carry")
    if isinstance(opt, c["z3"]):
        return "z3"
    if isinstance(opt, (c["zero"], c["bf16"])):
        return "hp"
    if isinstance(opt, c["unfused16"]):
        return "unfused16"
    if isinstance(opt, c["fused16"]):
        return "fused16"
    if isinstance(opt, torch.optim.Optimizer):
        return "plain"
    raise StateError(f"unsupported DeepSpeed optimizer wrapper {type(opt).__name__}")


def inner_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer that really steps (the basic optimizer inside DeepSpeed's wrapper)."""
    opt = engine.optimizer
    return opt if engine_kind(engine) == "plain" else opt.optimizer


def flat_partitions(engine: Any) -> list[torch.Tensor]:
    """The fp32 tensors the inner optimizer steps (its state is keyed by them)."""
    kind = engine_kind(engine)
    opt = engine.optimizer
    if kind == "z3":
        return list(opt.fp32_partitioned_groups_flat)
    if kind == "hp":
        if isinstance(opt, _classes()["bf16"]):
            return list(opt.fp32_groups_flat_partition)
        return list(opt.single_partition_of_fp32_groups)
    if kind == "fused16":
        return list(opt.fp32_groups_flat)
    if kind == "unfused16":
        return [p for group in opt.fp32_groups for p in group]
    return [p for g in opt.param_groups for p in g["params"]]


def _per_param_masters(engine: Any) -> dict[int, torch.Tensor]:
    """Stage 0: module parameter id -> the fp32 tensor that is its master (or a view of it)."""
    kind = engine_kind(engine)
    opt = engine.optimizer
    out: dict[int, torch.Tensor] = {}
    if kind == "plain":
        for g in opt.param_groups:
            for p in g["params"]:
                out[id(p)] = p
    elif kind == "unfused16":
        for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups):
            for lp, hp in zip(lp_group, hp_group):
                out[id(lp)] = hp
    elif kind == "fused16":
        for lp_group, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
            offset = 0
            for lp in lp_group:
                out[id(lp)] = flat.narrow(0, offset, lp.numel()).view(lp.shape)
                offset += lp.numel()
    return out


def _state_of_master(engine: Any, master: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor, int]:
    """Stage 0: the optimizer state dict holding `master`'s state, the tensor it is keyed by and
    master's offset in it (the fused FP16 optimizer keys one flat tensor per group)."""
    inner = inner_optimizer(engine)
    if engine_kind(engine) == "fused16":
        for flat in engine.optimizer.fp32_groups_flat:
            if master.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr():
                return inner.state[flat], flat, master.storage_offset() - flat.storage_offset()
        raise StateError("a parameter's fp32 master is in no fp16 group")
    return inner.state[master], master, 0


def _is_element_state(value: Any, like: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.numel() == like.numel()


def _step_int(value: Any) -> int:
    return int(value.item()) if torch.is_tensor(value) else int(value)


def _step_value(inner: torch.optim.Optimizer, group: dict[str, Any], step: int, device: Any) -> Any:
    """`step` as `inner` keeps it: a float tensor for torch's optimizers, an int for DeepSpeed's."""
    if type(inner).__module__.startswith("torch.optim"):
        from torch.optim.optimizer import _get_scalar_dtype

        fused = bool(group.get("fused"))
        if group.get("capturable") or fused:
            return torch.tensor(float(step), dtype=_get_scalar_dtype(is_fused=fused), device=device)
        return torch.tensor(float(step), dtype=_get_scalar_dtype())
    return step


# ---- the host copy ------------------------------------------------------------------------------


@dataclass
class HostState:
    """One engine's training state, on the host, in fp32, independent of stage and precision."""

    values: list[torch.Tensor]  # every module parameter, fp32 (the master where one exists)
    trained: list[bool]  # whether the optimizer holds that parameter
    moments: dict[str, list[torch.Tensor | None]]  # optimizer element state, per parameter
    step: int | None  # the optimizer's step count (None: it has not stepped yet)
    groups: list[dict[str, Any]]  # param groups' hyperparameters (no 'params')
    scheduler: dict[str, Any] | None
    loss_scale: dict[str, Any] | None
    counters: dict[str, int]
    rng: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of tensors held: weights and optimizer state."""
        n = sum(t.numel() * t.element_size() for t in self.values)
        for ts in self.moments.values():
            n += sum(t.numel() * t.element_size() for t in ts if t is not None)
        return n


def _host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32, copy=True)


def _host_fresh(t: torch.Tensor) -> torch.Tensor:
    """`_host` for a tensor DeepSpeed's `safe_get_full_*` has just built in a buffer of its own (a
    reduce or gather buffer, never the engine's state): kept as it is when already fp32 on the host.
    A second copy would cost nothing lasting but raised a switch's peak by two of the largest
    tensor (measured: RSS peak 8.7 MiB over the old engine plus the host copy on a 25M-parameter
    GPT, whose largest matrices are 4 MiB)."""
    return t.detach().to(device="cpu", dtype=torch.float32)


def _gathered_values(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Full values of ZeRO-3 parameters (gathered for the moment of the copy)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return [_host(p.data) for p in params]


class _Pools:
    """One flat fp32 host buffer per name, handed out in consecutive pieces (all names advance
    together: piece i of every buffer belongs to the same parameter).

    With `keep`, there are no buffers: `take` hands back the engine's own tensor (see
    `_keeps_own`)."""

    def __init__(self, numel: int, names: list[str], *, keep: bool = False) -> None:
        self.keep = keep
        numel = 0 if keep else numel
        self.buffers = {n: torch.empty(numel, dtype=torch.float32) for n in names} if numel else {}
        self.offset = 0

    def take(self, name: str, src: torch.Tensor) -> torch.Tensor:
        if self.keep:
            return src.detach() if src.device.type == "cpu" and src.dtype == torch.float32 else _host(src)
        piece = self.buffers[name].narrow(0, self.offset, src.numel())
        piece.copy_(src.detach().reshape(-1))
        return piece

    def advance(self, numel: int) -> None:
        self.offset += numel


def _keeps_own(tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether the host copy can be the engine's own tensors, with no copy: one process whose fp32
    masters and optimizer state already live in host memory (a CPU job, or optimizer offload).

    The switch destroys the old engine before it builds the new one, and nothing writes into a
    dead engine's tensors: emptying its optimizer (adapters/deepspeed/build.destroy) drops
    references, and building an engine never writes into the parameters it is given (ZeRO copies
    them into its flat buffers, a precision change casts them to new tensors). So the views kept
    here hold the state's exact bits until `restore` has copied them, and they keep only what the
    copy would have held: the flat fp32 partitions (plus their padding) outlive the engine instead
    of a copy of them. What that saves: a copy of the state into fresh pages, a third of a switch
    on a 25M-parameter GPT here (bench/switch_latency.py), and the copy's memory while the old
    engine is still alive (the switch's peak is the larger engine plus its state, no longer the old
    engine plus a copy). Several processes gather full tensors (`safe_get_full_*`) instead; a GPU
    engine's state must leave device memory for the new engine, so it is copied."""
    present = [t for t in tensors if t is not None]
    return (
        bool(present)
        and _single_process()
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in present)
    )


def _single_process() -> bool:
    """Whether this process is the whole job (every partition is its own: nothing to gather)."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_world_size() == 1


def _whole_fragment(p: torch.nn.Parameter, key: str | None, kind: str) -> torch.Tensor | None:
    """`p`'s fp32 master (`key` None) or optimizer state `key`, as the view of the engine's flat
    fp32 partition that holds it, when that view covers the whole parameter (one process);
    None when it does not (the state is then gathered) or the state does not exist."""
    if kind == "z3":
        opt = p._z3_optimizer  # type: ignore[attr-defined]
        if getattr(opt, "swap_optimizer", False):
            return None  # swapped to NVMe: a view would not outlive the swap buffer
        flat = opt.fp32_partitioned_groups_flat[opt.grad_position[opt.get_param_id(p)][0]]
        if key is not None and key not in opt.optimizer.state.get(flat, {}):
            return None
        part, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=True, optim_state_key=key)
        return part if part.numel() == p.ds_numel else None  # type: ignore[attr-defined]
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None or (key is not None and key not in mapping.optim_fragment):
        return None
    frag = mapping.get_hp_fragment(key)
    return frag if frag.numel() == p.numel() else None


def capture_rng() -> dict[str, Any]:
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")
    if np is not None:
        out["numpy"] = np.random.get_state()
    return out


def restore_rng(rng: dict[str, Any]) -> None:
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "random" in rng:
        random.setstate(rng["random"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if "numpy" in rng and "numpy" in sys.modules:
        sys.modules["numpy"].random.set_state(rng["numpy"])


def _loss_scale_of(optimizer: Any) -> dict[str, Any] | None:
    for holder in (getattr(optimizer, "loss_scaler", None), getattr(optimizer, "loss_scale_config", None)):
        if holder is not None and getattr(holder, "dynamic", getattr(holder, "dynamic_loss_scale", False)):
            return {k: getattr(holder, k) for k in LOSS_SCALE_FIELDS if hasattr(holder, k)}
    return None


def _set_loss_scale(optimizer: Any, saved: dict[str, Any]) -> None:
    for holder in (getattr(optimizer, "loss_scaler", None), getattr(optimizer, "loss_scale_config", None)):
        if holder is not None and getattr(holder, "dynamic", getattr(holder, "dynamic_loss_scale", False)):
            for k, v in saved.items():
                if hasattr(holder, k):
                    setattr(holder, k, v)


def capture(engine: Any, params: list[torch.nn.Parameter], *, own: bool = False) -> HostState:
    """Read the engine's whole training state into host memory (every rank gets the full copy).

    `own`: the caller destroys the engine next and writes into no tensor of it before `restore`
    (a switch): where the state is already in host memory in one process, the result holds the
    engine's own tensors instead of a copy (`_keeps_own`). Without it the result is a copy that
    later training does not change.

    Collective with several ranks (one all-reduce or all-gather per tensor): every rank calls it.
    Raises StateError, before anything is changed, when the state cannot be carried exactly.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    kind = engine_kind(engine)
    inner = inner_optimizer(engine)
    flats = flat_partitions(engine)
    states = [inner.state[f] for f in flats if inner.state.get(f)]

    steps = {_step_int(s["step"]) for s in states if "step" in s}
    if len(steps) > 1 and type(inner).__name__ == "FusedAdam":
        # DeepSpeed's FusedAdam counts the step of a group in one of its tensors' state (the last
        # one stepped) and uses that for the whole group; the others stay where they started.
        steps = {max(steps)}
    if len(steps) > 1:
        raise StateError(
            f"the optimizer's step counts differ across its tensors ({sorted(steps)}); a ZeRO engine "
            "keeps one per group, so this state cannot be carried exactly"
        )
    step = steps.pop() if steps else None
    keys = sorted({k for f in flats for k, v in inner.state.get(f, {}).items() if _is_element_state(v, f)})

    values: list[torch.Tensor] = []
    trained: list[bool] = []
    moments: dict[str, list[torch.Tensor | None]] = {k: [] for k in keys}
    if kind in ("z3", "hp"):
        # A ZeRO-3 parameter the optimizer was not given has no fp32 master (no _z3_optimizer).
        in_optimizer = [p.requires_grad and (kind != "z3" or hasattr(p, "_z3_optimizer")) for p in params]
        single = _single_process()
        wholes = [
            _whole_fragment(p, None, kind) if ok and single else None for p, ok in zip(params, in_optimizer)
        ]
        # One process: one copy out of the engine's own flat partitions, into one host buffer per
        # kind of tensor (weights, each moment), where safe_get_full_* would zero a buffer per
        # tensor, copy into it and all-reduce it over one rank. Measured on a 25M-parameter GPT:
        # a third of the time; one large buffer also gets huge pages where the allocator gives
        # them (torch: THP_MEM_ALLOC_ENABLE=1), where 300 small ones take a page fault per 4 KiB.
        # A switch on one process with the state in host memory keeps the engine's own tensors.
        keep = own and _keeps_own(wholes)
        pool = _Pools(sum(w.numel() for w in wholes if w is not None), ["", *keys], keep=keep)
        frozen: list[int] = []
        for i, p in enumerate(params):
            shape = p.ds_shape if kind == "z3" else p.shape
            whole = wholes[i]
            if whole is not None:
                trained.append(True)
                values.append(pool.take("", whole).view(shape))
                for k in keys:
                    m = _whole_fragment(p, k, kind)
                    moments[k].append(pool.take(k, m).view(shape) if m is not None else None)
                pool.advance(whole.numel())
                continue
            in_opt = in_optimizer[i]
            hp = safe_get_full_fp32_param(p) if in_opt else None
            trained.append(hp is not None)
            if hp is None:
                frozen.append(i)
                values.append(torch.empty(0))
                for k in keys:
                    moments[k].append(None)
                continue
            values.append(_host_fresh(hp).view(shape))
            for k in keys:
                moments[k].append(_host_fresh(safe_get_full_optimizer_state(p, k)).view(values[-1].shape))
        if frozen:
            fp = [params[i] for i in frozen]
            got = _gathered_values(fp) if kind == "z3" else [_host(p.data) for p in fp]
            for i, v in zip(frozen, got):
                values[i] = v
    else:
        masters = _per_param_masters(engine)
        # One host buffer per kind of tensor, or the engine's own tensors, as above.
        mine = [masters.get(id(p)) for p in params]
        keep = own and _keeps_own(mine)
        pool = _Pools(sum(m.numel() for m in mine if m is not None), ["", *keys], keep=keep)
        for p in params:
            master = masters.get(id(p))
            trained.append(master is not None)
            if master is None:
                values.append(_host(p.data))
                for k in keys:
                    moments[k].append(None)
                continue
            values.append(pool.take("", master).view(p.shape))
            st, _, offset = _state_of_master(engine, master) if keys else ({}, None, 0)
            for k in keys:
                t = st.get(k)
                if t is None:
                    moments[k].append(None)
                else:
                    piece = t.view(-1).narrow(0, offset, master.numel()) if kind == "fused16" else t
                    moments[k].append(pool.take(k, piece).view(p.shape))
            pool.advance(master.numel())

    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    sched = engine.lr_scheduler
    return HostState(
        values=values,
        trained=trained,
        moments=moments,
        step=step,
        groups=groups,
        scheduler=sched.state_dict() if sched is not None and hasattr(sched, "state_dict") else None,
        loss_scale=_loss_scale_of(engine.optimizer),
        counters={k: int(getattr(engine, k, 0)) for k in COUNTERS},
        rng=capture_rng(),
    )


def _ensure_optimizer_state(
    engine: Any,
    state: HostState,
    *,
    placeholders: bool = False,
    params: list[torch.nn.Parameter] | None = None,
) -> None:
    """Create the optimizer's state on a fresh engine, as its first step would, without stepping.

    DeepSpeed's own loader does the same (stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3):
    state tensors are set on the flat fp32 partitions, then ZeRO-1/2 link each parameter's
    fragment of them. Values are written afterwards; zeros here are placeholders."""
    if state.step is None:
        return
    kind = engine_kind(engine)
    inner = inner_optimizer(engine)
    group_of = {id(p): g for g in inner.param_groups for p in g["params"]}
    # Per-tensor state (stage 0: the plain optimizer, FP16_UnfusedOptimizer) gets the host copy's
    # tensors themselves (`restore`); zeros for it would be 8 bytes a parameter written for nothing.
    per_tensor = kind in ("plain", "unfused16")
    flats = flat_partitions(engine)
    written = _written_ranges(engine, kind, flats, params, state) if params is not None else {}
    for f in flats:
        st = inner.state[f]
        group = group_of.get(id(f), inner.param_groups[0])
        st["step"] = _step_value(inner, group, state.step, f.device)
        if per_tensor and not placeholders:
            continue
        for k in state.moments:
            if not torch.is_tensor(st.get(k)) or st[k].shape != f.shape:
                st[k] = _placeholder(f, written.get(id(f)))
    if kind == "hp":
        opt = engine.optimizer
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _placeholder(flat: torch.Tensor, written: list[tuple[int, int]] | None) -> torch.Tensor:
    """A state tensor shaped like `flat`: zeros, or, where `written` gives the (start, end) ranges
    the restore is about to write, uninitialized there and zeros only in between (the padding).
    Zeroing 8 bytes a parameter that are overwritten at once took a fifth of a switch here (on
    fresh pages without huge pages it runs at page-fault speed)."""
    if not written:
        return torch.zeros_like(flat, memory_format=torch.preserve_format)
    out = torch.empty_like(flat, memory_format=torch.preserve_format)
    view = out.view(-1)
    pos = 0
    for a, b in sorted(written):
        if a > pos:
            view[pos:a].zero_()
        pos = max(pos, b)
    if pos < view.numel():
        view[pos:].zero_()
    return out


def _written_ranges(
    engine: Any, kind: str, flats: list[torch.Tensor], params: list[torch.nn.Parameter], state: HostState
) -> dict[int, list[tuple[int, int]]]:
    """id(flat partition) -> the element ranges of it that `restore` writes for every state key
    (the fragments of the parameters whose whole state was carried), for ZeRO 1-3 and the BF16
    optimizer; empty for the others (their placeholders stay zeros)."""
    if kind not in ("z3", "hp"):
        return {}
    spans = {
        id(f): (f.data_ptr(), f.data_ptr() + f.numel() * f.element_size(), f.element_size()) for f in flats
    }
    out: dict[int, list[tuple[int, int]]] = {}
    for i, p in enumerate(params):
        if not state.trained[i] or any(state.moments[k][i] is None for k in state.moments):
            continue
        if kind == "z3":
            if not hasattr(p, "_z3_optimizer") or getattr(p._z3_optimizer, "swap_optimizer", False):
                continue
            frag, _ = p._z3_optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=False)
        else:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:
                continue
            frag = mapping.get_hp_fragment()
        ptr = frag.data_ptr()
        for fid, (lo, hi, size) in spans.items():
            if lo <= ptr < hi:
                start = (ptr - lo) // size
                out.setdefault(fid, []).append((start, start + frag.numel()))
                break
    return out


def restore(engine: Any, params: list[torch.nn.Parameter], state: HostState, *, same_scheduler: bool) -> None:
    """Write `state` into a freshly built engine over the same module.

    The engine must have been built from a module holding `state.values` (see `clean_module`),
    so its low-precision copies are already those values' rounding; this writes the exact fp32
    masters and optimizer state (ZeRO-3's partitions and stage 0's module parameters are
    refreshed from them; ZeRO 1/2's and BF16's need not be). Collective with several ranks.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    kind = engine_kind(engine)
    opt = engine.optimizer
    if len(opt.param_groups) != len(state.groups):
        raise StateError(
            f"the new engine has {len(opt.param_groups)} param groups, the old one had {len(state.groups)}"
        )
    _ensure_optimizer_state(engine, state, params=params)
    keys = list(state.moments)
    if kind in ("z3", "hp"):
        for i, p in enumerate(params):
            if not state.trained[i]:
                continue
            safe_set_full_fp32_param(p, state.values[i])
            for k in keys:
                m = state.moments[k][i]
                if m is not None:
                    safe_set_full_optimizer_state(p, m, k)
        if kind == "z3":
            _refresh_zero3_partitions(opt)
        # ZeRO 1/2 and BF16: the low-precision parameters need no refresh. The engine was built
        # from a module holding `state.values` (clean_module), so they are already those values,
        # or DeepSpeed's cast of them: what a copy_ into them would round to (4 bytes a parameter
        # written for nothing, measured at a twelfth of a ZeRO 2 switch).
    else:
        masters = _per_param_masters(engine)
        with torch.no_grad():
            for i, p in enumerate(params):
                master = masters.get(id(p))
                if master is None:
                    p.data.copy_(state.values[i])
                    continue
                v = state.values[i]
                if master.data_ptr() != v.data_ptr():  # not already the host copy (clean_module)
                    master.copy_(v)
                if master is not p and p.data_ptr() != v.data_ptr():
                    p.data.copy_(v)
                if not keys:
                    continue
                st, _, offset = _state_of_master(engine, master)
                for k in keys:
                    m = state.moments[k][i]
                    if m is None:
                        continue
                    if kind == "fused16":
                        st[k].view(-1).narrow(0, offset, master.numel()).copy_(m.view(-1))
                    elif m.device == master.device and m.dtype == master.dtype:
                        st[k] = m.view_as(master)  # the host copy itself: it was carried for this
                    else:
                        st[k] = m.to(master.device, copy=True).view_as(master)
    for g, saved in zip(opt.param_groups, state.groups):
        for k, v in saved.items():
            g[k] = v
    if kind in ("plain", "unfused16") and state.step is not None:
        _ensure_optimizer_state(engine, state, placeholders=True)  # zeros where nothing came
    if state.scheduler is not None and engine.lr_scheduler is not None and not same_scheduler:
        engine.lr_scheduler.load_state_dict(state.scheduler)
    if state.loss_scale is not None:
        _set_loss_scale(opt, state.loss_scale)
    for k, v in state.counters.items():
        if hasattr(engine, k):
            setattr(engine, k, v)
    restore_rng(state.rng)


def _refresh_zero3_partitions(opt: Any) -> None:
    """ZeRO-3: copy each fp32 master partition into its low-precision partition, and re-gather
    the persistent (small, unpartitioned) parameters, as DeepSpeed does after a step."""
    with torch.no_grad():
        for i, fp32 in enumerate(opt.fp32_partitioned_groups_flat):
            lp = opt.fp16_partitioned_groups_flat[i]
            if lp is not None and fp32.numel() > 0:
                lp.data.copy_(fp32.data)
                if hasattr(opt, "_unflatten_partitioned_parameters"):
                    opt._unflatten_partitioned_parameters(i)
        persistent = getattr(opt, "persistent_parameters", [])
        if persistent:
            persistent[0].all_gather(persistent)
        if hasattr(opt, "invalidate_secondary_tensor"):
            opt.invalidate_secondary_tensor()


# ---- what a rank holds ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldBytes:
    """Bytes of model state one rank's engine holds: parameters (low-precision or fp32 copies the
    model computes with), fp32 masters kept apart from them, optimizer state, and where the
    optimizer state lives."""

    params: int
    masters: int
    optimizer_state: int
    optimizer_state_device: str


def _nbytes(ts: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def held_bytes(engine: Any) -> HeldBytes:
    kind = engine_kind(engine)
    inner = inner_optimizer(engine)
    params = module_params(engine.module)
    if kind == "z3":
        lp = _nbytes(p.ds_tensor for p in params if hasattr(p, "ds_tensor"))
        lp += _nbytes(p.data for p in params if getattr(p, "ds_persist", False))
    else:
        lp = _nbytes(p.data for p in params)
    flats = flat_partitions(engine)
    masters = 0 if kind == "plain" else _nbytes(flats)
    tensors = [
        v for f in flats for v in inner.state.get(f, {}).values() if torch.is_tensor(v) and v.dim() > 0
    ]
    device = str(tensors[0].device) if tensors else (str(flats[0].device) if flats else "none")
    return HeldBytes(lp, masters, _nbytes(tensors), device)


__all__ = [
    "HeldBytes",
    "HostState",
    "ModuleSnapshot",
    "StateError",
    "capture",
    "clean_module",
    "engine_kind",
    "flat_partitions",
    "held_bytes",
    "inner_optimizer",
    "module_params",
    "restore",
]
