"""The streaming converter (HF / PyTorch -> Orbax), export (Orbax or a train work directory -> HF safetensors)
and ``--verify`` against transformers."""
