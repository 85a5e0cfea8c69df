"""A tiny local teacher for the examples: real text, a real tokenizer, random weights, no network.

Stands in for ``microsoft/codebert-base`` so the examples run anywhere in seconds.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path


def write_text_file(path: Path, package: str = "json") -> Path:
    """A local text file: the source of a standard-library package (about 100 KB of real text)."""
    src = Path(sysconfig.get_paths()["stdlib"]) / package
    path.write_text("\n\n".join(f.read_text(encoding="utf-8") for f in sorted(src.glob("*.py"))), encoding="utf-8")
    return path


def make_teacher(directory: Path, text_file: Path, *, layers: int = 4, hidden: int = 64, vocab: int = 512) -> Path:
    """Save a small llama (SafeTensors) with a byte-level BPE tokenizer trained on ``text_file``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(text_file)], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
