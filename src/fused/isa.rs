//! Run-time choice of instruction set for the host kernels (here, below
//! `kernels`, so that the training ops of this module share them).

/// Instruction set the kernels run with, detected once per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Generic,
}

impl Isa {
    /// The best instruction set this CPU supports (std caches the probe).
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
            {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Generic
    }
}

/// `a * b + c`, fused where the target has FMA (without it `mul_add` would
/// be a libm call).
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// Defines `$name(isa, args..)` that runs `$imp::<FMA>(args..)` compiled for
/// the detected instruction set (the loops inside are auto-vectorised).
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident => $imp:ident ( $($arg:ident : $ty:ty),* $(,)? )) => {
        $(#[$meta])*
        $vis fn $name(isa: $crate::fused::isa::Isa, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
            fn v4($($arg: $ty),*) {
                $imp::<true>($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn v3($($arg: $ty),*) {
                $imp::<true>($($arg),*)
            }
            match isa {
                // SAFETY: `Isa::Avx512` comes only from `Isa::detect`, after a
                // runtime check of exactly these features.
                #[cfg(target_arch = "x86_64")]
                $crate::fused::isa::Isa::Avx512 => unsafe { v4($($arg),*) },
                // SAFETY: as above, for AVX2 and FMA.
                #[cfg(target_arch = "x86_64")]
                $crate::fused::isa::Isa::Avx2 => unsafe { v3($($arg),*) },
                $crate::fused::isa::Isa::Generic => $imp::<false>($($arg),*),
            }
        }
    };
}

pub(crate) use multiversion;
