"""Grad-CAM heat maps (Selvaraju et al. 2017) for Keras models, saved as PNG overlays."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from PIL import Image

from melanoma_tf import plots
from melanoma_tf.backend import keras, tf
from melanoma_tf.distill.relational import feature_model
from melanoma_tf.distill.relational_losses import relation_ratio
from melanoma_tf.pipeline import load_images


def has_feature_map(model: keras.Model) -> bool:
    """Whether the model has a layer with a spatial (4-D) output of its own (an ensemble's are inside its members)."""
    return any(isinstance(layer.output_shape, tuple) and len(layer.output_shape) == 4 and layer.output_shape[1]
               and layer.output_shape[1] > 1 for layer in model.layers)


def last_feature_layer(model: keras.Model) -> keras.layers.Layer:
    """The last layer with a spatial (4-D) output: where Grad-CAM looks."""
    for layer in reversed(model.layers):
        shape = layer.output_shape
        if isinstance(shape, tuple) and len(shape) == 4 and shape[1] and shape[1] > 1:
            return layer
    raise ValueError(f"{model.name}: no spatial feature map for Grad-CAM")


def gradcam(model: keras.Model, images: np.ndarray, class_index: int = 0) -> np.ndarray:
    """Heat maps in [0, 1], one per image, at the input resolution.

    The map is ReLU(sum_k w_k A_k), w_k the spatial mean of d logit / d A_k.
    """
    layer = last_feature_layer(model)
    probe = keras.Model(model.inputs, [layer.output, model.output])
    x = tf.convert_to_tensor(images, tf.float32)
    with tf.GradientTape() as tape:
        features, logits = probe(x, training=False)
        score = logits[:, class_index]
    grads = tape.gradient(score, features)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))[..., None]
    cam = tf.image.resize(cam, images.shape[1:3], method="bilinear")[..., 0].numpy()
    peak = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
    return np.where(peak > 0, cam / np.maximum(peak, 1e-12), 0.0)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    colours = matplotlib.colormaps["jet"](heat)[..., :3] * 255
    return np.clip((1 - alpha) * image + alpha * colours, 0, 255).astype(np.uint8)


def gradcam_gallery(model: keras.Model, frame: pd.DataFrame, probability: np.ndarray, is_melanoma: np.ndarray,
                    threshold: float, folder: Path, per_kind: int = 4) -> list[dict]:
    """Overlays for the most confident false negatives and false positives at the threshold.

    Args:
      model: a Keras model (binary, or multiclass with melanoma at dx index 4).
      frame: the scored images (``image_id``, ``path``), aligned with probability.
      probability: melanoma probabilities; is_melanoma: the truth.

    Returns:
      ``[{"file", "image_id", "kind", "probability"}]``, files relative to folder's parent.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    p = np.asarray(probability)
    positive = np.asarray(is_melanoma).astype(bool)
    fn = np.flatnonzero(positive & (p < threshold))
    fp = np.flatnonzero(~positive & (p >= threshold))
    chosen = ([("false negative", i) for i in fn[np.argsort(p[fn])][:per_kind]]
              + [("false positive", i) for i in fp[np.argsort(-p[fp])][:per_kind]])
    if not chosen:
        return []
    size = int(model.input_shape[1])
    images = load_images([frame["path"].iloc[i] for _, i in chosen], size)
    mel = 0 if model.output_shape[-1] == 1 else 4
    heat = gradcam(model, images, mel)
    gallery = []
    for (kind, i), image, h in zip(chosen, images, heat):
        image_id = frame["image_id"].iloc[i]
        name = f"{kind.replace(' ', '_')}_{image_id}.png"
        side_by_side = np.concatenate([image.astype(np.uint8), overlay(image, h)], axis=1)
        Image.fromarray(side_by_side).resize((4 * size, 2 * size), Image.NEAREST).save(folder / name)
        gallery.append({"file": f"{folder.name}/{name}", "image_id": image_id, "kind": kind,
                        "probability": float(p[i])})
    return gallery


def relation_analysis(keras_model, images: np.ndarray, labels: np.ndarray, names: list[str], path: Path,
                      seed: int = 0, per_class: int = 12) -> tuple[dict, str]:
    """Feature-space relations of a Keras model on decoded ``images`` (CRCKD's analysis).

    Rd = mean intra-class / mean inter-class cosine similarity of the embeddings
    (the head's input) over all images, and a heat map of the similarity matrix
    of up to ``per_class`` images of each class, grouped by class.
    """
    features = feature_model(keras_model, keras_model.input_shape[1])
    embedding = np.concatenate([features(images[i:i + 64], training=False)[1].numpy()
                                for i in range(0, len(images), 64)])
    stats = relation_ratio(embedding, labels)
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([rng.permutation(np.flatnonzero(labels == k))[:per_class] for k in np.unique(labels)])
    chosen = chosen[np.argsort(labels[chosen], kind="stable")]
    f = embedding[chosen] / np.maximum(np.linalg.norm(embedding[chosen], axis=1, keepdims=True), 1e-12)
    figure = plots.relation_matrix_plot(path, f @ f.T, labels[chosen], names,
                                        f"feature relations (Rd = {stats['rd']:.3f})")
    return stats, figure
