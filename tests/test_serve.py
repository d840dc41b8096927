"""`codegen-jax serve`: a real server process on 127.0.0.1 answering the `openai` client; continuous
batching exact against requests sent alone; fill-in-the-middle; bad requests; disconnects; load."""

from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from flax import nnx

from codegen_jax.checkpoint import write_params_checkpoint
from codegen_jax.model import create_model

from conftest import tiny_config

KEY = "test-key"
PROMPTS = ["def add(a, b):\n    return", "import os\n", "class Point:\n    def __init__(self, x):\n", "x = [",
           "def fib(n):\n    if n < 2:\n        return n\n", "# utils\n"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, checkpoint, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "codegen_jax.cli", "serve", "--checkpoint", str(checkpoint), "--port",
             str(self.port), "--model-name", "tiny", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("server did not start")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def checkpoint(small_tokenizer, tmp_path_factory):
    cfg = tiny_config(f"model.vocab_size={small_tokenizer.vocab_size}", "model.max_seq_len=256")
    model = create_model(cfg.model, seed=0)
    workdir = tmp_path_factory.mktemp("served")
    write_params_checkpoint(workdir, cfg, nnx.to_pure_dict(nnx.state(model)), small_tokenizer, step=1)
    return workdir


@pytest.fixture(scope="module")
def server(checkpoint):
    # warmed: every decode bucket of greedy, sampled and top_p requests compiled before it listens (4
    # slots: 3 rows buckets x 3 cache lengths per mode)
    s = Server(checkpoint, "--slots", "4", "--max-queue", "64", "--api-key", KEY, "--warmup", "16")
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _complete(client, prompt, **kw):
    return client.completions.create(model="tiny", prompt=prompt, **{"max_tokens": 12, "temperature": 0, **kw})


def test_openai_client_completes_and_matches_generate(client, checkpoint, small_tokenizer):
    from codegen_jax.sample import Generator

    r = _complete(client, PROMPTS[0])
    (ours,), = Generator.from_checkpoint(checkpoint).generate([PROMPTS[0]], max_new_tokens=12, stop=[])
    assert r.object == "text_completion" and r.choices[0].text == ours.text
    assert r.choices[0].finish_reason == ("length" if ours.finish_reason == "length" else "stop")
    assert r.usage.completion_tokens == len(ours.tokens) and r.usage.prompt_tokens > 0
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_n_samples_with_a_seed_repeat_and_differ(client):
    a = _complete(client, PROMPTS[1], n=3, temperature=1.0, seed=7, max_tokens=16)
    b = _complete(client, PROMPTS[1], n=3, temperature=1.0, seed=7, max_tokens=16)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1


def test_streamed_chunks_join_to_the_text(client):
    whole = _complete(client, PROMPTS[2], max_tokens=20)
    pieces, reasons = [], []
    for event in _complete(client, PROMPTS[2], max_tokens=20, stream=True):
        pieces.append(event.choices[0].text)
        reasons.append(event.choices[0].finish_reason)
    assert "".join(pieces) == whole.choices[0].text and reasons[-1] == whole.choices[0].finish_reason
    assert all(r is None for r in reasons[:-1])


def test_stop_strings_cut_the_text(client):
    whole = _complete(client, PROMPTS[4], max_tokens=24).choices[0].text
    stop = whole[len(whole) // 2:][:2]
    assert len(stop) == 2 and whole.find(stop) > 0  # a real cut inside the text
    r = _complete(client, PROMPTS[4], max_tokens=24, stop=["never there", stop])
    assert r.choices[0].text == whole[:whole.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(e.choices[0].text for e in _complete(client, PROMPTS[4], max_tokens=24, stop=[stop],
                                                              stream=True))
    assert streamed == r.choices[0].text


def test_suffix_equals_the_literal_fim_prompt(client):
    a = _complete(client, "def area(r):\n    return ", suffix="\n\nprint(area(2))\n", max_tokens=10)
    b = _complete(client, "<fim_prefix>def area(r):\n    return <fim_suffix>\n\nprint(area(2))\n<fim_middle>",
                  max_tokens=10)
    assert a.choices[0].text == b.choices[0].text
    infill = httpx.post(client.base_url.join("/infill").__str__().replace("/v1/infill", "/infill"),
                        headers={"Authorization": f"Bearer {KEY}"},
                        json={"input_prefix": "def area(r):\n    return ", "input_suffix": "\n\nprint(area(2))\n",
                              "n_predict": 10}).json()
    assert infill["content"] == a.choices[0].text


def test_concurrent_requests_equal_each_sent_alone(client, server):
    """16 greedy requests of different prompts and budgets, staggered: continuous batching is exact."""
    jobs = [(PROMPTS[i % len(PROMPTS)] * (1 + i % 3), 4 + (i * 5) % 23) for i in range(16)]

    def one(job, delay):
        time.sleep(delay)
        return _complete(client, job[0], max_tokens=job[1]).choices[0].text

    with cf.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(one, jobs, [0.02 * (i % 5) for i in range(16)]))
    alone = [one(job, 0) for job in jobs]
    assert together == alone
    compiles = server.health()["compiles"]
    with cf.ThreadPoolExecutor(16) as pool:  # the same shapes again: warm, nothing compiles
        assert list(pool.map(one, jobs, [0.0] * 16)) == alone
    assert server.health()["compiles"] == compiles


def test_warmup_covers_prompts_of_its_length_with_their_bos(client, server, small_tokenizer):
    """--warmup 16: a prompt of 16 tokens is 17 ids with the server's BOS (the next bucket up): warmed
    too, so it compiles nothing."""
    prompt = next(p for p in ("a" + " a" * k for k in range(40)) if len(small_tokenizer.prompt_ids(p)) == 17)
    compiles = server.health()["compiles"]
    for temperature in (0.0, 0.8):
        _complete(client, prompt, max_tokens=3, temperature=temperature)
    assert server.health()["compiles"] == compiles


@pytest.mark.parametrize("body, message", [
    ('{"model": "tiny", "prompt": ', "JSON"),
    ({"prompt": "x", "max_tokens": -1}, "max_new_tokens must be >= 1"),
    ({"prompt": "x", "temperature": -1}, "temperature must be >= 0"),
    ({"prompt": "x", "max_tokens": "abc"}, "max_tokens"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x" * 1_000_000, "max_tokens": 4}, "more than the context of 256"),
    ({"prompt": "x", "model": "gpt-4"}, "not served here"),
    ({"prompt": "x", "echo": True}, "echo"),
])
def test_bad_requests_are_4xx_with_a_message_and_the_server_keeps_serving(server, client, body, message):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.url + "/v1/completions", content=content, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code in (400, 404) and message in r.json()["error"]["message"], r.text
    assert _complete(client, "x", max_tokens=2).choices[0].finish_reason in ("length", "stop")


def test_missing_or_wrong_api_key_is_401(server):
    for headers in ({}, {"Authorization": "Bearer nope"}):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # health needs no key


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": PROMPTS[0], "max_tokens": 200, "stream": True, "temperature": 0}) as r:
        next(r.iter_lines())  # one chunk, then hang up
    deadline = time.monotonic() + 20
    while server.health()["active"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.health()["active"] == 0 and server.health()["outstanding"] == 0


def test_a_full_queue_is_429_and_sigterm_drains_then_exits_0(checkpoint):
    s = Server(checkpoint, "--slots", "1", "--max-queue", "1")
    try:
        def post(i):
            return httpx.post(s.url + "/v1/completions", timeout=120,
                              json={"prompt": PROMPTS[i % 6], "max_tokens": 60, "temperature": 0})

        with cf.ThreadPoolExecutor(6) as pool:
            codes = sorted(r.status_code for r in pool.map(post, range(6)))
        assert 429 in codes and 200 in codes
        assert all(c in (200, 429) for c in codes)
        # more rows than slots + queue can ever hold: 400, not a 429 to retry forever
        r = httpx.post(s.url + "/v1/completions", timeout=60, json={"prompt": "x", "max_tokens": 2, "n": 3})
        assert r.status_code == 400 and "more rows than this server holds" in r.json()["error"]["message"]
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("r", post(0)))
        t.start()
        time.sleep(0.5)
        s.proc.send_signal(signal.SIGTERM)  # in flight: finishes, then the server exits 0
        t.join(timeout=60)
        assert result["r"].status_code == 200 and s.proc.wait(timeout=60) == 0
    finally:
        s.close()


@pytest.mark.slow
def test_500_requests_from_32_clients_all_correct_and_memory_flat(server, client):
    prompts = [p * k for p in PROMPTS for k in (1, 2)]
    expected = {p: _complete(client, p, max_tokens=6).choices[0].text for p in prompts}
    rss_warm = server.rss_kib()
    with cf.ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(lambda i: (prompts[i % len(prompts)], _complete(
            client, prompts[i % len(prompts)], max_tokens=6).choices[0].text), range(500)))
    assert all(text == expected[p] for p, text in texts)
    assert server.rss_kib() - rss_warm < 64 * 1024  # KiB: no growth beyond allocator noise
    assert server.health()["outstanding"] == 0
