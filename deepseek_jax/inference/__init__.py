"""Running a model: the prefill / decode steps over the KV cache, sampling, batched generation with MTP
speculative decoding, and chat sessions."""
