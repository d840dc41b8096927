"""One jitted train step and eval step: masked fp32 cross entropy, gradient accumulation by `lax.scan`
over microbatches, explicit in/out shardings, donated state.

A batch is a dict of int32 [b, t] arrays: tokens, segment_ids (0 = padding), positions, loss_mask
(1 where the token is a training target). Position t predicts token t+1 and counts only when that token
is a target in the same document (the last position predicts nothing).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from codegen_jax import lora
from codegen_jax.sharding import abstract, batch_sharding, opt_state_shardings, state_shardings

Batch = dict[str, jax.Array]


@dataclasses.dataclass
class TrainState:
    """Everything a step changes. Params are a pure dict (what Orbax saves and optax updates)."""

    step: jax.Array
    params: Any
    opt_state: Any


jax.tree_util.register_dataclass(TrainState, data_fields=["step", "params", "opt_state"], meta_fields=[])


def train_state_layout(abs_params: nnx.State, optimizer: optax.GradientTransformation,
                       mesh: jax.sharding.Mesh, lora_cfg: Any = None) -> tuple[TrainState, TrainState]:
    """(shardings, abstract values) of the TrainState of a model with (abstract) parameters
    `abs_params` on `mesh`: params by the rules table, Adam's moments like their parameters, the step
    replicated. One helper for the loop, checkpoint restore and `plan`. With LoRA on (`lora_cfg`), the
    optimizer state covers the adapters only."""
    params_sh = nnx.to_pure_dict(state_shardings(abs_params, mesh))
    params = abstract(nnx.to_pure_dict(abs_params), params_sh)
    trainable_mask = lora.trainable(params, lora_cfg)
    opt_abs = jax.eval_shape(optimizer.init, lora.split(params, trainable_mask)[0])
    opt_sh = opt_state_shardings(opt_abs, lora.split(params_sh, trainable_mask)[0], mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = TrainState(replicated, params_sh, opt_sh)
    return shardings, TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), params,
                                 abstract(opt_abs, opt_sh))


def target_weights(batch: Batch) -> jax.Array:
    """[b, t] float weights of the next-token targets: position t's target is token t+1 when that is a
    target token of the same document (the last position has none: weight 0)."""
    seg = batch["segment_ids"]
    same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0) & (batch["loss_mask"][:, 1:] > 0)
    return jnp.pad(same_doc.astype(jnp.float32), ((0, 0), (0, 1)))


def masked_nll(logits_btv: jax.Array, labels_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-position negative log-likelihood of `labels_bt` and the log-partition, both fp32 [b, t]."""
    logits_btv = logits_btv.astype(jnp.float32)
    log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, labels_bt[..., None], axis=-1)[..., 0]
    return log_z_bt - target_logit_bt, log_z_bt


def token_nll(graphdef: nnx.GraphDef, params: Any, batch: Batch, chunk: int = 0, key: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array]:
    """Next-token NLL [b, t] and log-partition [b, t] of the batch under `params` (the last position's
    label is a placeholder; `target_weights` gives it weight 0). `key`: LoRA dropout (training).

    With `chunk`, the LM head and cross entropy run on `chunk` positions at a time, each chunk
    rematerialized: the [b, t, vocab] fp32 logits (and their gradient) are never all live, which on a
    2048-token row of a 32k vocabulary is 256 MiB per sequence each."""
    model = nnx.merge(graphdef, params)
    x_btd, _ = model.hidden(batch["tokens"], batch["positions"], batch["segment_ids"], dropout_key=key)
    labels_bt = jnp.pad(batch["tokens"][:, 1:], ((0, 0), (0, 1)))
    t = x_btd.shape[1]
    if chunk <= 0 or chunk >= t or t % chunk:
        return masked_nll(model.logits(x_btd), labels_bt)

    @jax.checkpoint
    def piece(xs):
        x_bcd, labels_bc = xs
        return masked_nll(model.logits(x_bcd), labels_bc)

    b, n = x_btd.shape[0], t // chunk
    # chunks first ([n, b, c, ...]: the batch axis keeps its sharding), one compiled body for all
    x_nbcd = jnp.moveaxis(x_btd.reshape(b, n, chunk, -1), 1, 0)
    labels_nbc = jnp.moveaxis(labels_bt.reshape(b, n, chunk), 1, 0)
    nll_nbc, log_z_nbc = jax.lax.map(piece, (x_nbcd, labels_nbc))
    return jnp.moveaxis(nll_nbc, 0, 1).reshape(b, t), jnp.moveaxis(log_z_nbc, 0, 1).reshape(b, t)


def _sums(graphdef, params, batch, z_loss: float, chunk: int = 0, frozen: Any = None, key=None):
    """(objective sum, (nll sum, target count)) over one microbatch; `params` are the trained ones,
    `frozen` the rest (LoRA's base weights: no gradient is computed for them)."""
    nll_bt, log_z_bt = token_nll(graphdef, lora.join(params, frozen) if frozen else params, batch, chunk, key)
    w_bt = target_weights(batch)
    nll_sum = jnp.sum(nll_bt * w_bt)
    objective = nll_sum + z_loss * jnp.sum(jnp.square(log_z_bt) * w_bt)
    return objective, (nll_sum, jnp.sum(w_bt))


def grads_and_metrics(graphdef, params, batch: Batch, microbatches: int, z_loss: float, loss_chunk: int = 0,
                      frozen: Any = None, key: jax.Array | None = None):
    """Gradient (with respect to `params`; `frozen` ones take part in the loss only) of the token-mean
    objective over the whole batch, summed over microbatches inside one `lax.scan` so accumulation is
    exact (sum of sums, one division at the end). `key`: LoRA dropout, folded with the microbatch."""
    grad_fn = jax.value_and_grad(_sums, argnums=1, has_aux=True)
    if microbatches == 1:
        (_, (nll_sum, count)), grads = grad_fn(graphdef, params, batch, z_loss, loss_chunk, frozen, key)
    else:
        split = jax.tree.map(lambda x: x.reshape(microbatches, -1, *x.shape[1:]), batch)

        def body(acc, micro):
            i, micro = micro
            k = None if key is None else jax.random.fold_in(key, i)
            (_, (nll, n)), g = grad_fn(graphdef, params, micro, z_loss, loss_chunk, frozen, k)
            return jax.tree.map(jnp.add, acc, (g, nll, n)), None

        zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, nll_sum, count), _ = jax.lax.scan(body, zeros, (jnp.arange(microbatches), split))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    return grads, {"loss": nll_sum / denom, "tokens": count}


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh: jax.sharding.Mesh, state_shardings: Any,
                    microbatches: int = 1, z_loss: float = 0.0, skip_nonfinite: bool = False,
                    loss_chunk: int = 0, lora_cfg: Any = None, seed: int = 0
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """jit(train_step) with the state donated and pinned to `state_shardings`, the batch on the data
    axes. With `skip_nonfinite`, a step whose loss or gradient is NaN/Inf leaves the state unchanged;
    `loss_chunk` is `token_nll`'s chunk. With LoRA on (`lora_cfg`) only the adapters train: the base
    weights get no gradient and no optimizer state; its dropout draws from (seed, step)."""
    lora_on = lora_cfg is not None and lora_cfg.enabled
    dropout = lora_on and lora_cfg.dropout > 0

    def train_step(state: TrainState, batch: Batch):
        trained, frozen = lora.split(state.params, lora.trainable(state.params, lora_cfg)) if lora_on \
            else (state.params, None)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), state.step) if dropout else None
        grads, metrics = grads_and_metrics(graphdef, trained, batch, microbatches, z_loss, loss_chunk, frozen, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, trained)
        trained = optax.apply_updates(trained, updates)
        params = lora.join(trained, frozen) if lora_on else trained
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                             (params, opt_state), (state.params, state.opt_state))
        metrics.update(grad_norm=grad_norm, lr=schedule(state.step), finite=finite)
        return TrainState(state.step + 1, params, opt_state), metrics

    batch_sh = batch_sharding(mesh)
    return jax.jit(train_step, in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, None),
                   donate_argnums=(0,))


def make_eval_step(graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh, params_shardings: Any,
                   token_bytes_v: jax.Array, loss_chunk: int = 0) -> Callable[[Any, Batch], dict]:
    """jit(eval_step): summed nll (nats), target count and target UTF-8 bytes, for loss and bits/byte."""

    def eval_step(params, batch: Batch):
        nll_bt, _ = token_nll(graphdef, params, batch, loss_chunk)
        w_bt = target_weights(batch)
        n_bytes = jnp.sum(token_bytes_v[jnp.pad(batch["tokens"][:, 1:], ((0, 0), (0, 1)))] * w_bt)
        return {"nll_sum": jnp.sum(nll_bt * w_bt), "tokens": jnp.sum(w_bt), "bytes": n_bytes}

    return jax.jit(eval_step, in_shardings=(params_shardings, batch_sharding(mesh)))
