"""EAGLE-3 head converter: any published dialect -> specdec's normalised safetensors layout.

``convert_eagle3`` reads an EAGLE-3 head (SafeAILab pickled ``pytorch_model.bin``, SpecForge or
speculators safetensors) and writes the layout ``specdec.models.eagle3.load_eagle3`` documents.
Re-exported by ``specdec.models.convert``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _pickled_state_dict(root: Path) -> dict[str, torch.Tensor]:
    """Tensors of ``pytorch_model.bin`` (or its sharded index), read with ``weights_only=True``."""
    index = root / "pytorch_model.bin.index.json"
    if index.is_file():
        try:
            files = sorted({root / name for name in json.loads(index.read_text())["weight_map"].values()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a valid weight index ({e})") from None
    elif (root / "pytorch_model.bin").is_file():
        files = [root / "pytorch_model.bin"]
    else:
        found = sorted(p.name for p in root.iterdir() if p.name.endswith((".bin", ".pt", ".pth")))
        if len(found) != 1:
            raise ValueError(f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin in {root}"
                             + (f" (found {', '.join(found)}: which one holds the head?)" if found else ""))
        files = [root / found[0]]
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors come in many types
            raise ValueError(f"cannot read {f} as a PyTorch state dict with weights_only=True ({e})") from None
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise ValueError(f"{f} does not hold a flat state dict of named tensors")
        tensors.update(state)
    return tensors


def convert_eagle3(in_dir: str | Path, out_dir: str | Path) -> Path:
    """Rewrite an EAGLE-3 head of any dialect in specdec's normalised layout.

    Reads SafeAILab ``pytorch_model.bin`` (``torch.load(weights_only=True)``, sharded index
    too), SpecForge or speculators safetensors; writes ``out_dir/config.json`` (flat
    SpecForge-style keys, every variant flag explicit under ``Eagle3Config``'s names, aux
    layer ids as a top-level HF hidden_states index = input to decoder layer k, or null for
    the default {2, L//2, L-3}) and ``out_dir/model.safetensors`` (normalised names, dtypes
    kept; ``d2t``/``t2d`` only for a reduced draft vocabulary). Everything is validated
    before anything is written; ``load_eagle3(out_dir)`` gives back the same config and tensors.

    Args:
        in_dir: the head's directory (config.json + weights).
        out_dir: directory to write (created if missing); must differ from ``in_dir``.

    Returns:
        ``Path(out_dir)``.

    Example::

        >>> from specdec.models.convert import convert_eagle3
        >>> convert_eagle3("EAGLE3-LLaMA3.1-Instruct-8B", "eagle3-8b")   # doctest: +SKIP
        >>> # specdec generate --target Llama-3.1-8B-Instruct --draft eagle3-8b ...
    """
    from safetensors.torch import save_file

    from .eagle3 import normalise, normalised_config
    from .eagle3_dialects import read_config
    from .loader import _read_tensors, _weight_files

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise FileNotFoundError(f"EAGLE-3 head directory {in_dir} does not exist or is not a directory")
    if out_dir.exists() and (not out_dir.is_dir() or out_dir.resolve() == in_dir.resolve()):
        raise ValueError(f"{out_dir} is {'the input directory' if out_dir.is_dir() else 'a file'}: "
                         f"choose another output directory")
    raw = read_config(in_dir)
    if (in_dir / "model.safetensors").is_file() or (in_dir / "model.safetensors.index.json").is_file():
        tensors = _read_tensors(_weight_files(in_dir))
    else:
        tensors = _pickled_state_dict(in_dir)
    cfg, normal = normalise(raw, tensors, str(in_dir))
    if cfg.draft_vocab_size == cfg.vocab_size:  # identity maps are implied by their absence
        normal = {k: v for k, v in normal.items() if k not in ("d2t", "t2d")}
    dtypes = {str(t.dtype).removeprefix("torch.") for k, t in normal.items() if t.is_floating_point()}

    out_dir.mkdir(parents=True, exist_ok=True)
    config = normalised_config(cfg, torch_dtype=dtypes.pop() if len(dtypes) == 1 else None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.clone().contiguous() for k, v in normal.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    return out_dir
