"""Chat-template SFT: a `datasets` source with OpenAI-style `messages` rows is rendered with the
tokenizer's chat_template (or our own format) and packed with the loss on assistant turns only."""

from __future__ import annotations

import json


from codegen_jax import cli
from codegen_jax.config import Config, DataConfig
from codegen_jax.data import pipeline

CHATS = [
    [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."},
     {"role": "assistant", "content": "def add(a, b):\n    return a + b\n"}],
    [{"role": "user", "content": "Square it."}, {"role": "assistant", "content": "def sq(x):\n    return x * x\n"},
     {"role": "user", "content": "And cube?"}, {"role": "assistant", "content": "def cube(x):\n    return x ** 3\n"}],
]
ANSWERS = [m["content"] for c in CHATS for m in c if m["role"] == "assistant"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _cfg(path) -> Config:
    cfg = Config()
    cfg.data = DataConfig(source="datasets", paths=[str(path)], seq_len=128, val_fraction=0.0, fim_rate=0.0)
    cfg.train.batch_size = 2
    return cfg


def _targets(batches, tok) -> list[str]:
    """The decoded text of each run of target tokens (loss_mask 1), row by row."""
    out = []
    for b in batches:
        for row, mask in zip(b["tokens"], b["loss_mask"]):
            runs, current = [], []
            for t, m in zip(row.tolist(), mask.tolist()):
                if m:
                    current.append(t)
                elif current:
                    runs.append(current)
                    current = []
            runs += [current] if current else []
            out += [tok.hf.decode(r) for r in runs]
    return out


def _write(tmp_path, rows) -> object:
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    return path


def test_our_format_trains_on_the_assistant_turns_only(tmp_path, small_tokenizer):
    batches = list(pipeline.make_iterator(_cfg(_write(tmp_path, CHATS * 3)), small_tokenizer, num_epochs=1))
    targets = _targets(batches, small_tokenizer)
    assert sorted(set(targets)) == sorted(a + "<|endoftext|>" for a in ANSWERS)  # answers + eos, nothing else
    shown = small_tokenizer.hf.decode(batches[0]["tokens"][0][batches[0]["segment_ids"][0] > 0])
    assert "<|inst|>" in shown and "<|code|>" in shown  # the prompts are in the row, as non-targets


def test_an_imported_chat_template_renders_the_rows_with_loss_on_its_assistant_spans(tmp_path, small_tokenizer):
    from codegen_jax.data.tokenizer import load_tokenizer

    from transformers import AutoTokenizer

    small_tokenizer.save(tmp_path / "ours")  # a copy: the session's tokenizer stays as it is
    hf = AutoTokenizer.from_pretrained(tmp_path / "ours")
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    hf.chat_template = CHATML
    hf.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    batches = list(pipeline.make_iterator(_cfg(_write(tmp_path, CHATS)), tok, num_epochs=1))
    targets = _targets(batches, tok)
    assert sorted(targets) == sorted(f"{a}<|im_end|>\n" for a in ANSWERS)


def test_an_unknown_role_is_one_line_and_exit_2(tmp_path, capsys, small_tokenizer):
    small_tokenizer.save(tmp_path / "tok")
    bad = _write(tmp_path, [[{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]])
    (tmp_path / "c.yaml").write_text(f"data:\n  source: datasets\n  paths: [{bad}]\n  tokenizer: {tmp_path / 'tok'}\n")
    assert cli.main(["data", "inspect", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "role 'wizard' is not one of system, user, assistant" in err[0]


def _templated(tmp_path, small_tokenizer, template):
    from transformers import AutoTokenizer

    from codegen_jax.data.tokenizer import load_tokenizer

    small_tokenizer.save(tmp_path / "ours")
    hf = AutoTokenizer.from_pretrained(tmp_path / "ours")
    hf.chat_template = template
    hf.save_pretrained(tmp_path / "tok")
    return load_tokenizer(tmp_path / "tok")


def test_a_template_that_rewrites_earlier_turns_or_refuses_a_row_is_a_user_error(tmp_path, small_tokenizer):
    import pytest

    from codegen_jax.data.examples import Chat, chat_example
    from codegen_jax.errors import UserError

    chat = Chat(tuple((m["role"], m["content"]) for m in CHATS[1]))
    # shows only the last assistant turn in full: rendering up to a turn is not a prefix of the whole
    rewriting = _templated(tmp_path / "a", small_tokenizer, "{% for m in messages %}{% if loop.last %}"
                           "{{ m.content }}{% else %}{{ m.role }}{% endif %};{% endfor %}")
    with pytest.raises(UserError, match="renders earlier turns differently"):
        chat_example(rewriting, chat)
    refusing = _templated(tmp_path / "b", small_tokenizer, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(UserError, match="refuses a chat row.*roles must alternate"):
        chat_example(refusing, chat)


def test_chat_rows_with_pair_ratio_0_beside_documents_are_a_user_error(tmp_path, small_tokenizer):
    import pytest

    from codegen_jax.errors import UserError

    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "def f():\n    return 1\n"}) + "\n")
    cfg = _cfg(_write(tmp_path, CHATS))
    cfg.data.paths, cfg.data.pair_ratio = [str(docs), *cfg.data.paths], 0.0
    with pytest.raises(UserError, match=r"the 2 chat rows of the train split would be dropped.*pair_ratio above 0"):
        list(pipeline.make_iterator(cfg, small_tokenizer, num_epochs=1))
