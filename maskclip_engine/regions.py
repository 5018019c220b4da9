"""Regions from gestures: a click, a box or a phrase (the annotator's gestures) becomes a mask, from one
image's dense state.

The engine's word is *region*: it knows gestures and grids, not Label Studio.
:mod:`ls_integration.smart_tools` translates Label Studio's smart-tool contexts (keypoints,
rectangles, a text prompt) into :class:`Gestures` and the :class:`Region` back into a brush or
polygon result.

Everything here works on the feature grid of one image (a few thousand
locations at most) and is cheap; the image encoder ran once, before.

Region logic, and why:

* **Affinity, not the argmax.** An annotator clicks because MaskCLIP got
  something wrong, often the label itself. So a click grows a region by how
  alike the locations are to the clicked ones: the mean of the cosine of the
  dense features and the cosine of the last block's keys (the keys are what
  key smoothing groups locations by). Each click's similarity map is
  normalised per image: ``0`` at a typical location (the 25th percentile),
  ``1`` at the most similar one (the click itself), so one threshold works
  for any model and image.
* **The label's probability, as much as MaskCLIP agrees.** With a label, the
  score is ``max(affinity, r * p_label)``, where ``r`` is the label's
  probability at the clicked locations: where MaskCLIP already agrees with the
  annotator, the region extends over the rest of that label's object even
  where its features differ; where it does not (``r`` near 0), the label term
  fades out and affinity alone decides.
* **The object under the click.** Of the locations scoring over the threshold,
  only the connected pieces that hold a positive click are kept, and the
  clicked cell itself always belongs to the mask.
* **Negative clicks** remove what is more like them than like the positive
  clicks (so one negative click removes a whole similar part).
* **A box** restricts everything to its area (exactly, at pixel level) and
  picks the object inside: seeds at the box centre and at the label's most
  confident location in the box, the ring just outside the box as background.
* **A phrase** is its own text embedding. A location belongs to it when it is
  among the image's most phrase-like (the cosine map normalised per image as
  above) and the phrase beats the project's other labels there (softmax of
  scaled cosines, as MaskCLIP scores a label); then each location's score is
  averaged with its neighbours', weighted by key similarity. A phrase
  that names nothing confidently still gets the locations at least half as
  likely as its best one.

Grid scores are upsampled bilinearly to the image size and thresholded there,
so outlines are smooth, not blocky.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from maskclip_engine.errors import InvalidOptionError
from maskclip_engine.features.dense_state import DenseState, Point

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels of the original image


@dataclass(frozen=True)
class Gestures:
    """What the annotator gave: clicks and a box in image pixels, a phrase embedding, a label index.

    ``label`` indexes :attr:`DenseState.labels` (``None``: no label known).
    ``text`` is a ``[D]`` L2-normalised phrase embedding; ``competitors`` the
    ``[C', D]`` embeddings it is scored against (the project's other labels).
    """

    positive: tuple[Point, ...] = ()
    negative: tuple[Point, ...] = ()
    box: Box | None = None
    text: torch.Tensor | None = None
    competitors: torch.Tensor | None = None
    label: int | None = None

    @property
    def empty(self) -> bool:
        return not self.positive and self.box is None and self.text is None and self.label is None


@dataclass(frozen=True)
class RegionParams:
    """Knobs of the region logic described above; the defaults are the product's."""

    threshold: float = 0.5
    typical_quantile: float = 0.25  # the similarity a "typical" location has (maps to 0)
    key_weight: float = 0.5  # keys vs features in the affinity
    logit_scale: float = 100.0  # phrase vs labels softmax temperature, as MaskCLIP's


@dataclass(frozen=True)
class Region:
    """``mask`` ``HxW bool`` at the image's size, its mean grid ``score`` and the ``label`` index used."""

    mask: np.ndarray
    score: float
    label: int | None


def gesture_region(state: DenseState, gestures: Gestures, params: RegionParams | None = None) -> Region:
    """The mask the gestures ask for; empty when they ask for nothing."""
    params = params or RegionParams()
    if gestures.label is not None and not 0 <= gestures.label < len(state.labels):
        raise InvalidOptionError(f"label index {gestures.label} is out of range for {len(state.labels)} labels.")
    height, width = state.image_size
    if gestures.text is not None:
        score = phrase_scores(state, gestures.text, gestures.competitors, params)
        peak = float(score.max())
        threshold = min(params.threshold, 0.5 * peak) if peak > 0 else params.threshold
        # Refine the phrase map with clicks and a box when the annotator gave them too.
        if gestures.positive or gestures.box is not None or gestures.negative:
            score = torch.maximum(score, region_scores(state, gestures, params)[0])
        seeds: list[tuple[int, int]] = []
    else:
        score, seeds = region_scores(state, gestures, params)
        threshold = params.threshold
    if seeds:
        score = torch.where(connected_to(score >= threshold, seeds), score, torch.zeros_like(score))
    mask = upsample_mask(score, (height, width), threshold)
    rows, cols = state.grid
    for row, col in seeds:
        # Bilinear upsampling shrinks a one-cell object to half a cell; the clicked cell stays whole.
        if score[row, col] >= threshold:
            top, bottom = int(row * height / rows), int(np.ceil((row + 1) * height / rows))
            left, right = int(col * width / cols), int(np.ceil((col + 1) * width / cols))
            mask[top:bottom, left:right] = True
    if gestures.box is not None:
        mask &= _box_pixels(gestures.box, (height, width))
    grid_mask = score >= threshold
    mean = float(score[grid_mask].mean()) if bool(grid_mask.any()) else 0.0
    return Region(mask=mask.numpy(), score=mean, label=gestures.label)


def upsample_mask(score: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """``score >= threshold`` at image ``size`` ``(H, W)``, from grid scores ``[h, w]`` upsampled bilinearly.

    The same values as ``F.interpolate(..., mode="bilinear", align_corners=False)``,
    computed only over the bounding box of the cells at or over the threshold
    (plus one cell): a small object costs a small upsampling.
    """
    height, width = size
    mask = torch.zeros(height, width, dtype=torch.bool)
    over = torch.nonzero(score >= threshold)
    if over.numel() == 0:
        return mask
    rows, cols = score.shape
    r0, c0 = (over.min(dim=0).values - 1).clamp_min(0).tolist()
    r1, c1 = (over.max(dim=0).values + 1).tolist()
    y0, y1 = int(r0 * height / rows), min(height, int(np.ceil((r1 + 1) * height / rows)))
    x0, x1 = int(c0 * width / cols), min(width, int(np.ceil((c1 + 1) * width / cols)))
    along_y = _linear_weights(y0, y1, height, rows)  # [y1 - y0, h]
    along_x = _linear_weights(x0, x1, width, cols)  # [x1 - x0, w]
    mask[y0:y1, x0:x1] = (along_y @ score @ along_x.T) >= threshold
    return mask


def _linear_weights(start: int, stop: int, size: int, cells: int) -> torch.Tensor:
    """Rows of 1-D linear interpolation weights for output pixels ``start..stop`` of ``size`` from ``cells``."""
    source = ((torch.arange(start, stop, dtype=torch.float32) + 0.5) * cells / size - 0.5).clamp_min(0)
    low = source.floor().long().clamp_max(cells - 1)
    high = (low + 1).clamp_max(cells - 1)
    frac = source - low.float()
    weights = torch.zeros(stop - start, cells)
    index = torch.arange(stop - start)
    weights[index, low] += 1 - frac
    weights[index, high] += frac
    return weights


# --------------------------------------------------------------------- clicks and boxes
def region_scores(
    state: DenseState, gestures: Gestures, params: RegionParams
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Grid scores ``[h, w]`` in ``[0, 1]`` for clicks and a box, and the seed cells they grow from."""
    rows, cols = state.grid
    seeds = [state.cell(p) for p in gestures.positive]
    inside = torch.ones(rows, cols, dtype=torch.bool)
    ring: torch.Tensor | None = None
    if gestures.box is not None:
        inside, ring = _box_cells(state, gestures.box)
        seeds += _box_seeds(state, gestures, inside)
    label_probs = state.probs[gestures.label] if gestures.label is not None else None

    if not seeds:
        if label_probs is None:
            return torch.zeros(rows, cols), []
        score = label_probs.clone()  # only negatives: the label's region minus what they point at
        positive = score
    else:
        positive = affinity(state, [_vectors(state, [s]) for s in seeds], params)
        score = positive
        if label_probs is not None:
            agreement = float(torch.stack([label_probs[r, c] for r, c in seeds]).mean())
            score = torch.maximum(positive, agreement * label_probs)

    negatives = [_vectors(state, [state.cell(p)]) for p in gestures.negative]
    if ring is not None:
        # The ring outside a box is background, except where it continues what the seeds point at
        # (a loose box cutting through the object must not turn the object into a negative).
        background = ring & (positive < params.threshold)
        if bool(background.any()):
            negatives.append(_vectors(state, torch.nonzero(background).tolist()))
    if negatives:
        against = affinity(state, negatives, params)
        score = torch.where(against > positive, torch.zeros_like(score), score)
    score = torch.where(inside, score, torch.zeros_like(score))
    return score, seeds


def affinity(
    state: DenseState, seeds: Sequence[tuple[torch.Tensor, torch.Tensor]], params: RegionParams
) -> torch.Tensor:
    """Per-image normalised similarity ``[h, w]`` to the most similar of ``seeds`` (feature, key) pairs."""
    features = state.features.flatten(1)  # [D, N], unit length per location
    keys = state.keys.flatten(1)  # [K, N]
    feature_seeds = torch.stack([f for f, _ in seeds])  # [S, D]
    key_seeds = torch.stack([k for _, k in seeds])  # [S, K]
    similarity = (1 - params.key_weight) * (feature_seeds @ features) + params.key_weight * (key_seeds @ keys)
    typical = torch.quantile(similarity, params.typical_quantile, dim=1, keepdim=True)
    best = similarity.amax(dim=1, keepdim=True)
    normalised = ((similarity - typical) / (best - typical).clamp_min(1e-6)).clamp(0, 1)
    return normalised.amax(dim=0).reshape(state.grid)


def _vectors(state: DenseState, cells: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean L2-normalised feature and key of some cells (one cell: that cell's own)."""
    index = torch.tensor([list(c) for c in cells])
    feature = state.features[:, index[:, 0], index[:, 1]].mean(dim=1)
    key = state.keys[:, index[:, 0], index[:, 1]].mean(dim=1)
    return F.normalize(feature, dim=0), F.normalize(key, dim=0)


def _box_cells(state: DenseState, box: Box) -> tuple[torch.Tensor, torch.Tensor]:
    """Cells whose centres lie in the box (at least the centre's cell), and the one-cell ring outside it."""
    height, width = state.image_size
    rows, cols = state.grid
    x0, y0, x1, y1 = box
    centre_x = (torch.arange(cols) + 0.5) * width / cols
    centre_y = (torch.arange(rows) + 0.5) * height / rows
    in_x = (centre_x >= x0) & (centre_x <= x1)
    in_y = (centre_y >= y0) & (centre_y <= y1)
    inside = in_y[:, None] & in_x[None, :]
    row, col = state.cell(((x0 + x1) / 2, (y0 + y1) / 2))
    inside[row, col] = True
    grown = F.max_pool2d(inside[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
    return inside, grown & ~inside


def _box_seeds(state: DenseState, gestures: Gestures, inside: torch.Tensor) -> list[tuple[int, int]]:
    """The box centre, plus the label's most confident location in the box when MaskCLIP is confident there."""
    x0, y0, x1, y1 = gestures.box  # type: ignore[misc]
    seeds = [state.cell(((x0 + x1) / 2, (y0 + y1) / 2))]
    if gestures.label is not None:
        probs = torch.where(inside, state.probs[gestures.label], torch.full_like(inside, -1.0, dtype=torch.float32))
        best = int(probs.argmax())
        if float(probs.flatten()[best]) >= 0.5:
            seeds.append(divmod(best, state.grid[1]))
    return list(dict.fromkeys(seeds))


def _box_pixels(box: Box, size: tuple[int, int]) -> torch.Tensor:
    height, width = size
    x0, y0, x1, y1 = box
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    return ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]


def connected_to(mask: torch.Tensor, seeds: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The 4-connected parts of a grid ``mask`` ``[h, w]`` that hold at least one seed cell."""
    grid = mask.numpy()
    rows, cols = grid.shape
    keep = np.zeros_like(grid, dtype=bool)
    queue = deque((r, c) for r, c in seeds if grid[r, c])
    for r, c in queue:
        keep[r, c] = True
    while queue:
        r, c = queue.popleft()
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nr < rows and 0 <= nc < cols and grid[nr, nc] and not keep[nr, nc]:
                keep[nr, nc] = True
                queue.append((nr, nc))
    return torch.from_numpy(keep)


# --------------------------------------------------------------------- phrases
def phrase_scores(
    state: DenseState, text: torch.Tensor, competitors: torch.Tensor | None, params: RegionParams
) -> torch.Tensor:
    """Probability ``[h, w]`` that each location shows the phrase rather than one of ``competitors``."""
    features = state.features.flatten(1)  # [D, N], unit length per location
    phrase = F.normalize(text.float().flatten(), dim=0) @ features  # [N]
    # The cosine map, normalised per image like an affinity: among this image's locations, how phrase-like.
    typical = torch.quantile(phrase, params.typical_quantile)
    probs = ((phrase - typical) / (phrase.max() - typical).clamp_min(1e-6)).clamp(0, 1)
    if competitors is not None and competitors.numel() > 0:
        # ... and it must also beat the project's labels there, as a label beats the others in MaskCLIP:
        # a location that is merely the least unlike the phrase, but plainly another label, stays out.
        others = F.normalize(competitors.float(), dim=1) @ features  # [C', N]
        logits = torch.cat([phrase[None], others]) * params.logit_scale
        probs = torch.minimum(probs, torch.softmax(logits, dim=0)[0])
    return local_key_smoothing(probs.reshape(state.grid), state.neighbours)


def local_key_smoothing(scores: torch.Tensor, similarity: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Edge-aware smoothing of grid scores ``[h, w]``: each location averages its neighbours' scores,
    weighted by ``exp((cos(k_i, k_j) - 1) / temperature)`` (itself 1, an unlike neighbour almost 0).

    ``similarity`` is :func:`neighbour_similarity` of the keys. MaskCLIP's
    global key smoothing needs an ``N x N`` key product (tens of milliseconds
    per image on a CPU); a neighbourhood does for a single map, filling holes
    inside an object without spreading across its edges.
    """
    rows, cols = scores.shape
    radius = (int(round(similarity.shape[0] ** 0.5)) - 1) // 2
    padded = F.pad(scores.float(), (radius, radius, radius, radius))
    weights = torch.exp((similarity - 1) / temperature)  # [S, h, w]; 0 off the grid
    values = torch.stack(
        [padded[dy : dy + rows, dx : dx + cols] for dy in range(2 * radius + 1) for dx in range(2 * radius + 1)]
    )
    return (weights * values).sum(0) / weights.sum(0).clamp_min(1e-6)
