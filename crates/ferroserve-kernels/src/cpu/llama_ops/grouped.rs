//! [`AttentionArith::Fast`] attention: one task takes a sequence's query tile, a KV head and up
//! to [`GROUP_HEADS`] of the query heads that share it (grouped-query attention: SmolLM2 has
//! three query heads per KV head, Llama 3.2 1B four), and inside the tile up to `R` query rows
//! at a time, so that each key and value row is read and widened from f16 once for `R × G`
//! (row, head) pairs — a prompt's rows share their keys the way a GEMM's rows share a panel.
//!
//! The arithmetic of one (row, head) depends on nothing but its query, its position and the
//! cache (so it is batch-invariant, and the same at every ISA level and every `R`):
//! - score `j` = `(a₀ + a₁) · 1/√d`, where `a₀` is an f32 FMA chain over the even elements
//!   `q[0]·k[0], q[2]·k[2], …` in order and `a₁` the same over the odd ones (two chains so that
//!   one decoding row has enough independent FMAs to hide their latency);
//! - the softmax: the maximum, `fast_exp(s − max)` for every key, their sum in sixteen
//!   position-indexed lanes then a halving tree;
//! - the value sum: an f32 FMA chain over the keys in position order, per output element;
//!   one multiplication by the reciprocal of the sum.
//!
//! The query is not rounded to f16 (llama.cpp's order, kept by [`AttentionArith::LlamaCpp`]).
//! Per (row, key) a tile costs `G·d` FMAs for the scores and as many for the values, plus one
//! widened key and value element per `R·G` of them; the previous fast path summed each score
//! in llama.cpp's tree (a product and an add per element) and widened per row: a 2,048-token
//! prompt spent 65 % of its prefill there (bench/NOTES.md).

use super::*;

/// Query heads one task scores together.
pub(super) const GROUP_HEADS: usize = 4;

/// The widest head ([`SUPPORTED_HEAD_DIMS`]): the packed queries' stack array.
const MAX_HEAD_DIM: usize = 256;

/// One task: a sequence's query tile against one KV head, for `G` query heads from `first_head`.
struct GroupTask<'a> {
    q: &'a [f32],
    width: usize,
    d: usize,
    layout: &'a PagedKvLayout,
    k_cache: &'a [u16],
    v_cache: &'a [u16],
    seq: &'a PagedSeq<'a>,
    kv_head: usize,
    first_head: usize,
    tile: Range<usize>,
    out: *mut f32,
}

/// [`paged_attention`] for [`AttentionArith::Fast`] (the caller checked the arguments).
#[allow(clippy::too_many_arguments)]
pub(super) fn paged_attention_grouped(
    isa: Isa,
    q: &[f32],
    seqs: &[PagedSeq<'_>],
    heads: usize,
    layout: &PagedKvLayout,
    k_cache: &[u16],
    v_cache: &[u16],
    out: &mut [f32],
) {
    let (d, kv_heads, bt) = (layout.head_dim, layout.kv_heads, layout.block_tokens);
    assert!(d.is_multiple_of(LANES) && d <= MAX_HEAD_DIM && bt.is_multiple_of(LANES), "head_dim {d}, block_tokens {bt}");
    let width = heads * d;
    let group = heads / kv_heads;
    // Tasks: (sequence, KV head, first query head, heads in the task, query tile); a group of
    // more than GROUP_HEADS query heads is split into near-equal parts.
    let parts = group.div_ceil(GROUP_HEADS);
    let mut tasks = Vec::with_capacity(seqs.len() * kv_heads * parts);
    for (si, s) in seqs.iter().enumerate() {
        for g in 0..kv_heads {
            for part in 0..parts {
                let (h0, h1) = (g * group + part * group / parts, g * group + (part + 1) * group / parts);
                for t in (0..s.rows.len()).step_by(QUERY_TILE) {
                    tasks.push((si, g, h0, h1 - h0, t));
                }
            }
        }
    }
    let out_ptr = OutPtr(out.as_mut_ptr());
    let lv = level(isa);
    let run = |&(si, g, h0, n, t): &(usize, usize, usize, usize, usize)| {
        let s = &seqs[si];
        let tile = t..(t + QUERY_TILE).min(s.rows.len());
        SCORES.with(|cell| {
            let mut scores = cell.borrow_mut();
            // attend_rows' layout: per sixteen keys, a vector per (row, head) of a pass.
            let need = (s.start_pos + tile.end).div_ceil(LANES) * 4 * GROUP_HEADS * LANES;
            if scores.len() < need {
                scores.resize(need, 0.0);
            }
            let task = GroupTask {
                q,
                width,
                d,
                layout,
                k_cache,
                v_cache,
                seq: s,
                kv_head: g,
                first_head: h0,
                tile,
                out: out_ptr.get(),
            };
            match n {
                1 => attend_at_level::<1>(lv, &task, &mut scores),
                2 => attend_at_level::<2>(lv, &task, &mut scores),
                3 => attend_at_level::<3>(lv, &task, &mut scores),
                4 => attend_at_level::<4>(lv, &task, &mut scores),
                _ => unreachable!("at most GROUP_HEADS heads a task"),
            }
        });
    };
    let work: usize = seqs.iter().map(|s| s.rows.len() * (s.start_pos + s.rows.len()) * width * 2).sum();
    if tasks.len() > 1 && work >= ATTENTION_PAR_MIN_WORK {
        tasks.par_iter().for_each(run);
    } else {
        tasks.iter().for_each(run);
    }
}

/// [`attend_group`] compiled for level `lv` (from [`level`], which checked the CPU), with the
/// rows a pass takes: as many as keep the `R · G · 2` score chains in the 32 AVX-512
/// registers; one on AVX2 (16 registers of half the width) and on the portable level. Plain
/// `#[target_feature]` functions rather than `dispatch_level!`'s closures: with many
/// instantiations the compiler stopped inlining the closures, and the body then ran without
/// AVX (a libm call per `mul_add`).
fn attend_at_level<const G: usize>(lv: u8, task: &GroupTask<'_>, scores: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn avx512<const G: usize, const R: usize>(task: &GroupTask<'_>, scores: &mut [f32]) {
            attend_group::<G, R, AVX512>(task, scores)
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn avx2<const G: usize>(task: &GroupTask<'_>, scores: &mut [f32]) {
            attend_group::<G, 1, AVX2>(task, scores)
        }
        match lv {
            // SAFETY: `level` asserted that the CPU has the features.
            AVX512 if G <= 3 => return unsafe { avx512::<G, 4>(task, scores) },
            // SAFETY: as above.
            AVX512 => return unsafe { avx512::<G, 3>(task, scores) },
            // SAFETY: as above.
            AVX2 => return unsafe { avx2::<G>(task, scores) },
            _ => {}
        }
    }
    attend_group::<G, 1, PORTABLE>(task, scores)
}

/// Sixteen halves at `at` in `cache`, widened (the caller keeps `at + 16` inside the cache).
#[inline(always)]
fn widen_at<const L: u8>(cache: &[u16], at: usize) -> [f32; LANES] {
    debug_assert!(at + LANES <= cache.len());
    // SAFETY: the callers index whole 16-element rows of blocks inside the cache (checked by
    // `paged_attention` against the block table) and `[u16; 16]` has alignment 2.
    widen16::<L>(unsafe { &*cache.as_ptr().add(at).cast::<[u16; LANES]>() })
}

/// The task's query rows, `R` at a time, each against its KV head for its `G` query heads.
#[inline(always)]
fn attend_group<const G: usize, const R: usize, const L: u8>(task: &GroupTask<'_>, scores: &mut [f32]) {
    let mut i = task.tile.start;
    while i < task.tile.end {
        if task.tile.end - i >= R {
            attend_rows::<G, R, L>(task, i, scores);
            i += R;
        } else {
            attend_rows::<G, 1, L>(task, i, scores);
            i += 1;
        }
    }
}

/// Rows `i .. i + R` of the task's sequence (consecutive positions: row `r` sees `n0 + r` keys).
///
/// `scores` is laid out by sixteen-key chunk, then row, then head, then lane: the `R·G` score
/// vectors of a chunk are contiguous, so the score pass stores whole vectors, the softmax
/// reads a (row, head)'s lanes as vectors, and the value pass finds every (row, head)'s
/// weight of key `j` at a constant offset from one address.
#[inline(always)]
fn attend_rows<const G: usize, const R: usize, const L: u8>(task: &GroupTask<'_>, i: usize, scores: &mut [f32]) {
    let layout = task.layout;
    let (d, bt, be, kvh) = (task.d, layout.block_tokens, layout.block_elems(), task.kv_head);
    let scale = 1.0 / (d as f32).sqrt();
    let n0 = task.seq.start_pos + i + 1;
    let n_max = n0 + R - 1;
    let n_blocks = n_max.div_ceil(bt);
    let table = &task.seq.block_table[..n_blocks];
    let kv_at = |block: u32| block as usize * be + kvh * d * bt;
    // Score vector (chunk, r, h) starts at `vec_at(chunk, r, h)`.
    let vec_at = |chunk: usize, r: usize, h: usize| ((chunk * R + r) * G + h) * LANES;
    let n_chunks = n_max.div_ceil(LANES);
    assert!(scores.len() >= n_chunks * R * G * LANES, "score buffer too small");

    // The queries packed element by element: qp[c] holds element c of every (row, head).
    let mut qp = [[[0f32; G]; R]; MAX_HEAD_DIM];
    for r in 0..R {
        for h in 0..G {
            let at = (task.seq.rows.start + i + r) * task.width + (task.first_head + h) * d;
            for (c, &v) in task.q[at..at + d].iter().enumerate() {
                qp[c][r][h] = v;
            }
        }
    }

    // Scores, sixteen keys (lanes) at a time: each widened key row feeds every (row, head).
    // The tile's rows see up to n_max keys; a row's lanes past its own keys (and the last
    // chunk's lanes past n_max) are computed but never read.
    if let Some(&first) = table.first() {
        prefetch_f16(&task.k_cache[kv_at(first)..][..d * bt]);
    }
    for (b, &block) in table.iter().enumerate() {
        let kb = kv_at(block);
        if let Some(&next) = table.get(b + 1) {
            prefetch_f16(&task.k_cache[kv_at(next)..][..d * bt]);
        }
        prefetch_f16(&task.v_cache[kb..][..bt * d]);
        let valid = (n_max - b * bt).min(bt);
        for l in (0..valid).step_by(LANES) {
            let mut even = [[[0f32; LANES]; G]; R];
            let mut odd = [[[0f32; LANES]; G]; R];
            for c in (0..d).step_by(2) {
                let (k0, k1) = (widen_at::<L>(task.k_cache, kb + c * bt + l), widen_at::<L>(task.k_cache, kb + (c + 1) * bt + l));
                let (q0, q1) = (&qp[c], &qp[c + 1]);
                for r in 0..R {
                    for h in 0..G {
                        for lane in 0..LANES {
                            even[r][h][lane] = q0[r][h].mul_add(k0[lane], even[r][h][lane]);
                            odd[r][h][lane] = q1[r][h].mul_add(k1[lane], odd[r][h][lane]);
                        }
                    }
                }
            }
            let chunk = (b * bt + l) / LANES;
            for r in 0..R {
                for h in 0..G {
                    let s = &mut scores[vec_at(chunk, r, h)..][..LANES];
                    for lane in 0..LANES {
                        s[lane] = (even[r][h][lane] + odd[r][h][lane]) * scale;
                    }
                }
            }
        }
    }

    // Softmax weights per (row, head), in place: the maximum in sixteen lanes then across
    // them (max is exact and, NaN aside, order free; `f32::max` ignores NaN), `fast_exp` of
    // every score less it, the weights' sum in sixteen position-indexed lanes then a halving
    // tree. Lanes past the row's keys are set to 0 (they are never added).
    let mut inv = [[0f32; G]; R];
    for r in 0..R {
        let n = n0 + r;
        let (full, rest) = (n / LANES, n % LANES);
        for h in 0..G {
            let mut lane_max = [f32::NEG_INFINITY; LANES];
            for chunk in 0..full {
                let v = &scores[vec_at(chunk, r, h)..][..LANES];
                for l in 0..LANES {
                    lane_max[l] = lane_max[l].max(v[l]);
                }
            }
            let mut m = lane_max.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
            if rest > 0 {
                m = scores[vec_at(full, r, h)..][..rest].iter().fold(m, |a, &v| a.max(v));
            }
            let mut lanes = [0f32; LANES];
            for chunk in 0..full {
                let v = &mut scores[vec_at(chunk, r, h)..][..LANES];
                for l in 0..LANES {
                    v[l] = crate::cpu::math::fast_exp(v[l] - m);
                    lanes[l] += v[l];
                }
            }
            if rest > 0 {
                let v = &mut scores[vec_at(full, r, h)..][..LANES];
                for l in 0..LANES {
                    v[l] = if l < rest { crate::cpu::math::fast_exp(v[l] - m) } else { 0.0 };
                    lanes[l] += v[l];
                }
            }
            let mut w = LANES;
            while w > 1 {
                w /= 2;
                for l in 0..w {
                    lanes[l] += lanes[l + w];
                }
            }
            inv[r][h] = if lanes[0] == 0.0 { 0.0 } else { 1.0 / lanes[0] };
        }
    }

    // Values, sixteen output elements at a time: per key one widened value row for every
    // (row, head), each element's sum in position order. The last R - 1 keys only the later
    // rows see.
    for c16 in (0..d).step_by(LANES) {
        let mut acc = [[[0f32; LANES]; G]; R];
        for (b, &block) in table.iter().enumerate() {
            let vb = kv_at(block) + c16;
            let first = b * bt;
            let end = (n_max - first).min(bt);
            for l in (0..end).step_by(LANES) {
                let at = vec_at((first + l) / LANES, 0, 0);
                // The chunk's weights: (r, h)'s for key first + l + lane at (r·G + h)·16 + lane.
                let w = &scores[at..at + R * G * LANES];
                let lanes = (end - l).min(LANES);
                let all = n0.saturating_sub(first + l).min(lanes);
                for lane in 0..all {
                    let v = widen_at::<L>(task.v_cache, vb + (l + lane) * d);
                    for r in 0..R {
                        for h in 0..G {
                            let p = w[(r * G + h) * LANES + lane];
                            for x in 0..LANES {
                                acc[r][h][x] = v[x].mul_add(p, acc[r][h][x]);
                            }
                        }
                    }
                }
                for lane in all..lanes {
                    let v = widen_at::<L>(task.v_cache, vb + (l + lane) * d);
                    for r in 0..R {
                        // Only the later rows see the last R - 1 keys.
                        if first + l + lane >= n0 + r {
                            continue;
                        }
                        for h in 0..G {
                            let p = w[(r * G + h) * LANES + lane];
                            for x in 0..LANES {
                                acc[r][h][x] = v[x].mul_add(p, acc[r][h][x]);
                            }
                        }
                    }
                }
            }
        }
        for r in 0..R {
            for h in 0..G {
                let at = (task.seq.rows.start + i + r) * task.width + (task.first_head + h) * d + c16;
                let mut o = [0f32; LANES];
                for lane in 0..LANES {
                    o[lane] = acc[r][h][lane] * inv[r][h];
                }
                // SAFETY: (row, head) belongs to this task alone; `at + 16 <= out.len()`
                // because `out` has the length of `q`, whose row was read at the same place.
                unsafe { std::ptr::copy_nonoverlapping(o.as_ptr(), task.out.add(at), LANES) };
            }
        }
    }
}

/// Asks for the cache lines of `block` (one KV head's keys or values in one cache block).
#[inline(always)]
fn prefetch_f16(block: &[u16]) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..block.len()).step_by(32) {
        // SAFETY: a prefetch only hints the cache; the address is inside `block`.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(block.as_ptr().add(line).cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = block;
}
