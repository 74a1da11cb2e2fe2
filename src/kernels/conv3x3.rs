//! The per-path part of a block (reduce epilogue, grouped 3x3, its epilogue)
//! and the block's output epilogue, compiled for AVX-512, AVX2+FMA and
//! baseline x86-64 and picked at run time.
//!
//! The 3x3 (padding 1, stride s) of one path reads its `d` input channels
//! from zero-padded "phase planes": the padded map (H+2)x(W+2) split into
//! s*s planes by row and column parity (plane (py, px) holds padded pixels
//! (r*s+py, q*s+px)). Tap (dy, dx) of output (y, x) is then pixel
//! (y + dy/s, x + dx/s) of plane (dy%s, dx%s), so over the flattened plane
//! every tap is one contiguous shifted read. Outputs are computed on a grid
//! of the planes' width (the last columns of each row are junk, dropped by
//! the epilogue), in tiles of 4 output channels x [`CH`] positions held in
//! registers across all `9*d` taps: one load per 4 FMAs.

/// Positions per register tile of the 3x3 kernel (2 AVX-512 vectors); small
/// maps use half tiles, so that rounding the grid up wastes less.
pub(crate) const CH: usize = 32;

pub(crate) use crate::fused::isa::{Isa, madd, multiversion};

/// Shapes of one block's 3x3 stage for an input map of H x W and stride s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geom {
    pub h: usize,
    pub w: usize,
    pub s: usize,
    /// Output map.
    pub h2: usize,
    pub w2: usize,
    /// Phase plane size.
    pub hq: usize,
    pub wq: usize,
    /// Tile width of the 3x3 kernel: [`CH`] or `CH / 2`.
    pub tw: usize,
    /// Output grid length per channel: h2 * wq rounded up to `tw`.
    pub lr: usize,
}

impl Geom {
    pub fn new(h: usize, w: usize, s: usize) -> Geom {
        let (hp, wp) = (h + 2, w + 2);
        let (hq, wq) = (hp.div_ceil(s), wp.div_ceil(s));
        let (h2, w2) = ((h - 1) / s + 1, (w - 1) / s + 1);
        let tw = if h2 * wq <= 5 * CH { CH / 2 } else { CH };
        Geom {
            h,
            w,
            s,
            h2,
            w2,
            hq,
            wq,
            tw,
            lr: (h2 * wq).div_ceil(tw) * tw,
        }
    }

    fn plane_len(&self) -> usize {
        self.hq * self.wq
    }

    /// All s*s planes of one channel.
    fn chan_len(&self) -> usize {
        self.s * self.s * self.plane_len()
    }

    /// Plane buffer of one path: its d channels, then slack for the junk
    /// positions of the last tile (read, never used).
    pub fn path_planes(&self, d: usize) -> usize {
        d * self.chan_len() + CH + 2 * self.wq + 2
    }

    /// Output grid buffer of one path.
    pub fn path_grid(&self, d: usize) -> usize {
        d * self.lr
    }
}

/// One path of one sample: its reduce output and its (BN-folded) weights.
pub(crate) struct PathJob<'a> {
    /// Reduce output before bias, `d` rows of H*W.
    pub src: &'a [f32],
    /// BN shift after the reduce, `d`.
    pub bias1: &'a [f32],
    /// 3x3 weights [d_out, d_in, 9], BN scale folded.
    pub w: &'a [f32],
    /// BN shift after the 3x3, `d`.
    pub bias2: &'a [f32],
    /// Gate value of the path.
    pub gate: f32,
    pub d: usize,
    pub geom: Geom,
}

/// Writes relu(src + bias) zero-padded into the phase planes of each channel.
#[inline(always)]
fn fill_planes(job: &PathJob<'_>, planes: &mut [f32]) {
    let g = job.geom;
    let (h, w, s, wq) = (g.h, g.w, g.s, g.wq);
    let (plane_len, chan_len) = (g.plane_len(), g.chan_len());
    for c in 0..job.d {
        let src = &job.src[c * h * w..(c + 1) * h * w];
        let b = job.bias1[c];
        for py in 0..s {
            for px in 0..s {
                let start = c * chan_len + (py * s + px) * plane_len;
                let plane = &mut planes[start..start + plane_len];
                for (r, row) in plane.chunks_exact_mut(wq).enumerate() {
                    // Padded row r*s+py is input row r*s+py-1.
                    let yy = r * s + py;
                    if yy == 0 || yy > h {
                        row.fill(0.0);
                        continue;
                    }
                    let srow = &src[(yy - 1) * w..yy * w];
                    if s == 1 {
                        // wq = w + 2: [0, relu(row + b), 0], vectorised.
                        row[0] = 0.0;
                        row[w + 1] = 0.0;
                        for (o, &v) in row[1..w + 1].iter_mut().zip(srow) {
                            *o = (v + b).max(0.0);
                        }
                    } else {
                        // Padded column q*s+px is input column q*s+px-1:
                        // inside for q in lo..hi, zero padding around.
                        let lo = usize::from(px == 0);
                        let hi = if px > w {
                            lo
                        } else {
                            ((w - px) / s + 1).min(wq)
                        };
                        row[..lo].fill(0.0);
                        row[hi.max(lo)..].fill(0.0);
                        if hi > lo {
                            let first = lo * s + px - 1;
                            let src = &srow[first..first + (hi - lo - 1) * s + 1];
                            if s == 2 {
                                strided_relu::<2>(src, b, &mut row[lo..hi]);
                            } else {
                                for (i, o) in row[lo..hi].iter_mut().enumerate() {
                                    *o = (src[i * s] + b).max(0.0);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `out[i] = relu(src[i * S] + b)`; `src` holds `(out.len() - 1) * S + 1`
/// values. A compile-time stride lets the loop vectorise.
#[inline(always)]
fn strided_relu<const S: usize>(src: &[f32], b: f32, out: &mut [f32]) {
    let n = out.len();
    if n == 0 || src.len() < (n - 1) * S + 1 {
        return;
    }
    let (body, last) = out.split_at_mut(n - 1);
    for (o, c) in body.iter_mut().zip(src.chunks_exact(S)) {
        *o = (c[0] + b).max(0.0);
    }
    last[0] = (src[(n - 1) * S] + b).max(0.0);
}

/// OB output channels x T grid positions starting at `j0`, accumulated in
/// registers over every input channel and tap.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile<const OB: usize, const T: usize, const FMA: bool>(
    planes: &[f32],
    w: &[f32],
    d: usize,
    o0: usize,
    taps: &[usize; 9],
    chan_len: usize,
    j0: usize,
    out: &mut [[f32; T]; OB],
) {
    let mut acc = [[0.0f32; T]; OB];
    for i in 0..d {
        let mut wt = [[0.0f32; 9]; OB];
        for (ob, wrow) in wt.iter_mut().enumerate() {
            let at = ((o0 + ob) * d + i) * 9;
            wrow.copy_from_slice(&w[at..at + 9]);
        }
        let base = i * chan_len + j0;
        for (t, &off) in taps.iter().enumerate() {
            let src = &planes[base + off..base + off + T];
            for ob in 0..OB {
                let wv = wt[ob][t];
                for x in 0..T {
                    acc[ob][x] = madd::<FMA>(wv, src[x], acc[ob][x]);
                }
            }
        }
    }
    *out = acc;
}

#[inline(always)]
fn conv_path<const FMA: bool>(job: &PathJob<'_>, planes: &[f32], grid: &mut [f32]) {
    if job.geom.tw == CH {
        conv_tiles::<CH, FMA>(job, planes, grid);
    } else {
        conv_tiles::<{ CH / 2 }, FMA>(job, planes, grid);
    }
}

#[inline(always)]
fn conv_tiles<const T: usize, const FMA: bool>(
    job: &PathJob<'_>,
    planes: &[f32],
    grid: &mut [f32],
) {
    let g = job.geom;
    let (s, wq, lr, d) = (g.s, g.wq, g.lr, job.d);
    let plane_len = g.plane_len();
    let mut taps = [0usize; 9];
    for (t, off) in taps.iter_mut().enumerate() {
        let (dy, dx) = (t / 3, t % 3);
        *off = ((dy % s) * s + dx % s) * plane_len + (dy / s) * wq + dx / s;
    }
    let chan_len = g.chan_len();
    let mut o0 = 0;
    while o0 + 4 <= d {
        for j0 in (0..lr).step_by(T) {
            let mut acc = [[0.0f32; T]; 4];
            tile::<4, T, FMA>(planes, job.w, d, o0, &taps, chan_len, j0, &mut acc);
            for (ob, a) in acc.iter().enumerate() {
                let at = (o0 + ob) * lr + j0;
                grid[at..at + T].copy_from_slice(a);
            }
        }
        o0 += 4;
    }
    while o0 < d {
        for j0 in (0..lr).step_by(T) {
            let mut acc = [[0.0f32; T]; 1];
            tile::<1, T, FMA>(planes, job.w, d, o0, &taps, chan_len, j0, &mut acc);
            let at = o0 * lr + j0;
            grid[at..at + T].copy_from_slice(&acc[0]);
        }
        o0 += 1;
    }
}

/// out = gate * relu(grid + bias2), dropping the grid's junk columns.
#[inline(always)]
fn finish_path(job: &PathJob<'_>, grid: &[f32], out: &mut [f32]) {
    let g = job.geom;
    let (h2, w2, wq, lr) = (g.h2, g.w2, g.wq, g.lr);
    for c in 0..job.d {
        let b = job.bias2[c];
        let gate = job.gate;
        for y in 0..h2 {
            let src = &grid[c * lr + y * wq..c * lr + y * wq + w2];
            let at = (c * h2 + y) * w2;
            for (o, &v) in out[at..at + w2].iter_mut().zip(src) {
                *o = gate * (v + b).max(0.0);
            }
        }
    }
}

#[inline(always)]
fn path_impl<const FMA: bool>(
    job: &PathJob<'_>,
    planes: &mut [f32],
    grid: &mut [f32],
    out: &mut [f32],
) {
    fill_planes(job, planes);
    conv_path::<FMA>(job, planes, grid);
    finish_path(job, grid, out);
}

multiversion! {
    /// One path: relu(reduce + bias1) -> padded phase planes -> 3x3 ->
    /// gate * relu(. + bias2) into `out` (d rows of h2*w2). `planes` and
    /// `grid` are scratch of [`Geom::path_planes`] and [`Geom::path_grid`].
    pub(crate) fn run_path => path_impl(
        job: &PathJob<'_>,
        planes: &mut [f32],
        grid: &mut [f32],
        out: &mut [f32],
    )
}

/// The block's output epilogue on a tile: row r (a channel) of the output
/// becomes `relu(src[r] + bias[r] + residual[r])` over `cols` values, with
/// `src` the output itself when `None` (in place). Slices start at the
/// tile's first value; the `usize`s are row strides.
pub(crate) struct OutTile<'a> {
    pub src: Option<(&'a [f32], usize)>,
    pub residual: Option<(&'a [f32], usize)>,
    pub bias: &'a [f32],
    pub cols: usize,
}

#[inline(always)]
fn finish_out_impl<const FMA: bool>(t: &OutTile<'_>, out: &mut [f32], out_rs: usize) {
    let cols = t.cols;
    for (r, &b) in t.bias.iter().enumerate() {
        let o = &mut out[r * out_rs..r * out_rs + cols];
        match (t.src, t.residual) {
            (Some((s, srs)), Some((x, xrs))) => {
                let (s, x) = (&s[r * srs..r * srs + cols], &x[r * xrs..r * xrs + cols]);
                for ((o, &s), &x) in o.iter_mut().zip(s).zip(x) {
                    *o = (s + x + b).max(0.0);
                }
            }
            (Some((s, srs)), None) => {
                for (o, &s) in o.iter_mut().zip(&s[r * srs..r * srs + cols]) {
                    *o = (s + b).max(0.0);
                }
            }
            (None, Some((x, xrs))) => {
                for (o, &x) in o.iter_mut().zip(&x[r * xrs..r * xrs + cols]) {
                    *o = (*o + x + b).max(0.0);
                }
            }
            (None, None) => {
                for o in o.iter_mut() {
                    *o = (*o + b).max(0.0);
                }
            }
        }
    }
}

multiversion! {
    /// Applies an [`OutTile`] epilogue to `out` (row stride `out_rs`).
    pub(crate) fn finish_out => finish_out_impl(t: &OutTile<'_>, out: &mut [f32], out_rs: usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct 3x3 on one path against a naive loop, every ISA this CPU has.
    #[test]
    fn path_matches_naive_conv() {
        for (h, w, s, d) in [
            (5, 6, 1, 4),
            (7, 5, 2, 4),
            (4, 4, 2, 1),
            (3, 9, 3, 5),
            (16, 16, 2, 4),
            (28, 28, 1, 8),
            (1, 1, 2, 2),
        ] {
            let src: Vec<f32> = (0..d * h * w)
                .map(|i| ((i * 37 % 11) as f32) - 5.0)
                .collect();
            let wts: Vec<f32> = (0..d * d * 9)
                .map(|i| ((i * 13 % 7) as f32) * 0.1 - 0.3)
                .collect();
            let b1: Vec<f32> = (0..d).map(|c| c as f32 * 0.5 - 1.0).collect();
            let b2: Vec<f32> = (0..d).map(|c| 0.25 - c as f32 * 0.1).collect();
            let g = Geom::new(h, w, s);
            let job = PathJob {
                src: &src,
                bias1: &b1,
                w: &wts,
                bias2: &b2,
                gate: 0.7,
                d,
                geom: g,
            };
            // Naive reference.
            let act = |c: usize, y: isize, x: isize| -> f32 {
                if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
                    0.0
                } else {
                    (src[(c * h + y as usize) * w + x as usize] + b1[c]).max(0.0)
                }
            };
            let mut want = vec![0.0f32; d * g.h2 * g.w2];
            for o in 0..d {
                for y in 0..g.h2 {
                    for x in 0..g.w2 {
                        let mut acc = 0.0;
                        for i in 0..d {
                            for t in 0..9 {
                                let (yy, xx) =
                                    ((y * s + t / 3) as isize - 1, (x * s + t % 3) as isize - 1);
                                acc += wts[(o * d + i) * 9 + t] * act(i, yy, xx);
                            }
                        }
                        want[(o * g.h2 + y) * g.w2 + x] = 0.7 * (acc + b2[o]).max(0.0);
                    }
                }
            }
            let mut isas = vec![Isa::Generic, Isa::detect()];
            isas.dedup();
            for isa in isas {
                let mut planes = vec![f32::NAN; g.path_planes(d)];
                let mut grid = vec![0.0; g.path_grid(d)];
                let mut out = vec![0.0; d * g.h2 * g.w2];
                run_path(isa, &job, &mut planes, &mut grid, &mut out);
                for (a, b) in out.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{isa:?} {h}x{w} s{s} d{d}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
