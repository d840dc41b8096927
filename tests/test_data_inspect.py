"""`data inspect`: the report names the corpus, cleaning drops, pairs, token counts and packed rows."""

from __future__ import annotations

import re
import shutil

from codegen_jax.config import Config, DataConfig
from codegen_jax.data.inspect import inspect_data


def test_inspect_reports_every_section(code_corpus, small_tokenizer, tmp_path):
    corpus = tmp_path / "c"
    shutil.copytree(code_corpus, corpus)
    (corpus / "dup.py").write_text((corpus / "mod_1.py").read_text())
    (corpus / "blob.py").write_bytes(b"\x00\x01\x02")
    small_tokenizer.save(tmp_path / "tok")
    cfg = Config()
    cfg.data = DataConfig(source="files", paths=[str(corpus)], seq_len=128, pair_ratio=0.5,
                          tokenizer=str(tmp_path / "tok"))
    cfg.train.batch_size = 4
    out = inspect_data(cfg)
    assert "documents: train" in out and "languages: python 24" in out
    assert re.search(r"drop duplicate +1 +e\.g\. c/mod_1\.py", out)  # dup.py is read first
    assert re.search(r"drop binary +1 +e\.g\. c/blob\.py", out)
    assert "instruction pairs (train):" in out and "tokens per document" in out
    assert "efficiency" in out and "padding" in out
    # A pair's prompt is shown as not-a-target, its code as target.
    assert "⟦<|endoftext|><|inst|># def func_" in out and "<|code|>⟧def func_" in out
