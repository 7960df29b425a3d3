"""Bad input at paper scale is refused before any long work starts, with the figure and the
fix: a batch that cannot fit, a CUDA option on a CPU, more processes than GPUs, a crop the
images cannot fill, a run of the other profile."""

import pytest

from cpfcte.machinery.errors import CpfcteError


def test_batch_memory_is_extrapolated_from_two_probes_and_refused_with_the_figure():
    from cpfcte.machinery.capacity import check_batch_fits, extrapolate

    gb = 2**30
    probe = {1: 3 * gb, 2: 3.5 * gb}.__getitem__         # 2.5 GB fixed + 0.5 GB per image
    assert extrapolate(3 * gb, 3.5 * gb, 16) == 3 * gb + 15 * 0.5 * gb
    assert check_batch_fits(probe, 16, 80 * gb, "stage 1", "lower it") == 10.5 * gb
    with pytest.raises(CpfcteError, match=r"stage 1: batch 64 needs about 36\.5 GB .* the "
                                          r"device has 24\.0 GB; lower batch_size"):
        check_batch_fits(probe, 64, 24 * gb, "stage 1", "lower batch_size", extra=2 * gb)


def test_the_batch_is_checked_against_free_memory_not_the_total(monkeypatch):
    """Two jobs on one GPU: the second sees what the first leaves free (plus what it holds
    itself), not the device's total, and is refused before it runs out of memory."""
    import types

    import torch

    from cpfcte.machinery import capacity

    gb = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (30 * gb, 140 * gb))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 2 * gb)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(capacity, "cuda_probe", lambda step, d: {1: 3 * gb, 2: 4 * gb}.get)
    model = torch.nn.Linear(2, 2)
    cuda = types.SimpleNamespace(type="cuda")
    assert capacity.cuda_capacity(cuda) == 32 * gb
    assert capacity.check_cuda_batch(model, cuda, 16, None, "stage 1", "fix", slots=2) == \
        3 * gb + 15 * gb + 6 * 4 * 2
    with pytest.raises(CpfcteError, match=r"batch 64 needs about .* the device has 32\.0 GB"):
        capacity.check_cuda_batch(model, cuda, 64, None, "stage 1", "fix", slots=2)


def test_cuda_options_and_process_counts_are_refused_before_the_run_folder_exists(tiny_cfg,
                                                                                 tmp_path):
    import torch

    from cpfcte.machinery.distributed import check_nproc
    from cpfcte.stages.train import train

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(CpfcteError, match="device='cuda' but CUDA is not available"):
        train(tiny_cfg(device="cuda"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.json").exists()     # nothing blocks the name
    with pytest.raises(CpfcteError, match="--nproc -3: needs at least 1 process"):
        check_nproc(-3, "cpu", 8, "batch_size")
    with pytest.raises(CpfcteError, match="batch_size=10 is not divisible by --nproc 4"):
        check_nproc(4, "cpu", 10, "batch_size")
    with pytest.raises(CpfcteError, match="CUDA is not available"):
        check_nproc(2, "cuda", 8, "batch_size")
    with pytest.raises(CpfcteError, match="--max-epochs -1: must be ≥ 0"):
        train(tiny_cfg(), tmp_path / "run2", progress=False, max_epochs=-1)
    assert not (tmp_path / "run2").exists()


def test_a_crop_the_images_cannot_fill_is_refused(tiny_cfg, toy_root):
    from cpfcte.data import open_split
    from cpfcte.machinery.config import load_config
    from cpfcte.stages.deeplab_data import check_crop

    cfg = tiny_cfg(**{"deeplab.crop": 32})
    voc = open_split(cfg, cfg.train_split)
    check_crop(voc, cfg.deeplab)                                 # ~45 px images fill 32
    big = load_config("toy", {"data_root": str(toy_root), "deeplab.crop": 321}).deeplab
    with pytest.raises(CpfcteError, match=r"deeplab.crop=321 exceeds the images: \d+ of \d+ "
                                          r"train_aug images are smaller than 321 px"):
        check_crop(voc, big)


def test_a_run_of_another_profile_is_refused_by_the_cli(tiny_cfg, toy_root, capsys):
    from cpfcte.cli import main

    model = ["data_root=" + str(toy_root), "img_size=32", "token_dim=8", "lstm_hidden=8", "k=2",
             "batch_size=8", "epochs=1",
             "backbone_kwargs={patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}"]
    main(["train", "--profile", "toy", "--run", "t", "--set", *model])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["pseudo", "--profile", "voc", "--train-run", "toy/t", "--run", "p"])
    err = capsys.readouterr().err
    assert "is a run of profile 'toy', not 'voc': pass --profile toy" in err
    with pytest.raises(SystemExit):
        main(["train", "--profile", "toy", "--run", "t2", "--nproc", "-3", "--set", *model])
    assert "--nproc -3: needs at least 1 process" in capsys.readouterr().err


def test_an_inference_size_the_patches_cannot_tile_is_refused_before_training(tiny_cfg,
                                                                              tmp_path):
    from cpfcte.machinery.errors import CpfcteError
    from cpfcte.stages.train import train

    with pytest.raises(CpfcteError, match=r"infer_size=50 is not a multiple of the patch size 8; "
                                          r"give a multiple, e.g. infer_size=48"):
        train(tiny_cfg(infer_size=50), tmp_path / "t", progress=False)
    assert not (tmp_path / "t" / "checkpoint.pt").exists()
