"""Llama-family model runner: config, model, safetensors loader, llama2.c converter."""

from ..batch import ForwardBatch
from .config import SUPPORTED_ARCHITECTURES, ConfigError, GenerationDefaults, ModelConfig
from .llama import LlamaForCausalLM
from .loader import CheckpointError, load_model

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "CheckpointError",
    "ConfigError",
    "ForwardBatch",
    "GenerationDefaults",
    "LlamaForCausalLM",
    "ModelConfig",
    "load_model",
]
