"""The two model families, built from the settings with a fixed seed: a byte-level Llama and
a 1-channel ViT classifier. Both are stock transformers classes, so pacer-stream reads their
checkpoints as it would read real ones.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification

from bytetok import BOS, VOCAB_SIZE
from settings import ImageSettings, TextSettings


def make_llama(s: TextSettings) -> LlamaForCausalLM:
    torch.manual_seed(s.seed)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=s.hidden, num_hidden_layers=s.layers,
                         num_attention_heads=s.heads, num_key_value_heads=s.heads,
                         intermediate_size=s.intermediate, max_position_embeddings=s.context,
                         bos_token_id=BOS, eos_token_id=BOS, pad_token_id=None,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def make_vit(s: ImageSettings) -> ViTForImageClassification:
    torch.manual_seed(s.seed)
    config = ViTConfig(image_size=8, patch_size=s.patch, num_channels=1, hidden_size=s.hidden,
                       num_hidden_layers=s.layers, num_attention_heads=s.heads,
                       intermediate_size=s.intermediate, num_labels=10,
                       id2label={i: str(i) for i in range(10)},
                       label2id={str(i): i for i in range(10)})
    return ViTForImageClassification(config)
