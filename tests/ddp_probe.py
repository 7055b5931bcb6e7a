"""A Lightning callback for tests/test_experiments.py's DDP test: each rank writes the fingerprints of the images it
trained on, so the test can check that the ranks' shards differ and together cover the data."""
import hashlib
import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class ImageLog(Callback):
    def __init__(self, out_dir: str):
        self.out_dir, self.seen = Path(out_dir), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen += [hashlib.md5(x.cpu().numpy().tobytes()).hexdigest() for x in batch[0]]

    def on_train_end(self, trainer, pl_module):
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))
