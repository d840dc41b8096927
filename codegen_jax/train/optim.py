"""The optimizer: AdamW with a weight-decay mask, global-norm clipping and the learning-rate schedules
(warmup + cosine, warmup + linear, warmup-stable-decay, constant)."""

from __future__ import annotations

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
        names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        leaf = names[-1]
        spared = leaf == "weight" or leaf.startswith("b_") or leaf == "embed_vd"
        return decay_all or not spared

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(oc: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    parts = []
    if oc.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(oc.clip_norm))
    parts.append(optax.adamw(schedule(oc, total_steps), b1=oc.b1, b2=oc.b2, eps=oc.eps,
                             weight_decay=oc.weight_decay,
                             mask=lambda p: decay_mask(p, oc.decay_norms_and_embeddings)))
    return optax.chain(*parts)
