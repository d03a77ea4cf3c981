"""Tiny random models (2 layers, grouped-query attention) of every supported family, and a tiny
byte-level chat tokenizer built offline. Used by the fast test suite."""

from __future__ import annotations

from functools import lru_cache

import torch

FAMILIES = ("llama", "mistral", "gemma", "gemma2", "gemma3", "qwen2", "qwen3")

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_config(family: str, vocab: int = 300, **over):
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if family == "llama":
        cfg = LlamaConfig(**common)
    elif family == "mistral":
        cfg = MistralConfig(**common, sliding_window=None)
    elif family == "gemma":
        cfg = GemmaConfig(**common)
    elif family == "gemma2":
        cfg = Gemma2Config(**common, query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
                           final_logit_softcapping=30.0, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"])
    elif family == "gemma3":
        cfg = Gemma3TextConfig(**common, query_pre_attn_scalar=16, sliding_window=4,
                               layer_types=["sliding_attention", "full_attention"])
    elif family == "qwen2":
        cfg = Qwen2Config(**common)  # q/k/v carry biases
    elif family == "qwen3":
        cfg = Qwen3Config(**common)  # q/k RMS norms, no biases
    else:
        raise ValueError(family)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(family: str, seed: int = 0, **over):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **over)
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():  # random init is small; make activations (and importances) non-trivial
        for name, p in m.named_parameters():
            if "norm" in name:
                continue
            if p.dim() == 2:
                p.normal_(0, 0.3)
            elif p.dim() == 1:
                p.normal_(0, 0.2)
    m.eval()
    return m


@lru_cache(maxsize=1)
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token=None))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["how do I bake bread", "explain the water cycle", "write a poem about the sea",
              "I cannot help with that", "system user assistant"] * 10
    t.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok
