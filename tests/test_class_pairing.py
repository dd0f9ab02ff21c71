"""Golden sequences of concepts.PairedClassIterator, square and bucketed: which class image (and flip, crop, slot,
concept) each instance example of a step is paired with, over several epochs of every concept's class sequence, with
concepts repeated within a step and a class folder shared by two concepts, on both processes of two. Recorded at
93d7b26, before the iterator's two draw paths (square, bucketed) were merged into one; a refactor must keep them, and
with them every concepts run's batches and resumed states. Tiny and model-free: well under a second."""

import json
import pathlib

import numpy as np
import pytest

from dreambooth_jax.data import concepts as concepts_lib, images as data_lib

# class images: (H, W) of the stored (resized) image, its bucket (H, W) when bucketed
SHAPES = [((40, 48), (32, 32)), ((40, 56), (32, 48)), ((44, 44), (32, 32)), ((56, 40), (48, 32)),
          ((36, 40), (32, 32)), ((40, 52), (32, 48)), ((48, 48), (32, 32))]
# per concept, its class images; concept 2 shares concept 0's folder
GROUPS = [[0, 1, 2], [3, 4, 5, 6], [0, 1, 2]]
# per step, the concepts of the global batch's instance examples (4 = 2 processes x 2)
SQUARE_STEPS = [[0, 1, 1, 2], [1, 1, 1, 0], [2, 2, 0, 1], [0, 0, 0, 0], [1, 2, 1, 2], [1, 1, 0, 2]]
# per step, its bucket and the concepts of its 2 micro-batches x 4 examples (micro-batch-major)
BUCKET_STEPS = [((32, 32), [0, 1, 1, 2, 1, 0, 2, 2]), ((32, 48), [1, 0, 0, 2, 1, 1, 0, 2]),
                ((32, 32), [1, 1, 1, 1, 0, 2, 0, 2]), ((48, 32), [1, 1, 1, 1, 1, 1, 1, 1]),
                ((32, 32), [2, 0, 1, 0, 2, 1, 2, 0])]


# recorded at commit 93d7b26 (before the merge)
SQUARE_GOLDEN = [
    '0f@3,15s0c0 5f@8,9s1c1 | 3f@19,0s2c1 2f@1,6s3c2',
    '6f@2,13s0c1 4f@1,2s1c1 | 3@18,1s2c1 2f@12,0s3c0',
    '1@6,9s0c2 0f@7,6s1c2 | 1f@5,22s2c0 6@6,12s3c1',
    '0f@8,5s0c0 2f@3,10s1c0 | 1@0,14s2c0 2@1,8s3c0',
    '5@0,8s0c1 2@4,2s1c2 | 4f@0,2s2c1 1@3,21s3c2',
    '4@3,1s0c1 5f@7,0s1c1 | 0@2,6s2c0 0@8,12s3c2',
]
BUCKET_GOLDEN = [
    '0f@5,1s0c0 4f@2,7s1c1 6f@3,8s0c1 2@0,4s1c0 | 6f@15,13s2c1 2@6,7s3c2 0f@6,11s2c2 2f@0,10s3c2',
    '5f@8,0s0c1 1@8,3s1c0 5@1,2s0c1 5@0,0s1c1 | 1@2,8s2c0 1@2,4s3c2 1f@0,3s2c0 1@3,3s3c2',
    '4@1,8s0c1 4@2,0s1c1 2f@4,11s0c0 0@1,8s1c2 | 6@11,1s2c1 6@6,12s3c1 0f@4,4s2c0 2f@4,2s3c2',
    '3@7,4s0c1 3f@8,3s1c1 3f@3,1s0c1 3@8,3s1c1 | 3f@5,4s2c1 3@7,7s3c1 3@2,0s2c1 3f@6,0s3c1',
    '0f@5,9s0c2 0@6,15s1c0 0f@3,4s0c2 6f@8,14s1c1 | 4f@0,6s2c1 2@10,3s3c0 2f@2,12s2c2 2f@11,11s3c0',
]
# the final states (both processes walk every example: the same state)
SQUARE_STATE = {"a": (2, 2), "b": (2, 2), "a2": (2, 0)}
BUCKET_STATE = {"a2@32x32": (4, 0), "a2@32x48": (2, 0), "a@32x32": (3, 1), "a@32x48": (3, 0), "b@32x32": (4, 1),
                "b@32x48": (3, 0), "b@48x32": (8, 0)}


def class_images(bucketed: bool) -> data_lib.SubjectImages:
  rng = np.random.default_rng(0)
  return data_lib.SubjectImages(
      paths=[pathlib.Path(f"c{i}.png") for i in range(len(SHAPES))],
      captions=[f"class {i}" for i in range(len(SHAPES))],
      images=[rng.integers(0, 256, (*shape, 3), np.uint8) for shape, _ in SHAPES], resolution=32,
      original_sizes=[shape for shape, _ in SHAPES], buckets=[b for _, b in SHAPES] if bucketed else None,
      concepts=[0, 0, 0, 1, 1, 1, 1])


def iterators(bucketed: bool) -> list[concepts_lib.PairedClassIterator]:
  images = class_images(bucketed)
  return [concepts_lib.PairedClassIterator(images, [np.array(g) for g in GROUPS], ["a", "b", "a2"], 2, seed=7,
                                           center_crop=False, random_flip=True, process_index=p, process_count=2,
                                           with_pixels=False) for p in range(2)]


def rows(batch: dict) -> str:
  """index, flip, crop top-left, slot, concept of each example."""
  return " ".join(f"{i}{'f' if f else ''}@{t},{l}s{s}c{c}" for i, f, (t, l), s, c in zip(
      batch["index_B"], batch["flip_B"], batch["crop_top_left_B2"], batch["slot_B"], batch["concept_B"]))


def draw_unbucketed() -> tuple[list[str], list[dict]]:
  processes = iterators(bucketed=False)
  steps = [" | ".join(rows(it.next_for(concepts)) for it in processes) for concepts in SQUARE_STEPS]
  return steps, [it.get_state() for it in processes]


def draw_bucketed() -> tuple[list[str], list[dict]]:
  processes = iterators(bucketed=True)
  steps = [" | ".join(rows(it.next_for(concepts, bucket)) for it in processes)
           for bucket, concepts in BUCKET_STEPS]
  return steps, [it.get_state() for it in processes]


def as_state(positions: dict) -> dict:
  return {k: {"epoch": e, "position": p} for k, (e, p) in positions.items()}


def test_square_pairing_is_golden():
  steps, states = draw_unbucketed()
  assert steps == SQUARE_GOLDEN
  assert states == [{"seed": 7, "concepts": as_state(SQUARE_STATE)}] * 2


def test_bucketed_pairing_is_golden():
  steps, states = draw_bucketed()
  assert steps == BUCKET_GOLDEN
  unmoved = as_state({"a": (0, 0), "b": (0, 0), "a2": (0, 0)})  # the square sequences are not drawn from
  assert states == [{"seed": 7, "concepts": unmoved, "buckets": as_state(BUCKET_STATE)}] * 2
  with pytest.raises(ValueError, match=r"concept 'a': no class image in bucket 48x32 \(HxW\)"):
    iterators(bucketed=True)[0].next_for([1, 1, 0, 1], (48, 32))


def test_pairing_resumes_from_a_saved_state():
  for bucketed, draw in ((False, lambda it, k: it.next_for(SQUARE_STEPS[k])),
                         (True, lambda it, k: it.next_for(*BUCKET_STEPS[k][::-1]))):
    first, fresh = iterators(bucketed)[1], iterators(bucketed)[1]
    for k in range(2):
      draw(first, k)
    fresh.set_state(json.loads(json.dumps(first.get_state())))
    assert [rows(draw(fresh, k)) for k in range(2, 5)] == [rows(draw(first, k)) for k in range(2, 5)]
