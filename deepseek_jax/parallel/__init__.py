"""Where arrays live on the devices: the mesh, the one logical-axis rules table, context parallelism, and the
helpers of code that runs under ``jax.shard_map``."""
