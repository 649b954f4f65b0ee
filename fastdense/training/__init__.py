"""The training loop's parts, one module per job (the public names are re-exported by fastdense.train).

``trainer`` (the Trainer: building, rounds, the run; ``train()``), ``update`` (micro-batches and
optimizer updates), ``checkpointing`` (save / load), ``outputs`` (evaluation, what a finished
run writes), ``distributed`` (process group, collectives), ``engine`` (DeepSpeed config, LR
schedule), ``run_dir`` (run directories, resume resolution), ``tracking`` (metrics.jsonl,
TensorBoard, JSON numbers), ``plots`` (reward curve, grids), ``interrupt`` (SIGINT / SIGTERM).
"""
