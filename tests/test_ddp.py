"""Training under torchrun: two CPU processes with the gloo backend (as on several GPUs with
NCCL): identical replicas, one set of outputs written by rank 0, the frozen-backbone phase."""

import json

from cpfcte.train import train_distributed


def test_two_process_gloo_training_keeps_ranks_identical(tiny_cfg, tmp_path):
    cfg = tiny_cfg(epochs=2, warmup_epochs=1, freeze_backbone_warmup=True, batch_size=8)
    summary = train_distributed(cfg, tmp_path / "ddp", nproc=2)
    assert summary["processes"] == 2 and summary["complete"]
    assert [h["backbone_frozen"] for h in summary["history"]] == [True, False]
    digests = [(tmp_path / "ddp" / f"rank{r}.digest").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]                      # DDP kept the replicas identical
    log = (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in log] == [1, 2]   # written once, by rank 0
    assert (tmp_path / "ddp" / "checkpoint.pt").exists()
    # the 24 toy train_aug images, 4 per process per step: every image seen once per epoch
    assert all(0 < h["loss"] < 2 for h in summary["history"])
