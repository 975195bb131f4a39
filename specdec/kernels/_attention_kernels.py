"""The Triton kernels of paged verification attention (launched by verify_attention.py).

Kernel design (``_verify_attention_kernel``):

* grid = (query tiles x KV splits, H_kv, B); axis 0 varies fastest, so the programs
  that stream the same sequence/KV head run side by side and share K/V through L2.
* GQA fold: one program owns one KV head and all ``G = H / H_kv`` query heads on it.
  Tile row ``r`` is query ``q0 + r // G`` of the sequence, head ``kvh * G + r % G``,
  so each K/V tile is loaded once and multiplied against ``BLOCK_M = BLOCK_Q * G``
  rows (the Q tile is [BLOCK_M, D], the score tile [BLOCK_M, BLOCK_N]).
* Ragged queries without a host sync: the host knows an upper bound of the queries
  per sequence (``max_query_len``), the grid has ``cdiv(max_query_len, BLOCK_Q)`` tiles
  per sequence and a tile past its sequence's ``n_b`` queries returns at once.
* KV positions are walked BLOCK_N at a time; every position's slot comes from the
  block table (``block_table[b, pos // page] * page + pos % page``), so any page size
  works and a tile may straddle pages. Offsets into the cache are int64.
* Two loops: positions every row of the tile sees (the prefix; for causal also the new
  tokens up to the tile's first query) run without masks, the rest with the causal or
  tree-bit mask. Online softmax in base 2 with fp32 statistics (FlashAttention-2).
* Split-KV (flash-decoding) when the grid is too small to fill the GPU (decode, small
  batches, trees at B <= 8): each split handles a slice of the KV range and writes an
  fp32 partial output and its log-sum-exp; ``_combine_splits_kernel`` merges them.
  Query tiles are never shrunk to make programs: each query tile of a (sequence, KV
  head) streams that head's whole K/V (see the launch-config policy below).
"""


import triton
import triton.language as tl


@triton.jit
def _load_kv_tile(ptr, row_off, d, pos_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  MASKED: tl.constexpr, UPCAST: tl.constexpr):
    """[BLOCK_N, BLOCK_D] rows of K or V at int64 element offsets ``row_off``."""
    ptrs = ptr + row_off[:, None] + d[None, :]
    if MASKED:
        x = tl.load(ptrs, mask=pos_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    elif HEAD_DIM == BLOCK_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=d[None, :] < HEAD_DIM, other=0.0)
    if UPCAST:  # the interpreter computes bf16 wrongly
        x = x.to(tl.float32)
    return x


@triton.jit
def _popcount64(x):
    """Set bits of each int64 (SWAR; the masks clear the sign bits arithmetic shifts copy)."""
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    return (x * 0x0101010101010101) >> 56  # the byte sums, added into the top byte


@triton.jit
def _attend_range(
    acc, l_i, m_i, q, qi, q_pos, tree_bits, lo, hi, prefix, n_new,
    k_ptr, v_ptr, bt_row_ptr, scale_log2, cap_log2, window,
    stride_kb, stride_ks, stride_vb, stride_vs,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, MASKED: tl.constexpr, HAS_TREE: tl.constexpr,
    SLIDING: tl.constexpr, SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online-softmax accumulation over KV positions [lo, hi) (hi - lo a whole number of
    KV tiles unless MASKED).

    acc [BLOCK_M, BLOCK_D] f32, l_i / m_i [BLOCK_M] f32 (row sum and max, base 2).
    k_ptr / v_ptr already point at the program's KV head. SOFTCAP: ``scale_log2`` is
    scale / cap and scores are cap * tanh(q.k * scale / cap) (``cap_log2`` = cap / ln 2).
    SLIDING (with MASKED): row r also needs q_pos[r] - key position < ``window``.
    """
    offs_n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n  # [BLOCK_N] positions in the sequence
        pos_ok = pos < hi
        # -- paged addressing: slot = block_table[b, pos // page] * page + pos % page --
        if MASKED:
            blk = tl.load(bt_row_ptr + pos // PAGE_SIZE, mask=pos_ok, other=0)
        else:
            blk = tl.load(bt_row_ptr + pos // PAGE_SIZE)
        blk = blk.to(tl.int64)
        in_page = (pos % PAGE_SIZE).to(tl.int64)
        k = _load_kv_tile(k_ptr, blk * stride_kb + in_page * stride_ks, d, pos_ok,
                          HEAD_DIM, BLOCK_D, MASKED, UPCAST)
        # -- compute qk: s = (q . k) * scale / ln 2, so that exp(x) becomes exp2(s) --
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        if SOFTCAP:
            # cap * tanh(x), x = q.k * scale / cap; tanh(x) = 1 - 2 / (e^2x + 1) (+-1 at +-inf)
            s = (1.0 - 2.0 / (tl.math.exp2(s * (2.0 * 1.4426950408889634)) + 1.0)) * cap_log2
        if MASKED:
            j = pos - prefix  # index among the new tokens; < 0 inside the prefix
            if HAS_TREE:
                # bit j of the query's ancestor mask (shift clamped to the 64 bits)
                shift = tl.minimum(tl.maximum(j, 0), 63).to(tl.int64)
                bit = (tree_bits[:, None] >> shift[None, :]) & 1
                visible = (j[None, :] < 0) | ((j[None, :] < n_new) & (bit != 0))
            else:
                visible = j[None, :] <= qi[:, None]  # causal among the new tokens
            if SLIDING:
                # distance from the query to the key in positions; a tree ancestor j sits
                # as many positions before the query as the query has ancestors after j
                dist = q_pos[:, None] - pos[None, :]
                if HAS_TREE:
                    jj = tl.minimum(tl.maximum(j, 0), 63).to(tl.int64)
                    after_j = tree_bits[:, None] & ~((2 << jj[None, :]) - 1)  # bits above j
                    dist = tl.where(j[None, :] < 0, dist, _popcount64(after_j))
                visible = visible & (dist < window)
            visible = visible & pos_ok[None, :]
            s = tl.where(visible, s, float("-inf"))
        # -- online softmax: m_new = max(m, rowmax s); rescale acc and l by 2^(m - m_new) --
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen nothing keeps m = -inf; subtract 0 instead (no inf - inf)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N], masked -> 0
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv_tile(v_ptr, blk * stride_vb + in_page * stride_vs, d, pos_ok,
                          HEAD_DIM, BLOCK_D, MASKED, UPCAST)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# Ints that vary from call to call (the block table's width, the KV split count and the
# partial buffers' split strides) are not specialised: one compiled variant serves every
# batch. Split strides are passed in units of 16 elements and multiplied back in the
# kernel, so the compiler still knows they keep 16-element alignment.
@triton.jit(do_not_specialize=["max_positions", "stride_bt", "num_splits", "stride_os16",
                               "stride_ls16", "window"])
def _verify_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, seq_lens_ptr, q_start_ptr,
    tree_mask_ptr, out_ptr, lse_ptr,
    scale_log2, cap_log2, window, max_positions, num_splits,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_os16, stride_ot, stride_oh,
    stride_ls16, stride_lt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HAS_TREE: tl.constexpr,
    SLIDING: tl.constexpr, SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0) // num_splits
    split = tl.program_id(0) % num_splits
    kvh = tl.program_id(1)
    b = tl.program_id(2)

    q_begin = tl.load(q_start_ptr + b)
    n_new = tl.load(q_start_ptr + b + 1) - q_begin  # n_b queries of this sequence
    q0 = tile * BLOCK_Q
    if q0 >= n_new:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - n_new  # committed positions, seen by every query

    # -- rows of the tile: (query, head) pairs of the GQA group --
    rows = tl.arange(0, BLOCK_M)
    qi = q0 + rows // GROUP  # [BLOCK_M] query index within the sequence
    head = kvh * GROUP + rows % GROUP  # [BLOCK_M] query head
    row_ok = (rows < BLOCK_Q * GROUP) & (qi < n_new)
    tok = (q_begin + qi).to(tl.int64)  # [BLOCK_M] row of q / out
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_off = tok[:, None] * stride_qt + head[:, None].to(tl.int64) * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if HAS_TREE:
        tree_bits = tl.load(tree_mask_ptr + tok, mask=row_ok, other=0)  # [BLOCK_M] int64
    else:
        tree_bits = tok  # unused

    # -- KV range: [0, dense_end) is seen by every row, [dense_end, kv_end) is masked --
    if HAS_TREE:
        kv_end = seq_len
        dense_end = prefix
    else:  # causal: query qi sees positions <= prefix + qi
        kv_end = prefix + tl.minimum(q0 + BLOCK_Q, n_new)
        dense_end = prefix + q0 + 1
    kv_end = tl.minimum(kv_end, max_positions)  # never read past the block table row
    # -- sliding window: a query at position p sees keys > p - window. The tile's rows sit
    # at positions [first_q, last_q] (a tree node at prefix + its depth, depth < n_new):
    # no row sees a key <= first_q - window, every row's window holds the keys > last_q - window
    if SLIDING:
        if HAS_TREE:
            q_pos = prefix + _popcount64(tree_bits) - 1  # [BLOCK_M] ancestors = depth + 1
            first_q = prefix
            last_q = prefix + n_new - 1
        else:
            q_pos = prefix + qi
            first_q = prefix + q0
            last_q = prefix + tl.minimum(q0 + BLOCK_Q, n_new) - 1
        win_lo = (tl.maximum(first_q - window + 1, 0) // BLOCK_N) * BLOCK_N
        win_all = tl.maximum(last_q - window + 1, 0)
    else:
        q_pos = qi  # unused
        win_lo = 0
        win_all = 0
    lo = win_lo
    hi = kv_end
    if SPLIT:  # this split's slice, a whole number of KV tiles (possibly empty)
        chunk = tl.cdiv(tl.cdiv(kv_end - win_lo, num_splits), BLOCK_N) * BLOCK_N
        lo = tl.minimum(win_lo + split * chunk, kv_end)
        hi = tl.minimum(lo + chunk, kv_end)
    # [lo, edge_stop): the window's edge, masked; [edge_stop, dense_stop): every row sees
    # every key, unmasked; [dense_stop, hi): the causal / tree mask
    edge_stop = lo
    if SLIDING:
        edge_stop = tl.minimum(tl.maximum(lo, tl.cdiv(win_all, BLOCK_N) * BLOCK_N), hi)
    dense_stop = tl.maximum(edge_stop, (tl.minimum(dense_end, hi) // BLOCK_N) * BLOCK_N)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    k_ptr = k_cache_ptr + kvh.to(tl.int64) * stride_kh
    v_ptr = v_cache_ptr + kvh.to(tl.int64) * stride_vh
    bt_row_ptr = block_table_ptr + b.to(tl.int64) * stride_bt
    if SLIDING:
        acc, l_i, m_i = _attend_range(
            acc, l_i, m_i, q, qi, q_pos, tree_bits, lo, edge_stop, prefix, n_new,
            k_ptr, v_ptr, bt_row_ptr, scale_log2, cap_log2, window,
            stride_kb, stride_ks, stride_vb, stride_vs, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE,
            True, HAS_TREE, True, SOFTCAP, UPCAST, DOT_PRECISION)
    acc, l_i, m_i = _attend_range(
        acc, l_i, m_i, q, qi, q_pos, tree_bits, edge_stop, dense_stop, prefix, n_new,
        k_ptr, v_ptr, bt_row_ptr, scale_log2, cap_log2, window,
        stride_kb, stride_ks, stride_vb, stride_vs, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE,
        False, HAS_TREE, False, SOFTCAP, UPCAST, DOT_PRECISION)
    acc, l_i, m_i = _attend_range(
        acc, l_i, m_i, q, qi, q_pos, tree_bits, dense_stop, hi, prefix, n_new,
        k_ptr, v_ptr, bt_row_ptr, scale_log2, cap_log2, window,
        stride_kb, stride_ks, stride_vb, stride_vs, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE,
        True, HAS_TREE, False, SOFTCAP, UPCAST, DOT_PRECISION)

    # -- epilogue: out = acc / l; a row that saw nothing (l == 0) gets zeros --
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_off = tok[:, None] * stride_ot + head[:, None].to(tl.int64) * stride_oh + d[None, :]
    if SPLIT:
        o_off += split.to(tl.int64) * stride_os16 * 16
    tl.store(out_ptr + o_off, out, mask=row_ok[:, None] & d_ok[None, :])
    if SPLIT:  # log2-sum-exp2 of the split's scores, -inf when it saw nothing
        lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        l_off = split.to(tl.int64) * stride_ls16 * 16 + tok * stride_lt + head
        tl.store(lse_ptr + l_off, lse, mask=row_ok)


@triton.jit(do_not_specialize=["num_splits", "stride_ps16", "stride_ls16"])
def _combine_splits_kernel(
    part_ptr, lse_ptr, out_ptr, num_splits,
    stride_ps16, stride_pt, stride_ph, stride_ls16, stride_lt, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """out[t, h] = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, BLOCK_S).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < num_splits
    lse = tl.load(lse_ptr + s * stride_ls16 * 16 + t * stride_lt + h, mask=s_ok,
                  other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.math.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # [BLOCK_S]
    den = tl.sum(w, 0)
    part = tl.load(part_ptr + s[:, None] * stride_ps16 * 16 + t * stride_pt + h * stride_ph
                   + d[None, :], mask=s_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(w[:, None] * part, 0) / tl.where(den > 0.0, den, 1.0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + d, out, mask=d < HEAD_DIM)

