"""Train a tiny DeepSeek-V3 (MLA + MoE + MTP) on the built-in arithmetic language, from Python.

The same as `deepseek-jax train`, one layer down: a mesh, a Trainer (sharded state, jitted step with donated
state), the data, a few hundred steps, then a look at what the model learned. About 2-3 minutes on a CPU.
"""

import jax
import numpy as np

import deepseek_jax as dsj
from deepseek_jax.data import arithmetic_accuracy, make_dataset
from deepseek_jax.sharding import make_mesh
from deepseek_jax.train import TrainConfig, Trainer

config = dsj.presets["tiny-v3"]
tc = TrainConfig(steps=200, batch_size=16, seq_len=128, learning_rate=3e-3, warmup_steps=20)
mesh = make_mesh()  # every local device on the "data" axis; try make_mesh("data=2,fsdp=2,expert=2") on 8
trainer = Trainer(config, tc, mesh)
state = trainer.init_state()
data = make_dataset(None, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=0)
print(f"mesh {dict(mesh.shape)}, {sum(x.size for x in jax.tree.leaves(state['params'])):,} params, "
      f"data vocabulary {data.vocab_size}")

for step in range(tc.steps):
    state, metrics = trainer.run_step(state, trainer.put_batch(next(data)))
    if step % 25 == 0 or step == tc.steps - 1:
        load = np.asarray(metrics["expert_load_max_over_mean"])
        print(f"step {step + 1:4d}  loss {float(metrics['loss']):.3f}  MTP {float(metrics['mtp_loss']):.3f}  "
              f"balance {float(metrics['balance_loss']):.4f}  expert load max/mean {[round(float(x), 2) for x in load]}")

# Held-out data (another seed): how many answer characters does greedy next-token prediction get right?
held_out = make_dataset(None, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=123)
batch = next(held_out)
logits = trainer.model.apply({"params": state["params"]}, batch["inputs"], batch["positions"], batch["segment_ids"])
print(f"answer-character accuracy on held-out sums: {arithmetic_accuracy(np.asarray(logits), batch):.2f}")
row = batch["inputs"][0]
pred = np.asarray(logits[0]).argmax(-1)
print("input    :", repr(held_out.decode(row[:48])))
print("predicted:", repr(held_out.decode(pred[:48])))
