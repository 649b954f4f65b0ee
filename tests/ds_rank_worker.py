"""One rank of tests/test_multirank.py, started by the ``deepspeed`` launcher.

Runs ``fastdense train`` through the CLI's own ``main`` with the launcher's argv (which begins
with ``--local_rank=N``), and after training writes this rank's trainable weights (ZeRO-3
partitions gathered) to ``$FASTDENSE_TEST_DUMP/rank-N.safetensors`` so the test can compare ranks.
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before diffusers/peft import triton

import torch  # noqa: E402

torch.set_num_threads(1)  # two ranks on two cores


def main() -> None:
    from safetensors.torch import save_file

    from fastdense import train as train_mod
    from fastdense.cli.main import main as cli_main

    dump_dir = os.environ["FASTDENSE_TEST_DUMP"]
    run = train_mod.Trainer.run

    def run_then_dump(self):
        result = run(self)
        with self._gathered():
            weights = {name: p.detach().clone().contiguous()
                       for name, p in self.unet.named_parameters() if p.requires_grad}
        save_file(weights, os.path.join(dump_dir, f"rank-{self.dist.rank}.safetensors"))
        return result

    train_mod.Trainer.run = run_then_dump
    cli_main(sys.argv[1:])


if __name__ == "__main__":
    main()
