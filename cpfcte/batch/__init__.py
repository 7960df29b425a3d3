"""The batch of runs behind `make paper`: the catalog (``notebooks/batches.yaml``), the runner
(papermill, warm kernels, --jobs), the GPU-time plan, SLURM through submitit, and the
paper-scale smoke (`make test-scale`). Importing the catalog loads nothing else of the batch,
so the report can read it without the runner."""
