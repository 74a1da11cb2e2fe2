//! Safe wrapper over the `gemm` crate's f32 GEMM for strided row-major views.

use gemm::Parallelism;

/// A read-only strided matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// Row-major view with row stride `rs`.
    pub fn rows(data: &'a [f32], rs: usize) -> Self {
        View { data, rs, cs: 1 }
    }

    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `dst[m x n] (row stride dst_rs) = (accumulate ? dst : 0) + lhs[m x k] * rhs[k x n]`.
///
/// `threads > 1` lets `gemm` split the product over the rayon pool; 1 keeps
/// it on the calling thread (the caller parallelises over samples).
///
/// Panics if a view is too short for its shape (an internal bug, never user
/// input: callers size every buffer from validated shapes).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: View<'_>,
    rhs: View<'_>,
    accumulate: bool,
    threads: usize,
) {
    // SAFETY: `dst` is uniquely borrowed for the call, so nothing else
    // touches it and it aliases neither shared view.
    unsafe {
        sgemm_ptr(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst.len(),
            dst_rs,
            lhs,
            rhs,
            accumulate,
            threads,
        )
    }
}

/// [`sgemm`] into `dst_len` values at `dst`, of which it writes only the
/// elements (i, j), i < m, j < n, at `i * dst_rs + j`: threads may fill
/// disjoint column ranges of one matrix at once.
///
/// # Safety
/// `dst` must be valid for reads and writes of `dst_len` values; nothing
/// else may touch the elements written meanwhile, and they must not
/// overlap `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm_ptr(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_len: usize,
    dst_rs: usize,
    lhs: View<'_>,
    rhs: View<'_>,
    accumulate: bool,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst_rs + n <= dst_len && lhs.fits(m, k) && rhs.fits(k, n),
        "sgemm: view too short for {m}x{k} * {k}x{n}"
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // SAFETY: in bounds (asserted) and the caller's own.
                unsafe { std::ptr::write_bytes(dst.add(i * dst_rs), 0, n) };
            }
        }
        return;
    }
    let par = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the assertion above bounds every index gemm touches
    // (dst (i, j) at i*dst_rs + j, lhs (i, l) at i*rs + l*cs, rhs (l, j) at
    // l*rs + j*cs, all strides non-negative); the caller guarantees that
    // the written elements are its own and alias neither view.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0, // alpha: scales dst (read only when accumulating)
            1.0, // beta: scales lhs * rhs
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_product_matches_naive() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 2.0).collect();
        // b stored transposed: b[l][j] at j*k + l.
        let bt: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 - 1.0).collect();
        let mut dst = vec![1.0f32; m * (n + 2)];
        sgemm(
            m,
            n,
            k,
            &mut dst,
            n + 2,
            View::rows(&a, k),
            View {
                data: &bt,
                rs: 1,
                cs: k,
            },
            true,
            1,
        );
        for i in 0..m {
            for j in 0..n {
                let want = 1.0 + (0..k).map(|l| a[i * k + l] * bt[j * k + l]).sum::<f32>();
                assert!((dst[i * (n + 2) + j] - want).abs() < 1e-5);
            }
            assert_eq!(dst[i * (n + 2) + n], 1.0, "padding untouched");
        }
    }
}
