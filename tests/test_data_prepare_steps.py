"""The pieces of `data prepare` on their own: languages, secrets/PII redaction, MinHash, decontamination,
tree-sitter pairs, the record format."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from codegen_jax.data.prepare import languages
from codegen_jax.errors import UserError

from prepare_corpus import SECRETS, humaneval_text

pytest.importorskip("datatrove", reason="the prepare extra is not installed")


# ---- languages ---------------------------------------------------------------------------------------

REQUIRED = ("python javascript typescript java c cpp csharp go rust ruby php kotlin swift scala shell sql html css "
            "markdown yaml json toml lua r julia haskell ocaml perl dart zig").split()


def test_the_language_table_covers_thirty_languages_by_extension_name_and_shebang():
    assert set(REQUIRED) <= set(languages.LANGUAGES) and len(languages.LANGUAGES) >= 30
    cases = {"a/b.py": "python", "x.TSX": "typescript", "Main.java": "java", "k.kts": "kotlin", "lib.rs": "rust",
             "m.ml": "ocaml", "s.zig": "zig", "d.dart": "dart", "Makefile": "makefile", "Dockerfile": "dockerfile",
             "CMakeLists.txt": "cmake", "Gemfile": "ruby", "q.sql": "sql", "n.jl": "julia", "page.htm": "html"}
    for path, lang in cases.items():
        assert languages.detect(path) == lang, path
    assert languages.detect("bin/tool", "#!/usr/bin/env python3\nprint(1)\n") == "python"
    assert languages.detect("run", "#!/bin/bash -e\n") == "shell"
    assert languages.detect("x", "no shebang") == languages.UNKNOWN
    assert languages.detect("row:1", declared="C++") == "cpp"  # a data file's own language column
    assert languages.detect("a.py", declared="Klingon") == "python"  # unknown declarations fall back
    for lang in REQUIRED:  # every language is reachable from one of its own extensions
        ext = languages.LANGUAGES[lang].extensions[0]
        assert languages.detect(f"f{ext}") == lang


def test_language_names_are_checked_and_weights_resample_stably():
    assert languages.check_names(["Python", "C++", "golang"], "k") == ["python", "cpp", "go"]
    with pytest.raises(UserError, match="unknown language 'rustt'; did you mean rust"):
        languages.check_names(["rustt"], "data.languages")
    with pytest.raises(UserError, match="language:weight"):
        languages.parse_weights(["python=2"])
    assert languages.parse_weights(["python:2", "go:0.5"]) == {"python": 2.0, "go": 0.5}
    keys = [f"doc{i}" for i in range(4000)]
    for weight in (0.0, 0.5, 1.0, 2.5):
        counts = [languages.copies(weight, k) for k in keys]
        assert set(counts) <= {int(weight), int(weight) + 1}
        assert abs(np.mean(counts) - weight) < 0.05
        assert counts == [languages.copies(weight, k) for k in keys]  # the same documents every run
    exts, names, shebang = languages.selected_extensions(["python", ".proto"])
    assert ".pyi" in exts and ".proto" in exts and "SConstruct" in names and shebang
    assert len(languages.selected_extensions(["all"])[0]) > 100


# ---- redaction ---------------------------------------------------------------------------------------


def test_secrets_become_placeholders_and_code_stays():
    from codegen_jax.data.prepare.redact import redact_secrets

    counts = collections.Counter()
    text = (f'key = "{SECRETS["aws_id"]}"\ntoken = "{SECRETS["github"]}"\npassword = "{SECRETS["password"]}"\n'
            f'slack = "{SECRETS["slack"]}"\ngcp = "{SECRETS["gcp"]}"\n'
            "url = 'https://deploy:S3cr3tPassw0rd@db.internal/app'\n"
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n")
    out = redact_secrets(text, "python", counts)
    assert not any(v in out for v in SECRETS.values()) and "S3cr3tPassw0rd" not in out
    assert counts == {"key": 5, "password": 2} and out.count("<KEY>") == 5
    code = ('token = self.next_token()\nsecret = "Please enter your secret"\npassword = "changeme"\n'
            'api_key = os.environ["API_KEY"]\nsha = "3f786850e387550fdab836ed7e6dc881de23001b"\n')
    untouched = collections.Counter()
    assert redact_secrets(code, "python", untouched) == code and not +untouched
    assert "<KEY>" in redact_secrets(f"token: {SECRETS['yaml_token']}\n", "yaml", counts)  # bare value in config
    assert redact_secrets(f"token = {SECRETS['yaml_token']}\n", "python", counts).endswith("1\n")  # code: no


def test_pii_keeps_documentation_addresses():
    from datatrove.data import Document

    from codegen_jax.data.prepare.redact import RedactPII

    step = RedactPII("/nonexistent")
    text = ("mail jane@corp-mail.io or help@example.com, help@docs.example.org, a@b.test;\n"
            "hosts 34.117.59.81 8.8.8.8 127.0.0.1 10.1.2.3 192.0.2.7 198.51.100.1 203.0.113.9\n")
    doc = Document(text=text, id="0", metadata={"language": "text"})
    out = step.format(doc.text)
    assert out == ("mail <EMAIL> or help@example.com, help@docs.example.org, a@b.test;\n"
                   "hosts <IP_ADDRESS> <IP_ADDRESS> 127.0.0.1 10.1.2.3 192.0.2.7 198.51.100.1 203.0.113.9\n")
    assert step.counts == {"email": 1, "ip_address": 2}


# ---- MinHash -----------------------------------------------------------------------------------------


def test_lsh_bands_match_datasketch_and_signatures_estimate_jaccard(tmp_path):
    from datasketch.lsh import _optimal_param

    from codegen_jax.data.prepare.neardup import CodeMinhashSignature, lsh_params, minhash_config

    for t in (0.5, 0.7, 0.85):
        assert lsh_params(t) == _optimal_param(t, 128, 0.5, 0.5)
    step = CodeMinhashSignature(str(tmp_path), minhash_config(0.7))
    rng = np.random.RandomState(0)
    words = ["".join(rng.choice(list("abcdefghij"), 6)) for _ in range(440)]  # digits would all read as 0
    a = " ".join(words[:400])
    b = " ".join(words[:360] + words[400:])  # the last tenth replaced
    sa, sb = (set(step.get_shingles(t).ravel().tolist()) for t in (a, b))
    exact = len(sa & sb) / len(sa | sb)
    est = np.mean(np.concatenate(step.get_signature(step.get_shingles(a)))
                  == np.concatenate(step.get_signature(step.get_shingles(b))))
    assert 0.7 < exact < 0.9 and abs(est - exact) < 0.1
    layout = "def f(x):\n    return x + 1\n"
    spaced = "def  f( x ):\n\n        return   x+1\n"
    assert np.array_equal(step.get_shingles(layout), step.get_shingles(spaced))  # layout and punctuation ignored
    assert step.get_shingles("short text").shape == (1, 1)  # under 5 words: one shingle


# ---- decontamination ---------------------------------------------------------------------------------


def test_decontamination_finds_benchmark_code_and_spares_ordinary_code(tmp_path):
    from codegen_jax.data.prepare.decontam import build_index

    extra = tmp_path / "mine.jsonl"
    extra.write_text('{"prompt": "def spin_widget(w):\\n    \\"\\"\\"Spin the widget twice.\\"\\"\\"\\n"}\n')
    index = build_index([str(extra)], 10)
    leaked = humaneval_text(2)
    assert index.match("# copied\n" + leaked) == "humaneval"
    assert index.match(leaked.split('"""')[1]) == "humaneval"  # the docstring alone
    assert index.match("def g(w):\n    '''Spin the widget twice.'''\n    return w\n") == str(extra)
    ordinary = ("def total(numbers):\n    result = 0\n    for i in range(len(numbers)):\n"
                "        for j in range(len(numbers)):\n            result += numbers[i] * numbers[j]\n"
                "    return result\n# 0 1 2 3 4 5 6 7 8 9 10 11 12\n")
    assert index.match(ordinary) is None
    with pytest.raises(UserError, match="no string 'prompt'"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"question": 1}\n')
        build_index([str(bad)], 10)


# ---- tree-sitter pairs -------------------------------------------------------------------------------


def test_doc_comment_pairs_need_an_adjacent_doc_and_a_body():
    from codegen_jax.data.prepare.ts_pairs import mine_pairs

    src = ("/** Returns twice the value given. */\nfunction double(x) {\n  return 2 * x;\n}\n\n"
           "/** A comment that is separated. */\n\nfunction lonely(x) {\n  return x;\n}\n\n"
           "// A line comment is no JSDoc block.\nfunction plain(x) {\n  return x;\n}\n\n"
           "/** This function body is empty. */\nfunction empty() {}\n\n"
           "class Shape {\n  /**\n   * Computes the shape area.\n   */\n  area() {\n    return this.w * this.h;\n  }\n}\n")
    counts = collections.Counter()
    pairs = mine_pairs(src, "shapes.js", "javascript", counts)
    assert [p.instruction for p in pairs] == ["// function double(x)\n// Returns twice the value given.\n",
                                              "// area()\n// Computes the shape area.\n"]
    assert pairs[1].code == "area() {\n  return this.w * this.h;\n}\n"  # the method, dedented
    assert counts == {"functions": 5, "pairs": 2, "no_docstring": 2, "trivial_body": 1}
    go = "package p\n\n// Sum adds the numbers in xs.\nfunc Sum(xs []int) int {\n\tt := 0\n\treturn t\n}\n"
    assert mine_pairs(go, "s.go", "go")[0].instruction == "// func Sum(xs []int) int\n// Sum adds the numbers in xs.\n"
    assert mine_pairs("fn broken( {", "b.rs", "rust", counts) == [] and counts["syntax_error"] == 1


def test_record_format_round_trips_examples():
    from codegen_jax.data.prepare.record import decode_record, encode_record

    tokens = np.arange(10, 20, dtype=np.int32)
    for n_masked in (1, 4):
        mask = (np.arange(10) >= n_masked).astype(np.int32)
        t, m = decode_record(encode_record(tokens, mask))
        assert t.dtype == np.int32 and np.array_equal(t, tokens) and np.array_equal(m, mask)
    with pytest.raises(ValueError):
        encode_record(tokens, np.array([0, 1, 0, 1, 1, 1, 1, 1, 1, 1]))
