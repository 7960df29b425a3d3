"""The batch's runs as jobs through submitit: its local executor here (the same submission
machinery as SLURM); against a real SLURM in tests/test_slurm.py."""

import json

import pytest
from test_batch_report import seeded_batch  # noqa: F401  (the fixture)

from cpfcte.batch.runner import run_batch
from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.paths import runs_dir


def _cluster():
    from cpfcte.batch.cluster import ClusterConfig

    return ClusterConfig(poll_seconds=0.3, cpus_per_task=1, mem_gb=1)


def test_jobs_through_submitit_finish_skip_and_resubmit_only_what_failed(seeded_batch):
    from cpfcte.batch.cluster import status_lines

    root = runs_dir() / "toy"
    root.mkdir(parents=True, exist_ok=True)
    (root / "FAIL_pseudo_s1").write_text("")          # the step notebook raises for this run
    log = []
    res = run_batch("toy", batch_path=seeded_batch, executor="submitit-local",
                    cluster=_cluster(), log=log.append)
    assert res["pseudo_s1"]["status"] == "failed" and "asked to fail" in res["pseudo_s1"]["error"]
    assert res["summary"]["status"] == "blocked"       # never submitted
    assert all(res[n]["status"] == "done" for n in ("train", "train_s1", "train_s2",
                                                     "pseudo", "pseudo_s2"))
    assert sum(line.startswith("[submitted]") for line in log) == 6
    job = json.loads((root / "train_s1" / "job.json").read_text())
    assert job["executor"] == "submitit-local" and job["job_id"] and job["stderr"]
    lines = dict(line.split(None, 1) for line in status_lines("toy", ["train_s1", "pseudo_s1"]))
    assert lines["train_s1"].startswith("done") and f"job {job['job_id']}" in lines["train_s1"]
    assert lines["pseudo_s1"].startswith("failed")
    (root / "FAIL_pseudo_s1").unlink()
    log.clear()
    res = run_batch("toy", batch_path=seeded_batch, executor="submitit-local",
                    cluster=_cluster(), log=log.append)
    assert all(r["status"] == "done" for r in res.values())
    submitted = sorted(line.split()[1].rstrip(":") for line in log if line.startswith("[submitted]"))
    assert submitted == ["pseudo_s1", "summary"]        # only what was missing
    assert (root / "train" / "count.txt").read_text() == "1"


def test_cluster_bad_input_is_refused_before_anything_is_submitted(tmp_path, monkeypatch):
    from cpfcte.batch.catalog import Run
    from cpfcte.batch.cluster import ClusterConfig, check_executor, job_resources

    monkeypatch.setenv("PATH", str(tmp_path))           # no sbatch here
    with pytest.raises(CpfcteError, match="--executor slurm: sbatch, squeue, scancel not on "
                                          "the PATH"):
        check_executor("slurm")
    with pytest.raises(CpfcteError, match="--executor 'pbs': one of"):
        check_executor("pbs")
    (tmp_path / "c.yaml").write_text("partition: gpu\ngpu: 2\n")
    with pytest.raises(CpfcteError, match="c.yaml: unknown field 'gpu'"):
        ClusterConfig.load(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("partition: gpu\nsbatch: ['--constraint=h100']\n")
    cluster = ClusterConfig.load(tmp_path / "c.yaml", account="lab")
    assert cluster.partition == "gpu" and cluster.account == "lab"
    train = Run("train_full", "02_train.ipynb", {"nproc": 4}, stage="train")
    with pytest.raises(CpfcteError, match="nproc=4 exceeds the 1 GPU"):
        job_resources(train, "voc", cluster, 3600)
    warned = []
    ok = job_resources(Run("t", "02_train.ipynb", {}, stage="train"), "voc",
                       ClusterConfig(time_margin=0.5, min_minutes=1), 3600, warned.append)
    assert ok["gpus_per_node"] == 1 and ok["timeout_min"] == 31
    assert warned and "below the plan's estimate" in warned[0]
    toy = job_resources(Run("t", "02_train.ipynb", {}, stage="train"), "toy", cluster, 10)
    assert "gpus_per_node" not in toy and toy["timeout_min"] == 30


def test_sbatch_options_from_the_cluster_file():
    from cpfcte.batch.cluster import ClusterConfig, slurm_parameters

    params = slurm_parameters(ClusterConfig(partition="gpu", account="lab", qos="high",
                                            sbatch=["--constraint=h100", "--exclusive"]))
    assert params == {"slurm_partition": "gpu", "slurm_additional_parameters": {
        "account": "lab", "qos": "high", "constraint": "h100", "exclusive": True}}
