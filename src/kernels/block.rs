//! [`PackedBottleneck`]: one eval-mode bottleneck block on host slices.

use std::cell::RefCell;
use std::sync::OnceLock;
use std::time::Instant;

use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;
use serde::Serialize;

use super::conv3x3::{Geom, Isa, OutTile, PathJob, finish_out, run_path};
use super::pgemm::{Epilogue, Gemm, Panels, Term, path_mr, split_items};
use super::team::{self, Phase};
use crate::error::{MoeError, Result as MoeResult};
use crate::fused::matmul::{View, sgemm, sgemm_ptr};
use crate::moe::block::bn_affine;
use crate::moe::{Bottleneck, Gates};

/// Host copy of a tensor's values as f32.
pub(crate) fn host_vec<const D: usize>(t: Tensor<D>, what: &str) -> MoeResult<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| MoeError::config(what, format!("cannot read values: {e:?}")))
}

/// A [`Bottleneck`] packed for the fast eval-mode CPU path: weights on the
/// host with every BN (running statistics) folded in.
#[derive(Debug, Clone)]
pub struct PackedBottleneck {
    cin: usize,
    cout: usize,
    paths: usize,
    d: usize,
    stride: usize,
    /// Reduce weight [P*d, C_in], rows scaled by BN1's scale, in panels
    /// that never straddle two paths.
    w1: Panels,
    /// BN1 shift [P*d].
    b1: Vec<f32>,
    /// Grouped 3x3 weight [P*d, d, 9], rows scaled by BN2's scale.
    w2: Vec<f32>,
    /// BN2 shift [P*d].
    b2: Vec<f32>,
    /// Expand weight [C_out, P*d], rows scaled by BN3's scale, in panels of
    /// 8 output channels (a path is a column range of each).
    w3: Panels,
    /// Projection shortcut [C_out, C_in], rows scaled by its BN's scale,
    /// panels like `w3`'s.
    wsc: Option<Panels>,
    /// BN3 shift plus the shortcut BN's shift [C_out].
    bout: Vec<f32>,
    /// Every panel of `w3`, in order (the expand's panel list).
    w3_panels: Vec<usize>,
    /// `wsc` row-major for the `gemm` crate, made on the first call on a
    /// wide output map (it does not depend on the selection).
    wsc_rows: OnceLock<Vec<f32>>,
}

/// Where a block's wall time goes, phase by phase, milliseconds summed over
/// the samples ([`PackedBottleneck::profile`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct BlockProfile {
    /// Reduce 1x1 GEMM (the selected paths' panels), with the choice of
    /// panels and column ranges and any weight copies before it.
    pub reduce: f64,
    /// Per path: bias + ReLU into padded planes, 3x3, bias + ReLU + gate.
    pub conv3x3: f64,
    /// Strided copy of the input for a stride-2 projection shortcut.
    pub shortcut: f64,
    /// Expand 1x1 GEMM (and the projection shortcut's) with the output
    /// bias, residual and ReLU applied as each tile is stored.
    pub expand: f64,
}

impl BlockProfile {
    /// Sum of the phases.
    pub fn total(&self) -> f64 {
        self.reduce + self.conv3x3 + self.shortcut + self.expand
    }
}

/// Adds the time since `t0` to `slot` (when profiling) and restarts `t0`.
fn lap(
    prof: &mut Option<&mut BlockProfile>,
    t0: &mut Instant,
    slot: fn(&mut BlockProfile) -> &mut f64,
) {
    if let Some(p) = prof.as_deref_mut() {
        let now = Instant::now();
        *slot(p) += (now - *t0).as_secs_f64() * 1e3;
        *t0 = now;
    }
}

/// Per-thread buffers, grown to the largest block seen and reused.
#[derive(Default)]
struct Scratch {
    sel: Vec<usize>,
    panels: Vec<usize>,
    segs: Vec<(usize, usize)>,
    rows: Vec<usize>,
    w1_panels: Panels,
    w1_sel: Vec<f32>,
    /// Row-major selected expand columns on wide maps.
    w3_sel: Vec<f32>,
    hid: Vec<f32>,
    planes: Vec<f32>,
    grid: Vec<f32>,
    h2: Vec<f32>,
    xs: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch (a fresh one if it is already in use,
/// e.g. when rayon runs a nested task on a thread that holds it).
fn with_scratch<T>(f: impl FnOnce(&mut Scratch) -> T) -> T {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut sc) => f(&mut sc),
        Err(_) => f(&mut Scratch::default()),
    })
}

/// The first `len` values of a grow-only buffer.
fn buf(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// How a batch is spread over threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// One sample per task, everything inside single-threaded.
    PerSample,
    /// Samples in order, each split over threads (GEMMs and paths).
    Intra,
}

/// From this many positions per map on, the 1x1 convolutions copy the
/// selected paths' weights out of the panels (row-major) and multiply with
/// the `gemm` crate: the copy is then under 1/512 of the product's work, and
/// on such wide maps `gemm` ran the products 20-50% faster than the panel
/// kernel (the whole block: 6.6 against 10.4 ms for `ref-256x28` at batch
/// 32, k = 8). Narrower maps (the deep stages, where the weights outweigh
/// the activations and a copy of them costs up to a third of the time) use
/// the panels where they lie.
const WIDE_MAP: usize = 512;

/// Below this many multiply-adds per sample a batch smaller than the thread
/// count still runs one sample per thread (see [`Mode`]). With the spinning
/// team a split pays from about 1 M on (`ref-256x28` at batch 1, k = 8,
/// 14 M: 0.29 ms on one thread, 0.20 on two; `clevr-conv3` at batch 1,
/// k = 3, 1.5 M: efficiency 0.54-0.57 against its dense block split over
/// both threads at a 2 M threshold, 0.79-0.96 at 1 M); at 512 K the 0.3 M
/// `clevr-conv4` k = 3 block lost (0.92 -> 0.56). With rayon's joins it
/// took 16 M.
const INTRA_MIN_MACS: usize = 1 << 20;

/// Validated per-call selection: the gate row and the paths of each sample.
type Selection<'a> = Option<(&'a [f32], &'a [Vec<usize>])>;

impl PackedBottleneck {
    /// Packs a block (eval-mode BN from its running statistics).
    pub fn from_block(block: &Bottleneck) -> MoeResult<PackedBottleneck> {
        let (cin, cout, p, d, s) = (
            block.in_channels(),
            block.out_channels(),
            block.paths(),
            block.path_width(),
            block.stride(),
        );
        let inner = p * d;
        let w1 = host_vec(block.reduce.weight.val(), "block reduce weight")?;
        let w2 = host_vec(block.conv.weight.val(), "block 3x3 weight")?;
        let w3 = host_vec(block.expand.weight.val(), "block expand weight")?;
        let affine = |bn, what: &str| -> MoeResult<(Vec<f32>, Vec<f32>)> {
            let (sc, sh) = bn_affine(bn);
            Ok((host_vec(sc, what)?, host_vec(sh, what)?))
        };
        let (s1, b1) = affine(&block.bn_reduce, "block reduce BN")?;
        let (s2, b2) = affine(&block.bn_conv, "block 3x3 BN")?;
        let (s3, b3) = affine(&block.bn_expand, "block expand BN")?;
        let sizes_ok = w1.len() == inner * cin
            && w2.len() == inner * d * 9
            && w3.len() == cout * inner
            && s1.len() == inner
            && s2.len() == inner
            && s3.len() == cout;
        if !sizes_ok {
            return Err(MoeError::shape(
                "packed block weights",
                format!(
                    "reduce [{inner}, {cin}], 3x3 [{inner}, {d}, 3, 3], expand [{cout}, {inner}]"
                ),
                format!("{} / {} / {} values", w1.len(), w2.len(), w3.len()),
            ));
        }
        let w1: Vec<f32> = w1
            .chunks_exact(cin)
            .zip(&s1)
            .flat_map(|(row, &sc)| row.iter().map(move |v| v * sc))
            .collect();
        let w1 = Panels::pack(&w1, inner, cin, path_mr(d));
        let w2: Vec<f32> = w2
            .chunks_exact(d * 9)
            .zip(&s2)
            .flat_map(|(row, &sc)| row.iter().map(move |v| v * sc))
            .collect();
        let w3: Vec<f32> = w3
            .chunks_exact(inner)
            .zip(&s3)
            .flat_map(|(row, &sc)| row.iter().map(move |v| v * sc))
            .collect();
        let w3 = Panels::pack(&w3, cout, inner, 8);
        let (wsc, bout) = match &block.shortcut {
            Some(sc) => {
                let w = host_vec(sc.conv.weight.val(), "block shortcut weight")?;
                let (ss, bs) = affine(&sc.bn, "block shortcut BN")?;
                if w.len() != cout * cin || ss.len() != cout {
                    return Err(MoeError::shape(
                        "packed block shortcut",
                        format!("[{cout}, {cin}, 1, 1]"),
                        format!("{} values", w.len()),
                    ));
                }
                let w: Vec<f32> = w
                    .chunks_exact(cin)
                    .zip(&ss)
                    .flat_map(|(row, &sc)| row.iter().map(move |v| v * sc))
                    .collect();
                let w = Panels::pack(&w, cout, cin, 8);
                let bout = b3.iter().zip(&bs).map(|(a, b)| a + b).collect();
                (Some(w), bout)
            }
            None if s != 1 || cin != cout => {
                return Err(MoeError::shape(
                    "packed block shortcut",
                    "a projection shortcut when the stride or the width changes",
                    "none",
                ));
            }
            None => (None, b3),
        };
        Ok(PackedBottleneck {
            cin,
            cout,
            paths: p,
            d,
            stride: s,
            w1,
            b1,
            w2,
            b2,
            w3_panels: (0..w3.count()).collect(),
            w3,
            wsc,
            bout,
            wsc_rows: OnceLock::new(),
        })
    }

    /// P.
    pub fn paths(&self) -> usize {
        self.paths
    }
    /// d.
    pub fn path_width(&self) -> usize {
        self.d
    }
    /// C_in.
    pub fn in_channels(&self) -> usize {
        self.cin
    }
    /// C_out.
    pub fn out_channels(&self) -> usize {
        self.cout
    }
    /// Stride of the block.
    pub fn stride(&self) -> usize {
        self.stride
    }
    /// Output map size for an input map (H, W) (H, W >= 1).
    pub fn output_hw(&self, h: usize, w: usize) -> (usize, usize) {
        let g = Geom::new(h.max(1), w.max(1), self.stride);
        (g.h2, g.w2)
    }

    /// Eval-mode forward of `x` [N, C_in, H, W] (row-major) into a new
    /// [N, C_out, H', W'] vector.
    ///
    /// `gates`: `Some((g, sel))` with `g` the gate values [N, P] row-major
    /// (only selected entries are read) and `sel[n]` the distinct paths of
    /// sample n (1..=P of them; samples may differ): runs only those paths,
    /// each scaled by its gate, as [`Bottleneck::forward_sparse`] does.
    /// `None`: all paths with weight 1, as `forward_dense(x, None)`.
    pub fn forward(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        gates: Option<(&[f32], &[Vec<usize>])>,
    ) -> MoeResult<Vec<f32>> {
        let (h2, w2) = self.output_hw(h, w);
        let mut out = vec![0.0f32; n * self.cout * h2 * w2];
        self.forward_into(x, n, h, w, gates, &mut out)?;
        Ok(out)
    }

    /// [`Self::forward`] into a caller's buffer of N*C_out*H'*W' values
    /// (reusing one across calls saves the allocation and its page faults).
    pub fn forward_into(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        gates: Option<(&[f32], &[Vec<usize>])>,
        out: &mut [f32],
    ) -> MoeResult<()> {
        self.forward_mode(x, n, h, w, gates, out, None)
    }

    /// Tensor-level convenience: `x` [N, C_in, H, W] and the block's gates
    /// (`None`: the ungated block); the result lands on `x`'s device.
    pub fn forward_tensor(&self, x: Tensor<4>, gates: Option<&Gates>) -> MoeResult<Tensor<4>> {
        let [n, c, h, w] = x.dims();
        if c != self.cin {
            return Err(MoeError::shape(
                "packed block input",
                format!("[N, {}, H, W]", self.cin),
                format!("{:?}", x.dims()),
            ));
        }
        let device = x.device();
        let xv = host_vec(x, "packed block input")?;
        let gv = gates
            .map(|g| host_vec(g.values.clone(), "packed block gates"))
            .transpose()?;
        let sel = match (&gv, gates) {
            (Some(v), Some(g)) => Some((v.as_slice(), g.indices.as_slice())),
            _ => None,
        };
        let out = self.forward(&xv, n, h, w, sel)?;
        let (h2, w2) = self.output_hw(h, w);
        Ok(Tensor::from_data(
            TensorData::new(out, [n, self.cout, h2, w2]),
            &device,
        ))
    }

    fn check(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        gates: Selection<'_>,
        out: &[f32],
    ) -> MoeResult<()> {
        let in_len = n
            .checked_mul(self.cin)
            .and_then(|v| v.checked_mul(h))
            .and_then(|v| v.checked_mul(w));
        if n == 0 || h == 0 || w == 0 || in_len != Some(x.len()) {
            return Err(MoeError::shape(
                "packed block input",
                format!("N*{}*H*W values with N, H, W >= 1", self.cin),
                format!("{} values for N {n}, H {h}, W {w}", x.len()),
            ));
        }
        let (h2, w2) = self.output_hw(h, w);
        if out.len() != n * self.cout * h2 * w2 {
            return Err(MoeError::shape(
                "packed block output buffer",
                format!("{} values", n * self.cout * h2 * w2),
                format!("{}", out.len()),
            ));
        }
        if let Some((g, sel)) = gates {
            let p = self.paths;
            if g.len() != n * p || sel.len() != n {
                return Err(MoeError::shape(
                    "packed block gates",
                    format!("[{n}, {p}] values and {n} selections"),
                    format!("{} values and {} selections", g.len(), sel.len()),
                ));
            }
            for (s, paths) in sel.iter().enumerate() {
                let mut seen = vec![false; p];
                let ok = !paths.is_empty()
                    && paths
                        .iter()
                        .all(|&i| i < p && !std::mem::replace(&mut seen[i], true));
                if !ok {
                    return Err(MoeError::shape(
                        format!("packed block selected paths of sample {s}"),
                        format!("1 to {p} distinct path indices below {p}"),
                        format!("{paths:?}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Multiply-adds of one sample running `k` paths.
    fn sample_macs(&self, g: Geom, k: usize) -> usize {
        let (hw, hw2, kd) = (g.h * g.w, g.h2 * g.w2, k * self.d);
        let short = if self.wsc.is_some() {
            self.cin * self.cout * hw2
        } else {
            0
        };
        kd * (self.cin * hw + 9 * self.d * hw2 + self.cout * hw2) + short
    }

    /// Forward with an explicit threading mode (`None`: by batch size and
    /// work per sample).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_mode(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        gates: Selection<'_>,
        out: &mut [f32],
        mode: Option<Mode>,
    ) -> MoeResult<()> {
        self.check(x, n, h, w, gates, out)?;
        let geom = Geom::new(h, w, self.stride);
        let (in_len, out_len) = (self.cin * h * w, self.cout * geom.h2 * geom.w2);
        let threads = rayon::current_num_threads().max(1);
        let mode = mode.unwrap_or_else(|| {
            // Splitting one sample over threads costs a wake-up (unless a
            // helper lingers) and a spin barrier per phase: worth it from
            // a few tens of microseconds of work.
            let k = gates.map_or(self.paths, |(_, sel)| {
                sel.iter().map(Vec::len).max().unwrap_or(0)
            });
            if n >= threads || self.sample_macs(geom, k) < INTRA_MIN_MACS {
                Mode::PerSample
            } else {
                Mode::Intra
            }
        });
        let isa = Isa::detect();
        let p = self.paths;
        let sample = |s: usize, x_s: &[f32], out_s: &mut [f32], sc: &mut Scratch, t: usize| {
            let (row, sel) = match gates {
                Some((g, sel)) => (Some(&g[s * p..(s + 1) * p]), Some(sel[s].as_slice())),
                None => (None, None),
            };
            self.run_sample(isa, x_s, geom, sel, row, out_s, sc, t, None);
        };
        match mode {
            Mode::PerSample => out
                .par_chunks_mut(out_len)
                .zip(x.par_chunks(in_len))
                .enumerate()
                .for_each(|(s, (out_s, x_s))| with_scratch(|sc| sample(s, x_s, out_s, sc, 1))),
            Mode::Intra => {
                for (s, (out_s, x_s)) in out.chunks_mut(out_len).zip(x.chunks(in_len)).enumerate() {
                    with_scratch(|sc| sample(s, x_s, out_s, sc, threads));
                }
            }
        }
        Ok(())
    }

    /// [`Self::forward_into`] sample after sample, each split over `threads`
    /// threads (1: the calling thread alone), returning where the wall time
    /// went (phase by phase, summed over the samples).
    #[allow(clippy::too_many_arguments)]
    pub fn profile(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        gates: Option<(&[f32], &[Vec<usize>])>,
        out: &mut [f32],
        threads: usize,
    ) -> MoeResult<BlockProfile> {
        let geom = Geom::new(h, w, self.stride);
        self.check(x, n, h, w, gates, out)?;
        let (in_len, out_len) = (self.cin * h * w, self.cout * geom.h2 * geom.w2);
        let isa = Isa::detect();
        let mut prof = BlockProfile::default();
        with_scratch(|sc| {
            for (s, (out_s, x_s)) in out.chunks_mut(out_len).zip(x.chunks(in_len)).enumerate() {
                let (row, sel) = match gates {
                    Some((g, sel)) => (
                        Some(&g[s * self.paths..(s + 1) * self.paths]),
                        Some(sel[s].as_slice()),
                    ),
                    None => (None, None),
                };
                self.run_sample(
                    isa,
                    x_s,
                    geom,
                    sel,
                    row,
                    out_s,
                    sc,
                    threads.max(1),
                    Some(&mut prof),
                );
            }
        });
        Ok(prof)
    }

    /// One sample: `sel` the selected paths (None: all), `gate_row` its P
    /// gate values (None: weight 1); `threads > 1` splits the work inside.
    ///
    /// Four phases, each cut into items for [`team::run`]: the stride-2
    /// shortcut's subsample; the reduce (by columns, or by panels of the
    /// selected paths); the 3x3 (one item per path); the expand with the
    /// block's output epilogue (by panels or columns, or on a wide map by
    /// blocks of channels). Items write disjoint parts of the buffers,
    /// through raw pointers, since they may run on any thread.
    #[allow(clippy::too_many_arguments)]
    fn run_sample(
        &self,
        isa: Isa,
        x_s: &[f32],
        geom: Geom,
        sel: Option<&[usize]>,
        gate_row: Option<&[f32]>,
        out_s: &mut [f32],
        sc: &mut Scratch,
        threads: usize,
        mut prof: Option<&mut BlockProfile>,
    ) {
        let mut t0 = Instant::now();
        let (cin, cout, d, p) = (self.cin, self.cout, self.d, self.paths);
        let (hw, hw2) = (geom.h * geom.w, geom.h2 * geom.w2);
        let Scratch {
            sel: order,
            panels: panel_list,
            segs,
            rows: row_list,
            w1_panels,
            w1_sel,
            w3_sel,
            hid,
            planes,
            grid,
            h2,
            xs,
        } = sc;
        // Ascending paths: the weights are read in memory order.
        order.clear();
        match sel {
            Some(sel) => order.extend_from_slice(sel),
            None => order.extend(0..p),
        }
        order.sort_unstable();
        let order: &[usize] = order;
        let (k, kd) = (order.len(), order.len() * d);
        let whole = [(0, cin)];
        let (wide_in, wide_out) = (hw >= WIDE_MAP, hw2 >= WIDE_MAP);

        // The reduce's weights: the selected paths' panels where they lie;
        // on a wide map a row-major copy of their rows for `gemm`; for paths
        // narrower than a panel (d not a multiple of 8) a copy in full
        // panels (4-row tiles ran 30% slower; such weights are small).
        row_list.clear();
        if wide_in || self.w1.mr() != 8 {
            row_list.extend(order.iter().flat_map(|&path| path * d..(path + 1) * d));
        }
        panel_list.clear();
        let w1 = if wide_in {
            self.w1.unpack(Some(row_list), &whole, w1_sel);
            &self.w1
        } else if self.w1.mr() == 8 {
            let per_path = d / 8;
            panel_list.extend(
                order
                    .iter()
                    .flat_map(|&path| path * per_path..(path + 1) * per_path),
            );
            &self.w1
        } else {
            self.w1.select_rows(row_list, 8, w1_panels);
            panel_list.extend(0..w1_panels.count());
            &*w1_panels
        };
        // The expand's: the selected paths are column ranges of every panel
        // (consecutive paths merged into one range), h2's rows in order; on
        // a wide map a row-major copy of those columns (and of the
        // shortcut's weight).
        segs.clear();
        for &path in order {
            match segs.last_mut() {
                Some((k0, len)) if *k0 + *len == path * d => *len += d,
                _ => segs.push((path * d, d)),
            }
        }
        let segs: &[(usize, usize)] = segs;
        let mut wsc_sel: &[f32] = &[];
        if wide_out {
            self.w3.unpack(None, segs, w3_sel);
            if let Some(wsc) = &self.wsc {
                wsc_sel = self.wsc_rows.get_or_init(|| {
                    let mut rows = Vec::new();
                    wsc.unpack(None, &whole, &mut rows);
                    rows
                });
            }
        }
        let (w1_sel, w3_sel): (&[f32], &[f32]) = (w1_sel, w3_sel);
        let (panel_list, out_panels): (&[usize], &[usize]) = (panel_list, &self.w3_panels);

        // Buffers, written by the phases' items through these pointers.
        let (pb, gb) = (geom.path_planes(d), geom.path_grid(d));
        let hid = SharedBuf::of(buf(hid, kd * hw));
        let planes = SharedBuf::of(buf(planes, k * pb));
        let grid = SharedBuf::of(buf(grid, k * gb));
        let h2 = SharedBuf::of(buf(h2, kd * hw2));
        let strided = self.wsc.is_some() && geom.s > 1;
        let xs = SharedBuf::of(buf(xs, if strided { cin * hw2 } else { 0 }));
        let out = SharedBuf::of(out_s);

        // Phase 1: the shortcut input [C_in, HW'] as x's stride-s subsample.
        let subsample = |_: usize| {
            // SAFETY: the only item of its phase; nothing reads xs yet.
            let v = unsafe { xs.slice_mut(0, cin * hw2) };
            for c in 0..cin {
                for y in 0..geom.h2 {
                    let src = &x_s[(c * geom.h + y * geom.s) * geom.w..];
                    let dst = &mut v[(c * geom.h2 + y) * geom.w2..][..geom.w2];
                    for (q, o) in dst.iter_mut().enumerate() {
                        *o = src[q * geom.s];
                    }
                }
            }
        };

        // Phase 2: reduce 1x1, hid [kd, HW] = W1[selected paths] . x.
        let reduce_term = [Term {
            a: w1,
            segs: &whole,
            b: x_s,
            ldb: hw,
        }];
        // SAFETY: hid is written only by this plan's items, in phase 2.
        let reduce_plan = (!wide_in).then(|| unsafe {
            Gemm::new(
                isa,
                &reduce_term,
                panel_list,
                hw,
                hid.ptr,
                hid.len,
                hw,
                Epilogue::Set,
                threads,
            )
        });
        // On a wide map: `gemm` on a range of columns per item.
        let cols = hw.div_ceil(threads);
        let reduce_items = reduce_plan.as_ref().map_or(hw.div_ceil(cols), Gemm::items);
        let reduce = |i: usize| match &reduce_plan {
            Some(plan) => plan.run_item(i),
            None => {
                let (j0, n) = (i * cols, cols.min(hw - i * cols));
                let rhs = View::rows(&x_s[j0..], hw);
                // SAFETY: it writes only columns j0..j0 + n of hid's rows,
                // this item's own; j0 < hw <= hid.len.
                unsafe {
                    sgemm_ptr(
                        kd,
                        n,
                        cin,
                        hid.at(j0),
                        hid.len - j0,
                        hw,
                        View::rows(w1_sel, cin),
                        rhs,
                        false,
                        1,
                    )
                };
            }
        };

        // Phase 3, one item per path: bias + ReLU, grouped 3x3, bias +
        // ReLU, gate.
        let conv = |j: usize| {
            let path = order[j];
            let job = PathJob {
                // SAFETY: phase 2 is over; nothing writes hid any more.
                src: unsafe { hid.slice(j * d * hw, d * hw) },
                bias1: &self.b1[path * d..(path + 1) * d],
                w: &self.w2[path * d * d * 9..(path + 1) * d * d * 9],
                bias2: &self.b2[path * d..(path + 1) * d],
                gate: gate_row.map_or(1.0, |g| g[path]),
                d,
                geom,
            };
            // SAFETY: path j's own parts of the three buffers.
            let (pl, gr, o) = unsafe {
                (
                    planes.slice_mut(j * pb, pb),
                    grid.slice_mut(j * gb, gb),
                    h2.slice_mut(j * d * hw2, d * hw2),
                )
            };
            run_path(isa, &job, pl, gr, o);
        };

        // Phase 4: output [C_out, HW'] = relu(W3[:, selected] . h2 (+ Wsc .
        // xs) + bias (+ x)).
        // SAFETY (the slices below): phases 1 and 3 are over; nothing
        // writes h2 or xs any more.
        let shortcut_in = || {
            if strided {
                unsafe { xs.slice(0, cin * hw2) }
            } else {
                x_s
            }
        };
        // On a wide map, blocks of channels: about 256 KiB each (at least 32
        // channels), or a few per thread when splitting a sample.
        let rows = if threads > 1 {
            cout.div_ceil(4 * threads).max(1)
        } else {
            (65536 / hw2).max(32)
        };
        let expand_items = if wide_out {
            cout.div_ceil(rows)
        } else {
            split_items(isa, self.w3.mr(), hw2, out_panels.len(), threads)
        };
        let expand = |i: usize| {
            let h2 = unsafe { h2.slice(0, kd * hw2) };
            if wide_out {
                let c0 = i * rows;
                let m = rows.min(cout - c0);
                // SAFETY: channels c0..c0 + m, this item's own.
                let dst = unsafe { out.slice_mut(c0 * hw2, m * hw2) };
                self.wide_block(
                    isa,
                    x_s,
                    shortcut_in(),
                    h2,
                    (w3_sel, wsc_sel),
                    (kd, hw2),
                    c0,
                    dst,
                );
                return;
            }
            let mut terms = vec![Term {
                a: &self.w3,
                segs,
                b: h2,
                ldb: hw2,
            }];
            if let Some(wsc) = &self.wsc {
                terms.push(Term {
                    a: wsc,
                    segs: &whole,
                    b: shortcut_in(),
                    ldb: hw2,
                });
            }
            let epi = Epilogue::BiasRelu {
                bias: &self.bout,
                residual: self.wsc.is_none().then_some((x_s, hw2)),
            };
            // SAFETY: out is written only by this plan's items (the same
            // cut in every item: the same shapes and thread count).
            let plan = unsafe {
                Gemm::new(
                    isa, &terms, out_panels, hw2, out.ptr, out.len, hw2, epi, threads,
                )
            };
            plan.run_item(i);
        };

        let phases: [Phase<'_>; 4] = [
            (usize::from(strided), &subsample),
            (reduce_items, &reduce),
            (k, &conv),
            (expand_items, &expand),
        ];
        match prof.as_deref_mut() {
            None => team::run(threads, &phases),
            Some(_) => {
                // The selection and weight copies above count as reduce.
                lap(&mut prof, &mut t0, |p| &mut p.reduce);
                let slots: [fn(&mut BlockProfile) -> &mut f64; 4] = [
                    |p| &mut p.shortcut,
                    |p| &mut p.reduce,
                    |p| &mut p.conv3x3,
                    |p| &mut p.expand,
                ];
                for (phase, slot) in phases.iter().zip(slots) {
                    team::run(threads, std::slice::from_ref(phase));
                    lap(&mut prof, &mut t0, slot);
                }
            }
        }
    }

    /// Output channels `c0..` (as many as `dst` holds) on a wide map of
    /// `hw2` positions: the `gemm` crate's products with the row-major
    /// copies `(w3, wsc)` of the selected expand columns (`kd` of them) and
    /// of the shortcut, then bias + residual + ReLU while the block is
    /// still in cache.
    #[allow(clippy::too_many_arguments)]
    fn wide_block(
        &self,
        isa: Isa,
        x_s: &[f32],
        xs: &[f32],
        h2: &[f32],
        (w3, wsc): (&[f32], &[f32]),
        (kd, hw2): (usize, usize),
        c0: usize,
        dst: &mut [f32],
    ) {
        let cin = self.cin;
        let m = dst.len() / hw2;
        let identity = self.wsc.is_none();
        if !identity {
            let lhs = View::rows(&wsc[c0 * cin..], cin);
            sgemm(m, hw2, cin, dst, hw2, lhs, View::rows(xs, hw2), false, 1);
        }
        let lhs = View::rows(&w3[c0 * kd..], kd);
        sgemm(m, hw2, kd, dst, hw2, lhs, View::rows(h2, hw2), !identity, 1);
        let tile = OutTile {
            src: None,
            residual: identity.then(|| (&x_s[c0 * hw2..], hw2)),
            bias: &self.bout[c0..c0 + m],
            cols: hw2,
        };
        finish_out(isa, &tile, dst, hw2);
    }
}

/// A scratch buffer shared by the items of a phase, each writing its own
/// part of it (see [`PackedBottleneck::run_sample`]).
#[derive(Clone, Copy)]
struct SharedBuf {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: items touch disjoint parts (or, in a later phase, only read); see
// the callers of `slice` / `slice_mut`.
unsafe impl Send for SharedBuf {}
unsafe impl Sync for SharedBuf {}

impl SharedBuf {
    fn of(v: &mut [f32]) -> SharedBuf {
        SharedBuf {
            ptr: v.as_mut_ptr(),
            len: v.len(),
        }
    }

    /// The address of value `at` (at most `len`).
    fn at(self, at: usize) -> *mut f32 {
        assert!(at <= self.len, "shared buffer: {at} past {}", self.len);
        self.ptr.wrapping_add(at)
    }

    /// `len` values from `at`.
    /// # Safety
    /// Nobody may write them while the slice lives.
    unsafe fn slice<'a>(self, at: usize, len: usize) -> &'a [f32] {
        assert!(
            at + len <= self.len,
            "shared buffer: {at}+{len} past {}",
            self.len
        );
        // SAFETY: in bounds (asserted); the caller excludes writers.
        unsafe { std::slice::from_raw_parts(self.ptr.add(at), len) }
    }

    /// `len` values from `at`, to write.
    /// # Safety
    /// Nobody else may read or write them while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut<'a>(self, at: usize, len: usize) -> &'a mut [f32] {
        assert!(
            at + len <= self.len,
            "shared buffer: {at}+{len} past {}",
            self.len
        );
        // SAFETY: in bounds (asserted); the caller guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{max_rel_diff, random_gates, random_selection};
    use crate::moe::BottleneckConfig;
    use crate::moe::gate::selection_mask;
    use burn::tensor::{Device, Distribution};

    const TOL: f64 = 1e-4;

    fn tensor(v: Vec<f32>, dims: [usize; 4], device: &Device) -> Tensor<4> {
        Tensor::from_data(TensorData::new(v, dims), device)
    }

    /// Fast dense and sparse equal the Burn reference over a grid of shapes,
    /// in both threading modes, on narrow and wide maps.
    #[test]
    fn fast_block_matches_burn_over_a_grid() {
        let device = Device::default();
        device.seed(5);
        let mut cases = 0;
        for (p, d) in [(4, 1), (4, 4), (8, 1), (8, 4), (32, 1), (32, 4)] {
            let mut ks = vec![1, p / 4, p / 2, p];
            ks.dedup();
            for stride in [1, 2] {
                for (cin, cout) in [(8, 8), (6, 10)] {
                    let block = BottleneckConfig::new(cin, p * d, cout, p)
                        .with_stride(stride)
                        .init(&device)
                        .unwrap()
                        .with_random_batch_norms(&device);
                    let packed = PackedBottleneck::from_block(&block).unwrap();
                    // A small map (the panel kernel on both 1x1s) and, at
                    // batch 1, one of at least WIDE_MAP positions (the copied
                    // weights and `gemm`; at stride 2 its output is narrow
                    // again, so the two paths meet inside one block).
                    for (batch, (h, w)) in
                        [(1, (5 + stride, 7)), (3, (5 + stride, 7)), (1, (24, 23))]
                    {
                        let x = Tensor::<4>::random(
                            [batch, cin, h, w],
                            Distribution::Normal(0.0, 1.0),
                            &device,
                        );
                        let xv = host_vec(x.clone(), "x").unwrap();
                        let (h2, w2) = packed.output_hw(h, w);
                        // One run in a given threading mode, as a tensor.
                        let run = |gates: Selection<'_>, mode| {
                            let mut out = vec![0.0; batch * cout * h2 * w2];
                            packed
                                .forward_mode(&xv, batch, h, w, gates, &mut out, Some(mode))
                                .unwrap();
                            tensor(out, [batch, cout, h2, w2], &device)
                        };
                        for mode in [Mode::PerSample, Mode::Intra] {
                            // Ungated dense.
                            let want = block.forward_dense(x.clone(), None).unwrap();
                            let diff = max_rel_diff(run(None, mode), want);
                            assert!(diff <= TOL, "dense P{p} d{d} s{stride}: {diff}");
                            for &k in &ks {
                                let gates = random_gates(batch, p, &device);
                                let sel = random_selection(batch, p, k, cases as u64 + 1);
                                let gv = host_vec(gates.clone(), "g").unwrap();
                                let want = block
                                    .forward_sparse(x.clone(), gates.clone(), &sel)
                                    .unwrap();
                                let diff = max_rel_diff(run(Some((&gv, &sel)), mode), want);
                                assert!(
                                    diff <= TOL,
                                    "sparse P{p} d{d} k{k} s{stride} C{cin}->{cout} N{batch} {mode:?}: {diff}"
                                );
                                // Dense with masked gates (every path run) equals it too.
                                let masked = gates * selection_mask(&sel, p, &device);
                                let want = block
                                    .forward_dense(x.clone(), Some(masked.clone()))
                                    .unwrap();
                                let mv = host_vec(masked, "m").unwrap();
                                let all: Vec<Vec<usize>> =
                                    (0..batch).map(|_| (0..p).rev().collect()).collect();
                                let diff = max_rel_diff(run(Some((&mv, &all)), mode), want);
                                assert!(diff <= TOL, "masked dense P{p} d{d} k{k}: {diff}");
                                cases += 1;
                            }
                        }
                    }
                }
            }
        }
        assert!(cases >= 100, "grid too small: {cases}");
    }

    #[test]
    fn tensor_api_and_bad_inputs() {
        let device = Device::default();
        device.seed(9);
        let block = BottleneckConfig::new(8, 16, 12, 4)
            .with_stride(2)
            .init(&device)
            .unwrap()
            .with_random_batch_norms(&device);
        let packed = PackedBottleneck::from_block(&block).unwrap();
        let x = Tensor::<4>::random([2, 8, 9, 9], Distribution::Normal(0.0, 1.0), &device);
        let gates = Gates {
            values: random_gates(2, 4, &device),
            indices: vec![vec![3, 1], vec![0, 2]],
        };
        let got = packed.forward_tensor(x.clone(), Some(&gates)).unwrap();
        let want = block
            .forward_sparse(x.clone(), gates.values.clone(), &gates.indices)
            .unwrap();
        assert_eq!(got.dims(), [2, 12, 5, 5]);
        assert!(max_rel_diff(got, want) <= TOL);
        let got = packed.forward_tensor(x.clone(), None).unwrap();
        assert!(max_rel_diff(got, block.forward_dense(x, None).unwrap()) <= TOL);

        let xv = vec![0.0f32; 2 * 8 * 9 * 9];
        let g = vec![0.25f32; 8];
        assert!(
            packed.forward(&xv[1..], 2, 9, 9, None).is_err(),
            "short input"
        );
        assert!(packed.forward(&xv, 2, 0, 9, None).is_err(), "zero height");
        let dup = vec![vec![1, 1], vec![0, 2]];
        assert!(
            packed.forward(&xv, 2, 9, 9, Some((&g, &dup))).is_err(),
            "duplicate path"
        );
        let out_of_range = vec![vec![4], vec![0]];
        assert!(
            packed
                .forward(&xv, 2, 9, 9, Some((&g, &out_of_range)))
                .is_err()
        );
        let empty = vec![vec![], vec![0]];
        assert!(packed.forward(&xv, 2, 9, 9, Some((&g, &empty))).is_err());
        assert!(
            packed
                .forward(&xv, 2, 9, 9, Some((&g[1..], &[vec![0], vec![1]])))
                .is_err()
        );
        let bad = Tensor::<4>::zeros([1, 7, 4, 4], &device);
        assert!(packed.forward_tensor(bad, None).is_err());
    }
}
