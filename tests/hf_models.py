"""Tiny Hugging Face configs shared by the tests (built from code, nothing downloaded).

``transformers`` here is the real module, imported on first use: a test that touches it is skipped
when transformers is not installed, while the pure-torch tests of the same file still run. Import
it instead of a module-level ``pytest.importorskip("transformers")``, which skips the whole file.

Each ``*_config`` function returns the shared tiny configuration of one family; keyword arguments
override or add fields, so a test states only what it needs differently::

    model = transformers.BertModel(bert_config(num_hidden_layers=1)).eval()
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

__all__ = [
    "BERT",
    "GPT2",
    "LLAMA",
    "T5",
    "VIT",
    "bert_config",
    "gpt2_config",
    "llama_config",
    "t5_config",
    "transformers",
    "vit_config",
]


class _Transformers:
    """Stands for the ``transformers`` module; the first attribute read imports it or skips the test."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # pytest and mock probe objects for `_mock_name`, `__wrapped__`, ...
            raise AttributeError(name)
        module: ModuleType = pytest.importorskip("transformers", reason="transformers is not installed")
        return getattr(module, name)


#: ``transformers``, imported when a test first uses it (the test is skipped without it).
transformers: Any = _Transformers()

#: The shared tiny configurations: 2 layers, 2 heads, width 32, vocabulary 64 (token ids < 64).
GPT2: dict[str, Any] = {"vocab_size": 64, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 16}
BERT: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 32,
}
T5: dict[str, Any] = {"vocab_size": 64, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 2}
LLAMA: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
VIT: dict[str, Any] = {
    "image_size": 16,
    "patch_size": 4,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


def gpt2_config(**overrides: Any) -> Any:
    """GPT-2 from :data:`GPT2` with ``overrides``; skips the test without transformers.

    Args:
        **overrides: config fields to change or add.

    Returns:
        A ``transformers.GPT2Config``.

    Example:
        >>> model = transformers.GPT2LMHeadModel(gpt2_config(n_positions=32))
    """
    return transformers.GPT2Config(**{**GPT2, **overrides})


def bert_config(**overrides: Any) -> Any:
    """BERT from :data:`BERT` with ``overrides``; skips the test without transformers.

    Args:
        **overrides: config fields to change or add.

    Returns:
        A ``transformers.BertConfig``.

    Example:
        >>> model = transformers.BertModel(bert_config(num_hidden_layers=1))
    """
    return transformers.BertConfig(**{**BERT, **overrides})


def t5_config(**overrides: Any) -> Any:
    """T5 from :data:`T5` with ``overrides``; skips the test without transformers.

    Args:
        **overrides: config fields to change or add.

    Returns:
        A ``transformers.T5Config``.

    Example:
        >>> model = transformers.T5ForConditionalGeneration(t5_config(decoder_start_token_id=0))
    """
    return transformers.T5Config(**{**T5, **overrides})


def llama_config(**overrides: Any) -> Any:
    """Llama (grouped-query attention: 4 heads, 2 key/value heads) from :data:`LLAMA` with ``overrides``.

    Args:
        **overrides: config fields to change or add.

    Returns:
        A ``transformers.LlamaConfig``; the test is skipped without transformers.

    Example:
        >>> model = transformers.LlamaForCausalLM(llama_config())
    """
    return transformers.LlamaConfig(**{**LLAMA, **overrides})


def vit_config(**overrides: Any) -> Any:
    """ViT (16x16 images, 4x4 patches) from :data:`VIT` with ``overrides``; skips the test without transformers.

    Args:
        **overrides: config fields to change or add.

    Returns:
        A ``transformers.ViTConfig``.

    Example:
        >>> model = transformers.ViTModel(vit_config())
    """
    return transformers.ViTConfig(**{**VIT, **overrides})
