"""LLM.chat and ``specdec generate --chat``: conversations rendered by the tokenizer's chat
template. Oracle: transformers' ``apply_chat_template(..., add_generation_prompt=True)``
for the prompt ids, and ``generate`` on those ids for the reply."""

from __future__ import annotations

import shutil
import string

import pytest
import torch

from checkpoints import make_checkpoint
from specdec import LLM, SamplingParams
from specdec.cli import main

CHARS = string.ascii_letters + string.digits + string.punctuation  # 94 + 3 specials = 97
# no whitespace in the vocabulary: the template uses none
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
CONV = [{"role": "system", "content": "Be:brief."}, {"role": "user", "content": "Hi!"}]


def _save_tokenizer(path, template):
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = make_checkpoint(tmp_path_factory.mktemp("chat"), "qwen3", num_layers=2)
    plain = shutil.copytree(base, tmp_path_factory.mktemp("plain") / "ckpt")
    _save_tokenizer(base, TEMPLATE)
    _save_tokenizer(plain, None)
    return {"chat": base, "plain": plain}


def _llm(path, draft="ngram"):
    return LLM(str(path), draft=draft, num_draft_tokens=3, device="cpu", dtype=torch.float32, backend="torch",
               block_size=4)


def _template_ids(path, conv):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    return list(tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False))


def test_chat_renders_like_apply_chat_template(dirs):
    llm = _llm(dirs["chat"])
    want = _template_ids(dirs["chat"], CONV)
    assert want[-len("<|assistant|>"):] == [CHARS.index(c) + 3 for c in "<|assistant|>"]
    assert llm.render_chat(CONV) == want
    (out,) = llm.chat(CONV, GREEDY)
    assert out.prompt_token_ids == want
    assert out.token_ids == llm.generate([want], GREEDY)[0].token_ids
    assert len(out.token_ids) == 8


def test_chat_many_conversations_and_params(dirs):
    llm = _llm(dirs["chat"], draft="early-exit:1")
    convs = [CONV, [{"role": "user", "content": "2+2=?"}], CONV + [{"role": "assistant", "content": "Ok."},
                                                              {"role": "user", "content": "More!"}]]
    params = [GREEDY, SamplingParams(max_tokens=3, temperature=0), GREEDY]
    outs = llm.chat(convs, params)
    assert [o.prompt_token_ids for o in outs] == [_template_ids(dirs["chat"], c) for c in convs]
    ref = llm.generate([o.prompt_token_ids for o in outs], params)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert [len(o.token_ids) for o in outs] == [8, 3, 8]


def test_no_template_is_a_clear_error_before_any_work(dirs):
    llm = _llm(dirs["plain"])
    with pytest.raises(ValueError, match="tokenizer has no chat template.*call generate\\(\\), or pass chat_template="):
        llm.chat(CONV, GREEDY)
    assert not llm.has_work()
    # an explicit template renders the same as the tokenizer's own would
    assert llm.render_chat(CONV, chat_template=TEMPLATE) == _template_ids(dirs["chat"], CONV)


@pytest.mark.parametrize("messages", [[], [{"content": "x"}], "hello", [[{"role": "user", "content": "x"}], []]])
def test_bad_messages(dirs, messages):
    llm = _llm(dirs["chat"])
    with pytest.raises(ValueError, match="conversation"):
        llm.chat(messages)
    assert not llm.has_work()


def test_cli_generate_chat(dirs, capsys):
    args = ["generate", "--target", str(dirs["chat"]), "--prompt", "Hi!", "--max-tokens", "6",
            "--temperature", "0", "--ignore-eos", "--device", "cpu", "--backend", "torch"]
    assert main(args + ["--chat"]) == 0
    printed = capsys.readouterr().out
    llm = _llm(dirs["chat"], draft=None)
    (out,) = llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=6, temperature=0,
                                                                           ignore_eos=True))
    assert printed == out.text + "\n"
    assert main(args[:2] + [str(dirs["plain"])] + args[3:] + ["--chat"]) == 2
    assert "no chat template" in capsys.readouterr().err
