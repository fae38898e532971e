"""A tiny llama-architecture GGUF model that llama.cpp loads and generates from.

Nothing downloads at run time, so tests that need a language model make this one:
two layers, 64-wide, seeded random f32 weights, and a real `llama` (SentencePiece)
vocabulary of a few hundred pieces (control tokens, the 256 byte tokens, single
characters and ▁-prefixed English words with every prefix, so SentencePiece's
pairwise merges can reach each word). A ChatML chat template makes chat
completions work.

The output rows of the control tokens and of the byte tokens are zero, so their
logits are exactly 0 while the printable pieces' logits are spread around 0: greedy
decoding (and any low-temperature sampling) then picks a printable piece, never
EOS, and the generated text is valid UTF-8 that runs for as many tokens as asked.
`eos_bias` gives EOS a long output row instead, for tests that want generation to
stop on its own.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_FF = 128
N_CTX_TRAIN = 256

BOS_ID = 1
EOS_ID = 2

# ChatML, as many instruction-tuned models ship it; llama-cpp-python renders it
# with Jinja2 from the GGUF metadata.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORD_TEXT = (
    "the a an and or of to in on is are was it this that for with as at by be from "
    "you we they he she what which who how when where why not no yes can will one two "
    "three four five hello world model edge agent tell me about story once upon time "
    "there lived small robot cat dog sun moon water fire code data run fast slow good "
    "day night answer question paris france capital city "
)
_WORDS = tuple(_WORD_TEXT.split())

_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?:;'\"-()"


def _vocab() -> tuple[list[str], list[float], list[int]]:
    tt = gguf.TokenType
    tokens: list[str] = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types: list[int] = [tt.UNKNOWN, tt.CONTROL, tt.CONTROL, tt.CONTROL, tt.CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(tt.BYTE)
    seen = set(tokens)

    def add(piece: str) -> None:
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(tt.NORMAL)

    add("▁")
    for ch in _CHARS:
        add(ch)
    add("▁" + "\n")
    for word in _WORDS:
        piece = "▁" + word
        for k in range(2, len(piece) + 1):
            add(piece[:k])
    # SentencePiece merges the highest-scoring pair first; earlier pieces score higher.
    scores = [0.0] * 5 + [0.0] * 256 + [-float(i) for i in range(len(tokens) - 261)]
    return tokens, scores, types


def make_tiny_llama(path: Path, seed: int = 0, *, eos_bias: bool = False) -> Path:
    """Write a tiny llama GGUF model to `path` (same seed, same bytes) and return it."""
    tokens, scores, types = _vocab()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def w(*shape: int, std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("edge-agent tiny llama")
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    # numpy shapes are ggml's reversed: token_embd is ggml [n_embd, n_vocab].
    writer.add_tensor("token_embd.weight", w(n_vocab, N_EMBD, std=1.0))
    for i in range(N_LAYER):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(p + name + ".weight", w(N_EMBD, N_EMBD, std=N_EMBD**-0.5))
        writer.add_tensor(p + "ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(p + "ffn_gate.weight", w(N_FF, N_EMBD, std=N_EMBD**-0.5))
        writer.add_tensor(p + "ffn_up.weight", w(N_FF, N_EMBD, std=N_EMBD**-0.5))
        writer.add_tensor(p + "ffn_down.weight", w(N_EMBD, N_FF, std=N_FF**-0.5))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    output = w(n_vocab, N_EMBD, std=1.0)
    # Zero rows: logit exactly 0, below the best printable piece's (see module doc).
    silent = [i for i, t in enumerate(types) if t != gguf.TokenType.NORMAL]
    output[silent] = 0.0
    if eos_bias:
        # A long EOS row: its logit's magnitude dwarfs the others', so EOS wins
        # within a few tokens and generation stops on its own.
        output[EOS_ID] = w(N_EMBD, std=4.0)
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
