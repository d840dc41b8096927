"""The optimizer: AdamW (or Muon on the blocks' weight matrices) with a weight-decay mask, global-norm
clipping and the learning-rate schedules (warmup + cosine, warmup + linear, warmup-stable-decay, constant)."""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from codegen_jax.config import OptimConfig


def schedule(oc: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate per step: linear warmup from 0, then the configured decay to lr * min_lr_ratio over
    `optim.schedule_steps` (or `total_steps` when that is 0)."""
    total_steps = oc.schedule_steps or total_steps
    warmup = min(oc.warmup_steps, max(total_steps - 1, 0))
    floor = oc.lr * oc.min_lr_ratio
    rest = max(total_steps - warmup, 1)
    ramp = optax.linear_schedule(0.0, oc.lr, max(warmup, 1))
    if oc.schedule == "cosine":
        tail = optax.cosine_decay_schedule(oc.lr, rest, alpha=oc.min_lr_ratio)
    elif oc.schedule == "linear":
        tail = optax.linear_schedule(oc.lr, floor, rest)
    elif oc.schedule == "wsd":  # warmup-stable-decay: flat at lr, then a linear cool-down at the end
        flat = wsd_decay_start(oc, total_steps) - warmup
        tail = optax.join_schedules([optax.constant_schedule(oc.lr), optax.linear_schedule(oc.lr, floor, rest - flat)],
                                    [flat])
    else:
        tail = optax.constant_schedule(oc.lr)
    if warmup == 0:
        return tail
    return optax.join_schedules([ramp, tail], [warmup])


def wsd_decay_start(oc: Any, total_steps: int) -> int:
    """The step at which a wsd schedule of `total_steps` leaves its flat part (the last
    `decay_fraction` of the post-warmup steps, at least one, decays)."""
    warmup = min(oc.warmup_steps, max(total_steps - 1, 0))
    rest = max(total_steps - warmup, 1)
    return warmup + rest - max(int(rest * oc.decay_fraction), 1)


def decay_mask(params: Any, decay_all: bool) -> Any:
    """True where weight decay applies: matmul kernels; norm scales, biases and the token embedding are
    spared unless `decay_all` (MaxText/GPT practice: decaying them hurts small models)."""
    def keep(path: tuple, _: Any) -> bool:
        leaf = _leaf_name(path)
        spared = leaf == "weight" or leaf.startswith("b_") or leaf == "embed_vd"
        return decay_all or not spared

    return jax.tree_util.tree_map_with_path(keep, params)


def _leaf_name(path: tuple) -> str:
    """A parameter's own name (the last key of its tree path): w_q_dhk, weight, embed_vd, ..."""
    return str(getattr(path[-1], "key", getattr(path[-1], "idx", path[-1])))


_BLOCK_WEIGHT = re.compile(r"w_[a-z]+_([a-z]+)")  # w_q_dhk, w_o_hkd, w_gate_df, w_down_fd, ...


def muon_dims(params: Any) -> Any:
    """Muon's view of each parameter: the blocks' projections as matrices (`MuonDimensionNumbers`:
    the input axes, the output axes; a scanned stack's leading layer axis is a batch axis), None for
    what AdamW keeps (embeddings, the LM head, norms, biases, LoRA factors). The shape suffix says which
    axes are which: `d` first means d in, the rest out (w_q_dhk); `d` last, the rest in, d out (w_o_hkd)."""
    def spec(path: tuple, x: Any) -> Any:
        m = _BLOCK_WEIGHT.fullmatch(_leaf_name(path))
        if m is None:
            return None
        axes, lead = m.group(1), x.ndim - len(m.group(1))
        if axes[0] == "d":
            return optax.contrib.MuonDimensionNumbers((lead,), tuple(range(lead + 1, x.ndim)))
        if axes[-1] == "d":
            return optax.contrib.MuonDimensionNumbers(tuple(range(lead, x.ndim - 1)), (x.ndim - 1,))
        return None

    return jax.tree_util.tree_map_with_path(spec, params)


def make_optimizer(oc: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    parts = []
    if oc.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(oc.clip_norm))
    lr = schedule(oc, total_steps)
    mask = lambda p: decay_mask(p, oc.decay_norms_and_embeddings)  # noqa: E731
    adamw = optax.adamw(lr, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay, mask=mask)
    if oc.name == "muon":
        # consistent_rms=0.2 scales Muon's updates to AdamW's RMS (Liu et al. 2025), so one lr and one
        # weight decay serve both halves; every matrix Muon takes is one AdamW would decay
        muon = optax.contrib.muon(lr, beta=oc.muon_momentum, eps=oc.eps, weight_decay=oc.weight_decay,
                                  muon_weight_dimension_numbers=muon_dims, consistent_rms=0.2)
        labels = lambda p: jax.tree.map(lambda d: "adam" if d is None else "muon", muon_dims(p),  # noqa: E731
                                        is_leaf=lambda d: d is None or isinstance(d, tuple))
        parts.append(optax.partition({"muon": muon, "adam": adamw}, labels))
    else:
        parts.append(adamw)
    return optax.chain(*parts)
