"""A bench-sized llama GGUF model (no download): tests/ggufkit.py's vocabulary and rules, larger layers.

    .venv/bin/python bench/llama_gguf.py OUT.gguf [--embd 768 --layers 12 --ff 2048]

tests/ggufkit.py makes a 64-wide, 2-layer model for tests, where a token costs
microseconds and a tokens/s figure measures Python, not generation. Here the
same tokenizer (its SentencePiece vocabulary, ChatML template, BOS/EOS ids) and
the same trick that keeps greedy decoding off EOS (the control and byte tokens'
output rows are zero, so their logits are exactly 0, below the best printable
piece) go with layers large enough that a token is compute- and memory-bound:
768 wide, 12 layers, 2048 feed-forward, F16 matrices (about 170 MB), seeded
random weights. Only the shapes matter to speed; the text is gibberish.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from ggufkit import BOS_ID, CHAT_TEMPLATE, EOS_ID, _vocab  # noqa: E402


def make_llama(
    path: Path,
    *,
    n_embd: int = 768,
    n_layer: int = 12,
    n_ff: int = 2048,
    n_head: int = 12,
    n_ctx_train: int = 2048,
    seed: int = 0,
) -> Path:
    """Write the model to `path` (same arguments, same bytes) and return it."""
    tokens, scores, types = _vocab()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def w(*shape: int, std: float) -> np.ndarray:
        # Matrices in F16, as most published GGUFs are at least: half the bytes a token streams.
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float16)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"edge-agent bench llama {n_embd}x{n_layer}")
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

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

    ones = np.ones(n_embd, dtype=np.float32)  # norms stay F32, as llama.cpp's converters write them
    writer.add_tensor("token_embd.weight", w(n_vocab, n_embd, std=1.0))
    for i in range(n_layer):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", ones)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(p + name + ".weight", w(n_embd, n_embd, std=n_embd**-0.5))
        writer.add_tensor(p + "ffn_norm.weight", ones)
        writer.add_tensor(p + "ffn_gate.weight", w(n_ff, n_embd, std=n_embd**-0.5))
        writer.add_tensor(p + "ffn_up.weight", w(n_ff, n_embd, std=n_embd**-0.5))
        writer.add_tensor(p + "ffn_down.weight", w(n_embd, n_ff, std=n_ff**-0.5))
    writer.add_tensor("output_norm.weight", ones)
    output = w(n_vocab, n_embd, std=1.0)
    output[[i for i, t in enumerate(types) if t != gguf.TokenType.NORMAL]] = 0  # see the module doc
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--ff", type=int, default=2048)
    args = parser.parse_args()
    make_llama(args.out, n_embd=args.embd, n_layer=args.layers, n_ff=args.ff)
