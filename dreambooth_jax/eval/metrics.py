"""DreamBooth's metrics (Ruiz et al. 2023, section 4.1) as pure numpy functions of embeddings.

  DINO    mean pairwise cosine similarity between DINO ViT-S/16 CLS embeddings of generated and real images.
  CLIP-I  the same with CLIP image embeddings.
  CLIP-T  mean cosine similarity between a prompt's CLIP text embedding and the CLIP embeddings of its images.
  PRES    prior preservation: DINO between the real subject images and images generated for the bare class
          prompt ("a dog"); lower is better (the class prior has not collapsed onto the subject).
  DIV     diversity: mean LPIPS distance over pairs of images of the same prompt (eval/lpips.py computes LPIPS);
          higher is more diverse (the model has not collapsed onto the training photos' poses and backgrounds).
"""

import numpy as np


def normalize(x_ND: np.ndarray, where: str) -> np.ndarray:
  x_ND = np.asarray(x_ND, np.float64)
  if x_ND.ndim != 2 or x_ND.shape[0] == 0:
    raise ValueError(f"{where}: expected a non-empty (N, D) array of embeddings, got shape {x_ND.shape}")
  norms_N1 = np.linalg.norm(x_ND, axis=1, keepdims=True)
  if not np.all(np.isfinite(x_ND)) or np.any(norms_N1 == 0):
    raise ValueError(f"{where}: embeddings contain zero vectors or non-finite values")
  return x_ND / norms_N1


def cosine_matrix(a_ND: np.ndarray, b_MD: np.ndarray, where: str = "embeddings") -> np.ndarray:
  a_ND, b_MD = normalize(a_ND, f"{where} (first)"), normalize(b_MD, f"{where} (second)")
  if a_ND.shape[1] != b_MD.shape[1]:
    raise ValueError(f"{where}: embedding sizes differ ({a_ND.shape[1]} vs {b_MD.shape[1]})")
  return a_ND @ b_MD.T


def mean_pairwise_cosine(generated_ND: np.ndarray, real_MD: np.ndarray, where: str) -> float:
  """Mean over all N x M (generated, real) pairs."""
  return float(cosine_matrix(generated_ND, real_MD, where).mean())


def mean_cosine_distinct_pairs(x_ND: np.ndarray, where: str) -> float:
  """Mean cosine over the N(N-1) ordered pairs of distinct rows (the paper's real-vs-real reference row)."""
  sim = cosine_matrix(x_ND, x_ND, where)
  n = sim.shape[0]
  if n < 2:
    raise ValueError(f"{where}: distinct pairs need at least 2 embeddings, got {n}")
  return float((sim.sum() - np.trace(sim)) / (n * (n - 1)))


def dino(generated_ND, real_MD) -> float:
  return mean_pairwise_cosine(generated_ND, real_MD, "DINO")


def clip_i(generated_ND, real_MD) -> float:
  return mean_pairwise_cosine(generated_ND, real_MD, "CLIP-I")


def pres(real_MD, class_generated_ND) -> float:
  """Prior preservation: DINO between the real subject images and bare-class-prompt generations (lower = better)."""
  return mean_pairwise_cosine(class_generated_ND, real_MD, "PRES")


def clip_t(text_PD, image_ND, prompt_of_image_N) -> tuple[float, np.ndarray]:
  """(mean over images of cos(image, its prompt's text), per-prompt means (P,)).

  Every image weighs the same in the overall mean; prompt_of_image_N[i] indexes text_PD.
  """
  prompt_of_image_N = np.asarray(prompt_of_image_N)
  text_PD, image_ND = normalize(text_PD, "CLIP-T text"), normalize(image_ND, "CLIP-T images")
  if prompt_of_image_N.shape != (image_ND.shape[0],):
    raise ValueError(f"CLIP-T: {image_ND.shape[0]} images but {prompt_of_image_N.shape} prompt indices")
  if prompt_of_image_N.min() < 0 or prompt_of_image_N.max() >= text_PD.shape[0]:
    raise ValueError(f"CLIP-T: prompt indices must lie in [0, {text_PD.shape[0]})")
  if text_PD.shape[1] != image_ND.shape[1]:
    raise ValueError(f"CLIP-T: embedding sizes differ ({text_PD.shape[1]} vs {image_ND.shape[1]})")
  cos_N = np.sum(text_PD[prompt_of_image_N] * image_ND, axis=1)
  counts_P = np.bincount(prompt_of_image_N, minlength=text_PD.shape[0])
  sums_P = np.bincount(prompt_of_image_N, weights=cos_N, minlength=text_PD.shape[0])
  per_prompt_P = np.where(counts_P > 0, sums_P / np.maximum(counts_P, 1), np.nan)
  return float(cos_N.mean()), per_prompt_P


def div(per_prompt_means, per_prompt_pairs) -> float:
  """Mean LPIPS over all same-prompt pairs, from each prompt's mean and pair count (every pair weighs the same)."""
  means, pairs = np.asarray(per_prompt_means, np.float64), np.asarray(per_prompt_pairs, np.float64)
  if means.shape != pairs.shape or means.ndim != 1 or means.size == 0:
    raise ValueError(f"DIV: expected matching non-empty per-prompt means and pair counts, got {means.shape} and "
                     f"{pairs.shape}")
  if np.any(pairs < 1) or not np.all(np.isfinite(means)):
    raise ValueError("DIV: every prompt needs at least one pair and a finite mean distance")
  return float(np.sum(means * pairs) / np.sum(pairs))
