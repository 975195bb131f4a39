"""Checkpoint converters: llama2.c -> HF ``LlamaForCausalLM``; EAGLE-3 heads -> specdec's layout.

``convert_eagle3`` (in ``convert_eagle3.py``, re-exported here) reads an EAGLE-3 head in any published dialect
(pickled ``pytorch_model.bin`` included) and writes the normalised safetensors layout that
``specdec.models.eagle3.load_eagle3`` documents. The rest of this docstring is about llama2.c.

The output directory holds ``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` and ``special_tokens_map.json``; both ``transformers``
(``LlamaForCausalLM`` / ``AutoTokenizer``) and specdec's own loader read it.

Input formats (llama2.c, legacy "version 0" export):

* checkpoint: 7 little-endian int32 ``dim, hidden_dim, n_layers, n_heads, n_kv_heads,
  vocab_size, seq_len``, then float32 arrays in the order of ``_checkpoint_layout``.
  A negative ``vocab_size`` means the classifier is not shared with the embedding and
  follows the two ``freq_cis`` arrays.
* tokenizer: int32 ``max_token_length``, then per token ``float32 score, int32 length,
  length bytes``. Ids 0/1/2 are ``<unk>``, BOS (``"\\n<s>\\n"``), EOS (``"\\n</s>\\n"``),
  ids 3..258 the byte-fallback pieces ``<0x00>``..``<0xFF>``, the rest BPE pieces whose
  sentencepiece ``▁`` is stored as a plain space.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from .convert_eagle3 import convert_eagle3

__all__ = ["convert_llama2c", "convert_eagle3"]

_HEADER = struct.Struct("<7i")  # dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab, seq_len
_HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
_VERSIONED_MAGIC = 0x616B3432  # "ak42": llama2.c export versions >= 1 start with it
_SPACE = "\u2581"  # sentencepiece's visible space "▁"
_SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2
_N_BYTE_TOKENS = 256  # <0x00>..<0xFF> at ids 3..258
_RMS_NORM_EPS = 1e-5
_ROPE_THETA = 10000.0


def convert_llama2c(checkpoint: str | Path, tokenizer: str | Path, out_dir: str | Path) -> Path:
    """Convert a llama2.c checkpoint and its tokenizer into an HF Llama directory.

    Both inputs are read and validated before anything is written. The weights are
    stored in float32 under HF names; the rows of ``wq``/``wk`` are permuted per head
    from llama2.c's interleaved RoPE pairs to HF's rotate-half layout.

    Args:
        checkpoint: llama2.c legacy ``.bin`` checkpoint (e.g. ``stories260K.bin``).
        tokenizer: llama2.c tokenizer ``.bin`` (e.g. ``tok512.bin``); it must hold
            exactly the checkpoint's ``vocab_size`` tokens.
        out_dir: directory to write (created if missing; existing files overwritten).

    Returns:
        ``Path(out_dir)``.

    Raises:
        ValueError: a file that is too short, whose size does not match its header, whose
            header is inconsistent, or that is not a llama2.c tokenizer of the expected
            layout; the message names the file.

    Example::

        >>> from specdec.models.convert import convert_llama2c
        >>> out = convert_llama2c("stories260K.bin", "tok512.bin", "stories260K-hf")
        >>> from transformers import AutoTokenizer, LlamaForCausalLM
        >>> model = LlamaForCausalLM.from_pretrained(out)
        >>> tok = AutoTokenizer.from_pretrained(out)
    """
    checkpoint, tokenizer, out_dir = Path(checkpoint), Path(tokenizer), Path(out_dir)
    header, arrays = _read_checkpoint(checkpoint)
    pieces, scores = _read_tokenizer(tokenizer, header["vocab_size"], checkpoint)
    hf_tokenizer = _build_tokenizer(pieces, scores, tokenizer)
    tensors = _hf_tensors(header, arrays)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(_hf_config(header), indent=2) + "\n")
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    hf_tokenizer.save(str(out_dir / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": True,  # llama2.c prompts start with BOS
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # decoding must give back the text exactly
        "model_max_length": header["seq_len"],
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out_dir


# ---------------------------------------------------------------------------- checkpoint


def _checkpoint_layout(h: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the float32 arrays after the header, in file order."""
    d, f, n_layers, seq = h["dim"], h["hidden_dim"], h["n_layers"], h["seq_len"]
    vocab = abs(h["vocab_size"])
    head = d // h["n_heads"]
    q_rows, kv_rows = h["n_heads"] * head, h["n_kv_heads"] * head
    layout = [
        ("tok_embeddings", (vocab, d)),
        ("rms_att", (n_layers, d)),
        ("wq", (n_layers, q_rows, d)),
        ("wk", (n_layers, kv_rows, d)),
        ("wv", (n_layers, kv_rows, d)),
        ("wo", (n_layers, d, q_rows)),
        ("rms_ffn", (n_layers, d)),
        ("w1", (n_layers, f, d)),
        ("w2", (n_layers, d, f)),
        ("w3", (n_layers, f, d)),
        ("rms_final", (d,)),
        ("freq_cis_real", (seq, head // 2)),  # unused: HF recomputes RoPE from theta
        ("freq_cis_imag", (seq, head // 2)),
    ]
    if h["vocab_size"] < 0:  # untied classifier follows the RoPE tables
        layout.append(("wcls", (vocab, d)))
    return layout


def _read_checkpoint(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Parse and validate a legacy llama2.c checkpoint; arrays are float32 numpy views."""
    actual = path.stat().st_size
    if actual < _HEADER.size:
        raise ValueError(
            f"{path}: file too short for a llama2.c checkpoint header: "
            f"expected at least {_HEADER.size} bytes, got {actual}"
        )
    with path.open("rb") as fh:
        raw = fh.read(_HEADER.size)
    if struct.unpack_from("<I", raw)[0] == _VERSIONED_MAGIC:
        version = struct.unpack_from("<i", raw, 4)[0]
        raise ValueError(
            f"{path}: llama2.c export version {version} (magic 'ak42') is not supported; "
            f"only the legacy version-0 format is (export.py --version 0)"
        )
    h = dict(zip(_HEADER_FIELDS, _HEADER.unpack(raw), strict=True))
    shown = ", ".join(f"{k}={v}" for k, v in h.items())
    bad = [k for k in _HEADER_FIELDS if k != "vocab_size" and h[k] <= 0]
    if bad or h["vocab_size"] == 0:
        raise ValueError(f"{path}: not a llama2.c checkpoint, header has non-positive sizes ({shown})")
    if h["dim"] % h["n_heads"] or (h["dim"] // h["n_heads"]) % 2:
        raise ValueError(f"{path}: dim must split into n_heads heads of even size ({shown})")
    if h["n_heads"] % h["n_kv_heads"]:
        raise ValueError(f"{path}: n_heads must be a multiple of n_kv_heads ({shown})")

    layout = _checkpoint_layout(h)
    n_floats = sum(math.prod(shape) for _, shape in layout)
    expected = _HEADER.size + 4 * n_floats
    if actual != expected:
        untied = " with an untied classifier" if h["vocab_size"] < 0 else ""
        raise ValueError(
            f"{path}: file size does not match its header ({shown}){untied}: "
            f"expected {expected} bytes, got {actual}"
        )
    flat = np.fromfile(path, dtype="<f4", offset=_HEADER.size)
    arrays, start = {}, 0
    for name, shape in layout:
        size = math.prod(shape)
        arrays[name] = flat[start : start + size].reshape(shape)
        start += size
    return h, arrays


def _rope_interleaved_to_halves(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Permute the rows of a q/k projection from interleaved RoPE pairs to rotate-half.

    llama2.c rotates the pairs (2j, 2j+1) of each head by angle pos * theta^(-2j/head);
    HF rotates (j, j + head/2) by the same angle. Row order within a head becomes
    [0, 2, 4, ..., head-2, 1, 3, ..., head-1]: the "real" rows, then the "imaginary" ones.

    w: [n_heads * head, in] float32 -> [n_heads * head, in] float32.
    """
    rows, cols = w.shape
    head = rows // n_heads
    # [n_heads, head/2 pairs, 2 (re, im), in] -> [n_heads, 2, head/2, in]
    return w.reshape(n_heads, head // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def _hf_tensors(h: dict, a: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """HF Llama state dict (float32, contiguous) from the llama2.c arrays."""

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(x, dtype=np.float32, order="C", copy=True))  # own storage

    out = {"model.embed_tokens.weight": t(a["tok_embeddings"])}
    for i in range(h["n_layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = t(a["rms_att"][i])
        out[p + "self_attn.q_proj.weight"] = t(_rope_interleaved_to_halves(a["wq"][i], h["n_heads"]))
        out[p + "self_attn.k_proj.weight"] = t(_rope_interleaved_to_halves(a["wk"][i], h["n_kv_heads"]))
        out[p + "self_attn.v_proj.weight"] = t(a["wv"][i])
        out[p + "self_attn.o_proj.weight"] = t(a["wo"][i])
        out[p + "post_attention_layernorm.weight"] = t(a["rms_ffn"][i])
        out[p + "mlp.gate_proj.weight"] = t(a["w1"][i])  # SwiGLU: w2(silu(w1 x) * w3 x)
        out[p + "mlp.up_proj.weight"] = t(a["w3"][i])
        out[p + "mlp.down_proj.weight"] = t(a["w2"][i])
    out["model.norm.weight"] = t(a["rms_final"])
    if "wcls" in a:
        out["lm_head.weight"] = t(a["wcls"])
    return out


def _hf_config(h: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h["dim"],
        "intermediate_size": h["hidden_dim"],
        "num_hidden_layers": h["n_layers"],
        "num_attention_heads": h["n_heads"],
        "num_key_value_heads": h["n_kv_heads"],
        "head_dim": h["dim"] // h["n_heads"],
        "vocab_size": abs(h["vocab_size"]),
        "max_position_embeddings": h["seq_len"],
        "hidden_act": "silu",
        "rms_norm_eps": _RMS_NORM_EPS,
        # transformers >= 5 reads rope_parameters; older readers read rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": _ROPE_THETA},
        "rope_theta": _ROPE_THETA,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": h["vocab_size"] > 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        "use_cache": True,
    }


# ---------------------------------------------------------------------------- tokenizer


def _read_tokenizer(path: Path, vocab_size: int, checkpoint: Path) -> tuple[list[bytes], list[float]]:
    """Parse a llama2.c tokenizer file: (piece bytes, score) for each id, validated."""
    data = path.read_bytes()
    hint = "is this a llama2.c tokenizer file?"
    if len(data) < 4:
        raise ValueError(
            f"{path}: file too short for a llama2.c tokenizer: expected at least 4 bytes, "
            f"got {len(data)}"
        )
    (max_len,) = struct.unpack_from("<i", data, 0)
    if not 0 < max_len <= 1 << 16:
        raise ValueError(f"{path}: max_token_length {max_len} is implausible; {hint}")
    pieces: list[bytes] = []
    scores: list[float] = []
    off = 4
    while off < len(data):
        i = len(pieces)
        if off + 8 > len(data):
            raise ValueError(
                f"{path}: truncated at token {i}: expected 8 bytes of score and length at "
                f"offset {off}, got {len(data) - off}; {hint}"
            )
        score, n = struct.unpack_from("<fi", data, off)
        if not 0 < n <= max_len:
            raise ValueError(
                f"{path}: token {i} has length {n}, outside 1..max_token_length={max_len}; {hint}"
            )
        if not math.isfinite(score):
            raise ValueError(f"{path}: token {i} has a non-finite score {score}; {hint}")
        if off + 8 + n > len(data):
            raise ValueError(
                f"{path}: truncated in token {i}: expected {n} bytes at offset {off + 8}, "
                f"got {len(data) - off - 8}; {hint}"
            )
        pieces.append(data[off + 8 : off + 8 + n])
        scores.append(score)
        off += 8 + n
    if len(pieces) != abs(vocab_size):
        raise ValueError(
            f"{path} holds {len(pieces)} tokens but {checkpoint} has vocab_size {abs(vocab_size)}; "
            f"tokenizer and checkpoint do not belong together"
        )
    return pieces, scores


def _build_tokenizer(pieces: list[bytes], scores: list[float], path: Path) -> Tokenizer:
    """A ``tokenizers`` BPE equivalent to llama2.c's encode()/decode() for this vocab."""
    expected_head = [(b"<unk>",), (b"\n<s>\n", b"<s>"), (b"\n</s>\n", b"</s>")]
    expected_head += [(f"<0x{b:02X}>".encode(),) for b in range(_N_BYTE_TOKENS)]
    n_fixed = len(expected_head)  # 259
    if len(pieces) <= n_fixed:
        raise ValueError(f"{path}: only {len(pieces)} tokens; a llama2.c tokenizer has more than {n_fixed}")
    for i, allowed in enumerate(expected_head):
        if pieces[i] not in allowed:
            raise ValueError(
                f"{path}: token {i} is {pieces[i]!r}, expected {allowed[0]!r}: not the llama2.c "
                f"layout (<unk>, <s>, </s>, then <0x00>..<0xFF> at ids 3..258)"
            )

    # -- vocab: specials renamed, ' ' shown as '▁' like sentencepiece stores it --
    vocab: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        if i < len(_SPECIALS):
            text = _SPECIALS[i]
        else:
            try:
                text = piece.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}: token {i} {piece!r} is not valid UTF-8") from None
            text = text.replace(" ", _SPACE)
        if text in vocab:
            raise ValueError(f"{path}: tokens {vocab[text]} and {i} are both {text!r}")
        vocab[text] = i

    # -- merges: llama2.c merges the adjacent pair whose concatenation has the best score;
    # a BPE merge list ranks each (left, right) pair by the score of left+right (ties by
    # id), the way sentencepiece-BPE conversions derive merges. Only regular pieces merge.
    regular = {text: i for text, i in vocab.items() if i >= n_fixed}
    ranked = []
    for merged, i in regular.items():
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in regular and right in regular:
                ranked.append((-scores[i], i, regular[left], left, right))
    ranked.sort(key=lambda r: r[:3])
    merges = [(left, right) for *_, left, right in ranked]

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    # The whole text is one BPE "word" (llama2.c never splits it); "dummy prefix" space first.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)])
    tok.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    return tok
