"""Training under torchrun: two CPU processes with the gloo backend (as on several GPUs with
NCCL): identical replicas, one set of outputs written by rank 0, the frozen-backbone phase."""

import json

from cpfcte.stages.train import train_distributed


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


def _weights(run_dir):
    import torch

    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def _max_diff(a, b):
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_two_processes_train_the_same_weights_as_one(tiny_cfg, tmp_path):
    """Parity: 2 gloo processes with the same global batch and seed as 1 process see the same
    images per step (EpochShard) and average the same gradients, so the weights may differ only
    by float32 summation order (the mean of two half-batch means against one batch mean: about
    1e-7 relative per step, carried along by Adam's steps). Measured here after 6 steps: 3e-8;
    the tolerance, 1e-6, is 30 times that and 5 orders of magnitude below the gap to a run
    that saw the images in another order (the control, 0.7): a multi-process run that silently
    diverges from the single-process one (another data order, gradients summed instead of
    averaged, replicas drifting) fails it. The augmentation of an image depends on (seed,
    epoch, image) alone, so it is the same under any split; dropout masks are drawn per rank,
    so they are off here."""
    from cpfcte.stages.train import train

    no_dropout = {"dropout": 0.0, "lstm_dropout": 0.0}
    cfg = tiny_cfg(epochs=2, warmup_epochs=0, batch_size=8, augment="pcm", **no_dropout)
    train_distributed(cfg, tmp_path / "two", nproc=2)
    train(cfg, tmp_path / "one", progress=False)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert _max_diff(one, two) < 1e-6
    train(tiny_cfg(epochs=2, warmup_epochs=0, batch_size=8, augment="pcm", seed=1, **no_dropout),
          tmp_path / "other", progress=False)
    assert _max_diff(one, _weights(tmp_path / "other")) > 1e-2


def test_epoch_shard_splits_each_global_batch_between_ranks():
    from cpfcte.stages.train import EpochShard

    one = list(EpochShard(10, 4, 1, 0, seed=3, epoch=1))
    r0, r1 = (list(EpochShard(10, 4, 2, r, seed=3, epoch=1)) for r in (0, 1))
    assert len(one) == 8 and sorted(one) == sorted(r0 + r1)            # remainder 2 dropped
    assert r0 == one[0:2] + one[4:6] and r1 == one[2:4] + one[6:8]      # batch by batch
    assert list(EpochShard(10, 4, 1, 0, seed=3, epoch=2)) != one        # a new order per epoch
    assert len(list(EpochShard(3, 4, 1, 0, 0, 0, drop_last=False))) == 3


def test_each_rank_takes_its_gpu_before_the_process_group_exists(monkeypatch):
    """Under torchrun on CUDA: ``set_device(cuda:LOCAL_RANK)`` first, then NCCL with
    ``device_id``, so no rank's first barrier runs on GPU 0. (Faked: no GPU here.)"""
    import torch

    from cpfcte.machinery import distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kw: calls.append(("init", backend, kw.get("device_id"))))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    world, rank, local, device = distributed.dist_info(torch.device("cuda"))
    assert (world, rank, local, device) == (2, 1, 1, torch.device("cuda", 1))
    assert calls == [("set_device", torch.device("cuda", 1)),
                     ("init", "nccl", torch.device("cuda", 1))]
    calls.clear()
    assert distributed.dist_info(torch.device("cpu"))[3] == torch.device("cpu")
    assert calls == [("init", "gloo", None)]


def test_every_cli_entry_point_leaves_its_process_group_on_success_and_on_error(tmp_path):
    """Under torchrun each rank runs ``python -m cpfcte ...``; the CLI destroys the process
    group when the command ends, done or failed. A gloo group left alive at interpreter exit
    killed rank 1 with SIGABRT ("terminate called without an active exception") after its
    training had finished; on NCCL it can hang."""
    import pytest
    import torch.distributed as dist

    from cpfcte import cli

    for argv, code in ((["numerics", "--diff", str(tmp_path / "missing.json")], 2),    # error
                       (["paper", "--profile", "toy", "--dry-run", "--only", "table1"], None)):
        store = dist.FileStore(str(tmp_path / f"store{code}"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        assert dist.is_initialized()
        if code is None:
            cli.main(argv)
        else:
            with pytest.raises(SystemExit) as e:
                cli.main(argv)
            assert e.value.code == code
        assert not dist.is_initialized(), argv
