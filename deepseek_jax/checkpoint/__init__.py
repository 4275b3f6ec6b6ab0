"""Checkpoints in and out: the HF layout and its mapping onto our params, safetensors, FP8 releases, Orbax, the
streaming converter and export, train work directories, and ``load_pretrained`` over all of them."""
