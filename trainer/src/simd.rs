//! Loops compiled for the widest vector instructions the CPU has, picked at run time by pulp
//! (AVX2 or AVX-512 on x86-64): a release build targets baseline x86-64, whose SSE2 leaves
//! the merge's per-value loops at a quarter of the width. The compiler may not reorder
//! floating-point operations, so a loop gives the same bits at every width.

/// A loop to compile for the CPU's vector width. `run` must be `#[inline(always)]` (and so must
/// what it calls), or it stays compiled for the baseline.
pub(crate) trait Kernel {
    /// What the loop returns.
    type Output;
    /// The loop.
    fn run(self) -> Self::Output;
}

/// Runs `kernel` compiled for this CPU's widest vector instructions.
pub(crate) fn vectorized<K: Kernel>(kernel: K) -> K::Output {
    pulp::Arch::new().dispatch(Dispatch(kernel))
}

struct Dispatch<K>(K);

impl<K: Kernel> pulp::WithSimd for Dispatch<K> {
    type Output = K::Output;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> K::Output {
        self.0.run()
    }
}
