"""Numba kernels: arrays in, arrays out.

Everything that loops over rows or groups lives here: :mod:`._rows` (the pass over the
rows, key coding, sampling levels, predictions), :mod:`._groups` (the objective's passes
over the groups, conditional modes) and :mod:`._moments` (changes of row transform, the moment
start's sums). The per-group statistics
(see DESIGN.md section 2) are stored contiguously:

    A (G, q, q)  = Z_i' Z_i          B (G, q, p) = Z_i' X_i
    c (G, q)     = Z_i' y_i          n (G,)      = n_i

Each objective evaluation is one pass over the groups (two for more than five fixed
effects), never over rows.

Why the odd structure:

* The per-group work is written once as ``_*_range`` helpers taking ``q`` as an
  argument and inlined (``inline="always"``) into drivers that branch on
  ``q in (1, 2, 3)`` with a literal.  After inlining LLVM sees a constant trip
  count and unrolls the q-loops; a loop over a runtime ``q`` costs ~200 ns per
  group at q=2 (measured on the prototype), the specialised one a fraction.
* Drivers split the groups into ``nchunks`` contiguous ranges and ``prange``
  over the ranges.  Each range accumulates into arrays it allocated itself (no
  false sharing) and writes once at the end.  The thread count is passed in
  because calling ``numba.get_num_threads()`` inside a cached parallel
  function defeats the on-disk cache.
* No heap allocation per group, no LAPACK: q is tiny, so the q x q Cholesky
  and triangular solves are hand-rolled.
"""

from ._common import LEVEL_MAX, LEVEL_MIN
from ._groups import conditional_modes, objective_fused, objective_pass1, objective_pass2
from ._moments import moment_sums, transform_groups
from ._crossed import crossed_backward, crossed_forward, crossed_update, rest_fill, rest_pieces
from ._crossed1 import crossed_backward1, pair_sums
from ._nested import bucket_order, nested_evaluate, scatter_blocks
from ._pass import accumulate_records, packed_layout, record_layout, record_maps, split_records, sum_records
from ._nested2 import NESTED2_SIZES, nested2_evaluate
from ._rows import (
    accumulate_level_xx,
    code_first_seen,
    complete_rows,
    dense_codes,
    hash_find,
    hash_levels,
    linear_predictor,
    mark_keys,
    merge_pairs,
    number_keys,
    pack_string_views,
    pack_strings,
    order_within_runs,
    pair_order,
    pair_products,
    rehash_first_seen,
)

__all__ = [
    "LEVEL_MIN",
    "LEVEL_MAX",
    "mark_keys",
    "number_keys",
    "dense_codes",
    "hash_find",
    "code_first_seen",
    "pack_strings",
    "pack_string_views",
    "rehash_first_seen",
    "hash_levels",
    "linear_predictor",
    "objective_fused",
    "bucket_order",
    "scatter_blocks",
    "moment_sums",
    "objective_pass1",
    "objective_pass2",
    "conditional_modes",
    "transform_groups",
    "complete_rows",
    "accumulate_records",
    "record_layout",
    "record_maps",
    "packed_layout",
    "split_records",
    "sum_records",
    "accumulate_level_xx",
    "order_within_runs",
    "pair_order",
    "pair_products",
    "merge_pairs",
    "nested_evaluate",
    "nested2_evaluate",
    "NESTED2_SIZES",
    "crossed_forward",
    "crossed_update",
    "crossed_backward",
    "crossed_backward1",
    "rest_fill",
    "rest_pieces",
    "pair_sums",
]
