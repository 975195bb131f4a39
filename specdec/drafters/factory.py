"""The ``draft=`` argument parsed once into a ``DrafterSpec``, and the drafter built from it.

Kinds (``DrafterSpec.kind``):

  none        ``draft=None``: plain decoding through the speculative engine
  ngram       ``"ngram"``: prompt lookup, drafts from the host
  early-exit  ``"early-exit:N"``: the target's first N layers, sharing its weights and cache
  model       a model directory (config.json + weights) sharing the target's tokenizer
              (its vocabulary maybe padded to another size: models/vocab.py), with a KV
              cache of its own
  eagle3      an EAGLE-3 head directory (``is_eagle3_dir``): one decoder layer drafting
              from the target's captured hidden states, with a one-layer KV cache of its
              own; chains, static trees or ``draft_tree="dynamic:K,D,N"``

Three steps, in the order ``LLM`` runs them:

  DrafterSpec.parse(draft, draft_tree)  before anything is loaded: names and paths
  draft_cache_config(spec, ...)         after the target's config is known: the spec checked
                                        against it, and the config of the drafter's own KV
                                        cache (None: it has none) for the cache sizing
  build_drafter(spec, ...)              after the caches exist: weights loaded, drafter made

A new kind is one more branch in each: a name in ``parse`` (or a directory recognised
from its config.json in ``_directory_kind``), its cache layout in ``draft_cache_config``,
its construction in ``build_drafter``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..kv_cache import BlockManager, KVCache
from ..models import ModelConfig, load_model
from ..models.eagle3 import Eagle3Config, check_against_target, is_eagle3_dir, load_eagle3
from ..models.llama import LlamaForCausalLM
from ..models.vocab import check_draft_vocab, fit_vocab
from ..tree import TreeShape
from .base import Drafter
from .draft_model import ModelDrafter
from .eagle3 import DynamicTree, Eagle3Drafter
from .eagle3_head import Eagle3Head
from .ngram import NgramDrafter

NGRAM = "ngram"
EARLY_EXIT = "early-exit:"
DRAFTER_NAMES = ("a model directory", "an EAGLE-3 head directory", "'ngram'", "'early-exit:N'")
KINDS = ("none", "ngram", "early-exit", "model", "eagle3")


@dataclass(frozen=True)
class DrafterSpec:
    """What to draft with, parsed from ``LLM(draft=..., draft_tree=...)``.

    kind:       one of ``KINDS``
    name:       the drafter's display name ('none', 'ngram', 'early-exit:N', the path as given)
    path:       model / eagle3: the directory; else None
    num_layers: early-exit: N, the target layers it runs; else None
    tree:       a static draft tree, a ``DynamicTree`` (eagle3 only), or None for chains
    """

    kind: str
    name: str
    path: Path | None = None
    num_layers: int | None = None
    tree: TreeShape | DynamicTree | None = None

    @property
    def static_tree(self) -> TreeShape | None:
        """The tree of a drafter that takes static trees only (``parse`` gives a dynamic
        tree to EAGLE-3 heads alone)."""
        if isinstance(self.tree, DynamicTree):
            raise ValueError(f"the {self.name!r} drafter takes a static draft tree, got a dynamic one")
        return self.tree

    @property
    def model_path(self) -> Path:
        """The draft model directory (kind 'model')."""
        if self.path is None:
            raise ValueError(f"the {self.name!r} drafter has no model directory")
        return self.path

    @classmethod
    def parse(cls, draft, draft_tree=None) -> DrafterSpec:
        """The spec of ``draft`` (None, 'ngram', 'early-exit:N', a model or EAGLE-3 head
        directory) and ``draft_tree`` (None, branching factors, or ``"dynamic:K,D,N"`` with
        an EAGLE-3 head). The reserved names win over a folder of the same name (pass
        ``Path("ngram")`` or ``"./ngram"`` for that).

        >>> DrafterSpec.parse("early-exit:2", (2, 1)).num_layers
        2
        """
        spec = cls._of_name(draft)
        if draft_tree is not None and spec.kind == "none":
            raise ValueError("draft_tree needs a drafter: pass draft='ngram', 'early-exit:N' or a model directory")
        tree: TreeShape | DynamicTree | None
        if isinstance(draft_tree, str):
            tree = DynamicTree.parse(draft_tree)
            if spec.kind != "eagle3":
                raise ValueError(f"draft_tree={draft_tree!r} (a dynamic tree) needs an EAGLE-3 head as draft=, got "
                                 f"draft={draft!r}: use a static tree such as draft_tree=(2, 2) instead")
        else:
            tree = TreeShape.of(draft_tree) if draft_tree is not None else None
        return cls(spec.kind, spec.name, spec.path, spec.num_layers, tree)

    @classmethod
    def _of_name(cls, draft) -> DrafterSpec:
        if draft is None:
            return cls("none", "none")
        if isinstance(draft, str) and draft == NGRAM:
            return cls("ngram", NGRAM)
        if isinstance(draft, str) and draft.startswith(EARLY_EXIT):
            n = draft[len(EARLY_EXIT):]
            if not (n.isascii() and n.isdigit()):
                raise ValueError(f"early-exit drafter needs a layer count, e.g. 'early-exit:2'; got {draft!r}")
            return cls("early-exit", f"early-exit:{int(n)}", num_layers=int(n))
        if isinstance(draft, (str, Path)) and Path(draft).exists():
            return cls(_directory_kind(Path(draft)), str(draft), path=Path(draft))
        raise ValueError(
            f"draft {draft!r} is not a known drafter nor an existing path; use one of {', '.join(DRAFTER_NAMES)}"
        )

    @property
    def fixed_shape(self) -> bool:
        """Whether the fixed-shape decode step (CUDA graphs) can run this drafter: n-gram
        drafts come from the host, and trees have a shape of their own."""
        return self.kind != "ngram" and self.tree is None

    def draft_slots(self, num_draft_tokens: int) -> int:
        """Cache slots one step's drafts take: 0 without a drafter, the tree's nodes, or
        the chain length ``num_draft_tokens``."""
        if self.kind == "none":
            return 0
        if isinstance(self.tree, DynamicTree):
            return self.tree.cache_slots
        return self.tree.num_nodes if self.tree is not None else num_draft_tokens

    @property
    def draft_depth(self) -> int | None:
        """Draft tokens on one path: the tree's depth; None for chains (the chain length)."""
        return self.tree.depth if self.tree is not None else None


def _directory_kind(path: Path) -> str:
    """The kind of drafter a directory holds, read from its config.json."""
    if not (path / "config.json").is_file():
        raise ValueError(f"draft {str(path)!r} is not a model directory (no config.json in it); "
                         f"use one of {', '.join(DRAFTER_NAMES)}")
    return "eagle3" if is_eagle3_dir(path) else "model"


@dataclass(frozen=True)
class HeadCacheLayout:
    """The KV-cache layout of an EAGLE-3 head (one layer), carrying the loaded head so
    ``build_drafter`` does not read it twice.

    config:  the head's Eagle3Config;  tensors: its normalised state dict (``load_eagle3``)
    max_position_embeddings: the target's (the head caches every position the target does)
    """

    config: Eagle3Config
    tensors: dict
    max_position_embeddings: int
    num_layers: int = 1

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return self.config.head_dim


def draft_cache_config(spec: DrafterSpec, target_path,
                       target_config: ModelConfig) -> ModelConfig | HeadCacheLayout | None:
    """Check ``spec`` against the target, before any cache is allocated; returns the config
    of the model whose KV cache the drafter keeps apart from the target's (None: it keeps
    none; the early-exit drafter writes the target's own cache). An EAGLE-3 head is loaded
    here (its tensors checked, then the head against the target): a ``HeadCacheLayout``."""
    if spec.kind == "eagle3":
        return _eagle3_layout(spec, target_config)
    if spec.kind == "early-exit":
        n, layers = spec.num_layers, target_config.num_layers
        if n is None or not 1 <= n <= layers - 1:
            raise ValueError(f"early-exit:{n} needs 1 <= N <= {layers - 1} (the target has {layers} layers)")
    if spec.kind != "model":
        return None
    config = ModelConfig.from_file(spec.model_path)
    check_draft_vocab(spec.model_path, config.vocab_size, target_path, target_config.vocab_size, spec.name)
    return config


def _eagle3_layout(spec: DrafterSpec, target_config: ModelConfig) -> HeadCacheLayout:
    """Load an EAGLE-3 head (its tensors checked, then the head against the target)."""
    head_cfg, tensors = load_eagle3(spec.model_path)
    check_against_target(head_cfg, target_config)
    return HeadCacheLayout(head_cfg, tensors, target_config.max_position_embeddings)


def build_drafter(spec: DrafterSpec, target: LlamaForCausalLM, cache: KVCache, draft_cache: KVCache | None,
                  blocks: BlockManager, ops, device: torch.device, dtype: torch.dtype,
                  draft_config: ModelConfig | HeadCacheLayout | None = None) -> Drafter:
    """The drafter of ``spec`` over the engine's caches.

    target, cache: the target model and its KV cache
    draft_cache:   the drafter's own cache, sized from ``draft_cache_config`` (None if that
                   was None)
    blocks:        the block manager every cache shares
    draft_config:  what ``draft_cache_config`` returned (an EAGLE-3 head's loaded tensors);
                   None: loaded again
    """
    if spec.kind == "none":
        return Drafter()
    if spec.kind == "ngram":
        return NgramDrafter(tree=spec.static_tree)
    if spec.kind == "early-exit":
        return ModelDrafter(target, cache, blocks, ops, num_layers=spec.num_layers, shares_target_cache=True,
                            name=spec.name, tree=spec.static_tree)
    if spec.kind == "model":
        if draft_cache is None:
            raise ValueError(f"the draft model {spec.name} needs a KV cache of its own: size one from "
                             "draft_cache_config()")
        model = load_model(spec.model_path, device, dtype)
        fit_vocab(model, target.config.vocab_size)  # padded to another size: checked by draft_cache_config
        return ModelDrafter(model, draft_cache, blocks, ops, name=spec.name, tree=spec.static_tree)
    if spec.kind == "eagle3":
        return _build_eagle3(spec, target, draft_cache, blocks, ops, device, dtype, draft_config)
    raise ValueError(f"unknown drafter kind {spec.kind!r}; expected one of {', '.join(KINDS)}")


def _build_eagle3(spec: DrafterSpec, target: LlamaForCausalLM, draft_cache: KVCache | None, blocks: BlockManager,
                  ops, device, dtype, layout: ModelConfig | HeadCacheLayout | None) -> Eagle3Drafter:
    """The EAGLE-3 drafter: the head (weights cast to ``dtype``; the target's embedding
    table unless the head has its own) over its one-layer cache."""
    if draft_cache is None:
        raise ValueError(f"the EAGLE-3 head {spec.name} needs a KV cache of its own: size one from "
                         "draft_cache_config()")
    if not isinstance(layout, HeadCacheLayout):
        layout = _eagle3_layout(spec, target.config)
    head = Eagle3Head(layout.config, layout.tensors, target.model.embed_tokens.weight, device, dtype)
    return Eagle3Drafter(head, draft_cache, blocks, ops, layout.config.aux_layers(target.config.num_layers),
                         tree=spec.tree, name=spec.name)
