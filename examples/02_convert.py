"""02: converting checkpoints, HF / PyTorch (FP8 releases included) -> Orbax -> HF.

Run top to bottom: ``python examples/02_convert.py``. It works on a tiny random model so it finishes in
seconds on a laptop; with a real download (``huggingface-cli download deepseek-ai/DeepSeek-V3 --local-dir V3``)
the commands are the same:

    deepseek-jax convert V3 v3-orbax --dry-run        # mapping, shapes, sizes; nothing written
    deepseek-jax convert V3 v3-orbax                  # FP8 -> bf16 Orbax, streaming (peak RSS ~ largest tensor)
    deepseek-jax convert V3 v3-fp8 --keep-fp8         # keep e4m3fn weights + 128x128 scales as they are
    deepseek-jax export v3-orbax v3-hf --fp8          # back to the release format
"""

# %% A tiny "hub download": config.json + safetensors shards + index, FP8 block-quantized like DeepSeek's
# V3 release (e4m3fn weights with a `weight_scale_inv` per 128x128 block). We make one from a random init.
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import deepseek_jax as dsj
from deepseek_jax.checkpoint import hf_tensor_map
from deepseek_jax.cli import main as cli
from deepseek_jax.convert.export import OutTensor, write_sharded
from deepseek_jax.convert.fp8 import quantize_fp8_blocks

workdir = tempfile.mkdtemp(prefix="dsj-convert-example-")
hub = os.path.join(workdir, "hub")
os.makedirs(hub)
config = dsj.presets["tiny-v3"].replace(hidden_size=192, intermediate_size=200, num_nextn_predict_layers=0)
params = jax.jit(lambda: dsj.Transformer(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))()
params = jax.tree.map(lambda b: np.asarray(getattr(b, "value", b), np.float32), params["params"],
                      is_leaf=lambda x: hasattr(x, "value"))

tensors = []
for tm in hf_tensor_map(config):
    leaf = params
    for k in tm.path:
        leaf = leaf[k]
    for key, index in tm.sources:
        w = tm.to_hf(leaf[index])
        if tm.transpose and ".layers." in key and "mlp.gate." not in key:  # the release quantizes these
            w8, scale = quantize_fp8_blocks(w)
            tensors += [OutTensor(key, w8.shape, w8.dtype, lambda w8=w8: w8),
                        OutTensor(key + "_scale_inv", scale.shape, scale.dtype, lambda s=scale: s)]
        else:
            dt = np.float32 if tm.keep_fp32 else ml_dtypes.bfloat16
            tensors.append(OutTensor(key, w.shape, np.dtype(dt), lambda w=w, dt=dt: w.astype(dt)))
write_sharded(hub, tensors, max_shard_bytes=200_000)
hf_config = config.to_hf_dict()
hf_config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                    "weight_block_size": [128, 128]}
with open(os.path.join(hub, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
print(sorted(os.listdir(hub))[:4], "...")

# %% Look before converting: --dry-run prints every leaf of our params tree, its HF sources and sizes.
cli(["convert", hub, os.path.join(workdir, "unused"), "--dry-run"])

# %% Convert. FP8 weights are dequantized on the fly (no separate pass); per-layer weights are stacked into the
# scanned layout; the Orbax checkpoint is written slot by slot. --dtype float32 keeps full precision here.
orbax_dir = os.path.join(workdir, "orbax")
cli(["convert", hub, orbax_dir, "--dtype", "float32"])
print(sorted(os.listdir(orbax_dir)))  # config.json, deepseek_jax.json, params/ (Orbax)

# %% Load it like any checkpoint. The converted directory and the HF directory give the same logits.
tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (2, 16)), jnp.int32)
cfg, p_orbax = dsj.load_pretrained(orbax_dir)
cfg_hf, p_hf = dsj.load_pretrained(hub, dtype=jnp.float32)
model = dsj.Transformer(cfg)
diff = jnp.abs(model.apply({"params": p_orbax}, tokens) - model.apply({"params": p_hf}, tokens)).max()
print("max |logits(orbax) - logits(hf dir)| =", float(diff))

# %% On a mesh, each host reads only the chunks of its own shards (here: however many devices you have).
mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(1, 1, -1, 1), ("data", "fsdp", "expert", "tensor"))
_, p_mesh = dsj.load_pretrained(orbax_dir, mesh=mesh)
print("experts sharded as", p_mesh["moe_layers"]["mlp"]["experts"]["gate_proj"].sharding.spec)

# %% --keep-fp8 stores the e4m3fn weights and their scales untouched (half the bytes of bf16);
# load_pretrained dequantizes them on the devices, and export --fp8 gives the release tensors back bit for bit.
fp8_dir, back = os.path.join(workdir, "orbax-fp8"), os.path.join(workdir, "hf-again")
cli(["convert", hub, fp8_dir, "--keep-fp8", "--no-progress"])
cli(["export", fp8_dir, back, "--fp8", "--no-progress"])
from deepseek_jax.checkpoint import HFCheckpoint  # noqa: E402

a, b = HFCheckpoint(hub), HFCheckpoint(back)
same = all(np.array_equal(a.raw(k).view(np.uint8), b.raw(k).view(np.uint8)) for k in a.keys)
print("export --fp8 reproduces every release tensor bit for bit:", same)

# %% With torch and transformers installed, --verify runs both models on a few prompts after converting.
try:
    import transformers  # noqa: F401

    cli(["convert", hub, os.path.join(workdir, "verified"), "--dtype", "float32", "--verify", "--no-progress"])
except ImportError:
    print("(install torch and transformers for --verify)")
print("all files are under", workdir)
