"""gs:// run directories, checkpoints and data: a training run against a local Cloud Storage server
(tests/gcs_emulator.py) equals the same run on local disk, resumes exactly, moves an unreadable step
aside, and generates; a checkpoint two processes wrote to the bucket resumes in one; URLs where only
local paths work are refused with one line."""

import json
import os
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from codegen_jax import storage
from codegen_jax.cli import main
from codegen_jax.errors import UserError

from conftest import TINY_CLI_TRAIN, write_code_corpus

BUCKET = "bkt"
TRAIN_ARGS = [*TINY_CLI_TRAIN, "checkpoint.every=3", "optim.schedule_steps=6"]
CLI = str(Path(sys.executable).with_name("codegen-jax"))


# ---- without a server ----

def test_url_where_only_local_paths_work_is_refused(capsys):
    assert main(["generate", "--checkpoint", "runs/x", "--prompt", "def f(", "--out", "gs://b/out.jsonl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out gs://b/out.jsonl: must be a local path" in err[0]


def test_unsupported_url_scheme_is_refused(capsys):
    assert main(["train", "--config", "configs/tiny.yaml", "--workdir", "ftp://host/run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unsupported URL scheme ftp://" in err[0]


def test_missing_backend_names_the_extra(monkeypatch):
    monkeypatch.setattr(storage.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"s3:// paths need the s3fs package; pip install 'codegen-jax\[s3\]'"):
        storage.path("s3://bucket/run")


def test_sync_tree_uploads_only_new_or_changed_files(tmp_path):
    local, remote = tmp_path / "local", tmp_path / "remote"
    (local / "tb").mkdir(parents=True)
    (local / "metrics.jsonl").write_text("a\n")
    (local / "tb" / "events").write_text("e1")
    (local / "wandb").mkdir()
    (local / "wandb" / "x").write_text("skip me")
    uploaded: dict = {}
    storage.sync_tree(local, remote, uploaded, skip=("wandb",))
    assert (remote / "tb" / "events").read_text() == "e1" and not (remote / "wandb").exists()
    (remote / "tb" / "events").write_text("changed remotely")  # unchanged locally: not uploaded again
    with open(local / "metrics.jsonl", "a") as f:
        f.write("b\n")
    storage.sync_tree(local, remote, uploaded, skip=("wandb",))
    assert (remote / "metrics.jsonl").read_text() == "a\nb\n"
    assert (remote / "tb" / "events").read_text() == "changed remotely"


def test_local_copy_of_a_local_path_is_the_path_itself(tmp_path):
    assert storage.local_copy(str(tmp_path)) == tmp_path


# ---- against a local Cloud Storage server ----

@pytest.fixture(scope="module")
def gcs():
    """(environment for child processes, base URL) of a fresh in-memory Cloud Storage server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Path(__file__).with_name("gcs_emulator.py")
    proc = subprocess.Popen([sys.executable, str(server), str(port), BUCKET], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "ready"
    url = f"http://127.0.0.1:{port}"
    # gcsfs (etils.epath) and tensorstore (Orbax arrays) each read their own endpoint variable
    env = dict(os.environ, STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
               GOOGLE_AUTH_TOKEN_FOR_TESTING="test", JAX_PLATFORMS="cpu")
    yield env, url
    proc.terminate()
    proc.wait()


def _objects(url: str, prefix: str) -> list[str]:
    names, token = [], ""
    while True:
        q = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
        with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o?{q}") as r:
            page = json.load(r)
        names += [o["name"] for o in page.get("items", [])]
        token = page.get("nextPageToken")
        if not token:
            return sorted(names)


def _read(url: str, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media") as r:
        return r.read()


def _delete(url: str, name: str) -> None:
    req = urllib.request.Request(f"{url}/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}",
                                 method="DELETE")
    urllib.request.urlopen(req).close()


def _run(env, *args, expect: int = 0) -> str:
    proc = subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def _losses(jsonl: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, jsonl.splitlines()) if "loss" in r}


@pytest.mark.slow
def test_gcs_run_equals_local_run_resumes_and_generates(gcs, tmp_path):
    env, url = gcs
    corpus = write_code_corpus(tmp_path)
    subprocess.run([sys.executable, "-c", "import sys; from codegen_jax import storage; "
                    "storage.copy_tree(storage.path(sys.argv[1]), storage.path(sys.argv[2]))",
                    str(corpus), f"gs://{BUCKET}/data/corpus"], env=env, check=True, capture_output=True)

    local = tmp_path / "local"
    _run(env, "train", "--config", "configs/tiny.yaml", "--workdir", str(local), *TRAIN_ARGS,
         "data.source=files", f"data.paths=[{corpus}]", "train.steps=6")
    ref = _losses((local / "metrics.jsonl").read_text())

    run = f"gs://{BUCKET}/run"
    args = ["train", "--config", "configs/tiny.yaml", "--workdir", run, *TRAIN_ARGS,
            "data.source=files", f"data.paths=[gs://{BUCKET}/data/corpus]"]
    _run(env, *args, "train.steps=3")
    assert "resumed from step 3" in _run(env, *args, "train.steps=6")
    got = _losses(_read(url, "run/metrics.jsonl").decode())
    assert got == ref  # the same data, tokenizer and steps, bit for bit, across a restart

    names = _objects(url, "run/")
    for expected in ("run/config.yaml", "run/tokenizer/tokenizer.json", "run/loss.png",
                     "run/checkpoints/3/commit_success.txt", "run/checkpoints/6/commit_success.txt",
                     "run/checkpoints/6/data/process_0-of-1.json"):
        assert expected in names, expected
    assert any(n.startswith("run/tensorboard/events.out.tfevents") for n in names)

    gen = ["generate", "--prompt", "def func_1(x", "--max-new-tokens", "12"]
    local_text = _run(env, *gen, "--checkpoint", str(local)).splitlines()[0]
    assert local_text.startswith("def func_1(x") and local_text in _run(env, *gen, "--checkpoint", run)

    # an unreadable latest step is moved aside (copy, then delete: no rename on an object store)
    for name in _objects(url, "run/checkpoints/6/params/"):
        _delete(url, name)
    out = _run(env, *args, "train.steps=6")
    assert "checkpoint step 6 is unreadable" in out and "resumed from step 3" in out
    moved = _objects(url, "run/checkpoints_unreadable/")  # the broken step, kept for inspection
    assert any(n.endswith("/opt_state/_METADATA") for n in moved) and not any("/params/" in n for n in moved)
    assert "run/checkpoints/6/params/commit_success.txt" in _objects(url, "run/checkpoints/6/")  # saved again
    assert _losses(_read(url, "run/metrics.jsonl").decode()) == ref


@pytest.mark.slow
def test_missing_gcs_data_path_is_one_line(gcs, tmp_path):
    env, _ = gcs
    out = _run(env, "train", "--config", "configs/tiny.yaml", "--workdir", str(tmp_path / "w"), *TRAIN_ARGS,
               "data.source=files", f"data.paths=[gs://{BUCKET}/no/such/dir]", expect=2)
    errors = [line for line in out.splitlines() if "error:" in line]
    assert errors == [f"codegen-jax train: error: path not found: gs://{BUCKET}/no/such/dir"]


@pytest.mark.slow
def test_gcs_checkpoint_from_two_processes_resumes_in_one(gcs):
    env, url = gcs
    run = f"gs://{BUCKET}/mp"
    args = ["configs/tiny.yaml", "--workdir", run, *TRAIN_ARGS, "data.max_docs=150"]  # the stdlib corpus
    mp_env = dict(env, DEVICES_PER_PROCESS="2", CODEGEN_JAX=CLI)
    proc = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", *args, "train.steps=3"],
                          capture_output=True, text=True, env=mp_env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "mp/checkpoints/3/data/process_1-of-2.json" in _objects(url, "mp/")
    # one process reads the iterator state that two processes wrote (process_0-of-2.json)
    assert "resumed from step 3" in _run(env, "train", "--config", *args, "train.steps=6")
    losses = _losses(_read(url, "mp/metrics.jsonl").decode())
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
