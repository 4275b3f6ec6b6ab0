"""The model's building blocks: linear layers and the matmul hook, embedding, norms, rope, MLA, GQA, the dense
MLP, the attention cores, and the KV cache the attention layers read and fill."""
