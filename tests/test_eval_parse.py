"""`eval parse`: completions cut where the function ends and given to ast.parse; the rate and failures."""

from __future__ import annotations

import json

from codegen_jax import cli
from codegen_jax.eval.parse import DEFAULT_PROMPTS, function_end, score

PROMPT = 'def f(x):\n    """Double x."""'


def test_function_end_cuts_at_the_first_line_back_at_the_def_indentation():
    body = "\n    y = x * 2\n\n    def inner():\n        return y\n    return y\nprint(f(2))\nmore"
    assert function_end(PROMPT, body) == "\n    y = x * 2\n\n    def inner():\n        return y\n    return y"
    assert function_end(PROMPT, "\n    return x * 2") == "\n    return x * 2"  # ran to the end
    method = '    def g(self):\n        """A method."""'
    assert function_end(method, "\n        return 1\n    def h(self):\n        pass") == "\n        return 1"


def test_score_counts_what_parses_and_keeps_the_failures():
    report = score([PROMPT, PROMPT, PROMPT],
                   ["\n    return x * 2\nclass Next:", "\n    return (x *\nnext = 1", "\n    retur x"])
    assert (report["parsed"], report["total"]) == (1, 3) and abs(report["parse_rate"] - 1 / 3) < 1e-9
    assert [f["completion"] for f in report["failures"]] == ["\n    return (x *", "\n    retur x"]
    assert all("SyntaxError" in f["error"] for f in report["failures"])
    assert report["unfinished"] == 0 and all(r["ended"] for r in report["results"])  # none hit the limit


def test_failures_still_inside_their_function_at_the_token_limit_are_counted_apart():
    completions = ["\n    if x:\n        return (x,", "\n    return (x *\nnext = 1", "\n    retur x", "\n    return x"]
    report = score([PROMPT] * 4, completions, hit_limit=[True, True, False, True])
    # 1: cut by the limit inside the function; 2: hit it too, but its function had ended (a wrong short
    # body); 3: stopped by itself; 4: parses, so it is no failure whatever the limit
    assert [r["ended"] for r in report["results"]] == [False, True, True, False]
    assert (report["parsed"], len(report["failures"]), report["unfinished"]) == (1, 3, 1)
    from codegen_jax.commands.eval import format_parse

    line = format_parse({**report, "max_new_tokens": 160}, failures=0)
    assert line == ("parse rate 25% (1 of 4 greedy function completions parse as Python); 1 of the 3 failures "
                    "were still inside their function at the 160-token limit")
    assert "limit" not in format_parse({**score([PROMPT], ["\n    retur x"]), "max_new_tokens": 160})


def test_run_parse_eval_takes_the_token_limit_from_each_generation_s_finish_reason():
    from types import SimpleNamespace

    from codegen_jax.eval.parse import run_parse_eval

    class Stub:  # the same unfinished text, once cut by the limit and once ended by EOS
        def generate(self, prompts, **kwargs):
            return [[SimpleNamespace(text="\n    if x:\n        return (x,", finish_reason=reason)]
                    for reason in ("length", "eos")]

    report = run_parse_eval(Stub(), [PROMPT, PROMPT], max_new_tokens=12)
    assert [r["ended"] for r in report["results"]] == [False, True] and report["unfinished"] == 1
    assert report["max_new_tokens"] == 12


def test_default_prompts_parse_with_a_body_and_empty_bodies_do_not_count():
    assert len(DEFAULT_PROMPTS) >= 20
    assert score(DEFAULT_PROMPTS, ["\n    return None"] * len(DEFAULT_PROMPTS))["parse_rate"] == 1.0
    for filler in ("", "\n    pass", "\n    # the the the", '\n    """\n    """'):  # parse, but are not code
        report = score(DEFAULT_PROMPTS, [filler] * len(DEFAULT_PROMPTS))
        assert report["parse_rate"] == 0.0 and "empty body" in report["failures"][0]["error"]


def test_cli_on_a_checkpoint(tmp_path, capsys, small_tokenizer):
    from flax import nnx

    from codegen_jax.checkpoint import write_params_checkpoint
    from codegen_jax.model import create_model

    from conftest import tiny_config

    # the run's own decoding (a training run's closing check blocks repeated n-grams when its config's
    # sample section says so) is the default; --no-repeat-ngram overrides it
    cfg = tiny_config(f"model.vocab_size={small_tokenizer.vocab_size}", "model.max_seq_len=128",
                      "sample.no_repeat_ngram=2")
    write_params_checkpoint(tmp_path / "run", cfg, nnx.to_pure_dict(nnx.state(create_model(cfg.model))),
                            small_tokenizer, step=1)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in DEFAULT_PROMPTS[:4]))
    out = tmp_path / "parse.json"
    assert cli.main(["eval", "parse", "--checkpoint", str(tmp_path / "run"), "--prompts", str(prompts),
                     "--max-new-tokens", "24", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["total"] == 4 and f"({report['parsed']} of 4 greedy function completions" in printed
    assert len(report["results"]) == 4 and all(r["prompt"] == p for r, p in zip(report["results"], DEFAULT_PROMPTS))
    assert report["no_repeat_ngram"] == 2 and "; 2-grams blocked)" in printed.splitlines()[0]
    assert cli.main(["eval", "parse", "--checkpoint", str(tmp_path / "run"), "--prompts", str(prompts),
                     "--max-new-tokens", "24", "--no-repeat-ngram", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["no_repeat_ngram"] == 0 and "blocked" not in printed


def test_the_completed_function_is_judged_not_a_helper_before_it():
    helper = 'def helper(x):\n    return x\n\n\ndef f(x):\n    """Double x."""'
    assert score([helper], ["\n    return helper(x) * 2"])["parse_rate"] == 1.0
    report = score([helper], ["\n    pass"])  # the helper's body does not make f's count
    assert report["parse_rate"] == 0.0 and "empty body" in report["failures"][0]["error"]


def test_a_prompts_file_line_without_a_def_is_one_line(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT}) + "\n" + json.dumps({"prompt": "x = 1"}) + "\n")
    assert cli.main(["eval", "parse", "--checkpoint", str(tmp_path / "none"), "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 2 has no 'def'" in err[0]
