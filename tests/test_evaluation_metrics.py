"""Evaluation metrics and reports on small hand-checked cases."""

import json

import numpy as np
import pytest
from PIL import Image

from clamp_jax.evaluation import metrics, report
from clamp_jax.evaluation.classification import classification_metrics, keep_present_classes
from clamp_jax.evaluation.retrieval import retrieval_metrics

# Five images, three classes. Row by row: hit; miss (2nd best is right); miss (right one is
# last); hit; hit.
SCORES = np.array([[0.9, 0.05, 0.05],
                   [0.1, 0.6, 0.3],
                   [0.2, 0.3, 0.5],
                   [0.3, 0.4, 0.3],
                   [0.8, 0.1, 0.1]])
LABELS = np.array([0, 2, 0, 1, 0])

# Three images and five captions; captions 0 and 1 show image 0, caption 2 image 1, captions 3
# and 4 image 2. Rows are images, columns captions.
SIMILARITY = np.array([[0.9, 0.1, 0.8, 0.3, 0.2],
                       [0.7, 0.6, 0.5, 0.65, 0.1],
                       [0.1, 0.2, 0.3, 0.05, 0.25]])
CAPTION_IMAGE = np.array([0, 0, 1, 2, 2])


def test_top_k_accuracy_known_values():
  assert metrics.top_k_accuracy(SCORES, LABELS, 1) == pytest.approx(3 / 5)
  assert metrics.top_k_accuracy(SCORES, LABELS, 2) == pytest.approx(4 / 5)
  assert metrics.top_k_accuracy(SCORES, LABELS, 3) == 1.0
  assert metrics.top_k_accuracy(SCORES, LABELS, 5) == 1.0  # k is capped at the class count.


def test_mean_per_class_accuracy_known_value():
  # Class 0: 2 of 3 right; class 1: 1 of 1; class 2: 0 of 1.
  assert metrics.mean_per_class_accuracy(SCORES, LABELS) == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_mean_per_class_ignores_absent_classes():
  scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0]])
  labels = np.array([0, 1, 1])  # Class 2 never occurs.
  assert metrics.mean_per_class_accuracy(scores, labels) == pytest.approx((1 + 0.5) / 2)


@pytest.mark.parametrize('scores, positive, expected', [
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),  # 3 of 4 positive-negative pairs ordered.
    ([0.2, 0.5, 0.5, 0.9], [0, 1, 0, 1], 0.875),  # One tied pair counts one half.
    ([0.5, 0.5], [1, 0], 0.5),
    ([0.1, 0.2, 0.3], [0, 1, 1], 1.0),
    ([0.3, 0.2, 0.1], [0, 1, 1], 0.0),
])
def test_roc_auc_known_values(scores, positive, expected):
  assert metrics.roc_auc(np.array(scores), np.array(positive)) == pytest.approx(expected)


def test_roc_auc_one_class_raises():
  with pytest.raises(ValueError, match='both classes'):
    metrics.roc_auc(np.array([0.1, 0.2]), np.array([1, 1]))


def test_image_to_text_ranks_known_values():
  # Image 1's caption scores 0.5 and three captions score higher; image 2's best own is 0.25.
  ranks = metrics.image_to_text_ranks(SIMILARITY, CAPTION_IMAGE, np.arange(3))
  assert ranks.tolist() == [0, 3, 1]
  chunk = metrics.image_to_text_ranks(SIMILARITY[1:], CAPTION_IMAGE, np.array([1, 2]))
  assert chunk.tolist() == [3, 1]


def test_text_to_image_ranks_known_values():
  ranks = metrics.text_to_image_ranks(SIMILARITY.T, CAPTION_IMAGE)
  assert ranks.tolist() == [0, 2, 1, 2, 0]


def test_recall_at_k_known_values():
  recalls = metrics.recall_at_k(np.array([0, 2, 1, 2, 0]), (1, 2, 3))
  assert recalls == {1: pytest.approx(0.4), 2: pytest.approx(0.6), 3: 1.0}


def test_retrieval_metrics_from_embeddings():
  # Identity image embeddings make the similarity matrix equal to the text embeddings' columns.
  results = retrieval_metrics(np.eye(3), SIMILARITY.T.copy(), CAPTION_IMAGE)
  assert results['i2t_r1'] == pytest.approx(1 / 3)
  assert results['i2t_r5'] == 1.0
  assert results['t2i_r1'] == pytest.approx(0.4)
  assert results['t2i_r5'] == 1.0
  expected_mean = (1 / 3 + 1 + 1 + 0.4 + 1 + 1) / 6
  assert results['mean_recall'] == pytest.approx(expected_mean)


def test_classification_metrics_binary_has_roc_auc():
  scores = np.array([[0.5, 0.1], [0.3, 0.35], [0.4, 0.45], [0.2, 0.6]])
  labels = np.array([0, 0, 1, 1])
  results = classification_metrics(scores, labels)
  assert 'top5' not in results  # With two classes every image is a top-5 hit.
  assert results['top1'] == pytest.approx(3 / 4)
  # Margins: -0.4, 0.05 (negative), 0.05, 0.4 (positive): one tie, three ordered pairs.
  assert results['roc_auc'] == pytest.approx(0.875)


def test_keep_present_classes_renumbers():
  scores = np.arange(12.0).reshape(2, 6)
  subset, labels = keep_present_classes(scores, np.array([5, 2]))
  assert subset.tolist() == [[2.0, 5.0], [8.0, 11.0]]
  assert labels.tolist() == [1, 0]


def test_format_table_digits_matches_training_table():
  results = {'digits': {'top1': 0.922, 'top5': 1.0, 'num_images': 359}}
  expected = (f'{"dataset":<12} {"top1":>7} {"top5":>7} {"images":>7}\n'
              f'{"digits":<12} {0.922:>7.4f} {1.0:>7.4f} {359:>7d}')
  assert report.format_table(results, {'digits': 'top1'}) == expected


def test_reports_written_and_well_formed(tmp_path):
  results = {'pets': {'top1': 0.5, 'mean_per_class': 0.25, 'num_images': 8},
             'memes': {'top1': 0.75, 'mean_per_class': 0.5, 'roc_auc': 0.625, 'num_images': 4}}
  primary = {'pets': 'mean_per_class', 'memes': 'roc_auc'}
  paths = report.write_reports(results, primary, str(tmp_path))
  assert [path.rsplit('.', 1)[1] for path in paths] == ['json', 'md', 'png']

  with open(tmp_path / 'eval_results.json') as file:
    assert json.load(file) == results
  lines = (tmp_path / 'eval_results.md').read_text().splitlines()
  assert len(lines) == 2 + len(results) + 1
  assert len({line.count('|') for line in lines}) == 1
  assert lines[2].startswith('| pets | mean_per_class | 0.2500 |')
  assert lines[-1].startswith('| **mean** |  | **0.4375** |')
  with Image.open(tmp_path / 'eval_results.png') as image:
    assert image.format == 'PNG'
    assert image.width > 100
    assert image.height > 20
