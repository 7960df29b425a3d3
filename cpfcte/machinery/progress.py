"""Every progress bar of the library: tqdm.auto (a widget in Jupyter, text in a terminal),
redrawn at most once a second. In a notebook each redraw is a kernel message; a long cell that
redraws ten times a second (tqdm's default) sends thousands of them, and a client that reads
them only when the cell ends (nbval, papermill) can lose some past ZeroMQ's high-water mark,
the kernel's "idle" among them, and then wait for it in vain."""

from __future__ import annotations

MIN_INTERVAL_S = 1.0


def progress_bar(iterable=None, **kwargs):
    from tqdm.auto import tqdm

    kwargs.setdefault("mininterval", MIN_INTERVAL_S)
    return tqdm(iterable, **kwargs)
