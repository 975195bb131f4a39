"""llama2.c -> HF conversion, checked against the real stories260K checkpoint.

Oracles: a port of llama2.c's forward pass (interleaved RoPE on the raw weights) for the
logits, llama2.c's encode() ported below for the token ids, and the known greedy text.
"""

import json
import math
import pathlib
import re
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open

from specdec.models.convert import convert_llama2c

STORIES_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"
CHECKPOINT = STORIES_DIR / "stories260K.bin"
TOKENIZER = STORIES_DIR / "tok512.bin"
CHECKPOINT_BYTES = 1_056_540

pytestmark = pytest.mark.skipif(
    not (CHECKPOINT.is_file() and TOKENIZER.is_file()),
    reason=f"stories260K fixture not found at {STORIES_DIR}",
)

GREEDY_PREFIX = (
    "Once upon a time, there was a little girl named Lily. "
    "She loved to play outside in the park."
)

TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "The cat sat on the mat. The dog barked!",
    "Tim and Sue went to the park; they played with a red ball.",
    "\"Can I have some?\" she asked. 'Yes,' said Mom.",
    "Hello, world! How are you? I'm fine... thanks.",
    "1234567890",
    "3.14159 is pi, 2+2=4, and 100% sure (really) [yes] {no} <ok> a/b \\ c | d ~ e",
    "café 漢字 🙂",
    "naïve résumé Ünïcödé señor",
    "“Quoted” — dash – and ellipsis… ‘single’ €5 ™",
    "emoji 👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    " leading space",
    "   three leading spaces",
    "trailing space ",
    "trailing spaces   ",
    "multiple   inner    spaces",
    " ",
    "   ",
    "\n",
    "line one\nline two\n\nline four\n",
    "\n\nstarts with newlines",
    "tabs\tand\ttabs\t",
    "windows\r\nline endings\r\n",
    "a",
    "e",
    "aaaaaaaaaaa",
    "eeeeeeee",
    "!!!!!!!!",
    "..........",
    "the the the the",
    "hehehehe heheh",
    "Lily Lily Lily and Timmy",
    "ittleittle littlelittle",
    "no\u00a0break\u00a0space and hair\u200aspace",
    "ALL CAPS SHOUTING",
    "MiXeD cAsE wOrDs",
    "x" * 40,
    "zzz qqq jjj xyzzy",
    "",
]


# ---------------------------------------------------------------------- llama2.c oracles


def read_llama2c_tokenizer(path):
    """(pieces as bytes, scores) straight from a llama2.c tokenizer file."""
    data = path.read_bytes()
    pieces, scores, off = [], [], 4
    while off < len(data):
        score, n = struct.unpack_from("<fi", data, off)
        pieces.append(data[off + 8 : off + 8 + n])
        scores.append(score)
        off += 8 + n
    return pieces, scores


def llama2c_encode(text, pieces, scores):
    """Port of llama2.c's encode() without BOS/EOS."""
    lookup = {p: i for i, p in enumerate(pieces)}
    tokens = [lookup[b" "]] if text else []  # dummy prefix, only for non-empty text
    for ch in text:  # one UTF-8 character at a time, bytes + 3 when not in the vocab
        b = ch.encode("utf-8")
        tokens.extend([lookup[b]] if b in lookup else [x + 3 for x in b])
    while True:  # merge the adjacent pair whose concatenation scores best (leftmost on ties)
        best_score, best_id, best_idx = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            j = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
            if j is not None and scores[j] > best_score:
                best_score, best_id, best_idx = scores[j], j, i
        if best_idx == -1:
            return tokens
        tokens[best_idx : best_idx + 2] = [best_id]


def read_llama2c_checkpoint(path):
    """Header dict and raw llama2.c arrays (torch float32), layout from the format notes."""
    raw = path.read_bytes()
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    h = dict(zip(names, struct.unpack_from("<7i", raw), strict=True))
    d, f, L, V, S = h["dim"], h["hidden_dim"], h["n_layers"], abs(h["vocab_size"]), h["seq_len"]
    hd = d // h["n_heads"]
    shapes = [
        ("emb", (V, d)), ("rms_att", (L, d)), ("wq", (L, h["n_heads"] * hd, d)),
        ("wk", (L, h["n_kv_heads"] * hd, d)), ("wv", (L, h["n_kv_heads"] * hd, d)),
        ("wo", (L, d, h["n_heads"] * hd)), ("rms_ffn", (L, d)), ("w1", (L, f, d)),
        ("w2", (L, d, f)), ("w3", (L, f, d)), ("rms_final", (d,)),
        ("freq_re", (S, hd // 2)), ("freq_im", (S, hd // 2)),
    ]
    if h["vocab_size"] < 0:
        shapes.append(("wcls", (V, d)))
    flat = torch.from_numpy(np.frombuffer(raw, dtype="<f4", offset=28).astype(np.float32))
    w, start = {}, 0
    for name, shape in shapes:
        w[name] = flat[start : start + math.prod(shape)].view(shape)
        start += math.prod(shape)
    assert start == flat.numel(), "test fixture layout does not cover the file"
    w.setdefault("wcls", w["emb"])
    return h, w


def llama2c_forward(h, w, tokens):
    """llama2.c's forward() over a whole sequence: logits [T, V] float32."""
    T, H, Hkv = len(tokens), h["n_heads"], h["n_kv_heads"]
    hd = h["dim"] // H

    def rmsnorm(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g

    # llama2.c rotates interleaved pairs (2j, 2j+1) by pos * 10000^(-2j/hd)
    freq = 1.0 / 10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = (torch.arange(T, dtype=torch.float64)[:, None] * freq[None]).float()  # [T, hd/2]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]

    def rope(v, n):  # [T, n*hd] -> [T, n, hd]
        v = v.view(T, n, hd // 2, 2)
        re_, im = v[..., 0], v[..., 1]
        return torch.stack((re_ * cos - im * sin, re_ * sin + im * cos), -1).view(T, n, hd)

    x = w["emb"][torch.tensor(tokens)]  # [T, D]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in range(h["n_layers"]):
        xb = rmsnorm(x, w["rms_att"][layer])
        q = rope(xb @ w["wq"][layer].T, H)
        k = rope(xb @ w["wk"][layer].T, Hkv).repeat_interleave(H // Hkv, dim=1)  # head i -> kv i // g
        v = (xb @ w["wv"][layer].T).view(T, Hkv, hd).repeat_interleave(H // Hkv, dim=1)
        att = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        o = torch.einsum("hts,shd->thd", att, v).reshape(T, H * hd)
        x = x + o @ w["wo"][layer].T
        xb = rmsnorm(x, w["rms_ffn"][layer])
        x = x + (torch.nn.functional.silu(xb @ w["w1"][layer].T) * (xb @ w["w3"][layer].T)) @ w["w2"][layer].T
    return rmsnorm(x, w["rms_final"]) @ w["wcls"].T


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("stories260K-hf")
    result = convert_llama2c(str(CHECKPOINT), TOKENIZER, out)
    assert result == out
    return out


@pytest.fixture(scope="module")
def hf_model(converted):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(converted):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted)


@pytest.fixture(scope="module")
def llama2c_vocab():
    return read_llama2c_tokenizer(TOKENIZER)


# ---------------------------------------------------------------------- model


def test_convert_prints_nothing(tmp_path, capsys):
    convert_llama2c(CHECKPOINT, TOKENIZER, tmp_path / "new" / "dir")
    assert capsys.readouterr() == ("", "")
    assert (tmp_path / "new" / "dir" / "model.safetensors").is_file()


def test_config_fields(converted):
    cfg = json.loads((converted / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 5,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 8,
        "vocab_size": 512,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    assert {k: cfg.get(k) for k in expected} == expected


def test_tensor_names_and_tied_embeddings(converted):
    with safe_open(converted / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    per_layer = {
        "input_layernorm.weight": (64,),
        "self_attn.q_proj.weight": (64, 64),
        "self_attn.k_proj.weight": (32, 64),
        "self_attn.v_proj.weight": (32, 64),
        "self_attn.o_proj.weight": (64, 64),
        "post_attention_layernorm.weight": (64,),
        "mlp.gate_proj.weight": (172, 64),
        "mlp.up_proj.weight": (172, 64),
        "mlp.down_proj.weight": (64, 172),
    }
    expected = {"model.embed_tokens.weight": (512, 64), "model.norm.weight": (64,)}
    expected |= {f"model.layers.{i}.{k}": s for i in range(5) for k, s in per_layer.items()}
    assert shapes == expected  # in particular: no lm_head.weight, the classifier is tied
    assert dtypes == {"F32"}


def test_logits_match_llama2c_forward(hf_model):
    h, w = read_llama2c_checkpoint(CHECKPOINT)
    tokens = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 7, 500]
    with torch.no_grad():
        got = hf_model(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(got, llama2c_forward(h, w, tokens), rtol=1e-4, atol=1e-4)


def test_greedy_text(hf_model, hf_tokenizer):
    ids = [1]
    with torch.no_grad():
        for _ in range(36):  # full forward each step: no cache, no generate() settings
            ids.append(int(hf_model(torch.tensor([ids])).logits[0, -1].argmax()))
    text = hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert text.startswith(GREEDY_PREFIX), text


def _write_untied(path, classifier):
    raw = bytearray(CHECKPOINT.read_bytes())
    struct.pack_into("<i", raw, 20, -512)  # header vocab_size < 0: classifier not shared
    path.write_bytes(bytes(raw) + classifier.astype("<f4").tobytes())


def test_untied_classifier(tmp_path):
    from transformers import LlamaForCausalLM

    rng = np.random.default_rng(0)
    wcls = rng.standard_normal((512, 64)).astype(np.float32)
    ckpt = tmp_path / "untied.bin"
    _write_untied(ckpt, wcls)
    out = convert_llama2c(ckpt, TOKENIZER, tmp_path / "hf")

    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(out / "model.safetensors", framework="pt") as f:
        torch.testing.assert_close(f.get_tensor("lm_head.weight"), torch.from_numpy(wcls), rtol=0, atol=0)
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    h, w = read_llama2c_checkpoint(ckpt)
    tokens = [1, 403, 407, 261, 378]
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(got, llama2c_forward(h, w, tokens), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- tokenizer


def test_tokenizer_special_tokens(hf_tokenizer):
    tok = hf_tokenizer
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) == 512
    assert tok.convert_ids_to_tokens([3, 13, 258, 259, 410]) == ["<0x00>", "<0x0A>", "<0xFF>", "▁t", "▁"]
    assert tok("Once")["input_ids"][0] == 1  # BOS is added, EOS is not
    assert tok("Once")["input_ids"][-1] != 2


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_tokenizer_matches_llama2c_encode(hf_tokenizer, llama2c_vocab, text):
    ids = hf_tokenizer(text)["input_ids"]
    assert ids[0] == 1
    assert ids[1:] == llama2c_encode(text, *llama2c_vocab)


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_decode_round_trips(hf_tokenizer, text):
    ids = hf_tokenizer(text)["input_ids"]
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_encoder_oracle_is_not_trivial(llama2c_vocab):
    # the oracle must merge, fall back to bytes, and add the dummy prefix
    assert llama2c_encode("Once upon", *llama2c_vocab) == [403, 407]
    assert llama2c_encode("\n", *llama2c_vocab) == [410, 13]
    assert llama2c_encode("漢", *llama2c_vocab) == [410, 0xE6 + 3, 0xBC + 3, 0xA2 + 3]


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("size", [CHECKPOINT_BYTES - 4, CHECKPOINT_BYTES // 2, 100, CHECKPOINT_BYTES + 4])
def test_checkpoint_size_mismatch(tmp_path, size):
    bad = tmp_path / "bad.bin"
    data = CHECKPOINT.read_bytes()
    bad.write_bytes(data[:size] + b"\0" * max(0, size - len(data)))
    out = tmp_path / "out"
    pattern = f"{re.escape(str(bad))}.*expected {CHECKPOINT_BYTES} bytes, got {size}"
    with pytest.raises(ValueError, match=pattern):
        convert_llama2c(bad, TOKENIZER, out)
    assert not out.exists()  # nothing written on failure


def test_checkpoint_shorter_than_header(tmp_path):
    bad = tmp_path / "tiny.bin"
    bad.write_bytes(CHECKPOINT.read_bytes()[:10])
    with pytest.raises(ValueError, match=f"{re.escape(str(bad))}.*expected at least 28 bytes, got 10"):
        convert_llama2c(bad, TOKENIZER, tmp_path / "out")


def test_untied_checkpoint_without_classifier(tmp_path):
    bad = tmp_path / "untied_missing.bin"
    raw = bytearray(CHECKPOINT.read_bytes())
    struct.pack_into("<i", raw, 20, -512)
    bad.write_bytes(bytes(raw))
    expected = CHECKPOINT_BYTES + 512 * 64 * 4  # + classifier [vocab, dim] float32
    pattern = f"untied classifier.*expected {expected} bytes, got {CHECKPOINT_BYTES}"
    with pytest.raises(ValueError, match=pattern):
        convert_llama2c(bad, TOKENIZER, tmp_path / "out")


@pytest.mark.parametrize(
    "field, value, message",
    [(3, 7, "n_heads heads of even size"), (4, 3, "multiple of n_kv_heads"), (0, -64, "non-positive")],
)
def test_checkpoint_bad_header(tmp_path, field, value, message):
    bad = tmp_path / "bad_header.bin"
    raw = bytearray(CHECKPOINT.read_bytes())
    struct.pack_into("<i", raw, 4 * field, value)
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=message):
        convert_llama2c(bad, TOKENIZER, tmp_path / "out")


def test_versioned_export_is_rejected(tmp_path):
    bad = tmp_path / "v1.bin"
    bad.write_bytes(struct.pack("<Ii", 0x616B3432, 1) + b"\0" * 248)
    with pytest.raises(ValueError, match="version 1.*not supported"):
        convert_llama2c(bad, TOKENIZER, tmp_path / "out")


def test_checkpoint_given_as_tokenizer(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"{re.escape(str(CHECKPOINT))}.*llama2.c tokenizer"):
        convert_llama2c(CHECKPOINT, CHECKPOINT, out)
    assert not out.exists()


def test_truncated_tokenizer(tmp_path):
    bad = tmp_path / "tok_cut.bin"
    bad.write_bytes(TOKENIZER.read_bytes()[:-3])
    with pytest.raises(ValueError, match=f"{re.escape(str(bad))}: truncated in token 511"):
        convert_llama2c(CHECKPOINT, bad, tmp_path / "out")


def test_tokenizer_vocab_size_mismatch(tmp_path):
    bad = tmp_path / "tok_extra.bin"
    bad.write_bytes(TOKENIZER.read_bytes() + struct.pack("<fi", -300.0, 2) + b"zz")
    with pytest.raises(ValueError, match="holds 513 tokens but .* has vocab_size 512"):
        convert_llama2c(CHECKPOINT, bad, tmp_path / "out")


def test_tokenizer_wrong_layout(tmp_path):
    pieces, scores = read_llama2c_tokenizer(TOKENIZER)
    pieces[3], pieces[4] = pieces[4], pieces[3]  # byte pieces out of order
    body = b"".join(struct.pack("<fi", s, len(p)) + p for p, s in zip(pieces, scores, strict=True))
    bad = tmp_path / "tok_swapped.bin"
    bad.write_bytes(TOKENIZER.read_bytes()[:4] + body)
    with pytest.raises(ValueError, match=r"token 3 is b'<0x01>', expected b'<0x00>'"):
        convert_llama2c(CHECKPOINT, bad, tmp_path / "out")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        convert_llama2c(tmp_path / "absent.bin", TOKENIZER, tmp_path / "out")


def test_tokenizer_matches_llama2c_encode_fuzz(hf_tokenizer, llama2c_vocab):
    # seeded random concatenations of vocab pieces and awkward characters
    pieces, scores = llama2c_vocab
    alphabet = [p.decode("utf-8") for p in pieces[259:]] + list("漢🙂\n\t é  ")
    rng = np.random.default_rng(1234)
    for _ in range(300):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(1, 12))))
        ids = hf_tokenizer(text)["input_ids"][1:]
        assert ids == llama2c_encode(text, pieces, scores), repr(text)
        assert hf_tokenizer.decode(ids) == text
