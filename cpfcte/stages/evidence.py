"""Where each class's image score comes from (notebook 05's last figure; note 19), measured on
the pseudo-label stage's own forward pass at the inference size: no second pass over the split.

Evaluation only: it reads the split's ground-truth masks, resized to the patch grid, to locate
the objects. Per class c, over the images labelled with it: ``on_object``, the mean Z^c over
c's object patches; ``bg_on_object``, the mean background probability there; ``off_object``,
the mean Z^c over background patches; ``topk_on_object``, the share of the patches the run's
pooling draws c's image score from (``topk_pooling.pooled_patches``: k for top-k, 1 for max,
all for average pooling) that lie on c's objects. A healthy class scores high on its objects
and picks them; a collapsed one gives its objects to the background and draws its score from
background patches (``topk_on_object`` near 0). The sums and the images done are saved in the
run folder as the stage goes, so a resumed stage adds only what is missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cpfcte.machinery.errors import CpfcteError
from cpfcte.method.topk_pooling import pooled_patches

SAVE_EVERY = 64                 # images between two saves of the running sums


class ClassEvidence:
    def __init__(self, voc, pooling: str, k: int, path: Path | None = None):
        gt_dir = voc.gt_dir_or_none()
        if gt_dir is None:
            raise CpfcteError(f"{voc.root}: split {voc.split!r} has no ground-truth masks to "
                              "locate the objects; use a split with masks (train, val)")
        self.voc, self.gt_dir, self.pooling, self.k, self.path = voc, gt_dir, pooling, k, path
        self.sums = np.zeros((len(voc.classes), 5))  # images, on, bg-on, off, picked on object
        self.done: set[str] = set()
        self._unsaved = 0
        if path is not None and path.is_file():
            from cpfcte.machinery.io import read_json

            saved = read_json(path)
            if saved.get("pooling") == [pooling, k] and len(saved.get("sums", [])) == len(
                    voc.classes):
                self.sums = np.array(saved["sums"], dtype=np.float64)
                self.done = set(saved["done"])

    def wants(self, i: int) -> bool:
        """Whether image ``i`` still has to be added."""
        return self.voc.ids[i] not in self.done

    def add(self, i: int, grid: np.ndarray) -> None:
        """Add image ``i``'s patch probabilities Z (C, h, w)."""
        from PIL import Image

        from cpfcte.machinery.io import read_label_png

        image_id = self.voc.ids[i]
        if image_id in self.done:
            return
        self.done.add(image_id)
        present = np.flatnonzero(self.voc.labels(i))[1:]
        if len(present):
            z = np.asarray(grid).reshape(grid.shape[0], -1)                 # (C, s)
            h, w = grid.shape[1:]
            gt = Image.fromarray(read_label_png(self.gt_dir / f"{image_id}.png"))
            gt = np.asarray(gt.resize((w, h), Image.NEAREST)).ravel()
            n = pooled_patches(self.pooling, self.k, z.shape[1])
            for c in present:
                obj, bg = gt == c, gt == 0
                if not obj.any() or not bg.any():
                    continue
                picked = np.argsort(-z[c], kind="stable")[:n]
                self.sums[c] += (1, z[c, obj].mean(), z[0, obj].mean(), z[c, bg].mean(),
                                 obj[picked].mean())
        self._unsaved += 1
        if self._unsaved >= SAVE_EVERY:
            self.save()

    def save(self) -> None:
        if self.path is not None:
            from cpfcte.machinery.io import write_json

            write_json(self.path, {"pooling": [self.pooling, self.k],
                                   "sums": self.sums.tolist(), "done": sorted(self.done)})
        self._unsaved = 0

    def rows(self) -> list[dict]:
        rows = []
        for c in range(1, len(self.voc.classes)):
            n = self.sums[c, 0]
            if n:
                on, bg_on, off, top = self.sums[c, 1:] / n
                rows.append({"class": self.voc.classes[c], "images": int(n), "on_object": on,
                             "bg_on_object": bg_on, "off_object": off, "topk_on_object": top})
        return rows
