"""The protocol every preparation follows (VOC + SBD, COCO, your own folder, the toy's COCO
twin): its completion file goes first and comes back last, so a half-prepared tree is refused
(``cpfcte.data.datasets.dataset_root``) until the preparation is run again."""

from __future__ import annotations

from pathlib import Path

# the file each preparation writes last: a dataset without it is half prepared and refused
PREPARED = {"voc": "cpfcte_prepare_voc.json", "coco": "cpfcte_prepare_coco.json",
            "toy_coco": "cpfcte_prepare_coco.json", "folder": "cpfcte_prepare_folder.json"}


PREPARE_COMMAND = {"voc": "voc", "coco": "coco", "toy_coco": "toy", "folder": "folder …"}


def begin_preparation(out: Path, dataset: str, folders: tuple[str, ...]) -> None:
    """Start (or restart) preparing ``dataset`` into ``out``: its completion file goes first,
    so the tree is refused until ``finish_preparation``, and the temporary files a kill left in
    ``folders`` (relative to ``out``) are removed; the outputs already written are kept."""
    from cpfcte.machinery.io import clean_partial

    (out / PREPARED[dataset]).unlink(missing_ok=True)
    for sub in folders:
        clean_partial(out / sub)


def finish_preparation(out: Path, dataset: str, report: dict) -> None:
    """The last write of a preparation: its completion file, holding its ``report``."""
    from cpfcte.machinery.io import write_json

    write_json(out / PREPARED[dataset], report)
