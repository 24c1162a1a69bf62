"""Tiny random Hugging Face models, saved as real folders, for parity tests without any download."""

from __future__ import annotations

import pytest
import torch

VOCAB = 320  # byte-level BPE: 256 bytes + specials + a few merges
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=512)

# name → (transformers config class, model class, config kwargs)
ARCHS = {
    "llama-gqa-untied": ("LlamaConfig", "LlamaForCausalLM", dict(TINY, num_key_value_heads=2,
                                                                  tie_word_embeddings=False)),
    "llama-mha-tied": ("LlamaConfig", "LlamaForCausalLM", dict(TINY, num_key_value_heads=4,
                                                                tie_word_embeddings=True)),
    "llama3-rope-scaling": ("LlamaConfig", "LlamaForCausalLM", dict(
        TINY, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    "llama-linear-rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        TINY, num_key_value_heads=1, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # head_dim apart from hidden / heads (as Gemma, Qwen3): 64 and 128 take the native step's register-resident
    # attention paths (4 and 8 vectors per head with AVX-512), 16 above its general loop
    "llama-head-dim-64": ("LlamaConfig", "LlamaForCausalLM", dict(TINY, num_key_value_heads=2, head_dim=64)),
    "llama-head-dim-128": ("LlamaConfig", "LlamaForCausalLM", dict(TINY, num_key_value_heads=1, head_dim=128,
                                                                    num_attention_heads=2)),
    "mistral-sliding": ("MistralConfig", "MistralForCausalLM", dict(TINY, num_key_value_heads=2,
                                                                     sliding_window=16)),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(TINY, num_key_value_heads=2,
                                                            tie_word_embeddings=True)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                    n_positions=512)),
}


def make_hf_model(name: str, seed: int = 0):
    import transformers

    cfg_cls, model_cls, kwargs = ARCHS[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**kwargs)
    model = getattr(transformers, model_cls)(cfg).eval()
    # random init leaves biases/norms at 0/1; perturb everything so every weight matters in parity
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer():
    """A real byte-level BPE tokenizer (GPT-2 style) trained here on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["The capital of France is Paris.", "Hello world, hello there!", "Once upon a time 秒推 🚀"] * 20
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """name → path of a saved tiny model (built once per session)."""
    cache: dict[str, tuple] = {}

    def get(name: str, **save_kwargs):
        key = (name, tuple(sorted(save_kwargs.items())))
        if key not in cache:
            model = make_hf_model(name)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path, **save_kwargs)
            make_tokenizer().save_pretrained(path)
            cache[key] = (path, model)
        return cache[key]

    return get


@pytest.fixture
def native_preferred(monkeypatch):
    """Quantized linears use miaotui's native kernels (fp32 activations in, the reference the tests compare
    with): where PyTorch's packed kernels measure faster (AVX-512 builds, bf16 activations) prepare() would
    pick those instead."""
    from miaotui.compress.quant import kernels as choice

    monkeypatch.setattr(choice, "native_faster", lambda *args, **kwargs: True)
