"""The DeepSeek model in one Flax module with training and inference modes: the decoder block, the MTP module,
the transformer, and what they cost (parameter and FLOP counts)."""
