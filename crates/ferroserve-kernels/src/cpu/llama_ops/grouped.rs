//! [`AttentionArith::Fast`] attention by KV head: one task takes a KV head and up to
//! [`GROUP_HEADS`] of the query heads that share it (grouped-query attention: SmolLM2 has three
//! query heads per KV head, Llama 3.2 1B four), so each key and value is read and widened from
//! f16 once for all of them instead of once per query head.
//!
//! The arithmetic is bit for bit that of the per-head path (`score_keys` +
//! `softmax_values_fast`, which stay for head widths that are not a multiple of 64): the query
//! rounded to f16, each score the same tree of f32 sums over exact f16·f16 products, the same
//! softmax and the same f32 value sums in position order. What changes is only which work
//! shares a loop: per sixteen keys, a widened key row feeds every head of the group, and per key
//! a widened value row too, with all accumulators of the group in registers. (The per-head path
//! also kept its score tree in stack arrays the compiler turned into gathers: 32 % of a
//! 16-stream decode step, bench/NOTES.md.)
//!
//! Only the sign of an exactly-zero product sum can differ from the per-head path (it starts
//! each element's sum from `+0`; here from the first product): a ±0 score gives the same
//! softmax weight, so outputs are identical (tested bitwise against the per-head path).

use super::*;

/// Query heads one task scores together (their accumulators stay in registers: four heads of
/// 64 values are sixteen 512-bit registers).
pub(super) const GROUP_HEADS: usize = 4;

/// One task: a sequence's query tile against one KV head, for query heads `heads`.
struct GroupTask<'a> {
    q: &'a [f32],
    width: usize,
    layout: &'a PagedKvLayout,
    k_cache: &'a [u16],
    v_cache: &'a [u16],
    seq: &'a PagedSeq<'a>,
    kv_head: usize,
    first_head: usize,
    tile: Range<usize>,
    out: *mut f32,
}

/// [`paged_attention`] for [`AttentionArith::Fast`] and head widths that are multiples of 64
/// (the caller checked the arguments).
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
    debug_assert!(d.is_multiple_of(64));
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
            let need = GROUP_HEADS * (s.start_pos + tile.end).div_ceil(bt) * bt;
            if scores.len() < need {
                scores.resize(need, 0.0);
            }
            let task = GroupTask {
                q,
                width,
                layout,
                k_cache,
                v_cache,
                seq: s,
                kv_head: g,
                first_head: h0,
                tile,
                out: out_ptr.get(),
            };
            macro_rules! with_dim_heads {
                ($($dim:literal),*) => {
                    match (d, n) {
                        $(
                            ($dim, 1) => attend_at_level::<$dim, 1>(lv, &task, &mut scores),
                            ($dim, 2) => attend_at_level::<$dim, 2>(lv, &task, &mut scores),
                            ($dim, 3) => attend_at_level::<$dim, 3>(lv, &task, &mut scores),
                            ($dim, 4) => attend_at_level::<$dim, 4>(lv, &task, &mut scores),
                        )*
                        _ => unreachable!("head_dim and group size checked above"),
                    }
                };
            }
            with_dim_heads!(64, 128, 256)
        });
    };
    let work: usize = seqs.iter().map(|s| s.rows.len() * (s.start_pos + s.rows.len()) * width * 2).sum();
    if tasks.len() > 1 && work >= ATTENTION_PAR_MIN_WORK {
        tasks.par_iter().for_each(run);
    } else {
        tasks.iter().for_each(run);
    }
}

/// [`attend_group`] compiled for level `lv` (from [`level`], which checked the CPU). Plain
/// `#[target_feature]` functions rather than `dispatch_level!`'s closures: with this many
/// instantiations the compiler stopped inlining the closures, and the body then ran without
/// AVX (a libm call per `mul_add`).
fn attend_at_level<const D: usize, const G: usize>(lv: u8, task: &GroupTask<'_>, scores: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn avx512<const D: usize, const G: usize>(task: &GroupTask<'_>, scores: &mut [f32]) {
            attend_group::<D, G, AVX512>(task, scores)
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn avx2<const D: usize, const G: usize>(task: &GroupTask<'_>, scores: &mut [f32]) {
            attend_group::<D, G, AVX2>(task, scores)
        }
        match lv {
            // SAFETY: `level` asserted that the CPU has the features.
            AVX512 => return unsafe { avx512::<D, G>(task, scores) },
            // SAFETY: as above.
            AVX2 => return unsafe { avx2::<D, G>(task, scores) },
            _ => {}
        }
    }
    attend_group::<D, G, PORTABLE>(task, scores)
}

#[inline(always)]
fn add16(a: [f32; LANES], b: [f32; LANES]) -> [f32; LANES] {
    let mut s = [0f32; LANES];
    for l in 0..LANES {
        s[l] = a[l] + b[l];
    }
    s
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

/// Key row `c` of sixteen keys, widened.
#[inline(always)]
fn key_row<const L: u8>(keys: &[u16], bt: usize, c: usize) -> [f32; LANES] {
    widen16::<L>(keys[c * bt..c * bt + LANES].try_into().unwrap())
}

/// Element `c`'s products with sixteen keys (`keys`: the transposed block from the first of
/// them, rows `bt` apart) summed over the 64-wide steps `c, 64 + c, …`, for every head.
#[inline(always)]
fn tree_elem<const D: usize, const G: usize, const L: u8>(qh: &[[f32; D]; G], keys: &[u16], bt: usize, c: usize) -> [[f32; LANES]; G] {
    let k = key_row::<L>(keys, bt, c);
    let mut e = [[0f32; LANES]; G];
    for h in 0..G {
        for l in 0..LANES {
            e[h][l] = qh[h][c] * k[l];
        }
    }
    for step in 1..D / 64 {
        let k = key_row::<L>(keys, bt, 64 * step + c);
        for h in 0..G {
            for l in 0..LANES {
                e[h][l] += qh[h][64 * step + c] * k[l];
            }
        }
    }
    e
}

/// `x[i] = (e(i) + e(32 + i)) + (e(16 + i) + e(48 + i))`.
#[inline(always)]
fn tree_x<const D: usize, const G: usize, const L: u8>(qh: &[[f32; D]; G], keys: &[u16], bt: usize, i: usize) -> [[f32; LANES]; G] {
    let (a, b) = (tree_elem::<D, G, L>(qh, keys, bt, i), tree_elem::<D, G, L>(qh, keys, bt, 16 + i));
    let (c, d) = (
        tree_elem::<D, G, L>(qh, keys, bt, 32 + i),
        tree_elem::<D, G, L>(qh, keys, bt, 48 + i),
    );
    let mut x = [[0f32; LANES]; G];
    for h in 0..G {
        x[h] = add16(add16(a[h], c[h]), add16(b[h], d[h]));
    }
    x
}

/// `score_keys`' reduction tree regrouped: `u[j] = (x[12 + j] + x[4 + j]) + (x[8 + j] + x[j])`
/// (its `t[4 + j] + t[j]`), the score `(u[0] + u[2]) + (u[1] + u[3])`.
#[inline(always)]
fn tree_u<const D: usize, const G: usize, const L: u8>(qh: &[[f32; D]; G], keys: &[u16], bt: usize, j: usize) -> [[f32; LANES]; G] {
    let (x0, x4) = (tree_x::<D, G, L>(qh, keys, bt, j), tree_x::<D, G, L>(qh, keys, bt, 4 + j));
    let (x8, x12) = (tree_x::<D, G, L>(qh, keys, bt, 8 + j), tree_x::<D, G, L>(qh, keys, bt, 12 + j));
    let mut u = [[0f32; LANES]; G];
    for h in 0..G {
        u[h] = add16(add16(x12[h], x4[h]), add16(x8[h], x0[h]));
    }
    u
}

/// The task's query rows, each against its KV head for its `G` query heads.
#[inline(always)]
fn attend_group<const D: usize, const G: usize, const L: u8>(task: &GroupTask<'_>, scores: &mut [f32]) {
    let layout = task.layout;
    let (bt, be, kvh) = (layout.block_tokens, layout.block_elems(), task.kv_head);
    let scale = 1.0 / (D as f32).sqrt();
    for i in task.tile.clone() {
        let row = task.seq.rows.start + i;
        let n_keys = task.seq.start_pos + i + 1;
        let n_blocks = n_keys.div_ceil(bt);
        let stride = n_blocks * bt;
        let table = &task.seq.block_table[..n_blocks];
        // The G queries rounded to f16 (as `score_keys`).
        let mut qh = [[0f32; D]; G];
        for (h, qh) in qh.iter_mut().enumerate() {
            let at = row * task.width + (task.first_head + h) * D;
            for c16 in (0..D).step_by(LANES) {
                qh[c16..c16 + LANES].copy_from_slice(&round_f16_16::<L>(task.q[at + c16..at + c16 + LANES].try_into().unwrap()));
            }
        }

        // Scores, sixteen keys (lanes) at a time, for all G heads from one widened key row.
        // At 16 streams a step's caches (≈ 2 MB a layer for SmolLM2) stream from memory: fetch
        // the next block's keys and this block's values while scoring this block.
        let k_at = |b: usize| table[b] as usize * be + kvh * D * bt;
        if let Some(&first) = table.first() {
            prefetch_f16(&task.k_cache[first as usize * be + kvh * D * bt..][..D * bt]);
        }
        for (b, &block) in table.iter().enumerate() {
            let kt = &task.k_cache[block as usize * be + kvh * D * bt..][..D * bt];
            if b + 1 < table.len() {
                prefetch_f16(&task.k_cache[k_at(b + 1)..][..D * bt]);
            }
            prefetch_f16(&task.v_cache[block as usize * be + kvh * bt * D..][..bt * D]);
            let valid = (n_keys - b * bt).min(bt);
            for l in 0..valid.div_ceil(LANES) {
                let keys = &kt[l * LANES..];
                let (u0, u1, u2, u3) = (
                    tree_u::<D, G, L>(&qh, keys, bt, 0),
                    tree_u::<D, G, L>(&qh, keys, bt, 1),
                    tree_u::<D, G, L>(&qh, keys, bt, 2),
                    tree_u::<D, G, L>(&qh, keys, bt, 3),
                );
                for h in 0..G {
                    let sum = add16(add16(u0[h], u2[h]), add16(u1[h], u3[h]));
                    let s = &mut scores[h * stride + b * bt + l * LANES..][..LANES];
                    for lane in 0..LANES {
                        s[lane] = sum[lane] * scale;
                    }
                }
            }
        }

        // Softmax weights per head (as `softmax_values_fast`), in place.
        let mut inv = [0f32; G];
        for (h, inv) in inv.iter_mut().enumerate() {
            let s = &mut scores[h * stride..][..n_keys];
            // The maximum in sixteen lanes, then across them (max is exact and, NaN aside, order
            // free; `f32::max` ignores NaN as the per-head path's fold does).
            let mut lane_max = [f32::NEG_INFINITY; LANES];
            let mut chunks = s.chunks_exact(LANES);
            for c in &mut chunks {
                for l in 0..LANES {
                    lane_max[l] = lane_max[l].max(c[l]);
                }
            }
            let m = chunks.remainder().iter().chain(&lane_max).fold(f32::NEG_INFINITY, |a, &v| a.max(v));
            let mut lanes = [0f32; LANES];
            let mut chunks = s.chunks_exact_mut(LANES);
            for c in &mut chunks {
                for (l, v) in c.iter_mut().enumerate() {
                    *v = crate::cpu::math::fast_exp(*v - m);
                    lanes[l] += *v;
                }
            }
            for (l, v) in chunks.into_remainder().iter_mut().enumerate() {
                *v = crate::cpu::math::fast_exp(*v - m);
                lanes[l] += *v;
            }
            let mut w = LANES;
            while w > 1 {
                w /= 2;
                for l in 0..w {
                    lanes[l] += lanes[l + w];
                }
            }
            *inv = if lanes[0] == 0.0 { 0.0 } else { 1.0 / lanes[0] };
        }

        // Values in position order, one widened row for all G heads.
        let mut acc = [[0f32; D]; G];
        for (b, &block) in table.iter().enumerate() {
            let vb = &task.v_cache[block as usize * be + kvh * bt * D..][..bt * D];
            let valid = (n_keys - b * bt).min(bt);
            for slot in 0..valid {
                let mut p = [0f32; G];
                for (h, p) in p.iter_mut().enumerate() {
                    *p = scores[h * stride + b * bt + slot];
                }
                let v = &vb[slot * D..][..D];
                for c16 in (0..D).step_by(LANES) {
                    let vv = widen16::<L>(v[c16..c16 + LANES].try_into().unwrap());
                    for h in 0..G {
                        for l in 0..LANES {
                            acc[h][c16 + l] = vv[l].mul_add(p[h], acc[h][c16 + l]);
                        }
                    }
                }
            }
        }
        for h in 0..G {
            let at = row * task.width + (task.first_head + h) * D;
            let mut o = [0f32; D];
            for c in 0..D {
                o[c] = acc[h][c] * inv[h];
            }
            // SAFETY: (row, head) belongs to this task alone; `at + D <= out.len()` because
            // `out` has the length of `q`, which was just read at the same place.
            unsafe { std::ptr::copy_nonoverlapping(o.as_ptr(), task.out.add(at), D) };
        }
    }
}
