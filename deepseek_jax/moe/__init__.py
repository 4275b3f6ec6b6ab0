"""DeepSeekMoE: the router, the grouped expert GEMMs, dispatch on one device and across the expert axis, and the
layer that puts them together."""
