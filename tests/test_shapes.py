"""Fixed shapes shared by batches, the reference pass, sampling and judges: ladders, fitting, sorted chunks."""

import numpy as np
import pytest

from jaxalign import shapes


def test_bucket_ladder_is_capped_at_max_length():
  assert shapes.bucket_ladder((128, 256, 512, 1024), 512) == (128, 256, 512)
  assert shapes.bucket_ladder((128, 256, 512, 1024), 300) == (128, 256, 300)


def test_power_ladder():
  assert shapes.power_ladder(1024) == (64, 128, 256, 512, 1024)
  assert shapes.power_ladder(100) == (64, 100)
  assert shapes.power_ladder(512) == shapes.power_ladder(None) == (64, 128, 256, 512)
  assert shapes.power_ladder(300) == (64, 128, 256, 300)
  assert shapes.power_ladder(24) == (24,)


def test_fit():
  assert shapes.fit(129, (128, 256)) == 256
  assert shapes.fit(37, (8, 16, 64)) == 64
  with pytest.raises(ValueError, match="does not fit"):
    shapes.fit(300, (128, 256))
  # Beyond the last bucket: the next multiple of it (rows nobody limited).
  assert [shapes.fit(n, (128, 64), beyond=True) for n in (1, 64, 65, 128, 129, 300)] == [64, 64, 128, 128, 256, 384]


def test_target_width_is_one_of_four_per_length():
  assert [shapes.target_width(n, 256) for n in (0, 32, 33, 64, 65, 128, 129, 256)] == [32, 32, 64, 64, 128, 128,
                                                                                        256, 256]


def test_sorted_chunks_fill_and_scatter_put_results_back_in_order():
  lengths = np.array([5, 1, 9, 3, 9, 2, 7])
  chunks = shapes.sorted_chunks(lengths, 3, longest_first=True)
  assert [c.tolist() for c in chunks] == [[2, 4, 6], [0, 3, 5], [1]]
  assert [c.tolist() for c in shapes.sorted_chunks(lengths, 4)] == [[1, 5, 3, 0], [6, 2, 4]]
  full = [shapes.fill(c, 3) for c in chunks]
  assert full[-1].tolist() == [1, 1, 1]
  outputs = [lengths[f] * 10 for f in full]  # a per-row "result" of each full batch
  np.testing.assert_array_equal(shapes.scatter(chunks, outputs, len(lengths)), lengths * 10)
