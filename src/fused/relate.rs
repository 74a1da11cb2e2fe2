//! Training kernels for the Relation Network's g (Santoro et al. 2017; the
//! paper's section 3.2), forward and backward.
//!
//! Why: g runs on every ordered pair of objects (B * D^2 rows: 40,000 at
//! 75x75 and 262,144 at 128x128 for a batch of 64), so it is most of a
//! training step. On Burn's Flex backend each hidden layer is a matmul at
//! about 109 GFLOP/s on two threads, then separate passes for the bias,
//! the ReLU, their backward and the sum over pairs. Here every layer is
//! one pass over blocks of `BLOCK_ROWS` rows, in parallel, each block a
//! single-threaded `gemm` followed at once by its epilogue while it is in
//! cache:
//!
//! - [`pair_relu`]: `relu(u_i + v_j)` for every pair (g's first layer in its
//!   cheap form, the question term folded into `u`); backward sums the
//!   masked gradient over `j` (for `u`) and over `i` (for `v`);
//! - [`linear_relu`]: `relu(x W + b)`; backward masks the gradient by the
//!   output's sign, then `db` (column sums), `dW = x^T dz` (summed over a
//!   fixed number of runs of blocks, then the runs in order, so the result
//!   never depends on scheduling) and `dx = dz W^T`, block by block;
//! - [`linear_relu_sum`]: the same, summed over consecutive groups of rows
//!   (g's last layer summed over the pairs of a sample), so the summed
//!   output and its broadcast gradient never exist as separate tensors.
//!
//! Each op takes Burn tensors and routes at run time: on the Flex device
//! with autodiff it registers its own backward step (Burn's backend
//! extension API: `try_into_primitive::<Autodiff<Flex>>` and a
//! [`Backward`](burn::backend::autodiff::ops::Backward) implementation), on
//! Flex without autodiff it runs the forward kernel, and on any other
//! device (a GPU) it runs the same maths as plain Burn ops. Equality of
//! values and gradients with those plain ops is tested below.

use burn::nn::Linear;
use burn::tensor::Tensor;
use burn::tensor::activation::relu;
use rayon::prelude::*;

use super::matmul::{View, sgemm};
use super::{Route, relu1, route};

/// Rows per block: a block of `x` and of `dz` (256 columns) is 128 KiB
/// each, so a block's GEMM and epilogue stay in the core's L2.
pub(crate) const BLOCK_ROWS: usize = 128;

/// `y[b, i, j, :] = relu(u[b, i, :] + v[b, j, :])`; `u`, `v` are [b, d, h],
/// `y` is [b, d, d, h].
pub(crate) fn pair_relu_forward(u: &[f32], v: &[f32], b: usize, d: usize, h: usize) -> Vec<f32> {
    assert!(
        u.len() == b * d * h && v.len() == b * d * h,
        "pair_relu: bad sizes"
    );
    let mut y = vec![0.0f32; b * d * d * h];
    if h == 0 || d == 0 {
        return y;
    }
    y.par_chunks_mut(d * h).enumerate().for_each(|(bi, out)| {
        let sample = bi / d;
        let ui = &u[bi * h..(bi + 1) * h];
        let vs = &v[sample * d * h..(sample + 1) * d * h];
        for (o, vj) in out.chunks_exact_mut(h).zip(vs.chunks_exact(h)) {
            for ((o, &a), &c) in o.iter_mut().zip(ui).zip(vj) {
                *o = relu1(a + c);
            }
        }
    });
    y
}

/// Backward of [`pair_relu_forward`] from its output `y` and the gradient
/// `dy` (both [b, d, d, h]): `(du, dv)`, each [b, d, h].
pub(crate) fn pair_relu_backward(
    y: &[f32],
    dy: &[f32],
    b: usize,
    d: usize,
    h: usize,
) -> (Vec<f32>, Vec<f32>) {
    assert!(
        y.len() == b * d * d * h && dy.len() == y.len(),
        "pair_relu: bad sizes"
    );
    let mut du = vec![0.0f32; b * d * h];
    let mut dv = vec![0.0f32; b * d * h];
    if h == 0 || d == 0 {
        return (du, dv);
    }
    let per = d * d * h;
    du.par_chunks_mut(d * h)
        .zip(dv.par_chunks_mut(d * h))
        .enumerate()
        .for_each(|(s, (du, dv))| {
            let ys = &y[s * per..(s + 1) * per];
            let gs = &dy[s * per..(s + 1) * per];
            for (i, dui) in du.chunks_exact_mut(h).enumerate() {
                let yi = &ys[i * d * h..(i + 1) * d * h];
                let gi = &gs[i * d * h..(i + 1) * d * h];
                for ((yr, gr), dvj) in yi
                    .chunks_exact(h)
                    .zip(gi.chunks_exact(h))
                    .zip(dv.chunks_exact_mut(h))
                {
                    for (((&y, &g), du), dv) in yr.iter().zip(gr).zip(dui.iter_mut()).zip(dvj) {
                        let g = if y > 0.0 { g } else { 0.0 };
                        *du += g;
                        *dv += g;
                    }
                }
            }
        });
    (du, dv)
}

/// Shapes of one `relu(x W + b)`: `x` [m, k], `W` [k, n], `b` [n]; with
/// `group = Some(g)` the output is summed over consecutive `g` rows
/// (`m` a multiple of `g`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LinearShape {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub group: Option<usize>,
}

/// `y = relu(x W + b)` ([m, n], kept for the backward mask) and, with a
/// group, its sums over each group's rows ([m / g, n]).
pub(crate) fn linear_relu_forward(
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    s: LinearShape,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let LinearShape { m, k, n, group } = s;
    assert!(
        x.len() == m * k && w.len() == k * n && bias.len() == n,
        "linear_relu: bad sizes"
    );
    let mut y = vec![0.0f32; m * n];
    if n == 0 || m == 0 {
        return (
            y,
            group.map(|g| vec![0.0; m.checked_div(g).unwrap_or(0) * n]),
        );
    }
    // Each block returns its partial sums per group it touches (a block
    // spans at most a few groups); they are added serially below.
    let partials: Vec<Vec<(usize, Vec<f32>)>> = y
        .par_chunks_mut(BLOCK_ROWS * n)
        .enumerate()
        .map(|(bi, yb)| {
            let r0 = bi * BLOCK_ROWS;
            let rows = yb.len() / n;
            sgemm(
                rows,
                n,
                k,
                yb,
                n,
                View::rows(&x[r0 * k..(r0 + rows) * k], k),
                View::rows(w, n),
                false,
                1,
            );
            for row in yb.chunks_exact_mut(n) {
                for (v, &b) in row.iter_mut().zip(bias) {
                    *v = relu1(*v + b);
                }
            }
            let mut parts = Vec::new();
            if let Some(g) = group {
                let mut r = r0;
                while r < r0 + rows {
                    let gi = r / g;
                    let end = ((gi + 1) * g).min(r0 + rows);
                    let mut acc = vec![0.0f32; n];
                    for row in yb[(r - r0) * n..(end - r0) * n].chunks_exact(n) {
                        for (a, &v) in acc.iter_mut().zip(row) {
                            *a += v;
                        }
                    }
                    parts.push((gi, acc));
                    r = end;
                }
            }
            parts
        })
        .collect();
    let sums = group.map(|g| {
        let mut out = vec![0.0f32; (m / g) * n];
        for (gi, acc) in partials.into_iter().flatten() {
            for (o, a) in out[gi * n..(gi + 1) * n].iter_mut().zip(acc) {
                *o += a;
            }
        }
        out
    });
    (y, sums)
}

/// Gradients of one `relu(x W + b)` layer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LinearGrads {
    /// [m, k]; empty when not asked for.
    pub dx: Vec<f32>,
    /// [k, n].
    pub dw: Vec<f32>,
    /// [n].
    pub db: Vec<f32>,
}

/// Backward of [`linear_relu_forward`] from the input `x`, the weight `w`,
/// the output `y` (before any group sum) and the output's gradient `dy`:
/// [m, n], or [m / g, n] with a group (every row of a group gets its
/// group's gradient).
pub(crate) fn linear_relu_backward(
    x: &[f32],
    w: &[f32],
    y: &[f32],
    dy: &[f32],
    s: LinearShape,
    need_dx: bool,
) -> LinearGrads {
    linear_relu_backward_io(x, w, y, s, BackwardIo::Read { dy, need_dx })
}

/// [`linear_relu_backward`] for a square layer without a group (`k == n`),
/// writing `dx` over `dy` (saves allocating and faulting in an [m, k]
/// buffer per layer); the returned `dx` is empty.
pub(crate) fn linear_relu_backward_in_place(
    x: &[f32],
    w: &[f32],
    y: &[f32],
    dy: &mut [f32],
    s: LinearShape,
) -> LinearGrads {
    assert!(
        s.k == s.n && s.group.is_none(),
        "in-place backward needs a square layer without a group"
    );
    linear_relu_backward_io(x, w, y, s, BackwardIo::InPlace(dy))
}

/// Rows per block of the backward pass.
pub(crate) const BACKWARD_ROWS: usize = 256;

/// Runs of blocks whose dW and db are summed separately (a fixed count, so
/// the summation order never depends on the machine).
const PARTIAL_SUMS: usize = 16;

/// Where the backward reads `dy` and writes `dx`.
enum BackwardIo<'a> {
    /// `dy` is read; `dx` is allocated when asked for.
    Read { dy: &'a [f32], need_dx: bool },
    /// `dy` [m, n] (k == n, no group) is overwritten by `dx`.
    InPlace(&'a mut [f32]),
}

fn linear_relu_backward_io(
    x: &[f32],
    w: &[f32],
    y: &[f32],
    s: LinearShape,
    io: BackwardIo<'_>,
) -> LinearGrads {
    let block_rows = BACKWARD_ROWS;
    let LinearShape { m, k, n, group } = s;
    let dy_rows = match group {
        Some(g) => m / g,
        None => m,
    };
    let dy_len = match &io {
        BackwardIo::Read { dy, .. } => dy.len(),
        BackwardIo::InPlace(dy) => dy.len(),
    };
    assert!(
        x.len() == m * k && w.len() == k * n && y.len() == m * n && dy_len == dy_rows * n,
        "linear_relu backward: bad sizes"
    );
    let zeros = || (vec![0.0f32; k * n], vec![0.0f32; n], Vec::<f32>::new());
    if m == 0 || n == 0 {
        let (dw, db, _) = zeros();
        let dx = match io {
            BackwardIo::Read { need_dx: true, .. } => vec![0.0; m * k],
            _ => Vec::new(),
        };
        return LinearGrads { dx, dw, db };
    }
    // One block: dz = mask * dy, db += colsum dz, dW += x_b^T dz,
    // dx_b = dz W^T. `shared` is the read-only dy; `chunk` is either this
    // block's rows of dy (in place: read, then overwritten by dx) or of dx.
    let block = |bi: usize,
                 shared: Option<&[f32]>,
                 chunk: Option<&mut [f32]>,
                 acc: &mut (Vec<f32>, Vec<f32>, Vec<f32>)| {
        let (dw, db, dz) = acc;
        let r0 = bi * block_rows;
        let rows = block_rows.min(m - r0);
        dz.clear();
        dz.resize(rows * n, 0.0);
        for (r, dzr) in dz.chunks_exact_mut(n).enumerate() {
            let row = r0 + r;
            let gr = match (shared, &chunk) {
                (Some(dy), _) => {
                    let src = group.map_or(row, |g| row / g);
                    &dy[src * n..(src + 1) * n]
                }
                (None, Some(c)) => &c[r * n..(r + 1) * n],
                (None, None) => unreachable!("a block reads dy from somewhere"),
            };
            let yr = &y[row * n..(row + 1) * n];
            for (((dz, db), &y), &g) in dzr.iter_mut().zip(db.iter_mut()).zip(yr).zip(gr) {
                let g = if y > 0.0 { g } else { 0.0 };
                *dz = g;
                *db += g;
            }
        }
        if k == 0 {
            return;
        }
        // x_b^T: element (i, l) = x[(r0 + l) * k + i].
        sgemm(
            k,
            n,
            rows,
            dw,
            n,
            View {
                data: &x[r0 * k..(r0 + rows) * k],
                rs: 1,
                cs: k,
            },
            View::rows(dz, n),
            true,
            1,
        );
        if let Some(dxb) = chunk {
            // W^T: element (l, j) = w[j * n + l].
            sgemm(
                rows,
                k,
                n,
                dxb,
                k,
                View::rows(dz, n),
                View {
                    data: w,
                    rs: 1,
                    cs: n,
                },
                false,
                1,
            );
        }
    };
    let add = |(mut dw, mut db): (Vec<f32>, Vec<f32>), (dw2, db2): (Vec<f32>, Vec<f32>)| {
        for (a, b) in dw.iter_mut().zip(dw2) {
            *a += b;
        }
        for (a, b) in db.iter_mut().zip(db2) {
            *a += b;
        }
        (dw, db)
    };
    let init = || {
        let (dw, db, _) = zeros();
        (dw, db)
    };
    let nblocks = m.div_ceil(block_rows);
    let mut dx = match io {
        BackwardIo::Read { need_dx: true, .. } => vec![0.0f32; m * k],
        _ => Vec::new(),
    };
    // Each block reads dy from `shared`, or in place from its own chunk of
    // `target`, which receives dx (k == n in place, so chunks agree).
    let (shared, target) = match io {
        BackwardIo::InPlace(dy) => (None, Some(dy)),
        BackwardIo::Read { dy, .. } => (Some(dy), (!dx.is_empty()).then_some(dx.as_mut_slice())),
    };
    // dW and db are summed per fixed run of blocks, then the runs in
    // order: the same bits whatever the threads' scheduling (same seed,
    // same result).
    let per = nblocks.div_ceil(PARTIAL_SUMS);
    let run = |ri: usize, mut chunks: Option<&mut [f32]>| {
        let mut acc = zeros();
        for bi in ri * per..((ri + 1) * per).min(nblocks) {
            let chunk = chunks.as_mut().map(|c| {
                let start = (bi - ri * per) * block_rows * k;
                let end = (start + block_rows * k).min(c.len());
                &mut c[start..end]
            });
            block(bi, shared, chunk, &mut acc);
        }
        (acc.0, acc.1)
    };
    let partials: Vec<(Vec<f32>, Vec<f32>)> = match target {
        Some(buf) => buf
            .par_chunks_mut(per * block_rows * k)
            .enumerate()
            .map(|(ri, part)| run(ri, Some(part)))
            .collect(),
        None => (0..nblocks.div_ceil(per))
            .into_par_iter()
            .map(|ri| run(ri, None))
            .collect(),
    };
    let (dw, db) = partials.into_iter().fold(init(), add);
    LinearGrads { dx, dw, db }
}

/// `relu(u[:, i] + v[:, j])` for every ordered pair: `u`, `v` [B, D, H] ->
/// [B, D * D, H] (row `i * D + j` of a sample is the pair (i, j)).
pub fn pair_relu(u: Tensor<3>, v: Tensor<3>) -> Tensor<3> {
    match route(&u.device(), &[u.dtype(), v.dtype()]) {
        Route::Reference => pair_relu_reference(u, v),
        #[cfg(feature = "flex")]
        Route::Flex => {
            flex::pair_relu(u.clone(), v.clone()).unwrap_or_else(|| pair_relu_reference(u, v))
        }
        #[cfg(feature = "flex")]
        Route::FlexAutodiff => flex::pair_relu_autodiff(u.clone(), v.clone())
            .unwrap_or_else(|| pair_relu_reference(u, v)),
    }
}

/// [`pair_relu`] in plain Burn ops.
pub fn pair_relu_reference(u: Tensor<3>, v: Tensor<3>) -> Tensor<3> {
    let [b, d, h] = u.dims();
    relu(u.unsqueeze_dim::<4>(2) + v.unsqueeze_dim::<4>(1)).reshape([b, d * d, h])
}

/// `relu(linear(x))`, x [M, K] -> [M, N].
pub fn linear_relu(x: Tensor<2>, linear: &Linear) -> Tensor<2> {
    linear_relu_grouped(x, linear, None)
}

/// `relu(linear(x))` summed over consecutive groups of `group` rows:
/// x [M, K] -> [M / group, N]. `M` must be a multiple of `group`.
pub fn linear_relu_sum(x: Tensor<2>, linear: &Linear, group: usize) -> Tensor<2> {
    linear_relu_grouped(x, linear, Some(group))
}

fn linear_relu_grouped(x: Tensor<2>, linear: &Linear, group: Option<usize>) -> Tensor<2> {
    let w = linear.weight.val();
    let Some(b) = linear.bias.as_ref().map(|b| b.val()) else {
        return linear_relu_reference(x, linear, group);
    };
    let [m, _] = x.dims();
    if group.is_some_and(|g| g == 0 || m % g != 0) {
        return linear_relu_reference(x, linear, group);
    }
    match route(&x.device(), &[x.dtype(), w.dtype(), b.dtype()]) {
        Route::Reference => linear_relu_reference(x, linear, group),
        #[cfg(feature = "flex")]
        Route::Flex => flex::linear_relu(x.clone(), w, b, group)
            .unwrap_or_else(|| linear_relu_reference(x, linear, group)),
        #[cfg(feature = "flex")]
        Route::FlexAutodiff => flex::linear_relu_autodiff(x.clone(), w, b, group)
            .unwrap_or_else(|| linear_relu_reference(x, linear, group)),
    }
}

/// [`linear_relu`] / [`linear_relu_sum`] in plain Burn ops.
pub fn linear_relu_reference(x: Tensor<2>, linear: &Linear, group: Option<usize>) -> Tensor<2> {
    let y = relu(linear.forward(x));
    match group {
        None => y,
        Some(g) => {
            let [m, n] = y.dims();
            y.reshape([m / g, g, n]).sum_dim(1).reshape([m / g, n])
        }
    }
}

/// The Flex glue: host slices of `FlexTensor`s, and the autodiff steps.
#[cfg(feature = "flex")]
mod flex {
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops};
    use burn::backend::flex::FlexTensor;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::Tensor;

    use super::super::flex::{dims, host, record, tensor};
    use super::{
        LinearShape, linear_relu_backward, linear_relu_backward_in_place, linear_relu_forward,
        pair_relu_backward, pair_relu_forward,
    };

    type Ad = Autodiff<Flex>;

    pub(super) fn pair_relu(u: Tensor<3>, v: Tensor<3>) -> Option<Tensor<3>> {
        let [b, d, h] = u.dims();
        let u = u.try_into_primitive::<Flex>().ok()?;
        let v = v.try_into_primitive::<Flex>().ok()?;
        let y = pair_relu_forward(&host(&u)?, &host(&v)?, b, d, h);
        Some(Tensor::from_primitive::<Flex>(tensor(y, vec![b, d * d, h])))
    }

    #[derive(Debug)]
    struct PairReluBackward;

    #[derive(Debug, Clone)]
    struct PairReluState {
        y: FlexTensor,
        dims: [usize; 3],
    }

    impl Backward<Flex, 2> for PairReluBackward {
        type State = PairReluState;

        fn backward(
            self,
            ops: Ops<Self::State, 2>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let [pu, pv] = ops.parents;
            let dy = grads.consume::<Flex>(&ops.node);
            let PairReluState { y, dims: [b, d, h] } = ops.state;
            let (Some(y), Some(dy)) = (host(&y), host(&dy)) else {
                unreachable!("pair_relu: f32 tensors were checked in the forward pass")
            };
            let (du, dv) = pair_relu_backward(&y, &dy, b, d, h);
            if let Some(node) = pu {
                grads.register::<Flex>(node.id, tensor(du, vec![b, d, h]));
            }
            if let Some(node) = pv {
                grads.register::<Flex>(node.id, tensor(dv, vec![b, d, h]));
            }
        }
    }

    pub(super) fn pair_relu_autodiff(u: Tensor<3>, v: Tensor<3>) -> Option<Tensor<3>> {
        let [b, d, h] = u.dims();
        let u = u.try_into_primitive::<Ad>().ok()?;
        let v = v.try_into_primitive::<Ad>().ok()?;
        let y = pair_relu_forward(&host(u.primitive())?, &host(v.primitive())?, b, d, h);
        let y = tensor(y, vec![b, d * d, h]);
        let state = PairReluState {
            y: y.clone(),
            dims: [b, d, h],
        };
        Some(record(PairReluBackward, [u.node(), v.node()], state, y))
    }

    fn shape(x: &FlexTensor, w: &FlexTensor, group: Option<usize>) -> Option<LinearShape> {
        let (xd, wd) = (dims(x), dims(w));
        let (&[m, k], &[k2, n]) = (xd.as_slice(), wd.as_slice()) else {
            return None;
        };
        (k == k2).then_some(LinearShape { m, k, n, group })
    }

    /// Runs the forward kernel; returns (y, the op's output).
    fn forward(
        x: &FlexTensor,
        w: &FlexTensor,
        b: &FlexTensor,
        s: LinearShape,
    ) -> Option<(FlexTensor, FlexTensor)> {
        if dims(b) != [s.n] {
            return None;
        }
        let (y, sums) = linear_relu_forward(&host(x)?, &host(w)?, &host(b)?, s);
        let y = tensor(y, vec![s.m, s.n]);
        let out = match (sums, s.group) {
            (Some(sums), Some(g)) => tensor(sums, vec![s.m / g, s.n]),
            _ => y.clone(),
        };
        Some((y, out))
    }

    pub(super) fn linear_relu(
        x: Tensor<2>,
        w: Tensor<2>,
        b: Tensor<1>,
        group: Option<usize>,
    ) -> Option<Tensor<2>> {
        let x = x.try_into_primitive::<Flex>().ok()?;
        let w = w.try_into_primitive::<Flex>().ok()?;
        let b = b.try_into_primitive::<Flex>().ok()?;
        let (_, out) = forward(&x, &w, &b, shape(&x, &w, group)?)?;
        Some(Tensor::from_primitive::<Flex>(out))
    }

    #[derive(Debug)]
    struct LinearReluBackward;

    #[derive(Debug, Clone)]
    struct LinearReluState {
        x: FlexTensor,
        w: FlexTensor,
        y: FlexTensor,
        shape: LinearShape,
    }

    impl Backward<Flex, 3> for LinearReluBackward {
        type State = LinearReluState;

        fn backward(
            self,
            ops: Ops<Self::State, 3>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let [px, pw, pb] = ops.parents;
            let mut dy = grads.consume::<Flex>(&ops.node);
            let LinearReluState { x, w, y, shape: s } = ops.state;
            let (Some(x), Some(w), Some(y)) = (host(&x), host(&w), host(&y)) else {
                unreachable!("linear_relu: f32 tensors were checked in the forward pass")
            };
            // A square hidden layer writes dx over its own gradient when
            // that buffer is ours alone.
            let len = s.m * s.n;
            let in_place = px.is_some()
                && s.k == s.n
                && s.group.is_none()
                && dy.is_contiguous()
                && dy.layout().start_offset() == 0;
            let buf = in_place
                .then(|| dy.try_storage_mut::<f32>())
                .flatten()
                .filter(|b| b.len() >= len);
            let (g, dx) = match buf {
                Some(buf) => (
                    linear_relu_backward_in_place(&x, &w, &y, &mut buf[..len], s),
                    Some(dy),
                ),
                None => {
                    let Some(dy) = host(&dy) else {
                        unreachable!("linear_relu: f32 tensors were checked in the forward pass")
                    };
                    let mut g = linear_relu_backward(&x, &w, &y, &dy, s, px.is_some());
                    let dx = std::mem::take(&mut g.dx);
                    (g, px.is_some().then(|| tensor(dx, vec![s.m, s.k])))
                }
            };
            if let (Some(node), Some(dx)) = (px, dx) {
                grads.register::<Flex>(node.id, dx);
            }
            if let Some(node) = pw {
                grads.register::<Flex>(node.id, tensor(g.dw, vec![s.k, s.n]));
            }
            if let Some(node) = pb {
                grads.register::<Flex>(node.id, tensor(g.db, vec![s.n]));
            }
        }
    }

    pub(super) fn linear_relu_autodiff(
        x: Tensor<2>,
        w: Tensor<2>,
        b: Tensor<1>,
        group: Option<usize>,
    ) -> Option<Tensor<2>> {
        let x = x.try_into_primitive::<Ad>().ok()?;
        let w = w.try_into_primitive::<Ad>().ok()?;
        let b = b.try_into_primitive::<Ad>().ok()?;
        let s = shape(x.primitive(), w.primitive(), group)?;
        let (y, out) = forward(x.primitive(), w.primitive(), b.primitive(), s)?;
        let state = LinearReluState {
            x: x.primitive().clone(),
            w: w.primitive().clone(),
            y,
            shape: s,
        };
        Some(record(
            LinearReluBackward,
            [x.node(), w.node(), b.node()],
            state,
            out,
        ))
    }
}

#[cfg(test)]
mod tests {
    use burn::module::Module;
    use burn::nn::LinearConfig;
    use burn::tensor::{DType, Device, Distribution};

    use super::*;

    /// Deterministic values in [-1, 1) (a plain LCG: the kernels, not the
    /// values, are under test).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        crate::fused::testing::values(len, seed, -1.0, 1.0)
    }

    fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(1.0f64, |a, b| a.max(b.abs()));
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= tol * scale,
                "{what}[{i}]: {g} against {w} (scale {scale})"
            );
        }
    }

    /// Naive f64 forward and backward of relu(x W + b), summed by group.
    #[allow(clippy::type_complexity)]
    fn naive_linear(
        x: &[f32],
        w: &[f32],
        b: &[f32],
        dy: &[f32],
        s: LinearShape,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let LinearShape { m, k, n, group } = s;
        let mut y = vec![0.0f64; m * n];
        for r in 0..m {
            for c in 0..n {
                let z: f64 = b[c] as f64
                    + (0..k)
                        .map(|l| x[r * k + l] as f64 * w[l * n + c] as f64)
                        .sum::<f64>();
                y[r * n + c] = z.max(0.0);
            }
        }
        let g = group.unwrap_or(1);
        let mut sums = vec![0.0f64; (m / g) * n];
        for r in 0..m {
            for c in 0..n {
                sums[(r / g) * n + c] += y[r * n + c];
            }
        }
        let (mut dx, mut dw, mut db) = (vec![0.0; m * k], vec![0.0; k * n], vec![0.0; n]);
        for r in 0..m {
            let src = if group.is_some() { r / g } else { r };
            for c in 0..n {
                let dz = if y[r * n + c] > 0.0 {
                    dy[src * n + c] as f64
                } else {
                    0.0
                };
                db[c] += dz;
                for l in 0..k {
                    dw[l * n + c] += x[r * k + l] as f64 * dz;
                    dx[r * k + l] += dz * w[l * n + c] as f64;
                }
            }
        }
        (y, sums, dx, dw, db)
    }

    #[test]
    fn linear_relu_kernels_match_naive_loops() {
        // Rows that are not a multiple of the block, groups that straddle
        // blocks, one group (batch 1), one row, and a single column.
        for (i, &(m, k, n, group)) in [
            (300, 7, 5, None),
            (300, 7, 5, Some(25)),
            (300, 6, 6, None),
            (BACKWARD_ROWS * 2 + 3, 16, 16, None),
            (BACKWARD_ROWS * 40 + 7, 8, 8, Some(BACKWARD_ROWS * 40 + 7)),
            (BLOCK_ROWS * 2 + 3, 16, 9, Some(BLOCK_ROWS * 2 + 3)),
            (1, 3, 4, None),
            (1, 3, 4, Some(1)),
            (600, 33, 1, Some(200)),
        ]
        .iter()
        .enumerate()
        {
            let s = LinearShape { m, k, n, group };
            let x = values(m * k, 1 + i as u64);
            let w = values(k * n, 100 + i as u64);
            let b = values(n, 200 + i as u64);
            let dy_rows = group.map_or(m, |g| m / g);
            let dy = values(dy_rows * n, 300 + i as u64);
            let (y, sums) = linear_relu_forward(&x, &w, &b, s);
            let (ny, nsums, ndx, ndw, ndb) = naive_linear(&x, &w, &b, &dy, s);
            assert_close("y", &y, &ny, 1e-5);
            match (sums, group) {
                (Some(sums), Some(_)) => assert_close("sums", &sums, &nsums, 1e-5),
                (None, None) => {}
                other => panic!("sums present {} for group {:?}", other.0.is_some(), other.1),
            }
            let g = linear_relu_backward(&x, &w, &y, &dy, s, true);
            assert_close("dx", &g.dx, &ndx, 1e-5);
            assert_close("dw", &g.dw, &ndw, 1e-5);
            assert_close("db", &g.db, &ndb, 1e-5);
            let g2 = linear_relu_backward(&x, &w, &y, &dy, s, false);
            assert!(g2.dx.is_empty());
            assert_eq!(
                (&g2.dw, &g2.db),
                (&g.dw, &g.db),
                "dW and db do not depend on dx"
            );
            for _ in 0..3 {
                let again = linear_relu_backward(&x, &w, &y, &dy, s, true);
                assert_eq!(again, g, "the same bits on every run");
            }
            if k == n && group.is_none() {
                let mut buf = dy.clone();
                let g3 = linear_relu_backward_in_place(&x, &w, &y, &mut buf, s);
                assert_eq!(buf, g.dx, "in place: dx over dy");
                assert_eq!((g3.dw, g3.db), (g.dw, g.db), "in place: dW, db");
            }
        }
    }

    #[test]
    fn pair_relu_kernels_match_naive_loops() {
        for (i, &(b, d, h)) in [(1, 1, 1), (1, 5, 3), (3, 4, 7), (2, 9, 16)]
            .iter()
            .enumerate()
        {
            let u = values(b * d * h, 10 + i as u64);
            let v = values(b * d * h, 20 + i as u64);
            let dy = values(b * d * d * h, 30 + i as u64);
            let y = pair_relu_forward(&u, &v, b, d, h);
            let (du, dv) = pair_relu_backward(&y, &dy, b, d, h);
            let (mut ny, mut ndu, mut ndv) = (
                vec![0.0f64; b * d * d * h],
                vec![0.0f64; b * d * h],
                vec![0.0f64; b * d * h],
            );
            for s in 0..b {
                for p in 0..d {
                    for q in 0..d {
                        for c in 0..h {
                            let z = u[(s * d + p) * h + c] as f64 + v[(s * d + q) * h + c] as f64;
                            let o = ((s * d + p) * d + q) * h + c;
                            ny[o] = z.max(0.0);
                            if z > 0.0 {
                                ndu[(s * d + p) * h + c] += dy[o] as f64;
                                ndv[(s * d + q) * h + c] += dy[o] as f64;
                            }
                        }
                    }
                }
            }
            assert_close("y", &y, &ny, 1e-6);
            assert_close("du", &du, &ndu, 1e-5);
            assert_close("dv", &dv, &ndv, 1e-5);
        }
    }

    #[test]
    fn relu_keeps_nan_like_burn() {
        let y = pair_relu_forward(&[f32::NAN, -1.0], &[0.0, 0.5], 1, 1, 2);
        assert!(y[0].is_nan() && y[1] == 0.0);
    }

    /// g's layers in a small RN-shaped stack: pair_relu, hidden layers,
    /// the summed last layer.
    fn g_stack(u: Tensor<3>, v: Tensor<3>, layers: &[Linear], fused: bool) -> Tensor<2> {
        let [b, d, h] = u.dims();
        let (last, hidden) = layers.split_last().expect("layers");
        let x = if fused {
            pair_relu(u, v)
        } else {
            pair_relu_reference(u, v)
        }
        .reshape([b * d * d, h]);
        let x = hidden.iter().fold(x, |x, l| {
            if fused {
                linear_relu(x, l)
            } else {
                linear_relu_reference(x, l, None)
            }
        });
        if fused {
            linear_relu_sum(x, last, d * d)
        } else {
            linear_relu_reference(x, last, Some(d * d))
        }
    }

    fn flat<const D: usize>(t: Tensor<D>) -> Vec<f64> {
        t.into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32")
            .into_iter()
            .map(f64::from)
            .collect()
    }

    #[cfg(feature = "flex")]
    #[test]
    fn flex_devices_take_the_kernels() {
        let f32s = [DType::F32];
        assert_eq!(route(&Device::flex(), &f32s), Route::Flex);
        assert_eq!(
            route(&Device::flex().autodiff(), &f32s),
            Route::FlexAutodiff
        );
        assert_eq!(route(&Device::flex(), &[DType::F16]), Route::Reference);
    }

    #[test]
    fn values_and_gradients_match_burn_reference() {
        let device = Device::default().autodiff();
        // (batch, objects, width): batch 1, one object, rows that straddle
        // the kernels' blocks.
        for (i, &(b, d, h)) in [(1, 1, 4), (1, 5, 8), (3, 7, 16), (4, 12, 24)]
            .iter()
            .enumerate()
        {
            let seed = 7 + i as u64;
            device.seed(seed);
            let layers: Vec<Linear> = (0..3)
                .map(|_| LinearConfig::new(h, h).init(&device))
                .collect();
            let normal = Distribution::Normal(0.0, 1.0);
            let u = Tensor::<3>::random([b, d, h], normal, &device).require_grad();
            let v = Tensor::<3>::random([b, d, h], normal, &device).require_grad();
            let weight = Tensor::<2>::random([b, h], normal, &device);
            let mut results = Vec::new();
            for fused in [true, false] {
                let out = g_stack(u.clone(), v.clone(), &layers, fused);
                let grads = (out.clone() * weight.clone()).sum().backward();
                let mut r = vec![flat(out)];
                r.push(flat(u.grad(&grads).expect("du")));
                r.push(flat(v.grad(&grads).expect("dv")));
                for l in &layers {
                    r.push(flat(l.weight.grad(&grads).expect("dW")));
                    let bias = l.bias.as_ref().expect("bias");
                    r.push(flat(bias.grad(&grads).expect("db")));
                }
                results.push(r);
            }
            let names = ["out", "du", "dv", "dW1", "db1", "dW2", "db2", "dW3", "db3"];
            for ((name, got), want) in names.iter().zip(&results[0]).zip(&results[1]) {
                let got: Vec<f32> = got.iter().map(|&x| x as f32).collect();
                assert_close(&format!("shape {:?} {name}", (b, d, h)), &got, want, 1e-4);
            }
            // Evaluation (no autodiff) takes the forward kernels.
            let valid: Vec<Linear> = layers.iter().map(|l| l.valid()).collect();
            let inner = device.clone().inner();
            let (u, v) = (
                Tensor::<3>::from_data(u.to_data(), &inner),
                Tensor::<3>::from_data(v.to_data(), &inner),
            );
            let fast = flat(g_stack(u.clone(), v.clone(), &valid, true));
            let reference = flat(g_stack(u, v, &valid, false));
            let fast: Vec<f32> = fast.iter().map(|&x| x as f32).collect();
            assert_close("eval out", &fast, &reference, 1e-5);
        }
    }
}
