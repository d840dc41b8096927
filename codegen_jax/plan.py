"""Planning a config on its mesh: parameters, FLOPs per token and per-device memory of a config on its mesh.

Parameter, optimizer and gradient bytes are exact: each array's shard shape under the rules table.
Activations come from the compiled train step's memory analysis when the mesh fits this machine's
devices and the model is small enough to compile here; otherwise from an analytic estimate.
"""

from __future__ import annotations

import math
import types
from typing import Any

import jax
import numpy as np

from codegen_jax.config import Config
from codegen_jax.config_checks import mesh_shape
from codegen_jax.flops import attention_flops_per_token, flops_per_token, param_count
from codegen_jax.model import abstract_model, resolve_config
from codegen_jax.sharding import batch_sharding, logical_to_spec

GIB = 1024**3
# usable HBM per device (GiB) of accelerators people train on
ACCELERATORS = {"TPU v5e": 16, "TPU v4": 32, "TPU v5p": 95, "TPU v6e": 32, "A100-80GB": 80, "H100": 80,
                "H200": 141}
_COMPILE_LIMIT = 300_000_000  # parameters: above this, compiling the step on CPU costs too much


def _target_devices(cfg: Config, devices: int | None) -> int:
    if devices:
        return devices
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    return math.prod(sizes) if all(s > 0 for s in sizes) else jax.device_count()


def shard_bytes(cfg: Config, sizes: dict[str, int], trained_only: bool = False) -> tuple[int, int]:
    """(total, per-device) parameter bytes: every array divided by the mesh axes the rules give it
    (`trained_only`: the arrays training updates, with LoRA the adapters)."""
    from flax import nnx

    from codegen_jax.lora import is_adapter

    mesh = types.SimpleNamespace(shape=sizes)  # logical_to_spec only reads axis sizes
    _, state = abstract_model(cfg.model, lora=cfg.lora)
    total = per_device = 0
    for path, v in nnx.to_flat_state(state):
        if trained_only and cfg.lora.enabled and not is_adapter(path):
            continue
        spec = logical_to_spec(v.get_metadata().get("out_sharding"), v.shape, mesh)
        shards = math.prod(math.prod(sizes[a] for a in ((ax,) if isinstance(ax, str) else ax))
                           for ax in spec if ax is not None)
        nbytes = math.prod(v.shape) * np.dtype(v.dtype).itemsize
        total += nbytes
        per_device += nbytes // shards
    return total, per_device


def activation_bytes(cfg: Config, sizes: dict[str, int]) -> int:
    """Analytic per-device activation memory of one microbatch's forward+backward (Korthikanti et al.
    2022 per-layer counts, scaled to our compute dtype), plus fp32 logits and their gradient (of one
    `train.loss_chunk` of positions at a time when it is set)."""
    m = cfg.model
    b = cfg.train.batch_size // (sizes["data"] * sizes["fsdp"]) // cfg.optim.grad_accum
    t, d, f, h = cfg.data.seq_len, m.d_model, m.d_ff, m.n_heads
    elem = np.dtype(m.dtype).itemsize
    tp = sizes["tensor"]
    full_layer = b * t * (10 * d + (3 * h * m.head_dim + 3 * f) / tp) * elem + 2 * b * h * t * t * elem / tp
    saved = {"none": full_layer * m.n_layers,
             "dots_saveable": b * t * (4 * d + (2 * h * m.head_dim + 3 * f) / tp) * elem * m.n_layers + full_layer,
             "full": b * t * d * elem * m.n_layers + full_layer}[m.remat]
    logit_t = min(t, cfg.train.loss_chunk) if cfg.train.loss_chunk > 0 else t
    logits = 2 * b * logit_t * m.vocab_size * 4 / tp
    return int(saved + logits)


def compiled_activation_bytes(cfg: Config) -> int | None:
    """Temp memory of the compiled train step on this machine's devices (None if it can't be done)."""
    from codegen_jax.sharding import make_mesh

    if param_count(cfg.model) > _COMPILE_LIMIT:
        return None
    try:
        return _compile_step_temp_bytes(cfg, make_mesh(mesh_shape(cfg.mesh, jax.device_count())))
    except Exception:  # noqa: BLE001 - planning falls back to the analytic estimate
        return None


def _compile_step_temp_bytes(cfg: Config, mesh) -> int:
    from codegen_jax.train.optim import make_optimizer, schedule
    from codegen_jax.train.step import make_train_step, train_state_layout

    graphdef, abs_state = abstract_model(cfg.model, lora=cfg.lora)
    opt = make_optimizer(cfg.optim, cfg.train.steps)
    state_sh, state = train_state_layout(abs_state, opt, mesh, cfg.lora)
    step = make_train_step(graphdef, opt, schedule(cfg.optim, cfg.train.steps), mesh, state_sh,
                           cfg.optim.grad_accum, cfg.optim.z_loss, loss_chunk=cfg.train.loss_chunk, lora_cfg=cfg.lora)
    batch = {k: jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len), np.int32)
             for k in ("tokens", "segment_ids", "positions", "loss_mask")}
    with jax.set_mesh(mesh):  # as training traces it (sharding.on_mesh)
        return int(step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes)


def plan(cfg: Config, devices: int | None = None) -> dict[str, Any]:
    n = _target_devices(cfg, devices)
    sizes = mesh_shape(cfg.mesh, n)
    total, params_dev = shard_bytes(cfg, sizes)
    _, trained_dev = shard_bytes(cfg, sizes, trained_only=True)  # with LoRA: the adapters
    act = compiled_activation_bytes(cfg) if n == jax.device_count() else None
    out = {"devices": n, "mesh": sizes, "params": param_count(cfg.model),
           "flops_per_token": flops_per_token(cfg.model, cfg.data.seq_len),
           "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len,
           "params_bytes_total": total, "params_bytes": params_dev,
           "optimizer_bytes": 2 * trained_dev,  # Adam's mu and nu of what trains, in the parameter dtype
           "grads_bytes": trained_dev,
           "activations_bytes": act if act is not None else activation_bytes(cfg, sizes),
           "activations_source": "compiled" if act is not None else "analytic"}
    out["per_device_bytes"] = sum(out[k] for k in ("params_bytes", "optimizer_bytes", "grads_bytes",
                                                   "activations_bytes"))
    return out


# ---------------------------------------------------------------------------------------------------
# A TPU topology: the real programs compiled by libtpu's compiler on this host


def _topology_config(cfg: Config, **overrides: Any) -> Config:
    """`cfg` with `attention: auto` resolved for TPU and any `section.key` overrides applied."""
    import dataclasses

    from codegen_jax.config import from_dict

    d = cfg.to_dict()
    for key, value in overrides.items():
        section, leaf = key.split(".")
        d[section][leaf] = value
    out = from_dict(d)
    return dataclasses.replace(out, model=resolve_config(out.model, "tpu"))


def _train_program(cfg: Config, mesh: jax.sharding.Mesh) -> tuple[Any, tuple]:
    """The jitted train step and its abstract (state, batch), sharded on `mesh`."""
    from codegen_jax.train.optim import make_optimizer, schedule
    from codegen_jax.train.step import make_train_step, train_state_layout

    graphdef, abs_state = abstract_model(cfg.model, "tpu", lora=cfg.lora)
    opt = make_optimizer(cfg.optim, cfg.train.steps)
    state_sh, state = train_state_layout(abs_state, opt, mesh, cfg.lora)
    step = make_train_step(graphdef, opt, schedule(cfg.optim, cfg.train.steps), mesh, state_sh,
                           cfg.optim.grad_accum, cfg.optim.z_loss, loss_chunk=cfg.train.loss_chunk,
                           lora_cfg=cfg.lora)
    batch = {k: jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len), np.int32,
                                     sharding=batch_sharding(mesh))
             for k in ("tokens", "segment_ids", "positions", "loss_mask")}
    return step, (state, batch)


def _sampler_programs(cfg: Config, mesh: jax.sharding.Mesh) -> dict[str, tuple[Any, tuple]]:
    """The sampler's admit (prefill of every slot at once, prompts of half the context) and decode
    (one step; the loop body is the step) programs at `sample.batch_size` slots of full context."""
    import dataclasses
    import functools

    from flax import nnx

    from codegen_jax.sample import engine
    from codegen_jax.sample.filters import SamplingMode, SamplingParams
    from codegen_jax.sharding import abstract, state_shardings

    m = dataclasses.replace(cfg.model, scan_layers=False)  # the sampler's layout (model.unstacked)
    graphdef, abs_params = abstract_model(m, "tpu")
    params = abstract(nnx.to_pure_dict(abs_params), nnx.to_pure_dict(state_shardings(abs_params, mesh)))
    slots, capacity, prompt = cfg.sample.batch_size, m.max_seq_len, m.max_seq_len // 2
    state_sh = engine.state_shardings(m, mesh, slots, capacity)
    state = abstract(jax.eval_shape(functools.partial(engine.empty_state, m, slots, capacity)), state_sh)
    mode = SamplingMode(sample=True, top_k=False, top_p=True, min_p=False, repetition_penalty=False,
                        no_repeat_ngram=0, eos_id=0, pad_id=0, vocab_limit=m.vocab_size)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def arg(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=rep)

    n = slots
    sampling = SamplingParams(*(arg((n,), d) for d in (np.float32, np.float32, np.float32, np.int32,
                                                           np.float32)))
    admit_args = (params, state, arg((n, prompt), np.int32), arg((n,), np.int32), arg((n,), np.int32),
                  arg((n,), bool), arg((n, 3), np.uint32), sampling, arg((n,), np.int32))
    admit = jax.jit(functools.partial(engine.admit, graphdef, mode=mode), donate_argnums=(1,),
                    out_shardings=(state_sh, None))
    decode = jax.jit(functools.partial(engine.decode, graphdef, n_steps=1, length=capacity, mode=mode),
                     donate_argnums=(1,), out_shardings=(state_sh, None))
    stop = jax.ShapeDtypeStruct((slots,), bool, sharding=batch_sharding(mesh, 1))
    return {"prefill": (admit, admit_args), "decode": (decode, (params, state, None, stop))}


# libtpu options: no collective matmul loops (see `_flops_check`)
NO_WINDOWED_EINSUM = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                      "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def _flops_check(cfg: Config, mesh: jax.sharding.Mesh) -> dict[str, float]:
    """The compiler's FLOPs against ours on a program both count in full. The compiler's cost analysis
    counts a while loop's body once (a scanned layer stack reports about one layer, a chunked loss one
    chunk, accumulation one microbatch) and gives Pallas kernels (splash attention) no FLOPs, so the
    check compiles the same step with 2 unrolled layers, 1 row per chip, the whole loss in one piece,
    no accumulation or remat and the XLA attention, and compares with `flops_per_token` for it. Its
    optimizer is AdamW: the check is of the model's FLOPs, and Muon's Newton-Schulz matmuls are
    optimizer work `flops_per_token` does not count, about 5 x d_model / (tokens per chip) of the
    model's FLOPs: more than the model's own in this check's 1 row per chip (1.56x on tiny), ~6% in
    small's real step (65k tokens per chip). The SPMD partitioner also turns fsdp's all-gather +
    matmul (and matmul + reduce-scatter) into loops over the shards ("windowed einsum", when the
    operands are large enough: 17-37% of the FLOPs went uncounted for small, 1b and 7b on 32 chips),
    so the check compiles without them: the same FLOPs, counted in full. The XLA attention's backward
    recomputes the logits (`attention.causal_attention`, flash attention's backward): one of its two
    [t, s] matmuls once more, which the compiled program has and model FLOPs do not, so the check adds
    it to ours."""
    from codegen_jax import tpu

    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    check = _topology_config(cfg, **{"model.n_layers": 2, "model.scan_layers": False, "model.remat": "none",
                                     "model.attention": "xla", "train.batch_size": dp, "train.loss_chunk": 0,
                                     "optim.grad_accum": 1, "optim.name": "adamw"})
    step, args = _train_program(check, mesh)
    r = tpu.compile_report("train_step[flops check]", step, args, mesh, compiler_options=NO_WINDOWED_EINSUM)
    m, t = check.model, check.data.seq_len
    recompute = attention_flops_per_token(m, t) / 2  # q @ k^T, one of the two matmuls
    ours = (flops_per_token(m, t) + recompute) * t * dp / mesh.size
    return {"check_compiler_flops": r.flops, "check_model_flops": ours, "check_ratio": r.flops / ours,
            "check_program": "2 unrolled layers, 1 row per chip, no remat, XLA attention, whole loss, no windowed einsum"}


def _remat_factor(cfg: Config) -> float:
    """Hardware FLOPs over model FLOPs: full remat runs each layer's forward twice (4 passes, not 3)."""
    if cfg.model.remat != "full":
        return 1.0  # dots_saveable recomputes elementwise work only
    m, t = cfg.model, cfg.data.seq_len
    head = 2 * m.d_model * m.vocab_size
    return 1 + (flops_per_token(m, t, training=False) - head) / flops_per_token(m, t)


def _collective_bytes(cfg: Config, sizes: dict[str, int], per_device_params: int) -> float:
    """Analytic bytes each chip moves over ICI per train step: fsdp gathers the parameters (in the
    compute dtype) for the forward, again for the backward (and once more to rematerialize), per
    microbatch, and reduce-scatters the fp32 gradients; data parallelism all-reduces them."""
    m = cfg.model
    elem = np.dtype(m.dtype).itemsize / np.dtype(m.param_dtype).itemsize
    gathers = 3 if m.remat == "full" else 2
    fsdp, data = sizes["fsdp"], sizes["data"]
    full = per_device_params * fsdp  # this chip's parameters before the fsdp split
    moved = 0.0
    if fsdp > 1:
        moved += cfg.optim.grad_accum * gathers * full * elem * (fsdp - 1) / fsdp + full * (fsdp - 1) / fsdp
    if data > 1:
        moved += 2 * per_device_params * (data - 1) / data
    return moved


def plan_topology(cfg: Config, topology: str, programs: tuple[str, ...] = ("train_step", "prefill", "decode"),
                  estimate: bool = True) -> dict[str, Any]:
    """Compile `programs` of `cfg` for a TPU slice (e.g. `v5e-8`) on this host and report per-chip
    memory against HBM; with `estimate`, the compiler's FLOPs against the analytic ones and a roofline
    estimate of the step time and MFU (vendor peak FLOP/s, HBM and ICI bandwidth; perfect overlap)."""
    from codegen_jax import tpu
    from codegen_jax.config_checks import check_batch
    from codegen_jax.sharding import make_mesh

    topo = tpu.parse_topology(topology)
    devices = tpu.devices(topo)
    sizes = mesh_shape(cfg.mesh, topo.chips)
    check_batch(cfg, topo.chips)
    cfg = _topology_config(cfg)
    mesh = make_mesh(sizes, devices)
    hbm = tpu.hbm_bytes(devices[0])
    reports: dict[str, Any] = {}
    jobs = {"train_step": lambda: _train_program(cfg, mesh)} if "train_step" in programs else {}
    sampler = [p for p in ("prefill", "decode") if p in programs]
    if sampler:
        built = _sampler_programs(cfg, mesh)
        jobs.update({p: (lambda p=p: built[p]) for p in sampler})
    for name, make in jobs.items():
        jitted, args = make()
        reports[name] = tpu.compile_report(name, jitted, args, mesh).to_dict(hbm)
    out = {"config": cfg.name, "topology": topo.name, "topology_name": topo.topology_name, "chips": topo.chips,
           "chip": topo.chip.family, "mesh": sizes, "hbm_bytes": hbm, "params": param_count(cfg.model),
           "flops_per_token": flops_per_token(cfg.model, cfg.data.seq_len), "programs": reports,
           "fits": all(r["fits"] for r in reports.values())}
    if estimate and "train_step" in reports and reports["train_step"]["fits"]:
        out["estimate"] = _train_estimate(cfg, topo, sizes, reports["train_step"], mesh)
    if estimate and "decode" in reports and reports["decode"]["fits"]:
        out["decode_estimate"] = _decode_estimate(cfg, topo, reports["decode"])
    return out


def _train_estimate(cfg: Config, topo: Any, sizes: dict[str, int], report: dict, mesh) -> dict[str, Any]:
    """Roofline step time of the train step on this slice, labelled as the estimate it is: compute time
    (model FLOPs times the remat factor at peak bf16 FLOP/s) and collective time (`_collective_bytes`
    at the chip's ICI bandwidth), bracketed by perfect overlap (the larger of the two: `step_s`, `mfu`)
    and none (their sum: `step_s_no_overlap`, `mfu_no_overlap`). HBM traffic is left out: at these
    batches a step is compute-bound, and the compiler's byte count has the same loop problem as its
    FLOPs (see `_flops_check`)."""
    chip = topo.chip
    tokens_per_chip = cfg.train.batch_size * cfg.data.seq_len / topo.chips
    model_flops = flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_chip
    _, params_dev = shard_bytes(cfg, sizes)
    times = {"compute_s": model_flops * _remat_factor(cfg) / chip.peak_flops,
             "ici_s": _collective_bytes(cfg, sizes, params_dev) / chip.ici_bandwidth}
    step_s, serial_s = max(times.values()), sum(times.values())
    return {"kind": "roofline estimate, not a measurement: compute and ICI, perfect overlap .. none",
            "compiler_flops_as_counted": report["flops"], **_flops_check(cfg, mesh),
            "model_flops_per_chip": model_flops, "remat_factor": _remat_factor(cfg), **times,
            "bound": max(times, key=times.get).removesuffix("_s"), "step_s": step_s,
            "mfu": model_flops / (step_s * chip.peak_flops), "step_s_no_overlap": serial_s,
            "mfu_no_overlap": model_flops / (serial_s * chip.peak_flops), "peak_flops": chip.peak_flops}


def _decode_estimate(cfg: Config, topo: Any, report: dict) -> dict[str, Any]:
    """One decode step (the compiled loop body is one step, so the compiler's counts are per step):
    the larger of its FLOPs at peak and its bytes at HBM bandwidth, and the tokens/s it implies."""
    chip = topo.chip
    times = {"compute_s": report["flops"] / chip.peak_flops, "hbm_s": report["bytes_accessed"] / chip.hbm_bandwidth}
    step_s = max(times.values())
    return {"kind": "roofline estimate of one decode step (compiler FLOPs and bytes)", **times, "step_s": step_s,
            "bound": max(times, key=times.get).removesuffix("_s"),
            "tokens_per_s": cfg.sample.batch_size / step_s if step_s > 0 else 0.0}


# ---------------------------------------------------------------------------------------------------
# --search: the fastest setting that fits, by compiling candidates in order of estimated speed


def _candidates(cfg: Config, chips: int) -> list[dict[str, Any]]:
    """Overrides to try: rows per chip through grad_accum, remat none/dots_saveable/full, and the
    model split over fsdp alone or fsdp with tensor 2 or 4 (where the heads divide)."""
    m = cfg.model
    data = cfg.mesh.data if cfg.mesh.data > 0 else 1
    out = []
    for tensor in (1, 2, 4):
        if chips % (data * tensor) or m.n_heads % tensor or m.n_kv_heads % tensor:
            continue
        fsdp = chips // (data * tensor)
        rows = cfg.train.batch_size // (data * fsdp)
        if rows == 0 or cfg.train.batch_size % (data * fsdp):
            continue
        for remat in ("none", "dots_saveable", "full"):
            for accum in (a for a in (1, 2, 4, 8, 16) if rows % a == 0):
                out.append({"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor, "model.remat": remat,
                            "optim.grad_accum": accum})
    return out


def _estimated_seconds(cfg: Config, topo: Any) -> float:
    """Analytic step time for ordering candidates: compute with remat, fsdp gathers per microbatch,
    and tensor parallelism's activation all-reduces (4 per layer, forward and backward)."""
    sizes = mesh_shape(cfg.mesh, topo.chips)
    _, params_dev = shard_bytes(cfg, sizes)
    tokens = cfg.train.batch_size * cfg.data.seq_len / (sizes["data"] * sizes["fsdp"])
    compute = flops_per_token(cfg.model, cfg.data.seq_len) * tokens / sizes["tensor"] * _remat_factor(cfg)
    tp = sizes["tensor"]
    act = 4 * cfg.model.n_layers * tokens * cfg.model.d_model * np.dtype(cfg.model.dtype).itemsize * (tp - 1) / tp
    comm = _collective_bytes(cfg, sizes, params_dev) + act
    return max(compute / topo.chip.peak_flops, comm / topo.chip.ici_bandwidth) * (1 + 0.02 * cfg.optim.grad_accum)


def search(cfg: Config, topology: str, max_compiles: int = 12) -> dict[str, Any]:
    """Compile the train step for candidates (`_candidates`) fastest-estimated first, until one fits
    with 10% of HBM to spare; returns the winner's overrides (None if none fits within
    `max_compiles`) and every compile tried."""
    from codegen_jax import tpu
    from codegen_jax.sharding import make_mesh

    topo = tpu.parse_topology(topology)
    devices = tpu.devices(topo)
    hbm = tpu.hbm_bytes(devices[0])
    ranked = sorted(_candidates(cfg, topo.chips), key=lambda o: _estimated_seconds(_topology_config(cfg, **o), topo))
    tried = []
    for overrides in ranked[:max_compiles]:
        trial = _topology_config(cfg, **overrides)
        mesh = make_mesh(mesh_shape(trial.mesh, topo.chips), devices)
        step, args = _train_program(trial, mesh)
        r = tpu.compile_report("train_step", step, args, mesh).to_dict(hbm)
        tried.append({"overrides": overrides, "estimated_step_s": _estimated_seconds(trial, topo),
                      "per_device_bytes": r["per_device_bytes"], "fits": r["fits"], "compile_s": r["compile_s"]})
        if r["fits"] and r["per_device_bytes"] <= 0.9 * hbm:
            return {"best": overrides, "tried": tried, "hbm_bytes": hbm}
    return {"best": None, "tried": tried, "hbm_bytes": hbm}
