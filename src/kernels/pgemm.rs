//! GEMM with weights packed once: the 1x1 convolutions of the fast block.
//!
//! Why not the `gemm` crate here: it packs its left operand (the weights) on
//! every call, and a sparse sample first had to copy its selected paths'
//! reduce rows and expand columns out of the full matrices. At batch 1 on
//! ResNeXt-101's conv4 / conv5 those copies and packs took a third of the
//! sparse time (they scale with the weights, the GEMM with H*W), so sparse
//! was far slower than its MACs say. Here a weight matrix is packed at load
//! time into [`Panels`] of `mr` rows, laid out column by column; a sparse
//! reduce multiplies by the panels of the selected paths, a sparse expand by
//! the selected paths' column ranges of every panel, where they lie. Only
//! the activations (the right operand) are packed, by blocks of columns
//! that stay in L2, into strips of [`strip_width`] columns.
//!
//! The register tile is `mr` rows by one strip, accumulated over the whole
//! reduction and stored once, with the block's output epilogue (bias,
//! residual, ReLU) applied in the store.
//!
//! On wide maps the block still uses the `gemm` crate, on a row-major copy
//! of the selected weights ([`Panels::unpack`]): there the copy is small
//! beside the product and `gemm` was the faster of the two.

use crate::fused::isa::Isa;

/// A row-major `[rows, cols]` matrix packed in panels of `mr` rows: panel `q`
/// holds rows `q*mr..q*mr + mr` as `[cols][mr]`, rows past the end zero.
/// The default is an empty matrix for [`Panels::select_rows`] to fill.
#[derive(Debug, Clone, Default)]
pub(crate) struct Panels {
    mr: usize,
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl Panels {
    /// Packs `w` (`rows * cols` values, row-major); `mr` is 1, 2, 4 or 8.
    pub fn pack(w: &[f32], rows: usize, cols: usize, mr: usize) -> Panels {
        assert!(
            matches!(mr, 1 | 2 | 4 | 8) && w.len() == rows * cols,
            "Panels::pack: mr {mr}, {} values for {rows}x{cols}",
            w.len()
        );
        let count = rows.div_ceil(mr);
        let mut data = vec![0.0f32; count * cols * mr];
        if cols > 0 {
            for (row, src) in w.chunks_exact(cols).enumerate() {
                let (q, r) = (row / mr, row % mr);
                let panel = &mut data[q * cols * mr..(q + 1) * cols * mr];
                for (c, &v) in src.iter().enumerate() {
                    panel[c * mr + r] = v;
                }
            }
        }
        Panels {
            mr,
            rows,
            cols,
            data,
        }
    }

    /// Panels of `mr` rows holding the rows `rows` of this matrix, in that
    /// order, written over `into` (its buffer reused).
    pub fn select_rows(&self, rows: &[usize], mr: usize, into: &mut Panels) {
        assert!(matches!(mr, 1 | 2 | 4 | 8) && rows.iter().all(|&r| r < self.rows));
        let (cols, count) = (self.cols, rows.len().div_ceil(mr));
        into.data.clear();
        into.data.resize(count * cols * mr, 0.0);
        for (i, &row) in rows.iter().enumerate() {
            let src = self.panel(row / self.mr);
            let (q, r, sr) = (i / mr, i % mr, row % self.mr);
            let dst = &mut into.data[q * cols * mr..(q + 1) * cols * mr];
            for c in 0..cols {
                dst[c * mr + r] = src[c * self.mr + sr];
            }
        }
        into.mr = mr;
        into.rows = rows.len();
        into.cols = cols;
    }

    /// Row-major `[rows.len(), sum of lengths]` copy of the rows `rows`
    /// (all when `None`), columns the ranges `segs`, written over `out`.
    pub fn unpack(&self, rows: Option<&[usize]>, segs: &[(usize, usize)], out: &mut Vec<f32>) {
        let width: usize = segs.iter().map(|s| s.1).sum();
        let count = rows.map_or(self.rows, <[usize]>::len);
        out.clear();
        out.resize(count * width, 0.0);
        for (i, dst) in out.chunks_exact_mut(width.max(1)).take(count).enumerate() {
            let row = rows.map_or(i, |r| r[i]);
            let (src, r) = (self.panel(row / self.mr), row % self.mr);
            let mut j = 0;
            for &(k0, len) in segs {
                for c in k0..k0 + len {
                    dst[j] = src[c * self.mr + r];
                    j += 1;
                }
            }
        }
    }

    /// Rows per panel.
    pub fn mr(&self) -> usize {
        self.mr
    }
    /// Number of panels.
    pub fn count(&self) -> usize {
        self.rows.div_ceil(self.mr)
    }
    fn panel(&self, q: usize) -> &[f32] {
        let len = self.cols * self.mr;
        &self.data[q * len..(q + 1) * len]
    }
    /// Real (not padding) rows of panel `q`.
    fn valid(&self, q: usize) -> usize {
        (self.rows - q * self.mr).min(self.mr)
    }
}

/// The largest panel height (8, 4, 2 or 1) that divides `d`: panels of a
/// path's rows then never straddle two paths.
pub(crate) fn path_mr(d: usize) -> usize {
    [8, 4, 2]
        .into_iter()
        .find(|&m| d.is_multiple_of(m))
        .unwrap_or(1)
}

/// Columns per strip of the packed right operand for panels of `mr` rows:
/// enough vectors that the tile has 8-16 independent accumulators (FMA
/// latency times its two ports), within the register file (32 on AVX-512,
/// 16 on AVX2).
pub(crate) fn strip_width(isa: Isa, mr: usize) -> usize {
    match (isa, mr) {
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, 8) => 32,
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, _) => 64,
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, 8) => 8,
        _ => 16,
    }
}

/// One product summed into C: the panels of `a` over the column ranges
/// `segs` (start, length) of `a`, times B whose rows are those columns in
/// order (row `r` of B at `b[r * ldb..]`).
pub(crate) struct Term<'a> {
    pub a: &'a Panels,
    pub segs: &'a [(usize, usize)],
    pub b: &'a [f32],
    pub ldb: usize,
}

impl Term<'_> {
    fn depth(&self) -> usize {
        self.segs.iter().map(|s| s.1).sum()
    }
}

/// What the store does with the accumulated tile.
#[derive(Clone, Copy)]
pub(crate) enum Epilogue<'a> {
    /// C = sum of the terms.
    Set,
    /// C = relu(sum + bias[row] + residual[row]) with `bias` one value per C
    /// row and the residual row `r` at `res[r * ld..]` (columns as C's).
    BiasRelu {
        bias: &'a [f32],
        residual: Option<(&'a [f32], usize)>,
    },
}

/// Values of packed right operand kept per column block (512 KiB, a
/// quarter of this machine's L2): big enough that a batch-1 conv5 product
/// (2048 rows of B, 49 columns) is one block, so its weights are read once.
const BLOCK_VALUES: usize = 128 * 1024;

/// How a product's work is cut into items for threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Split {
    /// Nothing to do (no columns or no panels).
    Empty,
    /// One item: everything.
    Whole,
    /// Item `i`: columns `i * per..`, every panel (each packs its columns).
    Columns { per: usize },
    /// Item `i`: panels `i * per..`, every column (each packs all of B).
    Panels { per: usize },
}

impl Split {
    /// By columns when C is wide, or when it has few panels and at least a
    /// strip per thread: each item then packs only its share of B (a
    /// batch-1 conv4 reduce at k = P/4, 16 panels, ran 0.37-0.41 ms on two
    /// threads with B packed on one and 0.25-0.27 by columns). Else by
    /// panels, each item packing all of B: as fast as packing it once on
    /// one thread while the others wait, and B is then small beside the
    /// panels' work.
    fn new(isa: Isa, mr: usize, n: usize, panels: usize, threads: usize) -> Split {
        let nr = strip_width(isa, mr);
        let strips = n.div_ceil(nr);
        if n == 0 || panels == 0 {
            Split::Empty
        } else if threads <= 1 {
            Split::Whole
        } else if strips >= 4 * threads || (strips >= threads && panels <= 32 * threads) {
            Split::Columns {
                per: strips.div_ceil(threads) * nr,
            }
        } else {
            Split::Panels {
                per: panels.div_ceil(threads),
            }
        }
    }

    fn items(self, n: usize, panels: usize) -> usize {
        match self {
            Split::Empty => 0,
            Split::Whole => 1,
            Split::Columns { per } => n.div_ceil(per),
            Split::Panels { per } => panels.div_ceil(per),
        }
    }
}

/// Items [`Gemm::new`] will cut a product of `panels` panels of `mr` rows
/// and `n` columns into for `threads` threads.
pub(crate) fn split_items(isa: Isa, mr: usize, n: usize, panels: usize, threads: usize) -> usize {
    Split::new(isa, mr, n, panels, threads).items(n, panels)
}

/// `C = sum over terms of A[panels] . B` (then the epilogue), for the
/// panels `panels` of the terms' `a` (all with the same `mr` and rows):
/// C's row block `i` (rows `i*mr..`, the real rows of panel `panels[i]`)
/// lands at `C[i * mr * ldc..]`, row stride `ldc`, columns `0..n`. Cut into
/// items that may run on any threads in any order ([`Gemm::run_item`],
/// e.g. as a phase of [`super::team::run`]); the items write disjoint
/// parts of C.
pub(crate) struct Gemm<'a> {
    isa: Isa,
    terms: &'a [Term<'a>],
    panels: &'a [usize],
    n: usize,
    out: OutPtr,
    ldc: usize,
    epi: Epilogue<'a>,
    mr: usize,
    nr: usize,
    /// Columns per packed block.
    nc: usize,
    /// Rows of B per term (the sum of its column ranges).
    depths: Vec<usize>,
    split: Split,
}

impl<'a> Gemm<'a> {
    /// The plan for `threads` threads, C at `c` (`c_len` values). Panics if
    /// a slice is too short for the shapes (an internal bug: callers size
    /// every buffer from validated shapes).
    ///
    /// # Safety
    /// `c` must be valid for writes of `c_len` values, and nothing but this
    /// plan's items may read or write C from here until the last item has
    /// run.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn new(
        isa: Isa,
        terms: &'a [Term<'a>],
        panels: &'a [usize],
        n: usize,
        c: *mut f32,
        c_len: usize,
        ldc: usize,
        epi: Epilogue<'a>,
        threads: usize,
    ) -> Gemm<'a> {
        let mr = terms.first().map_or(8, |t| t.a.mr);
        let nr = strip_width(isa, mr);
        let depths: Vec<usize> = terms.iter().map(Term::depth).collect();
        let depth = depths.iter().sum::<usize>().max(1);
        let mut split = Split::new(isa, mr, n, panels.len(), threads.max(1));
        if let Some(first) = terms.first() {
            assert!(
                terms
                    .iter()
                    .all(|t| t.a.mr == mr && t.a.rows == first.a.rows),
                "pgemm: terms with different panel shapes"
            );
        } else {
            split = Split::Empty;
        }
        if split != Split::Empty {
            Self::check(terms, panels, n, c_len, ldc, epi);
        }
        Gemm {
            isa,
            terms,
            panels,
            n,
            out: OutPtr(c),
            ldc,
            epi,
            mr,
            nr,
            nc: (BLOCK_VALUES / depth / nr).max(1) * nr,
            depths,
            split,
        }
    }

    /// Asserts that every slice covers the shapes (C, the bias, the
    /// residual, each term's weight and B).
    fn check(
        terms: &[Term<'_>],
        panels: &[usize],
        n: usize,
        c_len: usize,
        ldc: usize,
        epi: Epilogue<'_>,
    ) {
        let a = terms[0].a;
        let mr = a.mr;
        assert!(
            panels.iter().all(|&q| q < a.count())
                && panels[..panels.len() - 1].iter().all(|&q| a.valid(q) == mr),
            "pgemm: panel out of range, or a partial panel before the last"
        );
        let c_rows = (panels.len() - 1) * mr + a.valid(panels[panels.len() - 1]);
        assert!(
            (c_rows - 1) * ldc + n <= c_len && ldc >= n,
            "pgemm: C too short for {c_rows} rows of {n}"
        );
        if let Epilogue::BiasRelu { bias, residual } = epi {
            assert!(bias.len() >= c_rows, "pgemm: bias too short");
            if let Some((res, ld)) = residual {
                assert!(
                    ld >= n && (c_rows - 1) * ld + n <= res.len(),
                    "pgemm: residual too short"
                );
            }
        }
        for t in terms {
            assert!(
                t.segs.iter().all(|&(k0, len)| k0 + len <= t.a.cols),
                "pgemm: column range past the weight"
            );
            let k = t.depth();
            assert!(
                k == 0 || (t.ldb >= n && (k - 1) * t.ldb + n <= t.b.len()),
                "pgemm: B too short for {k} rows of {n}"
            );
        }
    }

    /// Number of items.
    pub fn items(&self) -> usize {
        self.split.items(self.n, self.panels.len())
    }

    /// Runs item `i` (`< self.items()`) on this thread.
    pub fn run_item(&self, i: usize) {
        let (n, np) = (self.n, self.panels.len());
        let (cols, panels) = match self.split {
            Split::Empty => return,
            Split::Whole => ((0, n), (0, np)),
            Split::Columns { per } => ((i * per, per.min(n - i * per)), (0, np)),
            Split::Panels { per } => ((0, n), (i * per, per.min(np - i * per))),
        };
        with_packed(|buf| self.blocks(cols, panels, buf));
    }

    /// Panels `p0..p0 + pn` over columns `j0..j0 + jn`, block by block of
    /// columns, each block packed into `buf` first.
    fn blocks(&self, (j0, jn): (usize, usize), (p0, pn): (usize, usize), buf: &mut Vec<f32>) {
        let (nr, terms, depths) = (self.nr, self.terms, &self.depths);
        let mut n0 = j0;
        while n0 < j0 + jn {
            let nb = self.nc.min(j0 + jn - n0);
            let strips = nb.div_ceil(nr);
            let total = depths.iter().sum::<usize>() * strips * nr;
            if buf.len() < total {
                buf.resize(total, 0.0);
            }
            let mut spans = Vec::with_capacity(terms.len());
            let mut off = 0;
            for (t, &k) in terms.iter().zip(depths) {
                let len = k * strips * nr;
                pack_b(t.b, t.ldb, k, n0, nb, nr, &mut buf[off..off + len]);
                spans.push((off, len));
                off += len;
            }
            let packed: Vec<&[f32]> = spans.iter().map(|&(o, l)| &buf[o..o + l]).collect();
            let chunk = Chunk {
                terms,
                depths,
                packed: &packed,
                nr,
                panels: &self.panels[p0..p0 + pn],
                row0: p0 * self.mr,
                n0,
                nb,
                c: self.out,
                ldc: self.ldc,
                epi: self.epi,
            };
            // SAFETY: items write disjoint parts of C (different row blocks
            // or different columns), inside the length `check` asserted;
            // nothing else touches C while they run (`new`'s contract).
            unsafe { run_chunk(self.isa, self.mr, chunk) };
            n0 += nb;
        }
    }
}

/// C's base pointer, shared by tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: only dereferenced by `chunk_impl` at indices that the tasks of one
// `gemm` call partition between them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

thread_local! {
    static PACKED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's buffer for the packed right operand (a fresh
/// one if a nested task on this thread already holds it).
fn with_packed<T>(f: impl FnOnce(&mut Vec<f32>) -> T) -> T {
    PACKED.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => f(&mut v),
        Err(_) => f(&mut Vec::new()),
    })
}

/// Copies columns `n0..n0 + nb` of `rows` rows of `b` (row stride `ldb`)
/// into strips of `nr` columns: strip `s`, row `r` at `out[(s * rows + r) *
/// nr..]`, zero past `nb`.
fn pack_b(b: &[f32], ldb: usize, rows: usize, n0: usize, nb: usize, nr: usize, out: &mut [f32]) {
    let strips = nb.div_ceil(nr);
    for s in 0..strips {
        let j0 = s * nr;
        let w = nr.min(nb - j0);
        let strip = &mut out[s * rows * nr..(s + 1) * rows * nr];
        for (r, dst) in strip.chunks_exact_mut(nr).enumerate() {
            let src = &b[r * ldb + n0 + j0..][..w];
            dst[..w].copy_from_slice(src);
            dst[w..].fill(0.0);
        }
    }
}

/// One task's panels over one column block.
struct Chunk<'a> {
    terms: &'a [Term<'a>],
    /// Rows of each term's B.
    depths: &'a [usize],
    /// Each term's packed block (strips of `nr` columns).
    packed: &'a [&'a [f32]],
    /// The strip width it was packed with ([`strip_width`]); the kernel
    /// checks that it is its own.
    nr: usize,
    panels: &'a [usize],
    /// C row of this task's first row.
    row0: usize,
    n0: usize,
    nb: usize,
    c: OutPtr,
    ldc: usize,
    epi: Epilogue<'a>,
}

/// Dispatches a task to the kernel for its ISA, panel height and strip.
/// # Safety
/// The rows and columns `ch` covers must be written by no one else meanwhile.
unsafe fn run_chunk(isa: Isa, mr: usize, ch: Chunk<'_>) {
    // SAFETY (all arms): `Isa::Avx512` / `Isa::Avx2` come only from
    // `Isa::detect`, after a runtime check of exactly the features these
    // functions enable; the caller guarantees exclusive access to the part
    // of C that `ch` covers. Strip widths as in `strip_width`.
    unsafe {
        match (isa, mr) {
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, 8) => chunk_v4::<8, 32>(ch),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, 4) => chunk_v4::<4, 64>(ch),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, 2) => chunk_v4::<2, 64>(ch),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, _) => chunk_v4::<1, 64>(ch),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, 8) => chunk_v3::<8, 8>(ch),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, 4) => chunk_v3::<4, 16>(ch),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, 2) => chunk_v3::<2, 16>(ch),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, _) => chunk_v3::<1, 16>(ch),
            (_, 8) => chunk_impl::<8, 16, Portable>(ch),
            (_, 4) => chunk_impl::<4, 16, Portable>(ch),
            (_, 2) => chunk_impl::<2, 16, Portable>(ch),
            _ => chunk_impl::<1, 16, Portable>(ch),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn chunk_v4<const MR: usize, const NR: usize>(ch: Chunk<'_>)
where
    V4: Tile<MR, NR>,
{
    // SAFETY: forwarded from `run_chunk`.
    unsafe { chunk_impl::<MR, NR, V4>(ch) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk_v3<const MR: usize, const NR: usize>(ch: Chunk<'_>)
where
    V3: Tile<MR, NR>,
{
    // SAFETY: forwarded from `run_chunk`.
    unsafe { chunk_impl::<MR, NR, V3>(ch) }
}

/// One term's share of a tile: the panel, its column ranges, and the strip
/// of packed B rows (`NR` values each) for those columns in order.
struct Op<'a> {
    panel: &'a [f32],
    segs: &'a [(usize, usize)],
    /// `[rows][NR]`.
    strip: &'a [f32],
}

/// The register tile: `MR x NR` sums over every op's column ranges.
trait Tile<const MR: usize, const NR: usize> {
    fn tile(ops: &[Op<'_>]) -> [[f32; NR]; MR];
}

/// Plain loops (no FMA assumed): the fallback for CPUs without AVX2.
struct Portable;

impl<const MR: usize, const NR: usize> Tile<MR, NR> for Portable {
    #[inline(always)]
    fn tile(ops: &[Op<'_>]) -> [[f32; NR]; MR] {
        let mut acc = [[0.0f32; NR]; MR];
        for op in ops {
            let mut kb = 0;
            for &(k0, len) in op.segs {
                let a = &op.panel[k0 * MR..(k0 + len) * MR];
                let b = &op.strip[kb * NR..(kb + len) * NR];
                for (ar, br) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
                    for (acc_i, &av) in acc.iter_mut().zip(ar) {
                        for (o, &bv) in acc_i.iter_mut().zip(br) {
                            *o += av * bv;
                        }
                    }
                }
                kb += len;
            }
        }
        acc
    }
}

/// AVX-512 tiles: `NV` vectors of 16 columns per row.
#[cfg(target_arch = "x86_64")]
pub(crate) struct V4;

/// AVX2 + FMA tiles: `NV` vectors of 8 columns per row.
#[cfg(target_arch = "x86_64")]
pub(crate) struct V3;

/// Implements [`Tile`] for `$kernel` with `$nv` vectors of `$lanes` columns
/// per row, `MR` rows held in registers over the whole reduction.
#[cfg(target_arch = "x86_64")]
macro_rules! simd_tile {
    ($kernel:ty, $lanes:literal, [$($nv:literal),+], $zero:ident, $load:ident, $set1:ident, $fma:ident, $store:ident) => {$(
        impl<const MR: usize> Tile<MR, { $nv * $lanes }> for $kernel {
            #[inline(always)]
            fn tile(ops: &[Op<'_>]) -> [[f32; $nv * $lanes]; MR] {
                use std::arch::x86_64::*;
                const NR: usize = $nv * $lanes;
                // SAFETY: only reached from the `chunk_v*` function that
                // enables these instructions; the assertion bounds every
                // pointer inside `panel` and `strip`.
                unsafe {
                    let mut acc = [[$zero(); $nv]; MR];
                    for op in ops {
                        let mut kb = 0;
                        for &(k0, len) in op.segs {
                            assert!(
                                (k0 + len) * MR <= op.panel.len()
                                    && (kb + len) * NR <= op.strip.len()
                            );
                            let mut a = op.panel.as_ptr().add(k0 * MR);
                            let mut b = op.strip.as_ptr().add(kb * NR);
                            for _ in 0..len {
                                let mut bv = [$zero(); $nv];
                                for (v, o) in bv.iter_mut().enumerate() {
                                    *o = $load(b.add(v * $lanes));
                                }
                                for (i, acc_i) in acc.iter_mut().enumerate() {
                                    let av = $set1(*a.add(i));
                                    for (o, &v) in acc_i.iter_mut().zip(&bv) {
                                        *o = $fma(av, v, *o);
                                    }
                                }
                                a = a.add(MR);
                                b = b.add(NR);
                            }
                            kb += len;
                        }
                    }
                    let mut out = [[0.0f32; NR]; MR];
                    for (o, v) in out.iter_mut().zip(&acc) {
                        for (j, &x) in v.iter().enumerate() {
                            $store(o.as_mut_ptr().add(j * $lanes), x);
                        }
                    }
                    out
                }
            }
        }
    )+};
}

#[cfg(target_arch = "x86_64")]
simd_tile!(
    V4,
    16,
    [2, 4],
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_set1_ps,
    _mm512_fmadd_ps,
    _mm512_storeu_ps
);
#[cfg(target_arch = "x86_64")]
simd_tile!(
    V3,
    8,
    [1, 2],
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps,
    _mm256_storeu_ps
);

/// Prefetch hints (into L1) for the column ranges `segs` of a panel of
/// `mr` rows: one per 64-byte line that a range touches.
#[inline(always)]
fn prefetch_ranges(panel: &[f32], segs: &[(usize, usize)], mr: usize) {
    #[cfg(target_arch = "x86_64")]
    for &(k0, len) in segs {
        let range = &panel[(k0 * mr).min(panel.len())..((k0 + len) * mr).min(panel.len())];
        let Some(last) = range.last() else { continue };
        // From the line that holds the first value (ranges need not start
        // on a line) to the one that holds the last.
        let (start, end) = (range.as_ptr() as usize & !63, last as *const f32 as usize);
        for addr in (start..=end).step_by(64) {
            // SAFETY: a hint, not an access: it never faults, and each
            // address lies on a line of `panel`.
            unsafe {
                std::arch::x86_64::_mm_prefetch(addr as *const i8, std::arch::x86_64::_MM_HINT_T0)
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (panel, segs, mr);
}

/// Every panel of the task, strip by strip: the tile of all terms, then
/// one store with the epilogue.
///
/// # Safety
/// No one else may touch the rows and columns of C that `ch` covers.
#[inline(always)]
unsafe fn chunk_impl<const MR: usize, const NR: usize, K: Tile<MR, NR>>(ch: Chunk<'_>) {
    let Chunk {
        terms,
        depths,
        packed,
        nr,
        panels,
        row0,
        n0,
        nb,
        c,
        ldc,
        epi,
    } = ch;
    assert_eq!(nr, NR, "pgemm: B packed in strips of {nr}, kernel of {NR}");
    let strips = nb.div_ceil(NR);
    // Panel by panel, all strips of the block for each: the panel stays in
    // L1, the strips come from L2, and C and the residual are walked along
    // their rows (column strips across all rows first was 2.4x slower on a
    // batch-32 expand: the prefetchers lose rows read 128 bytes at a time).
    let mut ops: Vec<Op<'_>> = Vec::with_capacity(terms.len());
    for (i, &q) in panels.iter().enumerate() {
        // The column ranges of the panel two ahead, into L1: in a whole
        // network each block's weights come from memory once per image, and
        // a sparse expand reads its paths' ranges in pieces of d*MR values
        // one panel apart (16 KiB at conv4), which the prefetchers do not
        // follow. The sparse ResNeXt-101's blocks at batch 1 went from
        // 16.7-17.0 to 14.9-15.0 ms at k = 8 and from 28.4-28.6 to
        // 26.2-26.6 at k = 16 (`bench_fast -- cnnloop`); in `bench all` the
        // whole network at k = 8 from 22.6-22.9 to 20.8-21.5 ms and dense
        // from 47.3-48.2 to 46.4-47.7, and the conv5 block at batch 32
        // dense from 47-53 to 44-46 ms. Measured on Zen 5 only (48 KiB L1;
        // a dense conv5 panel is 32 KiB).
        if let Some(&ahead) = panels.get(i + 2) {
            for t in terms {
                prefetch_ranges(t.a.panel(ahead), t.segs, MR);
            }
        }
        for s in 0..strips {
            let rows = terms[0].a.valid(q);
            ops.clear();
            for ((t, pk), &depth) in terms.iter().zip(packed).zip(depths) {
                ops.push(Op {
                    panel: t.a.panel(q),
                    segs: t.segs,
                    strip: &pk[s * depth * NR..(s + 1) * depth * NR],
                });
            }
            let acc = K::tile(&ops);
            let j0 = s * NR;
            let w = NR.min(nb - j0);
            store(&acc, rows, i * MR, row0, n0 + j0, w, c, ldc, epi);
        }
    }
}

/// Writes `rows` rows of a tile (`w` columns from `col`) at C row
/// `row0 + crow`, through the epilogue.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn store<const MR: usize, const NR: usize>(
    acc: &[[f32; NR]; MR],
    rows: usize,
    crow0: usize,
    row0: usize,
    col: usize,
    w: usize,
    c: OutPtr,
    ldc: usize,
    epi: Epilogue<'_>,
) {
    for (r, acc_r) in acc.iter().enumerate().take(rows) {
        let row = row0 + crow0 + r;
        // SAFETY: inside C (asserted by `gemm`) and in this task's own rows
        // and columns (the contract of `chunk_impl`).
        let dst = unsafe { std::slice::from_raw_parts_mut(c.0.add(row * ldc + col), w) };
        match epi {
            Epilogue::Set => dst.copy_from_slice(&acc_r[..w]),
            Epilogue::BiasRelu { bias, residual } => {
                let b = bias[row];
                match residual {
                    Some((res, ld)) => {
                        let res = &res[row * ld + col..][..w];
                        for ((o, &v), &x) in dst.iter_mut().zip(&acc_r[..w]).zip(res) {
                            *o = (v + b + x).max(0.0);
                        }
                    }
                    None => {
                        for (o, &v) in dst.iter_mut().zip(&acc_r[..w]) {
                            *o = (v + b).max(0.0);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::values;

    /// `C = sum over terms of A[panels] . B` (then the epilogue), the plan's
    /// items run on `threads` threads.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        isa: Isa,
        terms: &[Term<'_>],
        panels: &[usize],
        n: usize,
        c: &mut [f32],
        ldc: usize,
        epi: Epilogue<'_>,
        threads: usize,
    ) {
        // SAFETY: `c` is borrowed mutably for the call; only the plan's
        // items write it.
        let plan = unsafe {
            Gemm::new(
                isa,
                terms,
                panels,
                n,
                c.as_mut_ptr(),
                c.len(),
                ldc,
                epi,
                threads,
            )
        };
        crate::kernels::team::run(threads, &[(plan.items(), &|i| plan.run_item(i))]);
    }

    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Generic];
        #[cfg(target_arch = "x86_64")]
        {
            if Isa::detect() == Isa::Avx512 {
                v.push(Isa::Avx512);
            }
            if matches!(Isa::detect(), Isa::Avx512 | Isa::Avx2) {
                v.push(Isa::Avx2);
            }
        }
        v
    }

    /// Panels over column ranges, two terms, tails in rows and columns,
    /// both epilogues, one and two threads: against an f64 triple loop.
    #[test]
    fn packed_gemm_matches_naive() {
        let mut cases = 0;
        for mr in [1, 2, 4, 8] {
            for (rows, ka, kb2, n) in [
                (8, 5, 3, 1),
                (19, 40, 7, 49),
                (16, 64, 0, 33),
                (3, 9, 4, 70),
            ] {
                let wa = values(rows * ka, 1 + mr as u64, -1.0, 1.0);
                let wb = values(rows * kb2.max(1), 2, -1.0, 1.0);
                let pa = Panels::pack(&wa, rows, ka, mr);
                let pb = Panels::pack(&wb[..rows * kb2], rows, kb2, mr);
                // Column ranges of A: every other block of 3 (and the tail).
                let segs: Vec<(usize, usize)> =
                    (0..ka).step_by(6).map(|k0| (k0, 3.min(ka - k0))).collect();
                let ksel: usize = segs.iter().map(|s| s.1).sum();
                let ldb = n + 3;
                let ba = values(ksel * ldb, 3, -1.0, 1.0);
                let bb = values(kb2.max(1) * ldb, 4, -1.0, 1.0);
                let full = [(0, kb2)];
                let bias = values(rows, 5, -0.5, 0.5);
                let res_ld = n + 1;
                let res = values(rows * res_ld, 6, -0.5, 0.5);
                // Panels in a shuffled order: C row block i is panel order[i].
                let mut order: Vec<usize> = (0..pa.count()).rev().collect();
                if order.len() > 2 {
                    order.swap(0, 1);
                }
                // Keep a partial panel last (C's row blocks are mr tall).
                if rows % mr != 0 {
                    order.retain(|&q| q != pa.count() - 1);
                    order.push(pa.count() - 1);
                }
                let want = |i: usize, j: usize| -> f64 {
                    let q = order[i / mr];
                    let row = q * mr + i % mr;
                    let mut s = 0.0f64;
                    let mut kk = 0;
                    for &(k0, len) in &segs {
                        for l in 0..len {
                            s += wa[row * ka + k0 + l] as f64 * ba[kk * ldb + j] as f64;
                            kk += 1;
                        }
                    }
                    for l in 0..kb2 {
                        s += wb[row * kb2 + l] as f64 * bb[l * ldb + j] as f64;
                    }
                    s
                };
                let c_rows = (order.len() - 1) * mr + pa.valid(order[order.len() - 1]);
                for isa in isas() {
                    for threads in [1, 2] {
                        for relu in [false, true] {
                            let ldc = n + 2;
                            let mut c = vec![7.0f32; c_rows * ldc];
                            let terms = [
                                Term {
                                    a: &pa,
                                    segs: &segs,
                                    b: &ba,
                                    ldb,
                                },
                                Term {
                                    a: &pb,
                                    segs: &full,
                                    b: &bb,
                                    ldb,
                                },
                            ];
                            let epi = if relu {
                                Epilogue::BiasRelu {
                                    bias: &bias,
                                    residual: Some((&res, res_ld)),
                                }
                            } else {
                                Epilogue::Set
                            };
                            gemm(isa, &terms, &order, n, &mut c, ldc, epi, threads);
                            for i in 0..c_rows {
                                for j in 0..ldc {
                                    let got = c[i * ldc + j] as f64;
                                    if j >= n {
                                        assert_eq!(got, 7.0, "padding column touched");
                                        continue;
                                    }
                                    let mut w = want(i, j);
                                    if relu {
                                        w = (w + bias[i] as f64 + res[i * res_ld + j] as f64)
                                            .max(0.0);
                                    }
                                    assert!(
                                        (got - w).abs() < 1e-4 * (1.0 + w.abs()),
                                        "mr {mr} rows {rows} n {n} {isa:?} t{threads}: \
                                         ({i}, {j}) {got} vs {w}"
                                    );
                                }
                            }
                            cases += 1;
                        }
                    }
                }
            }
        }
        assert!(cases >= 64, "{cases} cases");
    }

    /// `select_rows` and `unpack` give back the rows and columns of the
    /// row-major matrix that was packed.
    #[test]
    fn select_and_unpack_match_the_matrix() {
        let (rows, cols) = (13, 11);
        let w = values(rows * cols, 9, -1.0, 1.0);
        let at = |r: usize, c: usize| w[r * cols + c];
        for mr in [1, 2, 4, 8] {
            let p = Panels::pack(&w, rows, cols, mr);
            let mut out = Vec::new();
            p.unpack(None, &[(0, cols)], &mut out);
            assert_eq!(out, w, "mr {mr}: full unpack");
            let pick = [12, 0, 5, 6, 7];
            let segs = [(1, 3), (7, 4)];
            p.unpack(Some(&pick), &segs, &mut out);
            let want: Vec<f32> = pick
                .iter()
                .flat_map(|&r| (1..4).chain(7..11).map(move |c| at(r, c)))
                .collect();
            assert_eq!(out, want, "mr {mr}: rows {pick:?}, columns {segs:?}");
            let mut sel = Panels::default();
            p.select_rows(&pick, 8, &mut sel);
            assert_eq!((sel.count(), sel.valid(0)), (1, 5));
            sel.unpack(None, &[(0, cols)], &mut out);
            let want: Vec<f32> = pick
                .iter()
                .flat_map(|&r| (0..cols).map(move |c| at(r, c)))
                .collect();
            assert_eq!(out, want, "mr {mr}: select_rows");
        }
    }

    #[test]
    fn path_mr_divides_d() {
        for d in 1..40 {
            let m = path_mr(d);
            assert_eq!(d % m, 0);
            assert!(m <= 8);
            if d % 8 == 0 {
                assert_eq!(m, 8);
            }
        }
    }
}
