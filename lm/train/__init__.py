"""postlab.lm.train: the training infrastructure every task stands on.

`trainer`: the one trainer (a pure jitted step, accumulation, clipping, schedules, loss guard,
checkpoints with the data iterator's state); `checkpoint`: Orbax checkpoints; `rundir`: run
directories (resolved config, JSONL + TensorBoard metrics, plots, report); `runtime`: process
settings applied before JAX starts (glibc allocator, XLA:CPU training flags); `flops`: FLOPs per
token and MFU. Nothing here imports a task or a loader; importing the package imports nothing.
"""
