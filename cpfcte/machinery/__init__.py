"""The machinery under the method and the stages: nothing here knows the paper.

    config       one Config reaching every stage (profiles, overrides, digests)
    runfolder    the run-folder protocol (config, checkpoint, logs, metrics, one writer)
    io           atomic writes, images and label PNGs, split lists
    paths        project, data, runs and output folders
    errors       the one error type a user sees
    guard        the leak guard: no training on ground truth, no copy of it
    safety       nothing of the user's is lost: where a command may write
    finite       non-finite losses stop a run
    faults       fault injection for the fault benchmark
    numerics     pinned CPU code paths, seeds, provenance line
    precision    float32 where the method asks for it (no autocast, no TF32)
    capacity     will the batch fit on the GPU
    progress     progress bars
    distributed  torchrun plumbing (device, process group, barriers)
    notes        the interpretation notes, read from docs/interpretation.md
"""
