"""A tiny Qwen2-style chat model saved the way a hub model is: a stand-in for fine-tuning a
pretrained model offline (examples/lora.yaml, the tests). Nothing is downloaded: the model is
built from a config (random weights) and the tokenizer is a byte-level BPE trained here, with
ChatML's special tokens and chat template, as Qwen2's instruct models have them.

    python examples/tiny_pretrained.py DIR     # then: model: {pretrained: DIR}, tokenizer: {kind: pretrained, path: DIR}
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's ChatML template, without its tool-calling part.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TEXT = ("the quick brown fox jumps over the lazy dog . where is the capital of france ? paris is . "
        "hello , how are you today ? i am fine , thank you . what is the answer ? the answer is here . "
        "summarize the story in one line . a question and its answer . good morning and good night .").split(" . ")


def build(directory: Path, vocab_size: int = 384, seed: int = 0) -> Path:
    """Save the tokenizer and a 2-layer, 64-wide Qwen2 model into `directory`."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXT * 20, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=CHATML)
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(f"saved to {build(Path(sys.argv[1]))}")
