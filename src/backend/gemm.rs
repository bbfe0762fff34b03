//! Single-precision matrix products for the CPU backend: `C (+)= A·B`.
//!
//! On CPUs with AVX-512 this is a register-blocked kernel written for the shapes tlens
//! multiplies — tall activations times small weights ([12,769 × 512]·[512 × 113] for the
//! logits), and their transposes in the backward pass — elsewhere matrixmultiply's sgemm.
//! matrixmultiply (16×16 tiles; A and B copied into packed panels for every call) reached
//! ~160 GFLOP/s on the 2-core machine for these shapes, with a fifth of its time in packing;
//! this kernel reads A in place (row- or column-major), packs only B (the small operand) into
//! 32-column panels, and keeps a 12×32 tile of C in 24 registers: measured numbers are in
//! `benches/` and the README.
//!
//! Each element of C is one fused multiply-add chain over k in order, in blocks of `KC` = 256
//! (within a block in registers, then added to C), so the result does not depend on how the
//! work is split across threads.

use rayon::prelude::*;

/// Depth of one pass over k: matrixmultiply's, so both give the same bits (B's packed block
/// of a few panels × KC × 32 floats stays in L2).
pub(crate) const KC: usize = 256;
/// Rows of C per register tile.
const MR: usize = 12;
/// Columns of C per register tile (two AVX-512 registers).
const NR: usize = 32;

/// A matrix operand: pointer and element strides (row, column).
#[derive(Clone, Copy)]
pub struct Mat {
    /// Pointer to element [0, 0].
    pub ptr: *const f32,
    /// Row stride in elements.
    pub rs: isize,
    /// Column stride in elements.
    pub cs: isize,
}

#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: threads write disjoint blocks of C.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}
// SAFETY: operands are only read while a product runs.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

/// `C = A·B` (`accumulate` false; C may be uninitialised, it is only written) or
/// `C += A·B`, for A [m, k], B [k, n], C row-major [m, n] with row stride `ldc`, then
/// `C += bias` (a row of n, added after the product as torch's addmm rounds it) when given;
/// rows (or, for short A, columns) split across rayon's threads.
///
/// # Safety
/// `a`, `b` must be valid for the given shapes and strides, `c` for m rows of `ldc ≥ n`
/// elements, and C must not overlap A or B.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    a: Mat,
    b: Mat,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    bias: Option<&[f32]>,
) {
    if m == 0 || n == 0 {
        return;
    }
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "sgemm: bias length");
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(kernel) = tiled::Kernel::current().filter(|_| (a.cs == 1 || a.rs == 1) && k > 0) {
        return tiled::sgemm(
            kernel,
            m,
            k,
            n,
            a,
            b,
            c,
            ldc,
            accumulate,
            bias.map(|b| Mat {
                ptr: b.as_ptr(),
                rs: 0,
                cs: 1,
            }),
        );
    }
    fallback(m, k, n, a, b, c, ldc, accumulate, bias)
}

/// matrixmultiply's sgemm (CPUs without AVX-512), the bias added afterwards.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn fallback(
    m: usize,
    k: usize,
    n: usize,
    a: Mat,
    b: Mat,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    bias: Option<&[f32]>,
) {
    let c = Out(c);
    split(m, k, n, 16, &|r0, r1, c0, c1| {
        let (a, b, c) = (a, b, c); // whole structs (Send + Sync), not their pointer fields
                                   // SAFETY: the block [r0, r1) × [c0, c1) lies inside A, B and C.
        unsafe { plain_block(r0, r1, c0, c1, k, a, b, c.0, ldc, accumulate, bias) }
    });
}

/// C[r0..r1, c0..c1] (+)= A·B with matrixmultiply on this thread, then the bias.
#[allow(clippy::too_many_arguments)]
unsafe fn plain_block(
    r0: usize,
    r1: usize,
    c0: usize,
    c1: usize,
    k: usize,
    a: Mat,
    b: Mat,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    bias: Option<&[f32]>,
) {
    matrixmultiply::sgemm(
        r1 - r0,
        k,
        c1 - c0,
        1.0,
        a.ptr.offset(r0 as isize * a.rs),
        a.rs,
        a.cs,
        b.ptr.offset(c0 as isize * b.cs),
        b.rs,
        b.cs,
        if accumulate { 1.0 } else { 0.0 },
        c.add(r0 * ldc + c0),
        ldc as isize,
        1,
    );
    if let Some(bias) = bias {
        for i in r0..r1 {
            let row = std::slice::from_raw_parts_mut(c.add(i * ldc + c0), c1 - c0);
            row.iter_mut().zip(&bias[c0..c1]).for_each(|(x, b)| *x += b);
        }
    }
}

/// Run `f` on blocks of C: one block of rows per thread when A is tall, else one block of
/// columns (multiples of `align`) per thread; one block for small products.
fn split(
    m: usize,
    k: usize,
    n: usize,
    align: usize,
    f: &(dyn Fn(usize, usize, usize, usize) + Sync),
) {
    let threads = rayon::current_num_threads().max(1);
    // Below ~4M multiply-adds (≈ 40 µs on one core) splitting costs more than it saves
    // (measured on the trainer's small weight-gradient products).
    if threads == 1 || m * k.max(1) * n < 1 << 22 {
        f(0, m, 0, n);
    } else if m >= threads * 4 * MR || n < 2 * align * threads {
        let rows = m.div_ceil(threads).div_ceil(MR) * MR;
        (0..threads).into_par_iter().for_each(|t| {
            let (r0, r1) = (t * rows, ((t + 1) * rows).min(m));
            if r0 < r1 {
                f(r0, r1, 0, n)
            }
        });
    } else {
        let cols = n.div_ceil(threads).div_ceil(align) * align;
        (0..threads).into_par_iter().for_each(|t| {
            let (c0, c1) = (t * cols, ((t + 1) * cols).min(n));
            if c0 < c1 {
                f(0, m, c0, c1)
            }
        });
    }
}

/// `C ← C + A·B` as one fused multiply-add chain per element continued from C's value:
/// `c = fma(a[i, l], b[l, j], c)` for l in order, on the calling thread. A product over a long
/// k split into consecutive pieces, each chained onto the last, gives the same bits as one
/// chain; [`sgemm`]'s bits are then chains of `KC` from zero added to C in order (how the
/// trainer accumulates `postᵀ·dlogits` block by block with the bits of one product).
///
/// # Safety
/// As [`sgemm`]: `a` valid for [m, k], `b` for [k, n], `c` for m rows of `ldc ≥ n`, no overlap.
pub unsafe fn sgemm_chain(m: usize, k: usize, n: usize, a: Mat, b: Mat, c: *mut f32, ldc: usize) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(kernel) = tiled::Kernel::current().filter(|_| a.cs == 1 || a.rs == 1) {
        let packed = tiled::Packed::new(kernel, k, n, b);
        return tiled::block(kernel, 0, m, 0, n, k, a, &packed, c, ldc, false, None, true);
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        return chain_fma(m, k, n, a, b, c, ldc);
    }
    chain_plain(m, k, n, a, b, c, ldc)
}

/// [`sgemm_chain`] without AVX-512: `f32::mul_add` (one rounding, as the vector FMA) row by
/// row of C.
#[inline(always)]
unsafe fn chain_rows(m: usize, k: usize, n: usize, a: Mat, b: Mat, c: *mut f32, ldc: usize) {
    for i in 0..m {
        let row = std::slice::from_raw_parts_mut(c.add(i * ldc), n);
        for l in 0..k {
            let av = *a.ptr.offset(i as isize * a.rs + l as isize * a.cs);
            let bl = b.ptr.offset(l as isize * b.rs);
            if b.cs == 1 {
                // contiguous: vectorised
                let bl = std::slice::from_raw_parts(bl, n);
                row.iter_mut()
                    .zip(bl)
                    .for_each(|(x, &bv)| *x = av.mul_add(bv, *x));
            } else {
                for (j, x) in row.iter_mut().enumerate() {
                    *x = av.mul_add(*bl.offset(j as isize * b.cs), *x);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chain_fma(m: usize, k: usize, n: usize, a: Mat, b: Mat, c: *mut f32, ldc: usize) {
    chain_rows(m, k, n, a, b, c, ldc)
}

unsafe fn chain_plain(m: usize, k: usize, n: usize, a: Mat, b: Mat, c: *mut f32, ldc: usize) {
    chain_rows(m, k, n, a, b, c, ldc)
}

/// A right-hand operand B [k, n] prepared once for many products `A·B` computed one block of
/// rows at a time on the calling thread (the tabulated pass multiplies each block of inputs
/// while it is in cache). The arithmetic is [`sgemm`]'s.
pub struct PackedB {
    k: usize,
    n: usize,
    #[cfg(target_arch = "x86_64")]
    packed: Option<(tiled::Kernel, tiled::Packed)>,
    /// B row-major, for the fallback.
    plain: Vec<f32>,
}

impl PackedB {
    /// # Safety
    /// `b` must be valid for [k, n] with its strides.
    pub unsafe fn new(k: usize, n: usize, b: Mat) -> PackedB {
        #[cfg(target_arch = "x86_64")]
        if let Some(kernel) = tiled::Kernel::current().filter(|_| k > 0 && n > 0) {
            return PackedB {
                k,
                n,
                packed: Some((kernel, tiled::Packed::new(kernel, k, n, b))),
                plain: Vec::new(),
            };
        }
        let mut plain = Vec::with_capacity(k * n);
        for i in 0..k {
            for j in 0..n {
                plain.push(*b.ptr.offset(i as isize * b.rs + j as isize * b.cs));
            }
        }
        PackedB {
            k,
            n,
            #[cfg(target_arch = "x86_64")]
            packed: None,
            plain,
        }
    }

    /// `C (+)= A·B (+ bias)` for A [m, k] on this thread only (see [`sgemm`]).
    ///
    /// # Safety
    /// As [`sgemm`]: `a` valid for [m, k], `c` for m rows of `ldc ≥ n`, no overlap.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn mul(
        &self,
        m: usize,
        a: Mat,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
        bias: Option<&[f32]>,
    ) {
        let (k, n) = (self.k, self.n);
        if m == 0 || n == 0 {
            return;
        }
        if let Some(b) = bias {
            assert_eq!(b.len(), n, "PackedB::mul: bias length");
        }
        #[cfg(target_arch = "x86_64")]
        if let Some((kernel, p)) = &self.packed {
            assert!(
                a.cs == 1 || a.rs == 1,
                "PackedB::mul: A must be row- or column-major"
            );
            let bias = bias.map(|b| b.as_ptr());
            return tiled::block(
                *kernel, 0, m, 0, n, k, a, p, c, ldc, accumulate, bias, false,
            );
        }
        let b = Mat {
            ptr: self.plain.as_ptr(),
            rs: n as isize,
            cs: 1,
        };
        plain_block(0, m, 0, n, k, a, b, c, ldc, accumulate, bias);
    }
}

#[cfg(target_arch = "x86_64")]
mod tiled {
    use super::{split, Mat, Out, KC, MR, NR};
    use crate::backend::simd::{self, level, Level};
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    /// The register kernel a product runs with: both compute every element of C with the same
    /// fused multiply-add chain, so they give the same bits.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Kernel {
        /// 12 rows × 32 columns of C in 24 AVX-512 registers.
        Avx512,
        /// 6 rows × 16 columns of C in 12 AVX2 registers (12 × 8 for a last narrow panel).
        Avx2,
    }

    impl Kernel {
        /// The kernel for this process's [`level`], if any.
        pub fn current() -> Option<Kernel> {
            match level() {
                Level::Avx512 => Some(Kernel::Avx512),
                Level::Avx2 => Some(Kernel::Avx2),
                Level::Portable => None,
            }
        }

        /// Columns of B per packed panel: one row of a panel is the kernel's register tile
        /// width, so the kernel reads its panel contiguously.
        fn panel_width(self) -> usize {
            match self {
                Kernel::Avx512 => NR,
                Kernel::Avx2 => NR2,
            }
        }

        /// Every kernel this CPU can run, whatever the level (for tests).
        #[cfg(test)]
        pub fn supported() -> Vec<Kernel> {
            let mut k = Vec::new();
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
                k.push(Kernel::Avx512);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                k.push(Kernel::Avx2);
            }
            k
        }
    }

    /// Columns of C per AVX2 register tile (two registers).
    const NR2: usize = 16;

    /// B [k, n] copied into panels of `nr` columns (the kernel's [`Kernel::panel_width`]), each
    /// `[k][nr]` (64-byte aligned, zero-padded past column n).
    pub struct Packed {
        data: Vec<__m512>,
        k: usize,
        nr: usize,
    }

    impl Packed {
        pub unsafe fn new(kernel: Kernel, k: usize, n: usize, b: Mat) -> Packed {
            let nr = kernel.panel_width();
            let panels = n.div_ceil(nr);
            let len = (panels * k * nr).div_ceil(16); // in 16-float units
            let mut data: Vec<__m512> = Vec::with_capacity(len);
            let base = Out(data.as_mut_ptr() as *mut f32);
            let pack = move |p: usize| {
                let (base, b) = (base, b);
                let cols = (n - p * nr).min(nr);
                // SAFETY: panel p of B and of the buffer (capacity ≥ panels·k·nr floats).
                unsafe { pack_panel(k, cols, nr, b, p * nr, base.0.add(p * k * nr)) }
            };
            // Panels in parallel when B is large (each panel is written by one thread).
            if k * n >= 1 << 16 {
                (0..panels).into_par_iter().for_each(pack);
            } else {
                (0..panels).for_each(pack);
            }
            // SAFETY: pack_panel wrote all k·nr floats of every panel (padding included); a
            // last partial 16-float unit is only padding for alignment.
            if !(panels * k * nr).is_multiple_of(16) {
                (data.as_mut_ptr() as *mut f32)
                    .add(panels * k * nr)
                    .write_bytes(0, 16 - (panels * k * nr) % 16);
            }
            data.set_len(len);
            Packed { data, k, nr }
        }

        fn panel(&self, p: usize, k0: usize) -> *const f32 {
            let nr = self.nr;
            // SAFETY (callers): p < panels and k0 < k.
            unsafe { (self.data.as_ptr() as *const f32).add(p * self.k * nr + k0 * nr) }
        }
    }

    /// Lane masks of the two registers of a panel's first `cols` (≤ NR) columns.
    fn panel_masks(cols: usize) -> (u16, u16) {
        let first = |c: usize| if c >= 16 { u16::MAX } else { (1u16 << c) - 1 };
        (first(cols), first(cols.saturating_sub(16)))
    }

    /// A column-major tile of A (`rows` ≤ MR at each of kc columns `cs` apart) into `[kc][MR]`.
    unsafe fn pack_tile(kc: usize, rows: usize, a: *const f32, cs: isize, dst: *mut f32) {
        if rows == MR {
            for kk in 0..kc {
                let v = (a.offset(kk as isize * cs) as *const [f32; MR]).read_unaligned();
                (dst.add(kk * MR) as *mut [f32; MR]).write(v);
            }
        } else {
            for kk in 0..kc {
                std::ptr::copy_nonoverlapping(a.offset(kk as isize * cs), dst.add(kk * MR), rows);
            }
        }
    }

    /// Columns `j0 .. j0 + cols` (cols ≤ nr) of B into `dst` as `[k][nr]`, zeros past `cols`.
    unsafe fn pack_panel(k: usize, cols: usize, nr: usize, b: Mat, j0: usize, dst: *mut f32) {
        let first = b.ptr.offset(j0 as isize * b.cs);
        if b.cs == 1 && cols == nr && nr == NR2 {
            // Row-major B, a whole panel of 16 (the AVX2 kernel's): fixed-size row copies.
            for kk in 0..k {
                let v = (first.offset(kk as isize * b.rs) as *const [f32; NR2]).read_unaligned();
                (dst.add(kk * nr) as *mut [f32; NR2]).write(v);
            }
        } else if b.cs == 1 {
            // Row-major B: each k is a contiguous run of `cols`.
            for kk in 0..k {
                let d = dst.add(kk * nr);
                std::ptr::copy_nonoverlapping(first.offset(kk as isize * b.rs), d, cols);
                std::ptr::write_bytes(d.add(cols), 0, nr - cols);
            }
        } else {
            // Column by column (a column-major B is then read contiguously).
            std::ptr::write_bytes(dst, 0, k * nr);
            for j in 0..cols {
                let col = first.offset(j as isize * b.cs);
                for kk in 0..k {
                    *dst.add(kk * nr + j) = *col.offset(kk as isize * b.rs);
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub unsafe fn sgemm(
        kernel: Kernel,
        m: usize,
        k: usize,
        n: usize,
        a: Mat,
        b: Mat,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
        bias: Option<Mat>,
    ) {
        let packed = Packed::new(kernel, k, n, b);
        let c = Out(c);
        split(m, k, n, NR, &|r0, r1, c0, c1| {
            let (a, c, bias) = (a, c, bias);
            let bias = bias.map(|b| b.ptr.add(c0));
            // SAFETY: the block lies inside A, B and C; c0 is a multiple of NR.
            unsafe {
                block(
                    kernel, r0, r1, c0, c1, k, a, &packed, c.0, ldc, accumulate, bias, false,
                )
            }
        });
    }

    /// C[r0..r1, c0..c1] over k in blocks of KC: for each row tile, every column panel (the
    /// tile's rows of A stay in L1 across the panels).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn block(
        kernel: Kernel,
        r0: usize,
        r1: usize,
        c0: usize,
        c1: usize,
        k: usize,
        a: Mat,
        packed: &Packed,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
        bias: Option<*const f32>,
        chain: bool,
    ) {
        // A column-major: a tile's rows at one k are adjacent, but successive k are a column
        // apart, which the hardware prefetcher does not follow; such tiles are first copied
        // into a contiguous [kc][MR] buffer.
        let pack_a = a.cs != 1;
        let mut buf = std::mem::MaybeUninit::<[f32; KC * MR]>::uninit();
        let buf = buf.as_mut_ptr() as *mut f32; // written by pack_tile before it is read
        let mut k0 = 0;
        while k0 < k {
            let kc = (k - k0).min(KC);
            let acc = accumulate || k0 > 0;
            // The bias goes in with the last block of k.
            let bias = if k0 + kc == k { bias } else { None };
            let nr = packed.nr;
            let tile = |i: usize, j: usize, ap: *const f32, a: Mat| {
                let (rows, cols) = ((r1 - i).min(MR), (c1 - j).min(nr));
                let t = Tile {
                    kc,
                    ap,
                    a,
                    bp: packed.panel(j / nr, k0),
                    c: c.add(i * ldc + j),
                    ldc,
                    accumulate: acc,
                    bias: bias.map(|b| b.add(j - c0)),
                    chain,
                };
                match kernel {
                    Kernel::Avx512 => t.avx512(rows, cols),
                    Kernel::Avx2 => t.avx2(rows, cols),
                }
            };
            if kernel == Kernel::Avx2 && !pack_a {
                // Panel by panel, every row tile: the panel's [kc][16] (16 KB) stays in L1
                // while the rows of A stream from L2 (measured on Zen 3: ~15% faster for the
                // logits than streaming B per row tile; AVX-512's 32-column panels are twice
                // as large).
                for j in (c0..c1).step_by(nr) {
                    for i in (r0..r1).step_by(MR) {
                        tile(
                            i,
                            j,
                            a.ptr.offset(i as isize * a.rs + k0 as isize * a.cs),
                            a,
                        );
                    }
                }
            } else {
                for i in (r0..r1).step_by(MR) {
                    let mut ap = a.ptr.offset(i as isize * a.rs + k0 as isize * a.cs);
                    let mut a = a;
                    if pack_a {
                        pack_tile(kc, (r1 - i).min(MR), ap, a.cs, buf);
                        ap = buf;
                        a = Mat {
                            ptr: ap,
                            rs: 1,
                            cs: MR as isize,
                        };
                    }
                    for j in (c0..c1).step_by(nr) {
                        tile(i, j, ap, a);
                    }
                }
            }
            k0 += kc;
        }
    }

    /// One tile of C (≤ MR rows × ≤ NR columns) over kc steps of k: `C = A·B`, `C += A·B`
    /// (`accumulate`), or each element's chain continued from C (`chain`); then `+ bias`.
    #[derive(Clone, Copy)]
    struct Tile {
        kc: usize,
        /// A's first row at this k block, with A's strides in `a`.
        ap: *const f32,
        a: Mat,
        /// The panel at this k block (`[kc][NR]`).
        bp: *const f32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
        bias: Option<*const f32>,
        chain: bool,
    }

    impl Tile {
        unsafe fn avx512(self, rows: usize, cols: usize) {
            match rows {
                12 => self.tile512::<12>(cols),
                11 => self.tile512::<11>(cols),
                10 => self.tile512::<10>(cols),
                9 => self.tile512::<9>(cols),
                8 => self.tile512::<8>(cols),
                7 => self.tile512::<7>(cols),
                6 => self.tile512::<6>(cols),
                5 => self.tile512::<5>(cols),
                4 => self.tile512::<4>(cols),
                3 => self.tile512::<3>(cols),
                2 => self.tile512::<2>(cols),
                _ => self.tile512::<1>(cols),
            }
        }

        /// The tile as two 6 × 16 parts (rows 0–5 and 6–11 of a 16-column panel), or, when
        /// the panel has at most 8 columns (the last one of 113 logits), as one 12 × 8 part
        /// (half the padded columns' work).
        unsafe fn avx2(self, rows: usize, cols: usize) {
            if cols <= 8 {
                return match rows {
                    12 => self.tile256::<12, 1>(cols),
                    11 => self.tile256::<11, 1>(cols),
                    10 => self.tile256::<10, 1>(cols),
                    9 => self.tile256::<9, 1>(cols),
                    8 => self.tile256::<8, 1>(cols),
                    7 => self.tile256::<7, 1>(cols),
                    6 => self.tile256::<6, 1>(cols),
                    5 => self.tile256::<5, 1>(cols),
                    4 => self.tile256::<4, 1>(cols),
                    3 => self.tile256::<3, 1>(cols),
                    2 => self.tile256::<2, 1>(cols),
                    _ => self.tile256::<1, 1>(cols),
                };
            }
            for r0 in [0, 6] {
                if r0 >= rows {
                    break;
                }
                let part = Tile {
                    ap: self.ap.offset(r0 as isize * self.a.rs),
                    c: self.c.add(r0 * self.ldc),
                    ..self
                };
                match (rows - r0).min(6) {
                    6 => part.tile256::<6, 2>(cols),
                    5 => part.tile256::<5, 2>(cols),
                    4 => part.tile256::<4, 2>(cols),
                    3 => part.tile256::<3, 2>(cols),
                    2 => part.tile256::<2, 2>(cols),
                    _ => part.tile256::<1, 2>(cols),
                }
            }
        }

        /// R rows × the panel's first `cols` (≤ 32) columns in AVX-512 registers.
        #[target_feature(enable = "avx512f,avx512vl")]
        unsafe fn tile512<const R: usize>(self, cols: usize) {
            let Tile {
                kc,
                ap,
                a,
                bp,
                c,
                ldc,
                ..
            } = self;
            let (m0, m1) = panel_masks(cols);
            let mut lo = [_mm512_setzero_ps(); R];
            let mut hi = [_mm512_setzero_ps(); R];
            if self.chain {
                // Continue each element's chain from its value in C.
                for i in 0..R {
                    let row = c.add(i * ldc);
                    lo[i] = _mm512_maskz_loadu_ps(m0, row);
                    hi[i] = _mm512_maskz_loadu_ps(m1, row.add(16));
                }
            }
            if a.cs == 1 {
                // A row-major: row i's elements are consecutive.
                let rs = a.rs;
                for kk in 0..kc {
                    let b0 = _mm512_load_ps(bp.add(kk * NR));
                    let b1 = _mm512_load_ps(bp.add(kk * NR + 16));
                    for i in 0..R {
                        let av = _mm512_set1_ps(*ap.offset(i as isize * rs + kk as isize));
                        lo[i] = _mm512_fmadd_ps(av, b0, lo[i]);
                        hi[i] = _mm512_fmadd_ps(av, b1, hi[i]);
                    }
                }
            } else {
                // A column-major (rs = 1): the tile's R rows at one k are consecutive.
                let cs = a.cs;
                for kk in 0..kc {
                    let b0 = _mm512_load_ps(bp.add(kk * NR));
                    let b1 = _mm512_load_ps(bp.add(kk * NR + 16));
                    let col = ap.offset(kk as isize * cs);
                    for i in 0..R {
                        let av = _mm512_set1_ps(*col.add(i));
                        lo[i] = _mm512_fmadd_ps(av, b0, lo[i]);
                        hi[i] = _mm512_fmadd_ps(av, b1, hi[i]);
                    }
                }
            }
            let bias = self.bias.map(|b| {
                (
                    _mm512_maskz_loadu_ps(m0, b),
                    _mm512_maskz_loadu_ps(m1, b.add(16)),
                )
            });
            for i in 0..R {
                let row = c.add(i * ldc);
                let (mut x0, mut x1) = (lo[i], hi[i]);
                if self.accumulate && !self.chain {
                    x0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, row), x0);
                    x1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, row.add(16)), x1);
                }
                if let Some((b0, b1)) = bias {
                    x0 = _mm512_add_ps(x0, b0);
                    x1 = _mm512_add_ps(x1, b1);
                }
                _mm512_mask_storeu_ps(row, m0, x0);
                _mm512_mask_storeu_ps(row.add(16), m1, x1);
            }
        }

        /// R rows × the panel's first `cols` (≤ 8·W) columns in R·W AVX2 registers (W of 8
        /// columns each): the same arithmetic as [`Tile::tile512`], element by element.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn tile256<const R: usize, const W: usize>(self, cols: usize) {
            let Tile {
                kc,
                ap,
                a,
                bp,
                c,
                ldc,
                ..
            } = self;
            let mask: [__m256i; W] =
                std::array::from_fn(|w| simd::avx2::mask(cols.saturating_sub(8 * w)));
            let full = cols == 8 * W;
            let load = |p: *const f32, w: usize| {
                if full {
                    _mm256_loadu_ps(p.add(8 * w))
                } else {
                    _mm256_maskload_ps(p.add(8 * w), mask[w])
                }
            };
            let mut acc = [[_mm256_setzero_ps(); W]; R];
            if self.chain {
                for (i, r) in acc.iter_mut().enumerate() {
                    *r = std::array::from_fn(|w| load(c.add(i * ldc), w));
                }
            }
            if a.cs == 1 {
                let rs = a.rs;
                for kk in 0..kc {
                    let b: [__m256; W] =
                        std::array::from_fn(|w| _mm256_load_ps(bp.add(kk * NR2 + 8 * w)));
                    for (i, r) in acc.iter_mut().enumerate() {
                        let av = _mm256_set1_ps(*ap.offset(i as isize * rs + kk as isize));
                        for w in 0..W {
                            r[w] = _mm256_fmadd_ps(av, b[w], r[w]);
                        }
                    }
                }
            } else {
                let cs = a.cs;
                for kk in 0..kc {
                    let b: [__m256; W] =
                        std::array::from_fn(|w| _mm256_load_ps(bp.add(kk * NR2 + 8 * w)));
                    let col = ap.offset(kk as isize * cs);
                    for (i, r) in acc.iter_mut().enumerate() {
                        let av = _mm256_set1_ps(*col.add(i));
                        for w in 0..W {
                            r[w] = _mm256_fmadd_ps(av, b[w], r[w]);
                        }
                    }
                }
            }
            let bias = self
                .bias
                .map(|b| -> [__m256; W] { std::array::from_fn(|w| load(b, w)) });
            for (i, r) in acc.iter().enumerate() {
                let row = c.add(i * ldc);
                for w in 0..W {
                    let mut x = r[w];
                    if self.accumulate && !self.chain {
                        x = _mm256_add_ps(load(row, w), x);
                    }
                    if let Some(b) = bias {
                        x = _mm256_add_ps(x, b[w]);
                    }
                    if full {
                        _mm256_storeu_ps(row.add(8 * w), x);
                    } else {
                        _mm256_maskstore_ps(row.add(8 * w), mask[w], x);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// C from a plain f64 triple loop.
    fn reference(m: usize, k: usize, n: usize, a: &[f32], b: &[f32]) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|l| a[i * k + l] as f64 * b[l * n + j] as f64)
                    .sum();
            }
        }
        c
    }

    #[test]
    fn products_of_every_layout_and_edge_size_match_f64() {
        let mut rng = crate::task::Mt19937::new(3);
        let mut u = || rng.next_u32() as f32 / u32::MAX as f32 - 0.5;
        for &(m, k, n) in &[
            (1, 1, 1),
            (13, 7, 33),
            (25, 600, 17),
            (300, 1100, 113),
            (5, 40, 130),
            (64, 130, 512),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| u()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| u()).collect();
            let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect(); // [k, m]
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect(); // [n, k]
            let want = reference(m, k, n, &a, &b);
            let tol = 1e-5 * (k as f64).sqrt();
            for (a_mat, b_mat) in [
                (
                    Mat {
                        ptr: a.as_ptr(),
                        rs: k as isize,
                        cs: 1,
                    },
                    Mat {
                        ptr: b.as_ptr(),
                        rs: n as isize,
                        cs: 1,
                    },
                ),
                (
                    Mat {
                        ptr: at.as_ptr(),
                        rs: 1,
                        cs: m as isize,
                    },
                    Mat {
                        ptr: bt.as_ptr(),
                        rs: 1,
                        cs: k as isize,
                    },
                ),
            ] {
                for accumulate in [false, true] {
                    let mut c = vec![1f32; m * n];
                    // SAFETY: the buffers have the shapes given.
                    unsafe { sgemm(m, k, n, a_mat, b_mat, c.as_mut_ptr(), n, accumulate, None) };
                    for (i, (&got, &w)) in c.iter().zip(&want).enumerate() {
                        let w = w + accumulate as u8 as f64;
                        assert!(
                            (got as f64 - w).abs() <= tol,
                            "{m}×{k}×{n} [{i}]: {got} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_tiled_kernels_give_matrixmultiplys_bits() {
        // All chain fused multiply-adds over k in blocks of 256 and add the blocks to C in
        // order, so the products (and every activation of the forward pass) are the same bits
        // on CPUs with AVX-512, with AVX2 only, and with neither. Each kernel this CPU can run
        // is tested, whatever TLENS_SIMD says.
        let mut rng = crate::task::Mt19937::new(11);
        let mut u = || rng.next_u32() as f32 / u32::MAX as f32 - 0.5;
        for &(m, k, n) in &[(37, 600, 113), (300, 128, 512), (7, 1000, 40)] {
            let a: Vec<f32> = (0..m * k).map(|_| u()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| u()).collect();
            let bias: Vec<f32> = (0..n).map(|_| u()).collect();
            let c0: Vec<f32> = (0..m * n).map(|_| u()).collect();
            let a_mat = Mat {
                ptr: a.as_ptr(),
                rs: k as isize,
                cs: 1,
            };
            let b_mat = Mat {
                ptr: b.as_ptr(),
                rs: n as isize,
                cs: 1,
            };
            for accumulate in [false, true] {
                let mut y = c0.clone();
                // SAFETY: the buffers have the shapes given.
                unsafe {
                    fallback(
                        m,
                        k,
                        n,
                        a_mat,
                        b_mat,
                        y.as_mut_ptr(),
                        n,
                        accumulate,
                        Some(&bias),
                    );
                }
                #[cfg(target_arch = "x86_64")]
                for kernel in tiled::Kernel::supported() {
                    let mut x = c0.clone();
                    let b = Mat {
                        ptr: bias.as_ptr(),
                        rs: 0,
                        cs: 1,
                    };
                    // SAFETY: as above.
                    unsafe {
                        tiled::sgemm(
                            kernel,
                            m,
                            k,
                            n,
                            a_mat,
                            b_mat,
                            x.as_mut_ptr(),
                            n,
                            accumulate,
                            Some(b),
                        )
                    };
                    assert_eq!(x, y, "{kernel:?} {m}×{k}×{n} accumulate={accumulate}");
                }
            }
        }
    }

    #[test]
    fn chains_split_anywhere_and_windows_added_in_order_give_sgemms_bits() {
        // sgemm = chains of KC from zero, added to C in order; each chain built from pieces
        // with sgemm_chain (a tiled kernel where the CPU has one, else mul_add) must give the
        // same bits.
        let mut rng = crate::task::Mt19937::new(5);
        let mut u = || rng.next_u32() as f32 / u32::MAX as f32 - 0.5;
        let (m, k, n) = (40, 700, 113);
        let a: Vec<f32> = (0..k * m).map(|_| u()).collect(); // A [m, k] stored column-major
        let b: Vec<f32> = (0..k * n).map(|_| u()).collect();
        let a_at = |l: usize| Mat {
            ptr: a[l * m..].as_ptr(),
            rs: 1,
            cs: m as isize,
        };
        let b_at = |l: usize| Mat {
            ptr: b[l * n..].as_ptr(),
            rs: n as isize,
            cs: 1,
        };
        let mut want = vec![0f32; m * n];
        // SAFETY: the buffers have the shapes given.
        unsafe { sgemm(m, k, n, a_at(0), b_at(0), want.as_mut_ptr(), n, false, None) };
        let mut got = vec![0f32; m * n];
        let mut l0 = 0;
        while l0 < k {
            let l1 = (l0 + KC).min(k);
            let mut win = vec![0f32; m * n];
            // uneven pieces: 1, 63, 100, … rows
            let mut l = l0;
            for piece in [1, 63, 100, 37, usize::MAX].iter().cycle() {
                if l >= l1 {
                    break;
                }
                let r = (*piece).min(l1 - l);
                // SAFETY: rows l .. l + r of A's columns and B.
                unsafe { sgemm_chain(m, r, n, a_at(l), b_at(l), win.as_mut_ptr(), n) };
                l += r;
            }
            if l0 == 0 {
                got = win;
            } else {
                got.iter_mut().zip(&win).for_each(|(g, w)| *g += w);
            }
            l0 = l1;
        }
        assert_eq!(got, want);
        // and the portable chain gives the same bits as the dispatched one
        let (mut x, mut y) = (vec![0.5f32; m * n], vec![0.5f32; m * n]);
        // SAFETY: as above.
        unsafe {
            sgemm_chain(m, 300, n, a_at(0), b_at(0), x.as_mut_ptr(), n);
            chain_plain(m, 300, n, a_at(0), b_at(0), y.as_mut_ptr(), n);
        }
        assert_eq!(x, y);
        // and so does every tiled kernel this CPU can run
        #[cfg(target_arch = "x86_64")]
        for kernel in tiled::Kernel::supported() {
            let mut z = vec![0.5f32; m * n];
            // SAFETY: as above.
            unsafe {
                let packed = tiled::Packed::new(kernel, 300, n, b_at(0));
                tiled::block(
                    kernel,
                    0,
                    m,
                    0,
                    n,
                    300,
                    a_at(0),
                    &packed,
                    z.as_mut_ptr(),
                    n,
                    false,
                    None,
                    true,
                );
            }
            assert_eq!(z, y, "{kernel:?}");
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (m, k, n) = (500, 700, 113);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 104_729) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let run = |threads: usize| {
            let mut c = vec![0f32; m * n];
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| unsafe {
                sgemm(
                    m,
                    k,
                    n,
                    Mat {
                        ptr: a.as_ptr(),
                        rs: k as isize,
                        cs: 1,
                    },
                    Mat {
                        ptr: b.as_ptr(),
                        rs: n as isize,
                        cs: 1,
                    },
                    c.as_mut_ptr(),
                    n,
                    false,
                    None,
                )
            });
            c
        };
        assert_eq!(run(1), run(2));
        assert_eq!(run(1), run(3));
    }
}
